"""The embedded default experiment's adapter: MiniLM on the offline text suite.

``TextSuite`` builds the data, trains (or loads) the frozen linear-probe heads, fine-tunes each task
(full, LoRA or IA3) through the shared checkpoint mechanism, evaluates a merged encoder with a task's
own head and computes Fisher / Gram statistics; ``experiments.runner.run`` does the rest. Driven by the
Hydra config in ``configs/suite.yaml``; ``training_scripts/`` and ``eval_scripts/`` are thin wrappers.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from taskmerge.data import text_suite as data
from taskmerge.devices import config_device
from taskmerge.evaluate.metrics import accuracy
from taskmerge.experiments import runner
from taskmerge.experiments.runner import REPO, Adapter, repo_path
from taskmerge.io.peft import load_lora_factors
from taskmerge.models import text_encoder as family
from taskmerge.stats import ClassificationObjective, collect_statistics
from taskmerge.train import checkpoints as ckpt
from taskmerge.train.finetune import FinetuneConfig, finetune, wrap_encoder
from taskmerge.train.probe import train_probe


def finetune_config(cfg: DictConfig) -> FinetuneConfig:
    fc = OmegaConf.to_container(cfg.finetune, resolve=True)
    fc.pop("name", None)
    return FinetuneConfig(**{**fc, "seed": cfg.seed, "epochs": cfg.budget.epochs})


@dataclass(eq=False)
class TextSuite(Adapter):
    cfg: DictConfig
    tokenizer: object = None
    encoder: torch.nn.Module = None
    splits: dict = field(default_factory=dict)  # (task, split) -> Encoded
    heads: dict = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(self.cfg.tasks.names)

    @property
    def inputs(self) -> frozenset[str]:
        return frozenset({"kinds", "stats", "layer_stats"} | ({"lora"} if self.cfg.finetune.mode == "lora" else set()))

    @property
    def ckpt_root(self) -> Path:
        return repo_path(self.cfg.paths.checkpoints)

    @functools.cached_property
    def checkpoints(self) -> ckpt.TaskCheckpoints:
        """``checkpoints/<suite>/<model>/<mode>/<task>/``, fingerprinted by the fine-tuning config,
        the budget and the model."""
        c = self.cfg
        budget = {k: c.budget[k] for k in ("name", "max_train", "max_eval", "max_test", "epochs")}
        parts = {"finetune": vars(finetune_config(c)), "budget": budget, "model": c.model.name}
        return self.make_checkpoints(self.ckpt_root / c.suite / c.model.name / c.finetune.mode, lambda task: parts)

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
        path = ckpt.heads_dir(self.ckpt_root, self.cfg.suite, self.cfg.model.name) / f"{task}.safetensors"
        if path.exists():
            return ckpt.load_head(path)
        feats = family.split_features(self.encoder, self.splits[(task, "train")], self.cfg.model.eval_batch_size)
        head = train_probe(feats, self.splits[(task, "train")].labels, len(self.labels[task]), seed=self.cfg.seed)
        ckpt.save_head(head, path, self.labels[task])
        return head

    def classifier(self, encoder, task):
        return family.Classifier(encoder, self.heads[task])

    # ---------------------------------------------------------------- fine-tuning
    def finetune_task(self, task: str) -> dict:
        """Fine-tune ``task`` unless a matching checkpoint exists (``force=true`` retrains); its metadata."""
        return self.checkpoints.ensure(task, functools.partial(self.train, task))

    def train(self, task: str, folder: Path) -> dict:
        fc = finetune_config(self.cfg)
        torch.manual_seed(fc.seed)
        encoder = wrap_encoder(copy.deepcopy(self.encoder), fc)
        model = self.classifier(encoder, task)
        losses = finetune(model, self.splits[(task, "train")], fc)
        bs = self.cfg.model.eval_batch_size
        meta = {"suite": self.cfg.suite, "model": self.cfg.model.name,
                "train_examples": len(self.splits[(task, "train")]), "final_loss": losses[-1],
                **{f"{s}_accuracy": accuracy(model, self.splits[(task, s)], bs) for s in runner.SPLITS}}
        if fc.mode == "full":
            encoder.save_pretrained(str(folder), safe_serialization=True)
        else:
            encoder.save_pretrained(str(folder / "adapter"))
        ckpt.save_head(self.heads[task], folder / "head.safetensors", self.labels[task])
        return meta

    # ---------------------------------------------------------------- what the runner merges
    @property
    def model(self) -> torch.nn.Module:
        return self.encoder

    def pretrained_state(self) -> dict:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.encoder.state_dict().items()}  # CPU, as files

    def finetuned_state(self, task: str, source: Path) -> dict:
        return ckpt.load_encoder_state(source, self.encoder)

    def lora_factors(self, task: str, source: Path) -> dict:
        return load_lora_factors(source / "adapter", self.encoder.state_dict())

    def evaluator(self) -> "TextEvaluator":
        return TextEvaluator(self)

    # ---------------------------------------------------------------- statistics
    def statistics_settings(self) -> tuple[str, dict]:
        st = self.cfg.stats
        return f"{st.split}_{st.fisher}_{st.max_examples}", {"split": st.split, "fisher": st.fisher,
                                                             "max_examples": int(st.max_examples)}

    def statistics(self, task: str, state: dict) -> tuple[dict, dict]:
        """Fisher and Gram statistics of the fine-tuned ``task`` model (``state``) on ``stats.split``."""
        st = self.cfg.stats
        encoder = copy.deepcopy(self.encoder)
        encoder.load_state_dict(state)
        model = self.classifier(encoder, task)
        batches = ({"input_ids": ids, "attention_mask": mask, "labels": y}
                   for ids, mask, y in self._stats_batches(task))
        objective = ClassificationObjective(forward=lambda m, b: m.head(family.sentence_features(
            m.encoder, b["input_ids"], b["attention_mask"], vmap_safe=True)))
        return collect_statistics(
            model, batches, objective, fisher=st.fisher, max_examples=st.max_examples, seed=self.cfg.seed,
            name_map=lambda n: n[len("encoder."):] if n.startswith("encoder.") else None, split=st.split,
            model_id=str(self.checkpoint(task)))


    def _stats_batches(self, task: str):
        """The statistics' batches of ``task``: ``stats.split`` in its order, 16 a batch, (ids, mask, labels)."""
        split = self.splits[(task, self.cfg.stats.split)]
        return split.batches(16, torch.arange(len(split)))

    def layer_stats(self, pretrained: dict, finetuned: list[dict]):
        """RegMean++'s callback (``models.text_encoder.layerwise_grams``) on the statistics' examples: the
        first ``stats.max_examples`` of ``stats.split`` per task, in the same batches as regmean's Grams."""
        device, limit = config_device(self.cfg), int(self.cfg.stats.max_examples)
        batches = []
        for task in self.tasks:
            kept, seen = [], 0
            for ids, mask, _ in self._stats_batches(task):
                if seen >= limit:
                    break
                n = min(len(ids), limit - seen)  # the last batch is cut as collect_statistics cuts it
                kept.append((ids[:n].to(device), mask[:n].to(device)))
                seen += n
            batches.append(kept)

        def model(state):
            encoder = copy.deepcopy(self.encoder).eval()
            encoder.load_state_dict(state)
            return encoder

        return family.layerwise_grams(model(pretrained), [model(sd) for sd in finetuned], batches)


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


def run(cfg: DictConfig) -> dict:
    """The embedded default end to end (``eval_scripts/run_suite.py``, ``make demo``)."""
    return runner.run(TextSuite(cfg))


def compose_config(overrides=()) -> DictConfig:
    """configs/suite.yaml with Hydra overrides, outside a Hydra app (for the ``taskmerge`` CLI)."""
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return compose("suite", overrides=list(overrides))


def compute_statistics(cfg: DictConfig) -> dict[str, Path]:
    """Statistics of every configured task's fine-tuned model (``task=`` picks one); returns their files."""
    return runner.compute_statistics(TextSuite(cfg), [cfg.task] if cfg.task else None)
