"""What every search strategy shares: the space, the experiment's context, rows and selection.

A strategy (``search.engine.STRATEGIES``: grid, greedy, per_task, continual) turns a :class:`Space`
and a :class:`SearchContext` into validation rows, a selected point and test rows, all written to
the result store through :func:`make_rows`. This module depends on no strategy, so the strategies
import it and the engine imports them: no import cycle.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from taskmerge.merging.registry import Method, StateDict
from taskmerge.provenance import git_commit


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


def evaluate_point(ctx: SearchContext, merged, split: str, tasks: Sequence[str] | None = None) -> dict[str, float]:
    """Accuracy per task of a merged model (or, for a per-task output, of each task's own model)."""
    t0 = time.perf_counter()
    per_task = isinstance(merged, list)
    all_tasks = list(ctx.evaluator.tasks)
    accs = {task: ctx.evaluator.evaluate(merged[all_tasks.index(task)] if per_task else merged, task, split)
            for task in (tasks or all_tasks)}
    ctx.profile.evaluate += time.perf_counter() - t0
    return accs


def make_rows(ctx: SearchContext, method: str, hp: dict, stage: str, split: str, accs: dict, wall: float,
              order: str = "", step: int | str = "") -> list[dict]:
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


def selection(space: Space):
    """The space's selection metric over rows (one clear error for an unknown name)."""
    if space.select not in SELECTION:
        raise ValueError(f"unknown selection {space.select!r}; choose one of {sorted(SELECTION)}")
    return SELECTION[space.select]


def first_best(points: list[dict], score) -> dict:
    """The best point under ``score``; strict '>' in visiting order, so the first best wins a tie."""
    best, best_score = None, None
    for hp in points:
        s = score(hp)
        if best is None or s > best_score:
            best, best_score = hp, s
    return best


def own_rows(store, space: Space, ctx: SearchContext) -> list[dict]:
    """The rows already in the store for this space, fine-tuned set and seed (a re-run reads them back)."""
    return [r for r in store.rows() if r["method"] == space.name and r["checkpoints"] == ctx.checkpoints
            and str(r["seed"]) == str(ctx.seed)]
