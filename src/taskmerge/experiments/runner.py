"""The one experiment runner: references -> result store -> baselines -> search of every method -> report.

Text (``text_suite``), vision (``vision``) and language (``language``) differ only in an
:class:`Adapter`: it builds the family, trains (or imports) each task's checkpoint through the one
reuse mechanism (``train.checkpoints.TaskCheckpoints``), evaluates a merged state on a task's split,
and says which inputs a method can get (``inputs``: ``kinds`` always; ``stats``; ``layer_stats``;
``lora``). The
runner does the rest, the same for every family:

1. **prepare**: fine-tune or reuse every task's checkpoint; load the pretrained and fine-tuned states;
2. **references**: fine-tuned and pretrained accuracy per (task, split), read back from the result
   store when a previous run wrote them for the same checkpoints and seed, else evaluated;
3. **baselines** (``pretrained`` / ``finetuned`` rows), then the **search** of every configured method
   (``search.engine.search_method``: grid, greedy, per-task or continual), then the **report**.

The method context is built here and only here (:class:`MethodContext`): lazily, once per run, timed as
preparation. ``kinds`` (``merging.selection.tensor_kinds`` of the adapter's model) is passed to every
method that takes it. **LoRA policy**, the same everywhere: a method that merges LoRA factors
(``Method.inputs == "lora"``), or one that needs statistics, in a setting whose adapter cannot give
them, is skipped with a warning and listed under ``skipped`` in the outcome; a run in which every
configured method is skipped is an error.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch import nn

from taskmerge.cli_support import hydra_script, print_outcome
from taskmerge.devices import config_device
from taskmerge.merging import Method, get_method
from taskmerge.merging.selection import module_depths, tensor_kinds
from taskmerge.report import write_report
from taskmerge.search.common import Evaluator, Profile, SearchContext
from taskmerge.search.engine import search_method, write_baselines
from taskmerge.provenance import write_json_atomic
from taskmerge.search.spaces import validate_spaces
from taskmerge.search.store import ResultStore, experiment_identity
from taskmerge.train.checkpoints import TaskCheckpoints
from taskmerge.train.imported import check_against_theta0, require_theta0

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[3]
SPLITS = ("validation", "test")


def repo_path(p: str) -> Path:
    path = Path(p)
    return path if path.is_absolute() else REPO / path


class Adapter:
    """One model family in one setting: everything the runner asks of it.

    Subclasses set ``inputs`` and implement the methods that raise here; ``cfg`` is the setting's
    Hydra config (``experiment``, ``seed``, ``methods``, ``search``, ``paths``, ``finetune.mode``,
    optionally ``report``, ``force``, ``finetuned.pattern``).
    """

    inputs: frozenset[str] = frozenset({"kinds"})  # besides state dicts: kinds, stats, layer_stats, lora
    why_not: dict[str, str] = {}  # an input this setting cannot give -> why (said when a method is skipped)

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    # ------------------------------------------------------------ required
    @property
    def tasks(self) -> list[str]:
        """The fine-tuned models' tasks, in merge order."""
        raise NotImplementedError

    def load(self) -> "Adapter":
        """Build the family, the data and anything frozen (heads); return ``self``."""
        raise NotImplementedError

    @functools.cached_property
    def checkpoints(self) -> TaskCheckpoints:
        raise NotImplementedError

    def checkpoint(self, task: str) -> Path:
        """Where ``task``'s own checkpoint folder is (an imported one: ``checkpoints.source``)."""
        return self.checkpoints.path(task)

    def train(self, task: str, folder: Path) -> dict:
        """Fine-tune ``task``, write its weights into ``folder``, return metadata (accuracies, loss)."""
        raise NotImplementedError

    def pretrained_state(self) -> dict:
        raise NotImplementedError

    def finetuned_state(self, task: str, source: Path) -> dict:
        """The fine-tuned state dict of ``task`` read from ``source`` (our folder or an imported one)."""
        raise NotImplementedError

    @property
    def model(self) -> nn.Module:
        """The module whose parameter names are the merged state's keys (for tensor kinds)."""
        raise NotImplementedError

    def evaluator(self) -> Evaluator:
        raise NotImplementedError

    # ------------------------------------------------------------ optional
    def statistics_settings(self) -> tuple[str, dict]:
        """``(tag, settings)`` of the statistics (cache file name, what they depend on)."""
        raise NotImplementedError(f"{type(self).__name__} gives no statistics")

    def statistics(self, task: str, state: dict) -> tuple[dict, dict]:
        """Compute ``task``'s statistics of the fine-tuned ``state``: ``(stats, metadata)``."""
        raise NotImplementedError(f"{type(self).__name__} gives no statistics")

    def lora_factors(self, task: str, source: Path) -> dict:
        raise NotImplementedError(f"{type(self).__name__} gives no LoRA factors")

    def layer_stats(self, pretrained: dict, finetuned: list[dict]):
        """RegMean++'s ``layer_stats`` callback (``stats.layerwise``): input Grams block by block through the
        model being merged, on the statistics' examples; the family says where its blocks are."""
        raise NotImplementedError(f"{type(self).__name__} gives no layer-by-layer statistics")

    def selected(self, name: str, best: dict, merge: Callable[[dict], dict]) -> None:
        """Called after each method's search with its selection; ``merge(hp)`` merges at ``hp``."""

    def make_checkpoints(self, root: Path, parts: Callable[[str], dict]) -> TaskCheckpoints:
        """The shared checkpoint mechanism under ``root`` with this setting's ``force``,
        ``finetuned.pattern`` and metadata (``parts(task)``: what the task's fingerprint hashes)."""
        cfg = self.cfg
        meta = {"experiment": cfg.experiment, "mode": cfg.finetune.mode, "seed": cfg.seed,
                "config": OmegaConf.to_container(cfg, resolve=True)}
        return TaskCheckpoints(root, parts, force=cfg.get("force", False),
                               pattern=(cfg.get("finetuned") or {}).get("pattern"), metadata=meta)

    def identity_extra(self) -> str:
        """What the merges depend on besides the checkpoints (the statistics settings), for the CSV rows."""
        return json.dumps(self.statistics_settings()[1], sort_keys=True) if "stats" in self.inputs else ""


class MethodContext:
    """The context arguments of a method, built from the adapter in one place: lazily, once, timed as
    preparation (``profile.prepare``). ``kinds`` always; ``stats``, ``layer_stats`` and ``lora`` when declared
    (``layer_stats`` is a callback: its forwards run inside each merge and count as merging); ``depths``
    from the adapter's model (``selection.module_depths``) when it has one."""

    def __init__(self, adapter: Adapter, pretrained: dict, finetuned: list[dict], profile: Profile):
        self.adapter, self.pretrained, self.finetuned, self.profile = adapter, pretrained, finetuned, profile
        self._cache: dict = {}

    def __call__(self, method: Method) -> dict:
        out = {"kinds": self._get("kinds", lambda: tensor_kinds(self.pretrained, self.adapter.model)),
               "device": config_device(self.adapter.cfg)}
        if "stats" in method.context:
            out["stats"] = self._get("stats", self._statistics)
        if "depths" in method.context and (depths := self._get("depths", self._depths)):  # else: from the names
            out["depths"] = depths
        if "layer_stats" in method.context:
            out["layer_stats"] = self._get("layer_stats", lambda: self.adapter.layer_stats(self.pretrained,
                                                                                           self.finetuned))
        if method.inputs == "lora" or "lora" in method.context:
            out["lora"] = self._get("lora", lambda: [self.adapter.lora_factors(t, self.adapter.checkpoints.source(t))
                                                     for t in self.adapter.tasks])
        return out

    def _statistics(self) -> list[dict]:
        ck, (tag, settings) = self.adapter.checkpoints, self.adapter.statistics_settings()
        return [ck.statistics(t, tag, settings, functools.partial(self.adapter.statistics, t, sd))
                for t, sd in zip(self.adapter.tasks, self.finetuned)]

    def _depths(self) -> dict[str, int]:
        return {k: d for k, d in module_depths(self.adapter.model).items() if k in self.pretrained}

    def _get(self, key, build):
        if key not in self._cache:
            t0 = time.perf_counter()
            self._cache[key] = build()
            self.profile.prepare += time.perf_counter() - t0
        return self._cache[key]


def missing_inputs(adapter: Adapter, method: Method) -> str | None:
    """Why this setting cannot run ``method`` (the one policy: such a method is skipped), or None."""
    have = adapter.inputs
    if method.inputs == "lora" and "lora" not in have:
        return (f"{method.name} merges LoRA factors and this setting's fine-tunes are not LoRA "
                f"(use a LoRA fine-tune, e.g. finetune=lora)")
    if "stats" in method.context and "stats" not in have:
        return f"{method.name} needs Fisher/Gram statistics, which this setting does not compute"
    if "layer_stats" in method.context and "layer_stats" not in have:
        why = adapter.why_not.get("layer_stats", "this setting does not compute them")
        return f"{method.name} needs input Grams forwarded block by block through the merged model (layer_stats): {why}"
    return None


def results_csv(cfg: DictConfig) -> Path:
    """results/<experiment>.csv; in a Hydra multirun, one CSV per job: results/<experiment>/<id>.csv.

    The job's id hashes its overrides, so re-running the same sweep resumes each job's own CSV;
    ``<id>.overrides`` beside it records the overrides in words.
    """
    root = repo_path(cfg.paths.results)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        overrides = HydraConfig.get().job.override_dirname or "default"
        job = hashlib.sha256(overrides.encode()).hexdigest()[:10]
        folder = root / cfg.experiment
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{job}.overrides").write_text(overrides + "\n")
        return folder / f"{job}.csv"
    return root / f"{cfg.experiment}.csv"


def prepare(adapter: Adapter, tasks: Sequence[str] | None = None) -> dict[str, dict]:
    """Load the family and fine-tune (or reuse, or import) each task's checkpoint (default: every
    configured task); returns each task's metadata."""
    require_theta0(adapter.cfg)  # before anything is loaded or written
    adapter.load()
    unknown = [t for t in tasks or () if t not in adapter.tasks]
    if unknown:
        raise ValueError(f"task {unknown[0]!r} is not configured ({', '.join(adapter.tasks)})")
    return {t: adapter.checkpoints.ensure(t, functools.partial(adapter.train, t)) for t in tasks or adapter.tasks}


def references(evaluator: Evaluator, tasks: Sequence[str], pretrained: dict, finetuned: list[dict],
               store: ResultStore, checkpoints: str, seed) -> dict:
    """``(task, split) -> (fine-tuned accuracy, pretrained accuracy)``: the baseline rows of a previous
    run with the same checkpoints and seed, else evaluated (an evaluator with ``finetuned_reference``,
    the joint setting, has no fine-tuned model of its own to evaluate)."""
    wanted = [(t, s) for s in SPLITS for t in evaluator.tasks]
    seen = {(r["method"], r["task"], r["split"]): float(r["accuracy"]) for r in store.rows()
            if r["method"] in ("finetuned", "pretrained") and r["checkpoints"] == checkpoints
            and str(r["seed"]) == str(seed)}
    if all((m, t, s) in seen for m in ("finetuned", "pretrained") for t, s in wanted):
        return {(t, s): (seen[("finetuned", t, s)], seen[("pretrained", t, s)]) for t, s in wanted}
    fixed = getattr(evaluator, "finetuned_reference", None)
    refs = {}
    for task, split in wanted:
        ft = fixed if fixed is not None else evaluator.evaluate(finetuned[list(tasks).index(task)], task, split)
        refs[(task, split)] = (ft, evaluator.evaluate(pretrained, task, split))
    return refs


@dataclass
class Session:
    """A prepared experiment: states, evaluator, the result store with its baseline rows, the search context."""

    pretrained: dict
    finetuned: list[dict]
    evaluator: Evaluator
    store: ResultStore
    ctx: SearchContext
    context: "MethodContext"
    profile: Profile


def record_checkpoints(path: Path, ident: str, checkpoints: TaskCheckpoints, tasks: Sequence[str]) -> Path:
    """``<results>.checkpoints.json``: for each ``checkpoints`` id of the CSV's rows, every task's
    weights (``source``, sha256 of the files: ``weights``, and ``fingerprint``, ``import:…`` when imported)."""
    side = path.with_name(path.stem + ".checkpoints.json")
    known = json.loads(side.read_text()) if side.exists() else {}
    entry = {t: {"source": str(checkpoints.source(t)), "fingerprint": checkpoints.identity(t)[0],
                 "weights": checkpoints.identity(t)[1]} for t in tasks}
    if known.get(ident) != entry:
        known[ident] = entry
        write_json_atomic(side, known)
    return side


def session(adapter: Adapter, csv: Path | None = None) -> Session:
    """Prepare (fine-tune, reuse or import every checkpoint), load the states, check imported ones
    against θ0, open the result store (``csv``, default :func:`results_csv`), write the baselines."""
    cfg = adapter.cfg
    prepare(adapter)
    checkpoints = adapter.checkpoints
    t_other = time.perf_counter()
    pretrained = adapter.pretrained_state()
    finetuned = [adapter.finetuned_state(t, checkpoints.source(t)) for t in adapter.tasks]
    if checkpoints.pattern:  # imported: names, shapes, dtypes against θ0; zero / too-large task vectors warned
        for t, state in zip(adapter.tasks, finetuned):
            norms = check_against_theta0(t, checkpoints.source(t), pretrained, state)
            log.info("%s: imported %s (weights %s, ‖τ‖ %.4g)", t, checkpoints.source(t),
                     checkpoints.identity(t)[1][:16], norms["task_vector_norm"])
    evaluator = adapter.evaluator()
    ident = checkpoints.checkpoints_id(adapter.tasks, adapter.identity_extra())
    store = ResultStore(csv or results_csv(cfg), experiment_identity(cfg))
    record_checkpoints(store.path, ident, checkpoints, adapter.tasks)
    refs = references(evaluator, adapter.tasks, pretrained, finetuned, store, ident, cfg.seed)
    profile = Profile(prepare=time.perf_counter() - t_other)
    context = MethodContext(adapter, pretrained, finetuned, profile)
    ctx = SearchContext(cfg.experiment, pretrained, finetuned, evaluator, refs, ident, cfg.seed,
                        method_context=context, profile=profile)
    write_baselines(ctx, store)
    return Session(pretrained, finetuned, evaluator, store, ctx, context, profile)


def run(adapter: Adapter) -> dict:
    """Every configured method of the adapter's setting, end to end (see the module docstring)."""
    cfg = adapter.cfg
    spaces = validate_spaces(cfg, results=results_csv(cfg))  # the whole search, before any work
    skipped = {sp.name: r for sp in spaces if (r := missing_inputs(adapter, get_method(sp.method)))}
    if len(skipped) == len(spaces):
        raise ValueError("every configured method was skipped: " + "; ".join(f"methods.{n}: {r}" for n, r in skipped.items()))
    t_start = time.perf_counter()
    ses = session(adapter)
    pretrained, finetuned, store, ctx, context, profile = (ses.pretrained, ses.finetuned, ses.store, ses.ctx,
                                                           ses.context, ses.profile)
    ident = ctx.checkpoints
    selected = {}
    t_loop, before = time.perf_counter(), profile.merge + profile.evaluate + profile.prepare
    for space in spaces:
        method = get_method(space.method)
        if space.name in skipped:
            log.warning("skipping %s: %s", space.name, skipped[space.name])
            continue
        selected[space.name] = best = search_method(space, ctx, store)
        adapter.selected(space.name, best, lambda hp, m=method: m(pretrained, finetuned, hp, **context(m)))
        log.info("%s: selected %s (val %.3f, test %.3f)", space.name, best["hparams"], best["val"], best["test"])
    outputs = write_report(store.path) if cfg.get("report", True) else {}
    # other = everything in the search loop and the report that is neither merging, evaluating nor preparing
    profile.other += time.perf_counter() - t_loop - (profile.merge + profile.evaluate + profile.prepare - before)
    return {"csv": store.path, **outputs, "selected": selected, "skipped": skipped, "profile": profile,
            "checkpoints": ident, "total_seconds": time.perf_counter() - t_start}


def compute_statistics(adapter: Adapter, tasks: Sequence[str] | None = None) -> dict[str, Path]:
    """Statistics of each task's fine-tuned model (fine-tuned first if needed), cached; returns their files."""
    done = prepare(adapter, tasks)
    checkpoints, (tag, settings) = adapter.checkpoints, adapter.statistics_settings()
    out = {}
    for task in done:
        state = adapter.finetuned_state(task, checkpoints.source(task))
        checkpoints.statistics(task, tag, settings, functools.partial(adapter.statistics, task, state))
        out[task] = checkpoints.stats_path(task, tag)
    return out


def prepared(metas: dict[str, dict], adapter: Adapter) -> None:
    """What a fine-tuning script prints: each task's recorded accuracies and its folder."""
    for task, meta in metas.items():
        if meta:  # empty in the non-main processes of a multi-process fine-tune
            accs = "  ".join(f"{short} {meta[f'{s}_accuracy']:.3f}" for s, short in zip(SPLITS, ("val", "test"))
                             if f"{s}_accuracy" in meta)
            print(f"{task:20s} {accs}  -> {adapter.checkpoints.source(task)}")


def script(config_name: str, main: Callable[[DictConfig], None]):
    """A Hydra app over ``configs/<config_name>.yaml`` that runs ``main(cfg)`` with one-line errors
    (the body of every script in ``training_scripts/`` and ``eval_scripts/``)."""
    @hydra_script(str(REPO / "configs"), config_name)
    @functools.wraps(main)
    def app(cfg: DictConfig) -> None:
        logging.getLogger("taskmerge").setLevel(logging.INFO)
        main(cfg)

    return app


def search_script(config_name: str, family_run: Callable[[DictConfig], dict]):
    """``script`` that runs a family's experiment end to end and prints its outcome."""
    return script(config_name, lambda cfg: print_outcome(family_run(cfg)))
