"""Continual-merging baselines of the OPCM paper (FusionBench ``method/opcm/*``; specs/methods.md §5(c)).

Models arrive one at a time in the order of ``finetuned``; each method yields a step view of the
merged model after every task (the continual protocol evaluates each step without recomputing;
the merge is the last view). τ_t = θ_t − θ0 and
τ̄_t is the merged task vector after step t (τ̄_0 = 0).

- ``continual_task_arithmetic``: θ_t = θ0 + c·Σ_{i≤t} τ_i (after T steps: Task Arithmetic).
- ``continual_average``: θ̄_t = (1/t) Σ_{i≤t} θ_i, kept as a running mean.
- ``continual_ties``: τ̄_1 = c·τ_1; τ̄_t = τ̄_{t−1} + c·TIES([τ̄_{t−1}; τ_t]) with TIES's trim
  global per row (over every floating tensor), sign election and disjoint merge.

Float32 arithmetic, input dtype out; τ̄ lives in ``scratch`` (memory, or disk when streaming). The
element-wise ones (task arithmetic, average) carry τ̄ in row chunks of ``chunk_numel`` when streamed.
"""
from __future__ import annotations

from typing import Annotated, Literal, Sequence

from taskmerge.merging.inputs import float_keys, numel_of, walk
from taskmerge.merging.opcm import first_view, scratch_view, step_bar, tau_of
from taskmerge.merging.primitives import cached_stream
from taskmerge.merging.registry import Range, StateDict, register
from taskmerge.merging.ties import ties_stream

CARRIES = ("τ̄ in float32 (4 bytes per parameter, in `scratch`: memory or disk), plus one key of θ0 and the task "
           "(streamed task arithmetic and average: a row chunk)")


@register("continual_task_arithmetic", linear_in="scaling", sequential=True, memory=CARRIES)
def continual_task_arithmetic(pretrained: StateDict, finetuned: Sequence[StateDict], *,
                              scaling: float = 0.3, device=None, scratch=None, chunk_numel=None):
    """Continual Task Arithmetic: τ̄_t = τ̄_{t−1} + τ_t, θ_t = θ0 + c·τ̄_t (after T steps: Task Arithmetic).

    Hyperparameters:
        scaling (c, default 0.3): the OPCM paper sweeps c ∈ {0.1, …, 1.0}.
    """
    items = list(walk(pretrained, chunk_numel))
    total = {} if scratch is None else scratch
    for step, sd in enumerate(finetuned):
        for item in step_bar(items, "continual_task_arithmetic", step + 1, len(finetuned)):
            tau = tau_of(sd, pretrained, item, device)
            total[item] = tau if step == 0 else total[item].to(device) + tau
        yield scratch_view(items, total, scaling)


@register("continual_average", sequential=True, memory=CARRIES)
def continual_average(pretrained: StateDict, finetuned: Sequence[StateDict], *, device=None, scratch=None,
                      chunk_numel=None):
    """Continual weight averaging: the running mean θ̄_t = θ̄_{t−1} + (θ_t − θ̄_{t−1})/t (θ̄_1 = θ_1),
    kept as τ̄. No hyperparameters."""
    items = list(walk(pretrained, chunk_numel))
    tau_bar = {} if scratch is None else scratch
    for item in step_bar(items, "continual_average", 1, len(finetuned)):
        tau_bar[item] = tau_of(finetuned[0], pretrained, item, device)
    yield first_view(items, finetuned[0])
    for t, sd in enumerate(finetuned[1:], start=2):
        for item in step_bar(items, "continual_average", t, len(finetuned)):
            bar = tau_bar[item].to(device)
            tau_bar[item] = bar + (tau_of(sd, pretrained, item, device) - bar) / t
        yield scratch_view(items, tau_bar)


@register("continual_ties", sequential=True,
          memory=CARRIES + "; each step is TIES over [τ̄, τ_t] with its global-trim passes")
def continual_ties(pretrained: StateDict, finetuned: Sequence[StateDict], *,
                   k: Annotated[float, Range(0.0, 100.0, lo_open=True)] = 20.0,
                   merge: Literal["mean", "sum", "max"] = "sum",
                   scaling: Annotated[float, Range(0.0, None)] = 0.3, device=None, scratch=None):
    """Continual TIES (FusionBench ``ContinualTiesMergingForCLIP``): τ̄_1 = c·τ_1 (untrimmed), then
    τ̄_t = τ̄_{t−1} + c·TIES([τ̄_{t−1}; τ_t]) — TIES over two rows, the running merge and the new task,
    each trimmed to its top-k % over the whole model, signs elected, disjoint ``merge``.

    Hyperparameters:
        k (default 20, the class default ``threshold``): percent of entries kept per row.
        merge (default ``sum``, the class default ``merge_func``): disjoint mean, sum or max.
        scaling (c, default 0.3 = the OPCM script's value for 8 tasks; 0.1 for 14/20 tasks).
    Not ``linear_in``: c enters the recursion non-linearly.
    """
    keys = float_keys(pretrained)
    nbytes = 2 * 4 * sum(numel_of(pretrained, key) for key in keys)
    tau_bar = {} if scratch is None else scratch
    for key in keys:
        tau_bar[key] = scaling * tau_of(finetuned[0], pretrained, key, device)
    yield scratch_view(keys, tau_bar)
    for sd in finetuned[1:]:
        pair = cached_stream(lambda: ((key, [tau_bar[key].to(device), tau_of(sd, pretrained, key, device)])  # noqa: B023
                                      for key in keys), nbytes)
        merged = ties_stream(pair, k=k, merge=merge, trim_scope="global")
        for key, tau in merged:  # the last pass has read τ̄[key] before yielding it: safe to replace
            tau_bar[key] = tau_bar[key].to(device) + scaling * tau
        yield scratch_view(keys, tau_bar)
