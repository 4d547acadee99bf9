"""The search engine: merge at each grid point, evaluate on validation, select, test once.

Protocol (tall_masks / TSV / KnOTS per-task setting): for every point of a method's grid, merge and
evaluate each task's validation split with its own head; select the point with the best average
normalized accuracy (strict ``>``, so the first point in grid order wins a tie, as the official
loops do); evaluate the test split there. Every evaluated point is appended to the CSV at once;
points already in the CSV are read back instead of recomputed, so an interrupted search resumes.

What a grid does not change is computed once: for a method whose output is linear in a
hyperparameter ``s`` (``Method.linear_in``), the merge runs once per setting of the *other*
hyperparameters and each ``s`` is ``θ0 + s·Δ``.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from tqdm.auto import tqdm

from taskmerge.merging.outputs import LowRank, Update, collect
from taskmerge.merging.registry import Method, StateDict, get_method
from taskmerge.search.store import ResultStore, hparams_key

log = logging.getLogger(__name__)


class Evaluator(Protocol):
    tasks: Sequence[str]

    def evaluate(self, state: StateDict, task: str, split: str) -> float: ...


@dataclass
class Space:
    """A method's search space: fixed hyperparameters and an ordered grid over others."""

    method: str
    grid: dict[str, list] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    strategy: str = "grid"   # grid | greedy (KnOTS coordinate search) | per_task (TALL masks' per-task λ)
    accept: str = "ge"       # greedy: accept a value on >= (KnOTS per-task) or > (KnOTS joint)
    select: str = "avg_normalized_accuracy"
    orders: int = 10         # sequential methods: number of random task orders
    label: str | None = None  # the CSV's method column (default: the method); tells apart two configs of one method

    @property
    def name(self) -> str:
        return self.label or self.method

    def points(self, innermost: str | None = None) -> list[dict]:
        """Grid points in order; ``innermost`` (a method's linear hyperparameter) varies fastest."""
        names = sorted(self.grid, key=lambda n: n == innermost)
        return [{**self.fixed, **dict(zip(names, values))} for values in itertools.product(*(self.grid[n] for n in names))]


@dataclass
class Profile:
    """Seconds spent searching (merge / evaluate / other) and in one-off preparation that later
    searches reuse from disk (loading checkpoints, statistics, LoRA factors, baseline accuracies)."""

    merge: float = 0.0
    evaluate: float = 0.0
    other: float = 0.0
    prepare: float = 0.0
    merge_by_method: dict[str, float] = field(default_factory=dict)

    def add_merge(self, method: str, seconds: float) -> None:
        self.merge += seconds
        self.merge_by_method[method] = self.merge_by_method.get(method, 0.0) + seconds

    def summary(self) -> str:
        total = self.merge + self.evaluate + self.other
        pct = lambda x: 100 * x / total if total else 0.0  # noqa: E731
        top = sorted(self.merge_by_method.items(), key=lambda kv: -kv[1])[:3]
        where = ", ".join(f"{name} {sec:.1f}s" for name, sec in top)
        return (f"search profile: merge {self.merge:.1f}s ({pct(self.merge):.0f}%), evaluate {self.evaluate:.1f}s "
                f"({pct(self.evaluate):.0f}%), other {self.other:.1f}s ({pct(self.other):.0f}%); "
                f"one-off preparation {self.prepare:.1f}s" + (f"\nlongest merges: {where}" if top else ""))


@dataclass
class SearchContext:
    """Everything the engine needs about one experiment (built by the experiment, not the engine)."""

    experiment: str
    pretrained: StateDict
    finetuned: list[StateDict]
    evaluator: Evaluator
    refs: dict[tuple[str, str], tuple[float, float]]  # (task, split) -> (fine-tuned acc, pretrained acc)
    checkpoints: str  # identity (hash) of the fine-tuned set
    seed: int = 0
    method_context: Callable[[Method], dict] = lambda m: {}
    profile: Profile = field(default_factory=Profile)


class _MergeCache:
    """Merges of one method, reusing the float32 update Δ of ``merge(s=1)`` across values of ``linear_in``.

    The method's stream yields ``Update(Δ, s)`` with Δ independent of s (``merging.outputs``), so
    θ0 + s·Δ from the cached Δ is bit-identical to a direct merge at s, in every dtype.
    """

    def __init__(self, method: Method, ctx: SearchContext, name: str | None = None):
        self.method, self.ctx, self.name = method, ctx, name or method.name
        self._key, self._delta = None, None
        # built before any merge is timed: statistics and factors are preparation, not merging;
        # the cache holds what the method memoises across grid points (τ_MTL, SVDs)
        self.context = {**ctx.method_context(method), "cache": {}}
        self._last = None

    def __call__(self, hp: dict):
        t0 = time.perf_counter()
        try:
            return self._merge(hp)
        finally:
            self.ctx.profile.add_merge(self.name, time.perf_counter() - t0)

    def _merge(self, hp: dict):
        m, ctx, context = self.method, self.ctx, self.context
        if m.linear_in is None or m.output != "model":
            # keep the last merge: the test split usually re-visits the last validation point
            # (single-point grids, greedy searches), and a CG or SVD merge is worth not redoing
            key = hparams_key(hp)
            if self._last is None or self._last[0] != key:
                self._last = None  # free the previous merge before computing the next
                self._last = (key, m(ctx.pretrained, ctx.finetuned, hp, **context))
            return self._last[1]
        rest = {k: v for k, v in hp.items() if k != m.linear_in}
        key = hparams_key(rest)
        if key != self._key:
            self._delta = None
            self._delta = {}
            for k, u in m.stream(ctx.pretrained, ctx.finetuned, {**rest, m.linear_in: 1.0}, **context):
                if not isinstance(u, (Update, LowRank)):
                    raise TypeError(f"method {m.name!r} is linear_in={m.linear_in!r} but yields tensors, not Updates")
                self._delta[k] = u.delta
            self._key = key
        s = float(m.resolve(hp)[m.linear_in])
        return collect(ctx.pretrained, ((k, Update(d, s)) for k, d in self._delta.items()))


def _evaluate_point(ctx: SearchContext, merged, split: str, tasks: Sequence[str] | None = None) -> dict[str, float]:
    t0 = time.perf_counter()
    per_task = isinstance(merged, list)
    all_tasks = list(ctx.evaluator.tasks)
    accs = {task: ctx.evaluator.evaluate(merged[all_tasks.index(task)] if per_task else merged, task, split)
            for task in (tasks or all_tasks)}
    ctx.profile.evaluate += time.perf_counter() - t0
    return accs


def make_rows(ctx: SearchContext, method: str, hp: dict, stage: str, split: str, accs: dict, wall: float,
              order: str = "", step: int | str = "") -> list[dict]:
    from taskmerge.provenance import git_commit

    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    out = []
    for task, acc in accs.items():
        ft, pt = ctx.refs[(task, split)]
        out.append(dict(experiment=ctx.experiment, method=method, hparams=hp, stage=stage, task=task, split=split,
                        accuracy=acc, normalized_accuracy=acc / ft if ft else float("nan"),
                        finetuned_accuracy=ft, pretrained_accuracy=pt, seed=ctx.seed, order=order, step=step,
                        wall_time_s=round(wall, 3), checkpoints=ctx.checkpoints, git_commit=git_commit(),
                        timestamp=now))
    return out


SELECTION = {
    "avg_normalized_accuracy": lambda rows: sum(float(r["normalized_accuracy"]) for r in rows) / len(rows),
    "avg_accuracy": lambda rows: sum(float(r["accuracy"]) for r in rows) / len(rows),
}


class _Validation:
    """Validation results of one method's points: read from the CSV when present, else merged and evaluated."""

    def __init__(self, method: Method, space: Space, ctx: SearchContext, store: ResultStore):
        self.method, self.space, self.ctx, self.store = method, space, ctx, store
        self.merge = _MergeCache(method, ctx, space.name)
        self.mine = [r for r in store.rows() if r["method"] == space.name and r["checkpoints"] == ctx.checkpoints
                     and str(r["seed"]) == str(ctx.seed)]
        if space.select not in SELECTION:
            raise ValueError(f"unknown selection {space.select!r}; choose one of {sorted(SELECTION)}")
        self.score_fn = SELECTION[space.select]
        self.rows: dict[str, list[dict]] = {}

    def __call__(self, hp: dict) -> list[dict]:
        key = hparams_key(hp)
        if key not in self.rows:
            rows = [r for r in self.mine if r["stage"] == "search" and r["hparams"] == key]
            if not rows:
                t0 = time.perf_counter()
                merged = self.merge(hp)
                accs = _evaluate_point(self.ctx, merged, "validation")
                rows = make_rows(self.ctx, self.space.name, hp, "search", "validation", accs,
                                 time.perf_counter() - t0)
                self.store.append(rows)
            self.rows[key] = rows
        return self.rows[key]

    def score(self, hp: dict) -> float:
        return self.score_fn(self(hp))

    def test(self, hp: dict, tasks: Sequence[str] | None = None) -> list[dict]:
        """Test rows at ``hp`` (for ``tasks``), evaluated once and appended, or read back."""
        key = hparams_key(hp)
        wanted = set(tasks or self.ctx.evaluator.tasks)
        rows = [r for r in self.mine if r["stage"] == "test" and r["hparams"] == key and r["task"] in wanted]
        missing = [t for t in self.ctx.evaluator.tasks if t in wanted - {r["task"] for r in rows}]
        if missing:
            t0 = time.perf_counter()
            merged = self.merge(hp)
            accs = _evaluate_point(self.ctx, merged, "test", missing)
            new = make_rows(self.ctx, self.space.name, hp, "test", "test", accs, time.perf_counter() - t0)
            self.store.append(new)
            rows += new
        return rows


def _first_best(points: list[dict], score) -> dict:
    """The best point under ``score``; strict '>' in visiting order, so the first best wins a tie."""
    best, best_score = None, None
    for hp in points:
        s = score(hp)
        if best is None or s > best_score:
            best, best_score = hp, s
    return best


def _greedy(space: Space, method: Method, val: _Validation) -> dict:
    """KnOTS' coordinate search: one hyperparameter at a time, values in the given order; a value is
    accepted when its score is >= (``accept="ge"``, per-task scripts) or > (``"gt"``, joint scripts) the
    best so far, and the scan of that hyperparameter stops at the first value that is not accepted."""
    current = method.resolve({**space.fixed, **{k: v[0] for k, v in space.grid.items() if v}})
    for name, values in space.grid.items():
        best_value, best_score = current[name], None
        for value in values:
            s = val.score(method.resolve({**current, name: value}))
            if best_score is None or (s >= best_score if space.accept == "ge" else s > best_score):
                best_value, best_score = value, s
            else:
                break
        current = method.resolve({**current, name: best_value})
    return current


def search_method(space: Space, ctx: SearchContext, store: ResultStore) -> dict:
    """Search one method on validation and evaluate the test split at the selection.

    Returns ``{"hparams", "val", "test"}``; with ``strategy="per_task"``, ``hparams`` maps each task
    to its own selection (TALL masks' per-task λ).
    """
    method = get_method(space.method)
    if method.sequential:
        from taskmerge.search.continual import search_continual

        return search_continual(space, method, ctx, store)
    val = _Validation(method, space, ctx, store)
    points = [method.resolve(p) for p in space.points(method.linear_in)] or [method.resolve({})]
    if space.strategy in ("grid", "per_task"):
        for hp in tqdm(points, desc=f"search[{space.name}]", leave=False, disable=len(points) < 2):
            val(hp)
    if space.strategy == "per_task":
        if method.output != "per_task":
            raise ValueError(f"strategy=per_task selects one point per task and needs a per-task method, "
                             f"not {space.method!r}")
        choice = {}
        for task in ctx.evaluator.tasks:
            task_score = lambda hp, task=task: next(float(r["accuracy"]) for r in val(hp) if r["task"] == task)  # noqa: E731
            choice[task] = _first_best(points, task_score)
        test_rows = []
        for hp in {hparams_key(h): h for h in choice.values()}.values():
            test_rows += val.test(hp, [t for t, h in choice.items() if h == hp])
        val_rows = [next(r for r in val(choice[t]) if r["task"] == t) for t in ctx.evaluator.tasks]
        return {"hparams": choice, "val": val.score_fn(val_rows), "test": val.score_fn(test_rows)}
    if space.strategy == "greedy":
        best = _greedy(space, method, val)
    elif space.strategy == "grid":
        best = _first_best(points, val.score)
    else:
        raise ValueError(f"unknown search strategy {space.strategy!r}; choose grid, greedy or per_task")
    return {"hparams": best, "val": val.score(best), "test": val.score_fn(val.test(best))}


def write_baselines(ctx: SearchContext, store: ResultStore) -> None:
    """Rows for the pretrained and fine-tuned models (method ``pretrained`` / ``finetuned``)."""
    for method, idx in (("pretrained", 1), ("finetuned", 0)):
        for split, stage in (("validation", "search"), ("test", "test")):
            if store.has(method, {}, stage, split, ctx.checkpoints, ctx.seed):
                continue
            accs = {task: ctx.refs[(task, split)][idx] for task in ctx.evaluator.tasks}
            store.append(make_rows(ctx, method, {}, stage, split, accs, 0.0))
