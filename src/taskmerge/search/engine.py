"""The search engine: merge at each grid point, evaluate on validation, select, test once.

Protocol (tall_masks / TSV / KnOTS per-task setting): for every point of a method's grid, merge and
evaluate each task's validation split with its own head; select the point with the best average
normalized accuracy (strict ``>``, so the first point in grid order wins a tie, as the official
loops do); evaluate the test split there. Every evaluated point is appended to the CSV at once;
points already in the CSV are read back instead of recomputed, so an interrupted search resumes.

What a grid does not change is computed once: for a method whose output is linear in a
hyperparameter ``s`` (``Method.linear_in``), the merge runs once per setting of the *other*
hyperparameters and each ``s`` is ``θ0 + s·Δ``.

The strategies are one table, :data:`STRATEGIES` (grid, greedy, per_task, continual); a space's
strategy is its ``strategy`` field, or ``continual`` for a sequential method (``Method.sequential``).
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

from tqdm.auto import tqdm

from taskmerge.merging.outputs import LowRank, Update, collect
from taskmerge.merging.registry import Method, get_method
from taskmerge.search.common import (SELECTION, Evaluator, Profile, SearchContext, Space, evaluate_point,
                                     first_best, make_rows, own_rows, selection)
from taskmerge.search.continual import search_continual
from taskmerge.search.store import ResultStore, hparams_key

__all__ = ["SELECTION", "STRATEGIES", "Evaluator", "Profile", "SearchContext", "Space", "make_rows",
           "search_method", "strategy_of", "write_baselines"]
log = logging.getLogger(__name__)


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


class _Validation:
    """Validation results of one method's points: read from the CSV when present, else merged and evaluated."""

    def __init__(self, method: Method, space: Space, ctx: SearchContext, store: ResultStore):
        self.method, self.space, self.ctx, self.store = method, space, ctx, store
        self.merge = _MergeCache(method, ctx, space.name)
        self.mine = own_rows(store, space, ctx)
        self.score_fn = selection(space)
        self.rows: dict[str, list[dict]] = {}

    def __call__(self, hp: dict) -> list[dict]:
        key = hparams_key(hp)
        if key not in self.rows:
            rows = [r for r in self.mine if r["stage"] == "search" and r["hparams"] == key]
            if not rows:
                t0 = time.perf_counter()
                merged = self.merge(hp)
                accs = evaluate_point(self.ctx, merged, "validation")
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
            accs = evaluate_point(self.ctx, merged, "test", missing)
            new = make_rows(self.ctx, self.space.name, hp, "test", "test", accs, time.perf_counter() - t0)
            self.store.append(new)
            rows += new
        return rows


def _points(space: Space, method: Method) -> list[dict]:
    return [method.resolve(p) for p in space.points(method.linear_in)] or [method.resolve({})]


def _visit_all(space: Space, method: Method, val: _Validation) -> list[dict]:
    points = _points(space, method)
    for hp in tqdm(points, desc=f"search[{space.name}]", leave=False, disable=len(points) < 2):
        val(hp)
    return points


def _selected(best: dict, val: _Validation) -> dict:
    return {"hparams": best, "val": val.score(best), "test": val.score_fn(val.test(best))}


def search_grid(space: Space, method: Method, ctx: SearchContext, store: ResultStore) -> dict:
    """Every grid point on validation; the first best is tested."""
    val = _Validation(method, space, ctx, store)
    return _selected(first_best(_visit_all(space, method, val), val.score), val)


def search_greedy(space: Space, method: Method, ctx: SearchContext, store: ResultStore) -> dict:
    """KnOTS' coordinate search: one hyperparameter at a time, values in the given order; a value is
    accepted when its score is >= (``accept="ge"``, per-task scripts) or > (``"gt"``, joint scripts) the
    best so far, and the scan of that hyperparameter stops at the first value that is not accepted."""
    val = _Validation(method, space, ctx, store)
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
    return _selected(current, val)


def search_per_task(space: Space, method: Method, ctx: SearchContext, store: ResultStore) -> dict:
    """TALL masks' protocol: every point on validation, then each task's own best point (per-task output)."""
    if method.output != "per_task":
        raise ValueError(f"strategy=per_task selects one point per task and needs a per-task method, "
                         f"not {space.method!r}")
    val = _Validation(method, space, ctx, store)
    points = _visit_all(space, method, val)
    choice = {}
    for task in ctx.evaluator.tasks:
        task_score = lambda hp, task=task: next(float(r["accuracy"]) for r in val(hp) if r["task"] == task)  # noqa: E731
        choice[task] = first_best(points, task_score)
    test_rows = []
    for hp in {hparams_key(h): h for h in choice.values()}.values():
        test_rows += val.test(hp, [t for t, h in choice.items() if h == hp])
    val_rows = [next(r for r in val(choice[t]) if r["task"] == t) for t in ctx.evaluator.tasks]
    return {"hparams": choice, "val": val.score_fn(val_rows), "test": val.score_fn(test_rows)}


STRATEGIES = {"grid": search_grid, "greedy": search_greedy, "per_task": search_per_task,
              "continual": search_continual}


def strategy_of(space: Space, method: Method) -> str:
    """``continual`` for a sequential method (the task order matters), else the space's strategy."""
    return "continual" if method.sequential else space.strategy


def search_method(space: Space, ctx: SearchContext, store: ResultStore) -> dict:
    """Search one method on validation and evaluate the test split at the selection.

    Returns ``{"hparams", "val", "test"}``; with ``strategy="per_task"``, ``hparams`` maps each task
    to its own selection (TALL masks' per-task λ); continual searches add ``final_accuracy``, ``bwt``.
    """
    method = get_method(space.method)
    name = strategy_of(space, method)
    if name not in STRATEGIES:
        raise ValueError(f"unknown search strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name](space, method, ctx, store)


def write_baselines(ctx: SearchContext, store: ResultStore) -> None:
    """Rows for the pretrained and fine-tuned models (method ``pretrained`` / ``finetuned``)."""
    for method, idx in (("pretrained", 1), ("finetuned", 0)):
        for split, stage in (("validation", "search"), ("test", "test")):
            if store.has(method, {}, stage, split, ctx.checkpoints, ctx.seed):
                continue
            accs = {task: ctx.refs[(task, split)][idx] for task in ctx.evaluator.tasks}
            store.append(make_rows(ctx, method, {}, stage, split, accs, 0.0))
