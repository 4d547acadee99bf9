"""The papers' language settings, wired to the spine (fine-tuning loop, search engine, CSV store).

- ``mats``: T5 (full or IA3) on the P3 eight-QA mixture (``data.p3``); rank-classification accuracy
  (exact match for ROPES); statistics per task with MaTS masks (``models.t5.statistics``); methods
  over the trainable state (full: tied embeddings merged once and re-tied; IA3: vectors, θ0 = 1).
- ``knots``: Llama-3-8B + LoRA on six NLI tasks (``data.nli``), class-masked logits, per-task heads;
  LoRA methods receive the factors (``lora`` context), state-dict methods the dense W0 + ΔW_t.

Each task is fine-tuned once: its checkpoint (and T5's statistics) is saved under
``<paths.checkpoints>/<experiment>/<task>/`` and reused by later runs while the config fingerprint
matches (``experiments.language_checkpoints``); ``finetuned.pattern`` imports checkpoints instead.
CSV rows carry a hash of the checkpoint files, so a re-run resumes the search where it stopped.

Driven by ``configs/language_{mats,knots}.yaml`` through ``eval_scripts/run_language.py``;
see ``docs/language.md``. Loading data and checkpoints needs network or a filled HF cache; the
pieces are tested on tiny random models in ``tests/language``.
"""
from __future__ import annotations

import copy
import functools
import logging
import time

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from taskmerge.devices import config_device
from taskmerge.evaluate.metrics import accuracy
from taskmerge.experiments import language_checkpoints as lc
from taskmerge.experiments.language_checkpoints import TaskCheckpoints
from taskmerge.experiments.text_suite import repo_path
from taskmerge.search.engine import SearchContext, search_method, write_baselines
from taskmerge.search.spaces import spaces_from_config
from taskmerge.search.store import ResultStore, experiment_identity
from taskmerge.stats.keys import split_key
from taskmerge.train.finetune import FinetuneConfig, finetune

log = logging.getLogger(__name__)


class T5Evaluator:
    """``evaluate(state, task, split)`` for the MaTS setting (``state``: merged trainable tensors)."""

    def __init__(self, model, splits: dict, tokenizer, mode: str, aliases: dict, batch_size: int = 16):
        from taskmerge.models import t5

        self.t5, self.model, self.splits, self.tokenizer = t5, model, splits, tokenizer
        self.mode, self.aliases, self.batch_size = mode, aliases, batch_size
        self.tasks = sorted({t for t, _ in splits})
        self._loaded = None

    def evaluate(self, state, task: str, split: str) -> float:
        from taskmerge.data.p3 import exact_match

        if state is not self._loaded:
            if self.mode == "full":
                self.model.load_state_dict(self.t5.retie(state, self.aliases))
            else:
                self.t5.load_trainable(self.model, state)
            self._loaded = state
        data = self.splits[(task, split)]
        if data.multiple_choice:
            return accuracy(self.t5.T5RankClassifier(self.model), data.choices(), self.batch_size)
        return exact_match(self.model, data, self.tokenizer, self.batch_size)


class LlamaEvaluator:
    """``evaluate(state, task, split)`` for the KnOTS setting: merged base weights, the task's own head."""

    def __init__(self, model, splits: dict, heads: dict, batch_size: int = 8):
        from taskmerge.data.nli import CLASSES

        self.model, self.splits, self.heads, self.batch_size = model, splits, heads, batch_size
        self.classes = CLASSES
        self.tasks = sorted({t for t, _ in splits})
        self._loaded = None

    def evaluate(self, state, task: str, split: str) -> float:
        from taskmerge.models.llama import MaskedClassifier

        if state is not self._loaded:
            self.model.load_state_dict(state, strict=False)
            self._loaded = state
        self.model.score.load_state_dict(self.heads[task])
        return accuracy(MaskedClassifier(self.model, self.classes[task]), self.splits[(task, split)], self.batch_size)


def _finetune_config(cfg: DictConfig) -> FinetuneConfig:
    return FinetuneConfig(mode=cfg.finetune.mode, epochs=cfg.budget.epochs, batch_size=cfg.finetune.batch_size,
                          lr=cfg.finetune.lr, weight_decay=cfg.finetune.weight_decay, seed=cfg.seed)


def run_mats(cfg: DictConfig) -> dict:
    """Fine-tune (or reuse) T5 per P3 task, cache statistics, search every configured method."""
    from transformers import AutoTokenizer

    from taskmerge.data import p3
    from taskmerge.models import t5

    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    base = t5.load_t5(cfg.model.path).to(config_device(cfg))
    aliases = t5.tied_aliases(base)
    mode = cfg.finetune.mode
    splits = {}
    for task in cfg.tasks.names:
        for split, limit in (("train", cfg.budget.max_train), ("validation", cfg.budget.max_eval)):
            splits[(task, split)] = p3.Seq2SeqData(tok, p3.load_task(task, split, limit), cfg.model.max_source,
                                                   cfg.model.max_target)
        splits[(task, "test")] = splits[(task, "validation")]  # P3 test labels are hidden (see data/p3.py)
    pretrained = t5.trainable_state(t5.wrap(copy.deepcopy(base), mode))
    pretrained = t5.drop_aliases(pretrained, aliases) if mode == "full" else t5.ia3_pretrained(pretrained)
    evaluator = T5Evaluator(t5.wrap(copy.deepcopy(base), mode), splits, tok, mode, aliases)
    checkpoints = TaskCheckpoints(cfg)

    def train(task, folder):
        model = t5.wrap(copy.deepcopy(base), mode)
        t0 = time.perf_counter()
        losses = finetune(t5.T5TargetLM(model), splits[(task, "train")].train(), _finetune_config(cfg))
        seconds = time.perf_counter() - t0
        state = t5.trainable_state(model)
        if mode == "full":
            state = t5.drop_aliases(state, aliases)
            lc.save_full(folder, state)
        else:
            model.save_pretrained(str(folder / lc.ADAPTER))
        return {"train_seconds": round(seconds, 1), "final_loss": losses[-1],
                "validation_accuracy": evaluator.evaluate(state, task, "validation")}

    states = []
    for task in cfg.tasks.names:
        checkpoints.ensure(task, functools.partial(train, task))
        states.append(lc.load_state(checkpoints.source(task), pretrained))

    def task_statistics(i, task):
        model = t5.wrap(copy.deepcopy(base), mode)
        if mode == "full":
            model.load_state_dict(t5.retie(states[i], aliases))
        else:
            t5.load_trainable(model, states[i])
        stats, meta = t5.statistics(model, splits[(task, "train")].train().stats_batches(1),
                                    max_examples=cfg.stats.max_examples)
        # a tied alias (lm_head under transformers >= 5) is merged through its canonical tensor, so the
        # merge state has no such key: its Grams describe no tensor the methods see
        return {k: v for k, v in stats.items() if split_key(k)[0] not in aliases}, meta

    def stats():  # only when a configured method needs them (MaTS, Fisher, RegMean)
        return [checkpoints.statistics(t, functools.partial(task_statistics, i, t))
                for i, t in enumerate(tqdm(cfg.tasks.names, desc="statistics", leave=False))]

    refs = {(t, s): (evaluator.evaluate(states[i], t, s), evaluator.evaluate(pretrained, t, s))
            for i, t in enumerate(cfg.tasks.names) for s in ("validation", "test")}
    # the statistics budget is part of the identity: rows of statistics-based merges depend on it
    ident = checkpoints.checkpoints_id(cfg.tasks.names, extra=f"stats.max_examples={cfg.stats.max_examples}")
    return _search(cfg, pretrained, states, evaluator, refs, ident, {"stats": stats})


def run_knots(cfg: DictConfig) -> dict:
    """Fine-tune (or reuse) Llama LoRA per NLI task, then search the configured methods."""
    from transformers import AutoTokenizer

    from taskmerge.data import nli
    from taskmerge.io.peft import AdapterStateDict
    from taskmerge.models import llama

    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    base = llama.load_llama(cfg.model.path).to(config_device(cfg))
    splits, factors, heads = {}, [], {}
    limits = {"train": cfg.budget.max_train, "validation": cfg.budget.max_eval, "test": cfg.budget.max_test}
    for task in cfg.tasks.names:
        for split, limit in limits.items():
            splits[(task, split)] = nli.NLISplit(tok, nli.split_examples(task, split, cfg.seed, limit),
                                                 cfg.model.max_length)
    pretrained = {k: v.detach().to("cpu", copy=True) for k, v in base.state_dict().items()}  # CPU, as the files
    evaluator = LlamaEvaluator(copy.deepcopy(base), splits, heads)
    checkpoints = TaskCheckpoints(cfg)

    def train(task, folder):
        model = llama.wrap_lora(copy.deepcopy(base), OmegaConf.to_container(cfg.finetune.lora, resolve=True))
        t0 = time.perf_counter()
        losses = finetune(llama.MaskedClassifier(model, nli.CLASSES[task]), splits[(task, "train")],
                          _finetune_config(cfg))
        seconds = time.perf_counter() - t0
        head = model.get_base_model().score.weight
        lc.save_lora(folder, model, head)
        heads[task] = {"weight": head.detach().clone()}
        dense = dict(AdapterStateDict(pretrained, lora=llama.lora_factors(model)))
        return {"train_seconds": round(seconds, 1), "final_loss": losses[-1],
                "validation_accuracy": evaluator.evaluate(dense, task, "validation")}

    for task in cfg.tasks.names:
        checkpoints.ensure(task, functools.partial(train, task))
        f, heads[task] = lc.load_lora(checkpoints.source(task), pretrained)
        factors.append(f)
    dense = [dict(AdapterStateDict(pretrained, lora=f)) for f in factors]
    refs = {(t, s): (evaluator.evaluate(dense[i], t, s), evaluator.evaluate(pretrained, t, s))
            for i, t in enumerate(cfg.tasks.names) for s in ("validation", "test")}
    ident = checkpoints.checkpoints_id(cfg.tasks.names)
    return _search(cfg, pretrained, dense, evaluator, refs, ident, {"lora": lambda: factors})


def _search(cfg, pretrained, finetuned, evaluator, refs, checkpoints_id: str, extra_context: dict) -> dict:
    """``extra_context``: name -> builder of what methods may need (built once, on first use)."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = extra_context[name]()
        return built[name]

    def context(method):
        if method.inputs == "lora":
            return {"lora": get("lora") if "lora" in extra_context else None, "device": config_device(cfg)}
        return {"device": config_device(cfg), **{k: get(k) for k in extra_context if k in method.context}}

    ctx = SearchContext(cfg.experiment, pretrained, finetuned, evaluator, refs, checkpoints=checkpoints_id,
                        seed=cfg.seed, method_context=context)
    store = ResultStore(repo_path(cfg.paths.results) / f"{cfg.experiment}.csv", experiment_identity(cfg))
    write_baselines(ctx, store)
    selected = {}
    for space in spaces_from_config(cfg.methods, cfg.search):
        t0 = time.perf_counter()
        selected[space.name] = search_method(space, ctx, store)
        log.info("%s: %s in %.0fs", space.name, selected[space.name], time.perf_counter() - t0)
    return {"csv": store.path, "selected": selected, "checkpoints": checkpoints_id}


def run(cfg: DictConfig) -> dict:
    from taskmerge.search.spaces import validate_spaces

    validate_spaces(cfg, results=repo_path(cfg.paths.results) / f"{cfg.experiment}.csv")  # before any work
    if cfg.setting == "mats":
        return run_mats(cfg)
    if cfg.setting == "knots":
        return run_knots(cfg)
    raise ValueError(f"setting={cfg.setting!r}: choose mats or knots")
