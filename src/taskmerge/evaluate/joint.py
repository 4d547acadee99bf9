"""The KnOTS joint setting: one head over the union of all tasks' classes, pooled top-k.

KnOTS (``evaluate_cliphead_joint``) classifies every test image of every task against one head of
748 classes: the 758 local classes of the 8 tasks, with MNIST's and SVHN's digits sharing the same
10 joint classes. Top-1/3/5/10 are pooled over all examples (a micro average, weighted by task
size); hyperparameters are selected on joint top-3.

``JointLabels`` maps each task's local labels to joint indices: tasks listed together in a
``shared`` group share one joint class per identical class name (default: MNIST with SVHN);
every other class gets its own index, in task order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from taskmerge.evaluate.metrics import Split

DEFAULT_SHARED = (("MNIST", "SVHN"),)
TOPK = (1, 3, 5, 10)


@dataclass
class JointLabels:
    tasks: list[str]
    mapping: dict[str, torch.Tensor]  # task -> [num local classes] joint indices
    classnames: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, classnames: Mapping[str, Sequence[str]], tasks: Sequence[str] | None = None,
              shared: Sequence[Sequence[str]] = DEFAULT_SHARED) -> "JointLabels":
        tasks = list(tasks or classnames)
        group_of = {t: i for i, g in enumerate(shared) for t in g}
        seen: dict[tuple, int] = {}  # (group, classname) -> joint index
        names, mapping = [], {}
        for t in tasks:
            idx = []
            for c in classnames[t]:
                key = (group_of[t], c) if t in group_of else (t, c)
                if key not in seen:
                    seen[key] = len(names)
                    names.append(c)
                idx.append(seen[key])
            if len(set(idx)) != len(idx):
                raise ValueError(f"task {t}: duplicate class names {classnames[t]}")
            mapping[t] = torch.tensor(idx)
        return cls(tasks, mapping, names)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def to_joint(self, task: str, labels: torch.Tensor) -> torch.Tensor:
        return self.mapping[task][labels]

    def joint_weight(self, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[num joint classes, D] from per-task head weights [C_t, D] (a shared class: first task's row)."""
        d = next(iter(weights.values())).shape[1]
        out = torch.full((self.num_classes, d), float("nan"))
        filled = torch.zeros(self.num_classes, dtype=torch.bool)
        for t in self.tasks:
            w, idx = weights[t].cpu(), self.mapping[t]  # heads may sit on the script's device
            if w.shape[0] != len(idx):
                raise ValueError(f"task {t}: head has {w.shape[0]} classes, the label map {len(idx)}")
            new = ~filled[idx]
            out[idx[new]] = w[new].float()
            filled[idx] = True
        return out


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = TOPK) -> dict[int, int]:
    """How many rows have their label among the top-k logits, for each k (k capped at the class count)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == labels.unsqueeze(1)
    return {k: int(hit[:, :min(k, kmax)].any(1).sum()) for k in ks}


@torch.inference_mode()
def joint_topk(model: torch.nn.Module, splits: Mapping[str, Split], labels: JointLabels,
               batch_size: int = 128, ks: Sequence[int] = TOPK) -> dict[str, float]:
    """Pooled ``joint_top{k}`` over every task's split, plus ``<task>_top{k}`` per task.

    ``model(images) -> joint logits`` (the encoder under the joint head).
    """
    from taskmerge.devices import module_device

    model.eval()
    device = module_device(model)
    total, hits = 0, dict.fromkeys(ks, 0)
    out = {}
    for task, split in splits.items():
        n, task_hits = 0, dict.fromkeys(ks, 0)
        for images, y in split.batches(batch_size):
            c = topk_correct(model(images.to(device)).cpu(), labels.to_joint(task, y), ks)
            for k in ks:
                task_hits[k] += c[k]
            n += len(y)
        for k in ks:
            out[f"{task}_top{k}"] = task_hits[k] / max(n, 1)
            hits[k] += task_hits[k]
        total += n
    out.update({f"joint_top{k}": hits[k] / max(total, 1) for k in ks})
    return out
