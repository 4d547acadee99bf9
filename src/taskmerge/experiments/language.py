"""The papers' language settings as adapters of the one runner (``experiments.runner``).

- ``mats`` (:class:`T5Mats`): T5 (full or IA3) on the P3 eight-QA mixture (``data.p3``);
  rank-classification accuracy (exact match for ROPES); statistics per task with MaTS masks
  (``models.t5.statistics``); methods over the trainable state (full: tied embeddings merged once and
  re-tied; IA3: vectors, θ0 = 1).
- ``knots`` (:class:`LlamaKnots`): Llama-3-8B + LoRA on six NLI tasks (``data.nli``), class-masked
  logits, per-task heads; LoRA methods receive the factors (``lora`` context), state-dict methods the
  dense W0 + ΔW_t.

Each task is fine-tuned once: its checkpoint (and T5's statistics) is saved under
``<paths.checkpoints>/<experiment>/<task>/`` and reused by later runs while the config fingerprint
matches (``train.checkpoints.TaskCheckpoints``; the files: ``experiments.language_checkpoints``);
``finetuned.pattern`` imports checkpoints instead. CSV rows carry a hash of the checkpoint files, so
a re-run resumes the search where it stopped.

Driven by ``configs/language_{mats,knots}.yaml`` through ``eval_scripts/run_language.py``;
see ``docs/language.md``. Loading data and checkpoints needs network or a filled HF cache; the
pieces are tested on tiny random models in ``tests/language``.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from transformers import AutoTokenizer

from taskmerge.data import nli, p3
from taskmerge.devices import config_device
from taskmerge.evaluate.metrics import accuracy
from taskmerge.experiments import language_checkpoints as lc
from taskmerge.experiments import runner
from taskmerge.experiments.runner import Adapter, repo_path
from taskmerge.io.peft import AdapterStateDict
from taskmerge.models import llama, t5
from taskmerge.stats.keys import split_key
from taskmerge.train.checkpoints import TaskCheckpoints
from taskmerge.train.finetune import FinetuneConfig, finetune



class T5Evaluator:
    """``evaluate(state, task, split)`` for the MaTS setting (``state``: merged trainable tensors)."""

    def __init__(self, model, splits: dict, tokenizer, mode: str, aliases: dict, batch_size: int = 16):
        self.t5, self.model, self.splits, self.tokenizer = t5, model, splits, tokenizer
        self.mode, self.aliases, self.batch_size = mode, aliases, batch_size
        self.tasks = sorted({t for t, _ in splits})
        self._loaded = None

    def evaluate(self, state, task: str, split: str) -> float:
        if state is not self._loaded:
            if self.mode == "full":
                self.model.load_state_dict(self.t5.retie(state, self.aliases))
            else:
                self.t5.load_trainable(self.model, state)
            self._loaded = state
        data = self.splits[(task, split)]
        if data.multiple_choice:
            return accuracy(self.t5.T5RankClassifier(self.model), data.choices(), self.batch_size)
        return p3.exact_match(self.model, data, self.tokenizer, self.batch_size)


class LlamaEvaluator:
    """``evaluate(state, task, split)`` for the KnOTS setting: merged base weights, the task's own head."""

    def __init__(self, model, splits: dict, heads: dict, batch_size: int = 8):
        self.model, self.splits, self.heads, self.batch_size = model, splits, heads, batch_size
        self.classes = nli.CLASSES
        self.tasks = sorted({t for t, _ in splits})
        self._loaded = None

    def evaluate(self, state, task: str, split: str) -> float:
        if state is not self._loaded:
            self.model.load_state_dict(state, strict=False)
            self._loaded = state
        self.model.score.load_state_dict(self.heads[task])
        return accuracy(llama.MaskedClassifier(self.model, self.classes[task]), self.splits[(task, split)], self.batch_size)


def _finetune_config(cfg: DictConfig) -> FinetuneConfig:
    return FinetuneConfig(mode=cfg.finetune.mode, epochs=cfg.budget.epochs, batch_size=cfg.finetune.batch_size,
                          lr=cfg.finetune.lr, weight_decay=cfg.finetune.weight_decay, seed=cfg.seed)


class LanguageAdapter(Adapter):
    """What both language settings share: the task list, ``<checkpoints>/<experiment>/<task>/``
    fingerprinted by the setting, fine-tuning, model, task, budget, seed and mode, and the base model."""

    base = None

    @property
    def tasks(self) -> list[str]:
        return list(self.cfg.tasks.names)

    @functools.cached_property
    def checkpoints(self) -> TaskCheckpoints:
        c = self.cfg

        def parts(task: str) -> dict:
            plain = functools.partial(OmegaConf.to_container, resolve=True)
            return {"setting": c.setting, "finetune": plain(c.finetune), "model": plain(c.model), "task": task,
                    "budget": plain(c.budget), "seed": c.seed, "mode": c.finetune.mode}

        return self.make_checkpoints(repo_path(c.paths.get("checkpoints", "checkpoints")) / c.experiment, parts)

    @property
    def model(self):
        return self.base

    def load(self) -> "LanguageAdapter":
        self.tokenizer = AutoTokenizer.from_pretrained(self.cfg.model.path)
        self.base = self.load_base(self.cfg.model.path).to(config_device(self.cfg))
        self.setup(self.cfg)
        return self

    def load_base(self, path: str):
        raise NotImplementedError

    def setup(self, cfg: DictConfig) -> None:
        """Data, the merge's pretrained state and the evaluator, once ``tokenizer`` and ``base`` exist."""
        raise NotImplementedError

    def pretrained_state(self) -> dict:
        return self._pretrained

    def evaluator(self):
        return self._evaluator


class T5Mats(LanguageAdapter):
    """T5 (full fine-tuning or IA3) on P3; methods merge the trainable state; statistics for MaTS/Fisher/RegMean."""

    inputs = frozenset({"kinds", "stats"})

    def load_base(self, path: str):
        return t5.load_t5(path)

    def setup(self, cfg: DictConfig) -> None:
        self.aliases, self.mode = t5.tied_aliases(self.base), cfg.finetune.mode
        self.splits = {}
        for task in self.tasks:
            for split, limit in (("train", cfg.budget.max_train), ("validation", cfg.budget.max_eval)):
                self.splits[(task, split)] = p3.Seq2SeqData(self.tokenizer, p3.load_task(task, split, limit),
                                                            cfg.model.max_source, cfg.model.max_target)
            self.splits[(task, "test")] = self.splits[(task, "validation")]  # P3 test labels are hidden (data/p3.py)
        pretrained = t5.trainable_state(self._wrapped())
        self._pretrained = (t5.drop_aliases(pretrained, self.aliases) if self.mode == "full"
                            else t5.ia3_pretrained(pretrained))
        self._evaluator = T5Evaluator(self._wrapped(), self.splits, self.tokenizer, self.mode, self.aliases)

    def _wrapped(self, state: dict | None = None):
        model = t5.wrap(copy.deepcopy(self.base), self.mode)
        if state is not None and self.mode == "full":
            model.load_state_dict(t5.retie(state, self.aliases))
        elif state is not None:
            t5.load_trainable(model, state)
        return model

    def train(self, task: str, folder: Path) -> dict:
        model = self._wrapped()
        losses = finetune(t5.T5TargetLM(model), self.splits[(task, "train")].train(), _finetune_config(self.cfg))
        state = t5.trainable_state(model)
        if self.mode == "full":
            state = t5.drop_aliases(state, self.aliases)
            lc.save_full(folder, state)
        else:
            model.save_pretrained(str(folder / lc.ADAPTER))
        return {"final_loss": losses[-1], "validation_accuracy": self._evaluator.evaluate(state, task, "validation")}

    def finetuned_state(self, task: str, source: Path) -> dict:
        return lc.load_state(source, self._pretrained)

    def statistics_settings(self) -> tuple[str, dict]:
        n = int(self.cfg.stats.max_examples)
        return f"train_{n}", {"max_examples": n}

    def statistics(self, task: str, state: dict) -> tuple[dict, dict]:
        stats, meta = t5.statistics(self._wrapped(state), self.splits[(task, "train")].train().stats_batches(1),
                                    max_examples=self.cfg.stats.max_examples)
        # a tied alias (lm_head under transformers >= 5) is merged through its canonical tensor, so the
        # merge state has no such key: its Grams describe no tensor the methods see
        return {k: v for k, v in stats.items() if split_key(k)[0] not in self.aliases}, meta


class LlamaKnots(LanguageAdapter):
    """Llama + LoRA on NLI with per-task heads: LoRA methods get the factors, others the dense W0 + ΔW_t."""

    inputs = frozenset({"kinds", "lora"})

    def load_base(self, path: str):
        return llama.load_llama(path)

    def setup(self, cfg: DictConfig) -> None:
        limits = {"train": cfg.budget.max_train, "validation": cfg.budget.max_eval, "test": cfg.budget.max_test}
        self.splits = {(t, s): nli.NLISplit(self.tokenizer, nli.split_examples(t, s, cfg.seed, n), cfg.model.max_length)
                       for t in self.tasks for s, n in limits.items()}
        self._pretrained = {k: v.detach().to("cpu", copy=True) for k, v in self.base.state_dict().items()}
        self.heads, self.factors = {}, {}
        self._evaluator = LlamaEvaluator(copy.deepcopy(self.base), self.splits, self.heads)

    def train(self, task: str, folder: Path) -> dict:
        model = llama.wrap_lora(copy.deepcopy(self.base), OmegaConf.to_container(self.cfg.finetune.lora, resolve=True))
        losses = finetune(llama.MaskedClassifier(model, nli.CLASSES[task]), self.splits[(task, "train")],
                          _finetune_config(self.cfg))
        head = model.get_base_model().score.weight
        lc.save_lora(folder, model, head)
        self.heads[task] = {"weight": head.detach().clone()}
        dense = dict(AdapterStateDict(self._pretrained, lora=llama.lora_factors(model)))
        return {"final_loss": losses[-1], "validation_accuracy": self._evaluator.evaluate(dense, task, "validation")}

    def lora_factors(self, task: str, source: Path) -> dict:
        if task not in self.factors:
            self.factors[task], self.heads[task] = lc.load_lora(source, self._pretrained)
        return self.factors[task]

    def finetuned_state(self, task: str, source: Path) -> dict:
        return dict(AdapterStateDict(self._pretrained, lora=self.lora_factors(task, source)))


ADAPTERS = {"mats": T5Mats, "knots": LlamaKnots}


def run(cfg: DictConfig) -> dict:
    """A language setting end to end (``eval_scripts/run_language.py``)."""
    if cfg.setting not in ADAPTERS:
        raise ValueError(f"setting={cfg.setting!r}: choose one of {', '.join(ADAPTERS)}")
    return runner.run(ADAPTERS[cfg.setting](cfg))
