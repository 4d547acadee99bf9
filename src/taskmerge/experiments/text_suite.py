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

from taskmerge.data import declared
from taskmerge.devices import config_device
from taskmerge.evaluate.metrics import score
from taskmerge.experiments import runner
from taskmerge.experiments.runner import REPO, Adapter, repo_path
from taskmerge.io.load import load_model
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
    data: dict = field(default_factory=dict)  # task -> declared.TaskData

    @property
    def tasks(self) -> list[str]:
        """``tasks.names``, or every task of ``tasks.declared`` when names is null."""
        if self.cfg.tasks.get("names"):
            return list(self.cfg.tasks.names)
        if self.data:
            return list(self.data)
        return [n for d in self.declarations() for n in declared.read_declarations(d)]

    def declarations(self) -> list[Path]:
        """The files or folders declaring the tasks (``tasks.declared``; relative paths: to the repo)."""
        d = self.cfg.tasks.get("declared") or ["configs/tasks/declared"]
        return [repo_path(str(p)) for p in ([d] if isinstance(d, str) else d)]

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
        # a declared task's data is part of its checkpoint's identity (the built-in suite's is fixed by data_seed)
        return self.make_checkpoints(self.ckpt_root / c.suite / c.model.name / c.finetune.mode, lambda task: (
            parts if self.data[task].builtin else {**parts, "data": self.data[task].fingerprint}))

    # ---------------------------------------------------------------- data, model, heads
    def load(self) -> "TextSuite":
        """Check every declared task (one error before anything is written), then the model and heads."""
        device = config_device(self.cfg)  # checked before anything is built or written
        b = self.cfg.budget
        names = list(self.cfg.tasks.names) if self.cfg.tasks.get("names") else None
        self.data = declared.resolve_tasks(names, self.declarations(), repo_path(self.cfg.paths.data),
                                           seed=self.cfg.data_seed)
        images = [t for t, d in self.data.items() if d.kind != "text"]
        if images:
            raise declared.DeclarationError(f"task {images[0]!r} is an image task: run it with "
                                            "eval_scripts/run_vision.py (tasks.source=declared)")
        self.tokenizer = family.load_tokenizer(self.cfg.model.path)
        self.encoder = family.load_encoder(self.cfg.model.path, self._tiny_config(), seed=self.cfg.seed).to(device)
        limits = {"train": b.max_train, "validation": b.max_eval, "test": b.max_test}
        for task in self.tasks:
            for split, limit in limits.items():
                texts, labels = self.data[task].split(split, limit)
                self.splits[(task, split)] = family.encode(self.tokenizer, texts, labels, self.cfg.model.max_length)
        self.labels = {t: self.data[t].labels for t in self.tasks}
        for task in self.tasks:
            self.heads[task] = self._head(task)
        return self

    def _tiny_config(self):
        c = self.cfg.model.get("config")
        return None if c is None else OmegaConf.to_container(c, resolve=True)

    def _head(self, task: str):
        d = self.data[task]
        name = task if d.builtin else f"{task}-{d.fingerprint}"  # a declared task's head depends on its data
        path = ckpt.heads_dir(self.ckpt_root, self.cfg.suite, self.cfg.model.name) / f"{name}.safetensors"
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
                **{f"{s}_accuracy": score(model, self.splits[(task, s)], bs, self.data[task].metric)
                   for s in runner.SPLITS}}
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
        if not self.checkpoints.pattern:
            return ckpt.load_encoder_state(source, self.encoder)
        # imported: a safetensors file, an HF folder, a peft adapter (or one of our folders holding adapter/);
        # the runner checks it against θ0 (train.imported.check_against_theta0)
        if source.is_dir() and (source / "adapter" / "adapter_config.json").is_file() \
                and not (source / "model.safetensors").is_file():
            source = source / "adapter"
        return {k: v.detach().clone() for k, v in load_model(source, pretrained=self.pretrained_state()).items()}

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
        return score(model, self.suite.splits[(task, split)], self.suite.cfg.model.eval_batch_size,
                     self.suite.data[task].metric)


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
