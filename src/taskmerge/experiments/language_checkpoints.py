"""Per-task checkpoints of the language experiments: reuse across runs, fingerprints, statistics cache.

Layout ``<paths.checkpoints>/<experiment>/<task>/``:

- T5 full: ``model.safetensors`` (the trainable state, tied aliases dropped);
- T5 IA3: ``adapter/`` (a peft adapter folder with the IA3 vectors);
- Llama LoRA: ``adapter/`` (peft) and ``head.safetensors`` (the task's ``score`` head);
- ``statistics.safetensors`` (T5, written the first time a method needs statistics);
- ``metadata.json``: fingerprint, train time, validation accuracy. The folder is built in a hidden
  sibling and renamed into place with ``metadata.json`` written last, so a crash never leaves a
  folder that looks complete; a folder without ``metadata.json`` is retrained.

A complete checkpoint is reused when its fingerprint (a hash of what training and the recorded
accuracy depend on) matches the config, refused with a clear error when it does not (``force=true``
retrains, or change ``experiment``). ``finetuned.pattern`` imports existing checkpoints instead.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from taskmerge.experiments.text_suite import repo_path
from taskmerge.io.tensors import load_safetensors
from taskmerge.provenance import file_hash, git_commit, package_versions
from taskmerge.train import checkpoints as ckpt

log = logging.getLogger(__name__)

META, STATS, HEAD, ADAPTER, FULL = "metadata.json", "statistics.safetensors", "head.safetensors", "adapter", \
    "model.safetensors"
_NOT_WEIGHTS = (META, STATS, "README.md")  # peft writes a README; neither it nor the stats are the model


def config_fingerprint(cfg: DictConfig, task: str) -> str:
    """sha256 of what a task's checkpoint and its recorded accuracy depend on."""
    def plain(node):
        return OmegaConf.to_container(node, resolve=True)

    parts = {"setting": cfg.setting, "finetune": plain(cfg.finetune), "model": plain(cfg.model), "task": task,
             "budget": plain(cfg.budget), "seed": cfg.seed, "mode": cfg.finetune.mode}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class TaskCheckpoints:
    """Where each task's fine-tuned weights live, and whether they can be reused."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.root = repo_path(cfg.paths.get("checkpoints", "checkpoints")) / cfg.experiment
        self.force = bool(cfg.get("force", False))
        self.pattern = (cfg.get("finetuned") or {}).get("pattern")
        self._fingerprints: dict[str, str] = {}

    def path(self, task: str) -> Path:
        return self.root / task

    def source(self, task: str) -> Path:
        """The weights to load: the imported checkpoint (``finetuned.pattern``) or our own folder."""
        if self.pattern:
            src = Path(self.pattern.format(task=task))
            if not src.exists():
                raise FileNotFoundError(f"finetuned.pattern gives {src} for task {task}: no such file or folder")
            return src
        return self.path(task)

    def fingerprint(self, task: str) -> str:
        """The trained checkpoint's fingerprint, or ``import:<file hash>`` for an imported one."""
        if task not in self._fingerprints:
            self._fingerprints[task] = (f"import:{file_hash(self.source(task))}" if self.pattern
                                        else ckpt.load_metadata(self.path(task))["fingerprint"])
        return self._fingerprints[task]

    def ensure(self, task: str, train: Callable[[Path], dict]) -> dict:
        """Reuse ``task``'s complete checkpoint, or call ``train(folder)`` (writes the weights into
        ``folder``, returns metadata such as ``validation_accuracy``) and install the result."""
        if self.pattern:
            log.info("%s: using %s (finetuned.pattern)", task, self.source(task))
            return {"fingerprint": self.fingerprint(task), "source": str(self.source(task))}
        path, fp = self.path(task), config_fingerprint(self.cfg, task)
        if ckpt.is_complete(path) and not self.force:
            meta = ckpt.load_metadata(path)
            if meta.get("fingerprint") != fp:
                raise RuntimeError(
                    f"{path} holds a checkpoint fine-tuned with another config (fingerprint "
                    f"{meta.get('fingerprint')}, this config {fp}); pass force=true to retrain it, or change "
                    f"`experiment` to keep both")
            log.info("%s: reusing %s (val %.3f)", task, path, meta.get("validation_accuracy", float("nan")))
            return meta
        if path.exists():
            log.info("%s: %s", task, "force=true: retraining" if ckpt.is_complete(path) else
                     f"{path} is incomplete (no {META}): retraining")
        meta = {"task": task, "experiment": self.cfg.experiment, "setting": self.cfg.setting,
                "mode": self.cfg.finetune.mode, "model": self.cfg.model.path, "seed": self.cfg.seed,
                "fingerprint": fp, "config": OmegaConf.to_container(self.cfg, resolve=True),
                "versions": package_versions(), "git_commit": git_commit()}
        meta = ckpt.install_checkpoint(path, train, meta)
        self._fingerprints.pop(task, None)
        log.info("%s: fine-tuned in %.0fs, val %.3f -> %s", task, meta.get("train_seconds", 0.0),
                 meta.get("validation_accuracy", float("nan")), path)
        return meta

    def checkpoints_id(self, tasks, extra: str = "") -> str:
        """Identity of the fine-tuned set for the CSV rows: fingerprints and a hash of the weight files
        (``extra``: anything else the merges depend on, e.g. the statistics budget)."""
        h = hashlib.sha256(extra.encode())
        for t in tasks:
            h.update(f"{t}:{self.fingerprint(t)}:{_weights_hash(self.source(t))};".encode())
        return h.hexdigest()[:16]

    def statistics(self, task: str, compute: Callable[[], tuple[dict, dict]]) -> dict[str, torch.Tensor]:
        """``task``'s statistics, cached beside its checkpoint and reused while the checkpoint
        fingerprint and ``stats.max_examples`` match."""
        from taskmerge.stats import load_statistics, save_statistics

        path = self.path(task) / STATS
        want = {"checkpoint_fingerprint": self.fingerprint(task), "max_examples": int(self.cfg.stats.max_examples)}
        if path.exists():
            stats, meta = load_statistics(path)
            if all(meta.get(k) == v for k, v in want.items()):
                log.info("%s: reusing statistics %s", task, path)
                return stats
        t0 = time.perf_counter()
        stats, meta = compute()
        save_statistics(path, stats, {**meta, **want})
        log.info("%s: statistics in %.0fs -> %s", task, time.perf_counter() - t0, path)
        return stats


def _weights_hash(path: Path) -> str:
    return file_hash(path, 64, exclude=_NOT_WEIGHTS)


# ---------------------------------------------------------------- saving and loading weights

def save_full(folder: Path, state: Mapping[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(folder / FULL))


def save_lora(folder: Path, peft_model, head_weight: torch.Tensor) -> None:
    peft_model.save_pretrained(str(folder / ADAPTER))
    save_file({"weight": head_weight.detach().contiguous()}, str(folder / HEAD))


def _adapter_folder(src: Path) -> Path | None:
    for folder in (src, src / ADAPTER):
        if (folder / "adapter_config.json").is_file():
            return folder
    return None


def _bare(key: str) -> str:
    """A tensor name without peft's prefix, adapter name or ``modules_to_save`` wrapper."""
    key = key.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")
    return key.removesuffix(".default")


def load_state(src: Path, template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of ``template`` (names and shapes of the trainable state) read from ``src``: a peft
    adapter folder (IA3), a checkpoint folder of ours, a ``.safetensors`` file or a Hugging Face folder."""
    from taskmerge.io.load import load_model
    from taskmerge.io.peft import read_adapter

    adapter = _adapter_folder(src)
    if adapter is not None:
        tensors, where = read_adapter(adapter)[1], adapter / "adapter_model.safetensors"
    elif (src / FULL).is_file():
        tensors, where = load_safetensors(src / FULL), src / FULL
    else:
        tensors, where = load_model(src), src
    by_name = {_bare(k): k for k in tensors}
    extra = sorted(set(by_name) - {_bare(k) for k in template})
    if adapter is not None and extra:  # an adapter on other modules would be silently half-used
        raise ValueError(f"{where}: adapter tensors the model does not train here: {extra[:3]}")
    out = {}
    for k, ref in template.items():
        name = by_name.get(_bare(k))
        if name is None:
            raise ValueError(f"{where}: lacks {k} (a checkpoint of another model or mode?)")
        t = tensors[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{where}: {name} has shape {tuple(t.shape)}, the model's {k} is {tuple(ref.shape)}")
        out[k] = t.to(ref.dtype)
    return out


def load_lora(src: Path, pretrained: Mapping[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(factors, head)`` of a LoRA checkpoint: our folder (``adapter/`` + ``head.safetensors``) or a
    peft SEQ_CLS adapter folder whose saved ``score`` module is the head."""
    from taskmerge.io.peft import load_lora_factors, read_adapter

    adapter = _adapter_folder(src)
    if adapter is None:
        raise ValueError(f"{src}: not a peft adapter folder (adapter_config.json missing)")
    factors = load_lora_factors(adapter, pretrained)
    for head_file in (src / HEAD, adapter / HEAD):
        if head_file.is_file():
            return factors, {"weight": load_safetensors(head_file)["weight"]}
    tensors = read_adapter(adapter)[1]
    score = [k for k in tensors if _bare(k) == "score.weight"]
    if not score:
        raise ValueError(f"{src}: no {HEAD} and the adapter saved no score head (modules_to_save)")
    return factors, {"weight": tensors[score[0]]}
