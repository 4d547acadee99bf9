"""The CLIP vision experiments (TALL/TSV/OPCM per-task, KnOTS per-task and joint), end to end.

``VisionSuite`` builds the CLIP family, the tasks (torchvision data or synthetic images), the
cached zero-shot heads and the fine-tuned encoders (trained here, or imported: safetensors,
Hugging Face folders, peft adapters); ``run`` hands them to the shared search engine
(``search.engine``) and store, then writes the report. Config: ``configs/vision/`` (Hydra).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from taskmerge.data import vision as vdata
from taskmerge.devices import config_device
from taskmerge.evaluate.joint import JointLabels, joint_topk
from taskmerge.evaluate.metrics import accuracy
from taskmerge.experiments.text_suite import repo_path
from taskmerge.models.clip import ClipFamily, ZeroShotHead, align_vision_keys
from taskmerge.provenance import file_hash, git_commit, package_versions, write_json_atomic
from taskmerge.train import checkpoints as ckpt
from taskmerge.train.clip_finetune import ClipFinetuneConfig, finetune_clip
from taskmerge.train.finetune import wrap_encoder

log = logging.getLogger(__name__)


def task_names(cfg: DictConfig) -> list[str]:
    names = list(cfg.tasks.names)
    if cfg.get("order_seed") is not None:  # OPCM: a random task order per seed (10 seeds in the paper)
        random.Random(int(cfg.order_seed)).shuffle(names)
    return names


@dataclass
class VisionSuite:
    cfg: DictConfig
    family: ClipFamily = None
    tasks: dict = field(default_factory=dict)  # name -> VisionTask
    heads: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return task_names(self.cfg)

    @property
    def root(self) -> Path:
        return repo_path(self.cfg.paths.checkpoints) / self.cfg.suite / self.cfg.model.name

    def checkpoint(self, task: str) -> Path:
        return self.root / self.cfg.finetune.mode / task

    def load(self) -> "VisionSuite":
        device = config_device(self.cfg)  # checked before anything is built or written
        m = self.cfg.model
        arch = m.arch if isinstance(m.arch, str) else OmegaConf.to_container(m.arch)
        self.family = ClipFamily.build(m.backend, arch, m.name, seed=self.cfg.seed, path=m.get("path"),
                                       text_leftovers=m.get("text_leftovers", True)).to(device)
        t = self.cfg.tasks
        for name in self.names:
            if t.source == "synthetic":
                sizes = {"train": t.train, "validation": t.validation, "test": t.test}
                task = vdata.synthetic_task(name, int(t.num_classes[name]), self.family.image_size, sizes,
                                            seed=self.cfg.data_seed)
            else:
                task = vdata.load_task(name, t.root, t.protocol, vdata.clip_transform(self.family.image_size),
                                       seed=self.cfg.data_seed, num_workers=t.get("num_workers", 0))
            limits = self.cfg.budget
            task.splits = {s: sp.head(limits.get(f"max_{s}")) for s, sp in task.splits.items()}
            self.tasks[name] = task
            self.heads[name] = self._head(task)
        return self

    def _head(self, task) -> ZeroShotHead:
        imported = self.cfg.finetuned.get("heads")
        if imported:
            from taskmerge.models.clip import load_head

            return load_head(Path(imported.format(task=task.name)))
        return self.family.head(self.root / "heads" / f"{task.name}.safetensors", task.classnames, task.templates)

    def classifier(self, encoder, task: str):
        return self.family.classifier(encoder, self.heads[task])

    # ------------------------------------------------------------ fine-tuning
    def finetune_config(self, task: str) -> ClipFinetuneConfig:
        fc = OmegaConf.to_container(self.cfg.finetune, resolve=True)
        epochs = (fc.pop("epochs", None) or {}).get(task)
        fc.pop("name", None)
        out = ClipFinetuneConfig(**fc, seed=self.cfg.seed)
        if epochs is not None:  # task-vectors counts epochs over the (90%) training split
            out.steps = vdata.num_steps(epochs, len(self.tasks[task].splits["train"]), out.batch_size)
        if self.cfg.budget.get("steps"):
            out.steps = int(self.cfg.budget.steps)
        out.warmup_steps = min(out.warmup_steps, out.steps)
        return out

    def finetune_task(self, task: str, accelerator=None, force: bool = False) -> dict:
        path = self.checkpoint(task)
        fc = self.finetune_config(task)
        fingerprint = hashlib.sha256(json.dumps([vars(fc), self.cfg.model.name, self.cfg.tasks.name],
                                                sort_keys=True, default=str).encode()).hexdigest()[:12]
        if ckpt.is_complete(path) and not force:
            meta = ckpt.load_metadata(path)
            if meta.get("fingerprint") != fingerprint:
                raise RuntimeError(f"{path} was trained with another config; pass force=true or change `suite`")
            return meta
        encoder = wrap_encoder(copy.deepcopy(self.family.encoder), fc)
        model = self.classifier(encoder, task)
        t0 = time.perf_counter()
        losses = finetune_clip(model, self.tasks[task].splits["train"], fc, accelerator)
        if accelerator is not None:
            accelerator.wait_for_everyone()
            encoder = accelerator.unwrap_model(model).encoder
            if not accelerator.is_main_process:
                return {}
        bs = self.cfg.model.eval_batch_size
        model = self.classifier(encoder, task)
        meta = {"task": task, "mode": fc.mode, "suite": self.cfg.suite, "model": self.cfg.model.name,
                "fingerprint": fingerprint, "steps": fc.steps, "final_loss": losses[-1],
                "train_seconds": round(time.perf_counter() - t0, 1),
                "validation_accuracy": accuracy(model, self.tasks[task].splits["validation"], bs),
                "test_accuracy": accuracy(model, self.tasks[task].splits["test"], bs),
                "config": OmegaConf.to_container(self.cfg, resolve=True), "versions": package_versions(),
                "git_commit": git_commit()}
        _save(path, encoder, meta)
        log.info("fine-tuned %s (%s, %d steps): val %.3f test %.3f", task, fc.mode, fc.steps,
                 meta["validation_accuracy"], meta["test_accuracy"])
        return meta

    # ------------------------------------------------------------ fine-tuned models
    def _source(self, task: str) -> Path | None:
        pattern = self.cfg.finetuned.get("pattern")
        return Path(pattern.format(task=task)) if pattern else None

    def finetuned_states(self) -> list[dict]:
        from taskmerge.io.load import load_model

        pretrained = self.family.encoder_state()
        out = []
        for t in self.names:
            src = self._source(t)
            if src is None:
                out.append(ckpt.load_encoder_state(self.checkpoint(t), self.family.encoder))
                continue
            sd = align_vision_keys(load_model(src, pretrained=pretrained), pretrained)  # both HF layouts
            missing = [k for k in pretrained if k not in sd]
            if [k for k in missing if k.startswith(("visual.", "vision_model."))]:
                raise ValueError(f"{src}: lacks encoder tensors such as {missing[:3]}")
            out.append({k: (sd[k] if k in sd else v).to(v.dtype) for k, v in pretrained.items()})
        return out

    def lora_factors(self) -> list[dict]:
        from taskmerge.io.peft import load_lora_factors

        pretrained = self.family.encoder_state()
        return [load_lora_factors(self._source(t) or self.checkpoint(t) / "adapter", pretrained) for t in self.names]

    def checkpoints_id(self) -> str:
        h = hashlib.sha256()
        for t in self.names:
            h.update(file_hash(self._source(t) or self.checkpoint(t)).encode())
        return h.hexdigest()[:16]


def _save(path: Path, encoder, meta: dict) -> None:
    """model.safetensors (full) or adapter/ (lora), then metadata.json last, atomically."""
    def write(folder: Path) -> None:
        if meta["mode"] == "full":
            save_file({k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()},
                      str(folder / "model.safetensors"))
        else:
            encoder.save_pretrained(str(folder / "adapter"))

    ckpt.install_checkpoint(path, write, meta)


class VisionEvaluator:
    """Per-task setting: a merged encoder state on a task's split with that task's own head."""

    def __init__(self, suite: VisionSuite):
        self.suite, self.tasks = suite, suite.names
        self.encoder = copy.deepcopy(suite.family.encoder).eval()
        self._loaded = None

    def load(self, state):
        if state is not self._loaded:
            self.encoder.load_state_dict(state)
            self._loaded = state
        return self.encoder

    def evaluate(self, state, task: str, split: str) -> float:
        model = self.suite.classifier(self.load(state), task)
        return accuracy(model, self.suite.tasks[task].splits[split], self.suite.cfg.model.eval_batch_size)


class JointEvaluator(VisionEvaluator):
    """Joint setting (KnOTS): one pseudo-task ``joint_top3`` (the selection metric); every top-k and
    per-task top-k of the last evaluation is kept in ``last``."""

    def __init__(self, suite: VisionSuite):
        super().__init__(suite)
        s = suite
        self.labels = JointLabels.build({t: s.tasks[t].classnames for t in s.names}, s.names)
        weights = {t: s.heads[t].weight for t in s.names}
        self.head = ZeroShotHead(self.labels.joint_weight(weights), s.heads[s.names[0]].projection)
        self.tasks = ("joint_top3",)
        self.last: dict = {}

    def evaluate(self, state, task: str, split: str) -> float:
        model = self.suite.family.classifier(self.load(state), self.head)
        splits = {t: self.suite.tasks[t].splits[split] for t in self.suite.names}
        self.last = joint_topk(model, splits, self.labels, self.suite.cfg.model.eval_batch_size)
        return self.last[task]


def prepare(cfg: DictConfig, accelerator=None) -> VisionSuite:
    suite = VisionSuite(cfg).load()
    if not cfg.finetuned.get("pattern"):
        for t in suite.names:
            suite.finetune_task(t, accelerator, force=cfg.force)
    return suite


def references(suite: VisionSuite, evaluator, pretrained, finetuned) -> dict:
    """(fine-tuned, pretrained) accuracy per (task, split); joint: fine-tuned reference 1.0 (none exists)."""
    refs = {}
    for split in ("validation", "test"):
        if isinstance(evaluator, JointEvaluator):
            refs[("joint_top3", split)] = (1.0, evaluator.evaluate(pretrained, "joint_top3", split))
            continue
        for i, t in enumerate(suite.names):
            refs[(t, split)] = (evaluator.evaluate(finetuned[i], t, split), evaluator.evaluate(pretrained, t, split))
    return refs


def run(cfg: DictConfig) -> dict:
    from taskmerge.search.engine import SearchContext, search_method, write_baselines
    from taskmerge.search.spaces import spaces_from_config, validate_spaces
    from taskmerge.search.store import ResultStore, experiment_identity

    validate_spaces(cfg, cfg.finetune.mode == "lora", repo_path(cfg.paths.results) / f"{cfg.experiment}.csv")
    t_start = time.perf_counter()
    suite = prepare(cfg)
    joint = cfg.setting.name == "joint"
    evaluator = JointEvaluator(suite) if joint else VisionEvaluator(suite)
    pretrained = suite.family.encoder_state()
    finetuned = suite.finetuned_states()
    refs = references(suite, evaluator, pretrained, finetuned)
    lora = suite.lora_factors() if cfg.finetune.mode == "lora" else None
    ctx = SearchContext(cfg.experiment, pretrained, finetuned, evaluator, refs, suite.checkpoints_id(), cfg.seed,
                        method_context=lambda m: {"device": config_device(cfg), **({"lora": lora} if m.inputs == "lora" else {})})
    store = ResultStore(repo_path(cfg.paths.results) / f"{cfg.experiment}.csv", experiment_identity(cfg))
    write_baselines(ctx, store)
    selected = {}
    for space in spaces_from_config(cfg.methods, cfg.search):
        if space.method in ("knots", "lora_merge") and lora is None:
            raise ValueError(f"method {space.method} merges LoRA factors: use finetune=lora (KnOTS settings)")
        selected[space.name] = best = search_method(space, ctx, store)
        if joint:
            best["joint_test"] = _joint_all_k(ctx, space, best, evaluator)
        log.info("%s: selected %s (val %.3f, test %.3f)", space.name, best["hparams"], best["val"], best["test"])
    out = {"csv": store.path, "selected": selected, "profile": ctx.profile}
    if cfg.get("report", True):
        from taskmerge.report import write_report

        out.update(write_report(store.path))
    out["total_seconds"] = time.perf_counter() - t_start
    if joint:
        write_json_atomic(store.path.with_suffix(".joint.json"),
                          {m: b["joint_test"] for m, b in selected.items()})
    return out


def _joint_all_k(ctx, space, best, evaluator: JointEvaluator) -> dict:
    """Every pooled and per-task top-k on test at the selected point (the CSV holds joint top-3)."""
    from taskmerge.merging.registry import get_method

    m = get_method(space.method)
    merged = m(ctx.pretrained, ctx.finetuned, best["hparams"], **ctx.method_context(m))
    evaluator.evaluate(merged, "joint_top3", "test")
    return dict(evaluator.last)
