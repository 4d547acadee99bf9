"""The continual protocol (OPCM and the continual TA / TIES / averaging baselines).

For ``Space.orders`` random task orders (seeded by the experiment seed, as FusionBench's
``shuffle_order`` with a fixed seed), merge one task at a time and, after every step, evaluate the
tasks seen so far on the test split. Reported per order: the final average accuracy and backward
transfer BWT = 1/(T−1) Σ_{i<T} (a_{T,i} − a_{i,i}) (a_{t,i}: accuracy on task i after step t, i
indexing tasks in merge order; Lopez-Paz & Ranzato 2017, as FusionBench's metric); then mean ± std
over orders. With more than one grid point, the point is selected on the validation split by the
final average normalized accuracy, averaged over the same orders (OPCM itself has α fixed at 0.5).
Rows carry ``order`` (its index) and ``step``; every step's rows are appended at once, and a re-run
skips orders whose rows are complete.
"""
from __future__ import annotations

import math
import random
import statistics
import time

from taskmerge.merging.registry import Method
from taskmerge.search.common import (SearchContext, Space, evaluate_point, first_best, make_rows, own_rows,
                                     selection)
from taskmerge.search.store import ResultStore, hparams_key


def task_orders(n_tasks: int, n_orders: int, seed: int) -> list[list[int]]:
    """``n_orders`` seeded random permutations, distinct while there are enough (T! ≥ n_orders)."""
    rng = random.Random(seed)
    orders, distinct = [], math.factorial(n_tasks) >= n_orders
    while len(orders) < n_orders:
        order = list(range(n_tasks))
        rng.shuffle(order)
        if not distinct or order not in orders:
            orders.append(order)
    return orders


def _order_label(order: list[int], tasks) -> str:
    return ">".join(tasks[i] for i in order)


def _run_order(method: Method, name: str, hp: dict, order: list[int], ctx: SearchContext, store: ResultStore,
               split: str, stage: str, every_step: bool, existing: list[dict]) -> list[dict]:
    """Rows of one order (read back if complete), evaluating after every step or only the last."""
    tasks = list(ctx.evaluator.tasks)
    label = _order_label(order, tasks)
    key = hparams_key(hp)
    have = [r for r in existing if r["stage"] == stage and r["hparams"] == key and r["order"] == label]
    n_expected = len(order) * (len(order) + 1) // 2 if every_step else len(order)
    if len(have) == n_expected:
        return have
    rows, done_steps = list(have), {int(r["step"]) for r in have}
    context = ctx.method_context(method)
    steps = method.steps(ctx.pretrained, [ctx.finetuned[i] for i in order], hp, **context)
    t0 = time.perf_counter()
    for step, merged in enumerate(steps, start=1):
        ctx.profile.add_merge(name, time.perf_counter() - t0)
        if (every_step or step == len(order)) and step not in done_steps:
            seen = [tasks[i] for i in order[:step]] if every_step else tasks
            accs = evaluate_point(ctx, merged, split, seen)
            new = make_rows(ctx, name, hp, stage, split, accs, time.perf_counter() - t0, label, step)
            store.append(new)
            rows += new
        t0 = time.perf_counter()
    return rows


def summarize(rows: list[dict], n_tasks: int) -> dict:
    """Final average accuracy and BWT per order, then mean ± std over orders.

    An order without rows at its last step (a run interrupted inside it) is left out; with no complete
    order the result is ``{"orders": 0}``."""
    finals, bwts = [], []
    for label in dict.fromkeys(r["order"] for r in rows):
        mine = [r for r in rows if r["order"] == label]
        last = [float(r["accuracy"]) for r in mine if int(r["step"]) == n_tasks]
        if not last:
            continue
        finals.append(sum(last) / len(last))
        order = label.split(">")
        acc = {(int(r["step"]), r["task"]): float(r["accuracy"]) for r in mine}
        if n_tasks > 1 and all((i + 1, order[i]) in acc for i in range(n_tasks)):
            bwts.append(sum(acc[(n_tasks, order[i])] - acc[(i + 1, order[i])] for i in range(n_tasks - 1))
                        / (n_tasks - 1))
    if not finals:
        return {"orders": 0}
    std = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    out = {"final_accuracy": (statistics.mean(finals), std(finals)), "orders": len(finals)}
    if bwts:
        out["bwt"] = (statistics.mean(bwts), std(bwts))
    return out


def search_continual(space: Space, method: Method, ctx: SearchContext, store: ResultStore) -> dict:
    """The continual protocol for a sequential method (the ``continual`` entry of ``engine.STRATEGIES``)."""
    tasks = list(ctx.evaluator.tasks)
    orders = task_orders(len(tasks), space.orders, ctx.seed)
    points = [method.resolve(p) for p in space.points()] or [method.resolve({})]
    existing = own_rows(store, space, ctx)
    score = selection(space)
    if len(points) > 1:
        val_scores = {}
        for hp in points:
            rows = [r for order in orders
                    for r in _run_order(method, space.name, hp, order, ctx, store, "validation", "search", False, existing)]
            val_scores[hparams_key(hp)] = score(rows)
        best = first_best(points, lambda hp: val_scores[hparams_key(hp)])
    else:
        best, val_scores = points[0], {}
    rows = [r for order in orders
            for r in _run_order(method, space.name, best, order, ctx, store, "test", "continual", True, existing)]
    final = [r for r in rows if int(r["step"]) == len(tasks)]
    return {"hparams": best, "val": val_scores.get(hparams_key(best), float("nan")), "test": score(final),
            **summarize(rows, len(tasks))}
