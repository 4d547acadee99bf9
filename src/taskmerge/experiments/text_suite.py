"""The embedded default experiment: MiniLM on the offline text suite, end to end.

``prepare`` builds the data, trains (or loads) the frozen linear-probe heads and the fine-tuned
checkpoints; ``search`` runs every configured method through its grid; both are driven by the Hydra
config in ``configs/suite.yaml``. Scripts in ``training_scripts/`` and ``eval_scripts/`` are thin
wrappers over these functions.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from taskmerge.data import text_suite as data
from taskmerge.devices import config_device
from taskmerge.evaluate.metrics import accuracy
from taskmerge.models import text_encoder as family
from taskmerge.provenance import file_hash, git_commit, package_versions, write_json_atomic
from taskmerge.train import checkpoints as ckpt
from taskmerge.train.finetune import FinetuneConfig, finetune, wrap_encoder
from taskmerge.train.probe import train_probe

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[3]


def repo_path(p: str) -> Path:
    path = Path(p)
    return path if path.is_absolute() else REPO / path


def finetune_config(cfg: DictConfig) -> FinetuneConfig:
    fc = OmegaConf.to_container(cfg.finetune, resolve=True)
    fc.pop("name", None)
    return FinetuneConfig(**{**fc, "seed": cfg.seed, "epochs": cfg.budget.epochs})


@dataclass
class TextSuite:
    cfg: DictConfig
    tokenizer: object = None
    encoder: torch.nn.Module = None
    splits: dict = field(default_factory=dict)  # (task, split) -> Encoded
    heads: dict = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(self.cfg.tasks.names)

    @property
    def ckpt_root(self) -> Path:
        return repo_path(self.cfg.paths.checkpoints)

    def model_name(self) -> str:
        return self.cfg.model.name

    def checkpoint(self, task: str) -> Path:
        return ckpt.checkpoint_dir(self.ckpt_root, self.cfg.suite, self.model_name(), self.cfg.finetune.mode, task)

    # ---------------------------------------------------------------- data, model, heads
    def load(self) -> "TextSuite":
        device = config_device(self.cfg)  # checked before anything is built or written
        b = self.cfg.budget
        suite_dir = data.build_suite(repo_path(self.cfg.paths.data), seed=self.cfg.data_seed)
        self.tokenizer = family.load_tokenizer(self.cfg.model.path)
        self.encoder = family.load_encoder(self.cfg.model.path, self._tiny_config(), seed=self.cfg.seed).to(device)
        limits = {"train": b.max_train, "validation": b.max_eval, "test": b.max_test}
        for task in self.tasks:
            for split, limit in limits.items():
                texts, labels = data.load_split(suite_dir, task, split, limit)
                self.splits[(task, split)] = family.encode(self.tokenizer, texts, labels, self.cfg.model.max_length)
        self.labels = {t: data.label_names(suite_dir, t) for t in self.tasks}
        for task in self.tasks:
            self.heads[task] = self._head(task)
        return self

    def _tiny_config(self):
        c = self.cfg.model.get("config")
        return None if c is None else OmegaConf.to_container(c, resolve=True)

    def _head(self, task: str):
        path = ckpt.heads_dir(self.ckpt_root, self.cfg.suite, self.model_name()) / f"{task}.safetensors"
        if path.exists():
            return ckpt.load_head(path)
        feats = family.split_features(self.encoder, self.splits[(task, "train")], self.cfg.model.eval_batch_size)
        head = train_probe(feats, self.splits[(task, "train")].labels, len(self.labels[task]), seed=self.cfg.seed)
        ckpt.save_head(head, path, self.labels[task])
        return head

    def classifier(self, encoder, task):
        return family.Classifier(encoder, self.heads[task])

    # ---------------------------------------------------------------- fine-tuning
    def finetune_task(self, task: str, force: bool = False) -> dict:
        """Fine-tune ``task`` unless a matching checkpoint exists; returns its metadata."""
        path = self.checkpoint(task)
        fc = finetune_config(self.cfg)
        # what the checkpoint and its recorded accuracies depend on (not, e.g., the statistics budget)
        budget = {k: self.cfg.budget[k] for k in ("name", "max_train", "max_eval", "max_test", "epochs")}
        fingerprint = hashlib.sha256(json.dumps([vars(fc), budget, self.cfg.model.name], sort_keys=True,
                                                default=str).encode()).hexdigest()[:12]
        if ckpt.is_complete(path) and not force:
            meta = ckpt.load_metadata(path)
            if meta.get("fingerprint") != fingerprint:
                raise RuntimeError(f"{path} was trained with a different config; pass force=true to retrain "
                                   "it, or choose another suite name")
            return meta
        torch.manual_seed(fc.seed)
        encoder = wrap_encoder(copy.deepcopy(self.encoder), fc)
        model = self.classifier(encoder, task)
        t0 = time.perf_counter()
        losses = finetune(model, self.splits[(task, "train")], fc)
        bs = self.cfg.model.eval_batch_size
        meta = {
            "task": task, "mode": fc.mode, "suite": self.cfg.suite, "model": self.model_name(), "seed": fc.seed,
            "fingerprint": fingerprint, "config": OmegaConf.to_container(self.cfg, resolve=True),
            "train_examples": len(self.splits[(task, "train")]), "train_seconds": round(time.perf_counter() - t0, 1),
            "final_loss": losses[-1],
            "validation_accuracy": accuracy(model, self.splits[(task, "validation")], bs),
            "test_accuracy": accuracy(model, self.splits[(task, "test")], bs),
            "versions": package_versions(), "git_commit": git_commit(),
        }
        ckpt.save_checkpoint(path, encoder, self.heads[task], self.labels[task], meta)
        log.info("fine-tuned %s (%s): val %.3f test %.3f in %.0fs", task, fc.mode, meta["validation_accuracy"],
                 meta["test_accuracy"], meta["train_seconds"])
        return meta

    def pretrained_accuracy(self, evaluate) -> dict[str, float]:
        """``{"task/split": accuracy}`` of the pretrained encoder, cached beside the heads it depends on."""
        path = ckpt.heads_dir(self.ckpt_root, self.cfg.suite, self.model_name()) / "pretrained_accuracy.json"
        cached = json.loads(path.read_text()) if path.exists() else {}
        missing = [(t, s) for t in self.tasks for s in ("validation", "test") if f"{t}/{s}" not in cached]
        for task, split in missing:
            cached[f"{task}/{split}"] = evaluate(task, split)
        if missing:
            write_json_atomic(path, cached)
        return cached

    # ---------------------------------------------------------------- statistics
    def stats_path(self, task: str) -> Path:
        st = self.cfg.stats
        return (self.ckpt_root / self.cfg.suite / self.model_name() / "stats" / self.cfg.finetune.mode / task
                / f"{st.split}_{st.fisher}_{st.max_examples}.safetensors")

    def statistics(self, task: str, state: dict) -> dict:
        """Fisher and Gram statistics of the fine-tuned ``task`` model (``state``), computed once and cached."""
        from taskmerge.stats import ClassificationObjective, collect_statistics, load_statistics, save_statistics

        path = self.stats_path(task)
        if path.exists():
            return load_statistics(path, reference=state)[0]
        st = self.cfg.stats
        encoder = copy.deepcopy(self.encoder)
        encoder.load_state_dict(state)
        model = self.classifier(encoder, task)
        data = self.splits[(task, st.split)]
        batches = ({"input_ids": ids, "attention_mask": mask, "labels": y}
                   for ids, mask, y in data.batches(16, torch.arange(len(data))))
        objective = ClassificationObjective(forward=lambda m, b: m.head(family.sentence_features(
            m.encoder, b["input_ids"], b["attention_mask"], vmap_safe=True)))
        stats, meta = collect_statistics(
            model, batches, objective, fisher=st.fisher, max_examples=st.max_examples, seed=self.cfg.seed,
            name_map=lambda n: n[len("encoder."):] if n.startswith("encoder.") else None, split=st.split,
            model_id=str(self.checkpoint(task)))
        path.parent.mkdir(parents=True, exist_ok=True)
        save_statistics(path, stats, meta)
        return stats

    def lora_factors(self) -> list[dict]:
        from taskmerge.io.peft import load_lora_factors

        ref = self.encoder.state_dict()
        return [load_lora_factors(self.checkpoint(t) / "adapter", ref) for t in self.tasks]

    def finetuned_states(self) -> list[dict]:
        return [ckpt.load_encoder_state(self.checkpoint(t), self.encoder) for t in self.tasks]

    def checkpoints_id(self) -> str:
        """Identity of the fine-tuned set: hash of every checkpoint's weights and head."""
        h = hashlib.sha256()
        for t in self.tasks:
            h.update(file_hash(self.checkpoint(t)).encode())
        return h.hexdigest()[:16]


class TextEvaluator:
    """Evaluate a merged encoder state on a task's split with that task's frozen head."""

    def __init__(self, suite: TextSuite):
        self.suite, self.tasks = suite, suite.tasks
        self.encoder = copy.deepcopy(suite.encoder).eval()
        self._loaded = None

    def evaluate(self, state, task: str, split: str) -> float:
        if state is not self._loaded:
            self.encoder.load_state_dict(state)
            self._loaded = state
        model = self.suite.classifier(self.encoder, task)
        return accuracy(model, self.suite.splits[(task, split)], self.suite.cfg.model.eval_batch_size)


def compose_config(overrides=()) -> DictConfig:
    """configs/suite.yaml with Hydra overrides, outside a Hydra app (for the ``taskmerge`` CLI)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return compose("suite", overrides=list(overrides))


def compute_statistics(cfg: DictConfig) -> dict[str, Path]:
    """Statistics of every configured task's fine-tuned model (``task=`` picks one); returns their files."""
    suite = TextSuite(cfg).load()
    tasks = [cfg.task] if cfg.task else suite.tasks
    out = {}
    for task in tasks:
        suite.finetune_task(task, force=False)
        suite.statistics(task, ckpt.load_encoder_state(suite.checkpoint(task), suite.encoder))
        out[task] = suite.stats_path(task)
    return out
