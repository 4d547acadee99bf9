"""The CLIP vision experiments' adapter (TALL/TSV/OPCM per-task, KnOTS per-task and joint).

``VisionSuite`` builds the CLIP family, the tasks (torchvision data or synthetic images), the
cached zero-shot heads and the fine-tuned encoders (trained here, or imported: safetensors,
Hugging Face folders, peft adapters); ``experiments.runner.run`` does the rest. In the joint
setting (KnOTS) one head covers every class, the selection metric is pooled joint top-3 and every
top-k at the selection goes to ``results/<experiment>.joint.json``. Config: ``configs/vision.yaml``.
"""
from __future__ import annotations

import copy
import functools
import random
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from taskmerge.data import vision as vdata
from taskmerge.devices import config_device
from taskmerge.evaluate.joint import JointLabels, joint_topk
from taskmerge.data import declared
from taskmerge.evaluate.metrics import score
from taskmerge.experiments import runner
from taskmerge.experiments.runner import Adapter, repo_path
from taskmerge.io.load import load_model
from taskmerge.io.peft import load_lora_factors
from taskmerge.models.clip import ClipFamily, ZeroShotHead, align_vision_keys, load_head
from taskmerge.provenance import write_json_atomic
from taskmerge.train import checkpoints as ckpt
from taskmerge.train.clip_finetune import ClipFinetuneConfig, finetune_clip
from taskmerge.train.finetune import wrap_encoder



def task_names(cfg: DictConfig) -> list[str]:
    names = list(cfg.tasks.names) if cfg.tasks.get("names") else \
        [n for d in declarations(cfg) for n in declared.read_declarations(d)]
    if cfg.get("order_seed") is not None:  # OPCM: a random task order per seed (10 seeds in the paper)
        random.Random(int(cfg.order_seed)).shuffle(names)
    return names


def declarations(cfg: DictConfig) -> list[Path]:
    """``tasks.declared`` (``tasks.source=declared``): files or folders declaring image tasks."""
    d = cfg.tasks.get("declared")
    if not d:
        raise declared.DeclarationError("tasks.source=declared needs tasks.declared=<YAML file or folder>")
    return [repo_path(str(p)) for p in ([d] if isinstance(d, str) else d)]


@dataclass(eq=False)
class VisionSuite(Adapter):
    cfg: DictConfig
    accelerator: object = None  # an ``accelerate.Accelerator`` for a multi-process fine-tune
    family: ClipFamily = None
    data: dict = field(default_factory=dict)  # name -> VisionTask
    heads: dict = field(default_factory=dict)
    declared: dict = field(default_factory=dict)  # name -> data.declared.TaskData (tasks.source=declared)
    joint_test: dict = field(default_factory=dict)  # joint setting: every top-k at each selection
    why_not = {"layer_stats": "the vision setting computes no statistics (no calibration examples or Gram pass over "
                              "its images; regmean, fisher and mats are skipped here too), and open_clip's fused "
                              "q/k/v (nn.MultiheadAttention.in_proj_weight) is no nn.Linear for RegMean's closed form"}

    @property
    def tasks(self) -> list[str]:
        return task_names(self.cfg)

    @property
    def inputs(self) -> frozenset[str]:
        return frozenset({"kinds"} | ({"lora"} if self.cfg.finetune.mode == "lora" else set()))

    @property
    def joint(self) -> bool:
        return self.cfg.setting.name == "joint"

    @property
    def root(self) -> Path:
        return repo_path(self.cfg.paths.checkpoints) / self.cfg.suite / self.cfg.model.name

    @functools.cached_property
    def checkpoints(self) -> ckpt.TaskCheckpoints:
        """``checkpoints/<suite>/<model>/<mode>/<task>/``, fingerprinted by the task's fine-tuning
        config, the model and the task list (or imported: ``finetuned.pattern``)."""
        c = self.cfg
        out = self.make_checkpoints(self.root / c.finetune.mode, lambda task: {
            "finetune": vars(self.finetune_config(task)), "model": c.model.name, "tasks": c.tasks.name,
            **({"data": self.declared[task].fingerprint} if task in self.declared else {})})
        out.writer = self.accelerator is None or self.accelerator.is_main_process
        return out

    def load(self) -> "VisionSuite":
        device = config_device(self.cfg)  # checked before anything is built or written
        m = self.cfg.model
        arch = m.arch if isinstance(m.arch, str) else OmegaConf.to_container(m.arch)
        self.family = ClipFamily.build(m.backend, arch, m.name, seed=self.cfg.seed, path=m.get("path"),
                                       text_leftovers=m.get("text_leftovers", True)).to(device)
        t = self.cfg.tasks
        if t.source == "declared":  # every declared task is checked before anything is written
            names = list(t.names) if t.get("names") else None
            self.declared = declared.resolve_tasks(names, declarations(self.cfg), repo_path(t.get("data", ".data")),
                                                   seed=self.cfg.data_seed)
            texts = [n for n, d in self.declared.items() if d.kind != "image"]
            if texts:
                raise declared.DeclarationError(f"task {texts[0]!r} is a text task: run it with "
                                                "eval_scripts/run_suite.py (tasks=own)")
        for name in self.tasks:
            if t.source == "declared":
                task = vdata.declared_task(self.declared[name], vdata.clip_transform(self.family.image_size),
                                           t.get("num_workers", 0))
            elif t.source == "synthetic":
                sizes = {"train": t.train, "validation": t.validation, "test": t.test}
                task = vdata.synthetic_task(name, int(t.num_classes[name]), self.family.image_size, sizes,
                                            seed=self.cfg.data_seed)
            else:
                task = vdata.load_task(name, t.root, t.protocol, vdata.clip_transform(self.family.image_size),
                                       seed=self.cfg.data_seed, num_workers=t.get("num_workers", 0))
            limits = self.cfg.budget
            task.splits = {s: sp.head(limits.get(f"max_{s}")) for s, sp in task.splits.items()}
            self.data[name] = task
            self.heads[name] = self._head(task)
        return self

    def _head(self, task) -> ZeroShotHead:
        imported = self.cfg.finetuned.get("heads")
        if imported:
            return load_head(Path(imported.format(task=task.name)))
        d = self.declared.get(task.name)
        name = task.name if d is None else f"{task.name}-{d.fingerprint}"  # a declared task's head: its labels
        return self.family.head(self.root / "heads" / f"{name}.safetensors", task.classnames, task.templates)

    def metric(self, task: str) -> str:
        return self.declared[task].metric if task in self.declared else "accuracy"

    def classifier(self, encoder, task: str):
        return self.family.classifier(encoder, self.heads[task])

    # ------------------------------------------------------------ fine-tuning
    def finetune_config(self, task: str) -> ClipFinetuneConfig:
        fc = OmegaConf.to_container(self.cfg.finetune, resolve=True)
        epochs = (fc.pop("epochs", None) or {}).get(task)
        fc.pop("name", None)
        out = ClipFinetuneConfig(**fc, seed=self.cfg.seed)
        if epochs is not None:  # task-vectors counts epochs over the (90%) training split
            out.steps = vdata.num_steps(epochs, len(self.data[task].splits["train"]), out.batch_size)
        if self.cfg.budget.get("steps"):
            out.steps = int(self.cfg.budget.steps)
        out.warmup_steps = min(out.warmup_steps, out.steps)
        return out

    def finetune_task(self, task: str) -> dict:
        """Fine-tune ``task`` unless a matching checkpoint exists (``force=true`` retrains); its metadata
        (empty in the non-main processes of a multi-process run)."""
        return self.checkpoints.ensure(task, functools.partial(self.train, task))

    def train(self, task: str, folder: Path) -> dict:
        fc, acc = self.finetune_config(task), self.accelerator
        encoder = wrap_encoder(copy.deepcopy(self.family.encoder), fc)
        model = self.classifier(encoder, task)
        losses = finetune_clip(model, self.data[task].splits["train"], fc, acc)
        if acc is not None:
            acc.wait_for_everyone()
            encoder = acc.unwrap_model(model).encoder
            if not acc.is_main_process:
                return {}
        bs = self.cfg.model.eval_batch_size
        model = self.classifier(encoder, task)
        meta = {"suite": self.cfg.suite, "model": self.cfg.model.name, "steps": fc.steps, "final_loss": losses[-1],
                **{f"{s}_accuracy": score(model, self.data[task].splits[s], bs, self.metric(task))
                   for s in runner.SPLITS}}
        if fc.mode == "full":
            save_file({k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()},
                      str(folder / "model.safetensors"))
        else:
            encoder.save_pretrained(str(folder / "adapter"))
        return meta

    # ------------------------------------------------------------ what the runner merges
    @property
    def model(self):
        return self.family.encoder

    def pretrained_state(self) -> dict:
        return self.family.encoder_state()

    def finetuned_state(self, task: str, source: Path) -> dict:
        if not self.checkpoints.pattern:
            return ckpt.load_encoder_state(source, self.family.encoder)
        pretrained = self.family.encoder_state()
        sd = align_vision_keys(load_model(source, pretrained=pretrained), pretrained)  # both HF layouts
        missing = [k for k in pretrained if k not in sd]
        if [k for k in missing if k.startswith(("visual.", "vision_model."))]:
            raise ValueError(f"{source}: lacks encoder tensors such as {missing[:3]}")
        return {k: (sd[k] if k in sd else v).to(v.dtype) for k, v in pretrained.items()}

    def lora_factors(self, task: str, source: Path) -> dict:
        return load_lora_factors(source if self.checkpoints.pattern else source / "adapter",
                                 self.family.encoder_state())

    @functools.cached_property
    def _evaluator(self):
        return JointEvaluator(self) if self.joint else VisionEvaluator(self)

    def evaluator(self):
        return self._evaluator

    def selected(self, name: str, best: dict, merge) -> None:
        """Joint setting: every pooled and per-task top-k on test at the selected point (the CSV holds
        joint top-3), in ``results/<experiment>.joint.json``."""
        if not self.joint:
            return
        evaluator = self.evaluator()
        evaluator.evaluate(merge(best["hparams"]), "joint_top3", "test")
        best["joint_test"] = self.joint_test[name] = dict(evaluator.last)
        write_json_atomic(runner.results_csv(self.cfg).with_suffix(".joint.json"), self.joint_test)


class VisionEvaluator:
    """Per-task setting: a merged encoder state on a task's split with that task's own head."""

    def __init__(self, suite: VisionSuite):
        self.suite, self.tasks = suite, suite.tasks
        self.encoder = copy.deepcopy(suite.family.encoder).eval()
        self._loaded = None

    def load(self, state):
        if state is not self._loaded:
            self.encoder.load_state_dict(state)
            self._loaded = state
        return self.encoder

    def evaluate(self, state, task: str, split: str) -> float:
        model = self.suite.classifier(self.load(state), task)
        return score(model, self.suite.data[task].splits[split], self.suite.cfg.model.eval_batch_size,
                     self.suite.metric(task))


class JointEvaluator(VisionEvaluator):
    """Joint setting (KnOTS): one pseudo-task ``joint_top3`` (the selection metric); every top-k and
    per-task top-k of the last evaluation is kept in ``last``."""

    def __init__(self, suite: VisionSuite):
        super().__init__(suite)
        s = suite
        self.labels = JointLabels.build({t: s.data[t].classnames for t in s.tasks}, s.tasks)
        weights = {t: s.heads[t].weight for t in s.tasks}
        self.head = ZeroShotHead(self.labels.joint_weight(weights), s.heads[s.tasks[0]].projection)
        self.tasks = ("joint_top3",)
        self.finetuned_reference = 1.0  # no fine-tuned model covers every class: normalized = absolute
        self.last: dict = {}

    def evaluate(self, state, task: str, split: str) -> float:
        model = self.suite.family.classifier(self.load(state), self.head)
        splits = {t: self.suite.data[t].splits[split] for t in self.suite.tasks}
        self.last = joint_topk(model, splits, self.labels, self.suite.cfg.model.eval_batch_size)
        return self.last[task]


def run(cfg: DictConfig) -> dict:
    """A vision setting end to end (``eval_scripts/run_vision.py``)."""
    return runner.run(VisionSuite(cfg))
