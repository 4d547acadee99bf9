"""TIES-merging (Yadav et al., NeurIPS 2023, "TIES-Merging: Resolving Interference When Merging
Models"); official code github.com/prateeky2806/ties-merging (specs/methods.md §6).

    τ̂_t = τ_t ⊙ [|τ_t| ≥ thr_t]                (trim: keep the top-k % by magnitude)
    γ    = sign(Σ_t τ̂_t), 0 → sign(Σ_j γ_j)    (elect by mass; zeros take the model's majority)
    τ_m  = Σ_t τ̂_t [sign τ̂_t = γ] / #{t : τ̂_t ≠ 0, sign τ̂_t = γ}   (disjoint mean)
    θ    = θ0 + λ τ_m

``ties_stream`` is the streaming engine, shared by DARE, TALL/Consensus and KnOTS.
"""
from __future__ import annotations

import math
from typing import Annotated, Iterator, Literal, Mapping, Sequence

import torch

from taskmerge.merging.inputs import Part, float_keys, parts, shape_of, task_stream, task_vectors
from taskmerge.merging.outputs import Update
from taskmerge.merging.primitives import (MergeRule, TaskStream, cached_stream, disjoint_merge, elect_sign,
                                          fill_zero_signs, global_topk_thresholds, kth_index, majority_sign,
                                          streamed_kthvalue_abs, trim_tasks)
from taskmerge.merging.registry import Range, StateDict, register

TrimScope = Literal["global", "per_tensor"]
Percent = Annotated[float, Range(0.0, 100.0, lo_open=True)]


def ties_stream(stream: TaskStream, *, k: float, merge: MergeRule, trim_scope: TrimScope = "global",
                elect: bool = True, max_keeps_sign: bool = True, trim_count: str = "official",
                chunked: Mapping[str, Sequence[torch.Tensor | None]] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, merged τ)`` for every key of ``stream`` (trim → elect → disjoint merge).

    ``trim_scope="global"``: one threshold per task over all keys (official; two extra streamed
    passes unless k=100); ``"per_tensor"``: per tensor and task (mergekit). The majority sign is
    always taken over the whole stream (one more pass). ``elect=False`` skips sign election
    (KnOTS' TA inner merge: top-k only). ``trim_count``: ``official`` or ``exact`` (see ``ties``).
    ``chunked`` (per_tensor): the thresholds of the tensors ``stream`` yields in row chunks
    (:func:`chunked_thresholds`); whole tensors select their own.
    """
    if merge not in ("mean", "sum", "max"):
        raise ValueError(f"merge={merge!r}: choose one of mean, sum, max")
    if trim_scope not in ("global", "per_tensor"):
        raise ValueError(f"trim_scope={trim_scope!r}: choose global or per_tensor")
    if not elect and merge == "max" and max_keeps_sign:
        raise ValueError("merge='max' needs sign election")
    exact = {"official": False, "exact": True}[trim_count]
    thresholds = global_topk_thresholds(stream, k, exact) if trim_scope == "global" else None

    def thresholds_of(item):
        if trim_scope == "global" or not isinstance(item, Part):
            return thresholds  # per_tensor and a whole tensor: None, trim_tasks selects with kthvalue
        if chunked is None or item.key not in chunked:  # a chunk's own threshold would be wrong, not slow
            raise ValueError(f"{item.key}: a per-tensor trim of row chunks needs the tensor's thresholds (chunked=)")
        return chunked[item.key]
    trimmed = lambda: ((item, trim_tasks(taus, k, thresholds_of(item), exact)) for item, taus in stream())  # noqa: E731
    if elect and hasattr(stream, "nbytes"):  # the majority pass and the merge pass see the same stacks
        trimmed = cached_stream(trimmed, stream.nbytes)
    majority = majority_sign(trimmed) if elect else 0.0
    for key, stack in trimmed():
        sign = fill_zero_signs(elect_sign(stack), majority) if elect else None
        yield key, disjoint_merge(stack, sign, merge, max_keeps_sign)


def chunked_thresholds(pretrained: StateDict, finetuned: Sequence[StateDict], k: float, exact: bool,
                       device=None, chunk_numel: int | None = None) -> dict[str, list[torch.Tensor | None]]:
    """Per-tensor trim thresholds, one per task, of every tensor larger than ``chunk_numel``.

    The global trim's exact radix selection (``primitives.streamed_kthvalue_abs``) run over one
    tensor's row chunks alone: two reads of the tensor, T chunks and the histograms in memory, and
    the same value ``kthvalue`` of the whole tensor gives (it *is* one of the entries). The chunks
    are not cached: holding them would be the whole tensor again.
    """
    out = {}
    for key in float_keys(pretrained):
        items = parts(pretrained, [key], chunk_numel)
        if not isinstance(items[0], Part):
            continue
        rank = kth_index(math.prod(shape_of(pretrained, key)), k, exact)

        def chunks(items=items):
            return ((i, task_vectors(i, pretrained, finetuned, device=device)) for i in items)
        out[key] = streamed_kthvalue_abs(chunks, [rank] * len(finetuned))
    return out


def check_percent(name: str, value: float) -> None:
    if not 0 < value <= 100:
        raise ValueError(f"{name}={value} must be a percentage in (0, 100]")


TRIM_MEMORY = ("global trim: two 2^16-bin histograms per task (two extra read passes for the exact threshold, "
               "one for the majority sign; the task vectors are kept after the first pass when they total "
               "<= TASKMERGE_STREAM_CACHE_BYTES, 1 GiB); one key (row chunk) otherwise. per_tensor: the same, "
               "with the two threshold passes over each tensor larger than chunk_numel alone (row chunks)")


@register("ties", linear_in="scaling", memory=TRIM_MEMORY)
def ties(pretrained: StateDict, finetuned: Sequence[StateDict], *,
         k: Percent = 20.0,
         merge: Literal["mean", "sum", "max"] = "mean",
         scaling: float = 1.0,
         trim_scope: Literal["global", "per_tensor"] = "global",
         trim_count: Literal["official", "exact"] = "official",
         device=None, chunk_numel=None):
    """TIES-merging: trim to the top-k %, elect signs by mass, disjoint merge, θ = θ0 + λ τ_m.

    Equations in the module docstring. Every floating tensor takes part (official: all parameters
    of the flattened model); integer buffers are copied from θ0.

    Hyperparameters:
        k (20): percentage of each task vector kept, by magnitude. Threshold = kthvalue of |τ_t|
            at rank d − int(d·k/100), keep |τ| ≥ thr (ties kept; when d·k/100 < 1 only the max
            survives); k=100 disables the trim. Official searched grid (when tuned): {10, 20, 30}.
        merge ("mean"): disjoint ``mean`` (TIES default), ``sum`` (used inside TALL/Consensus),
            or ``max`` (largest kept magnitude times γ).
        scaling (λ, 1.0): the paper's value without a validation set. Official grids: ties-merging
            README {0.8, 0.9, …, 2.5}; tall_masks / MaTS {0.1, …, 1.0}; TSV fork {1/30, …, 1}.
            Negative λ negates the merged task vector (λ multiplies τ_m after the merge).
        trim_scope ("global"): one threshold per task over the whole model, computed exactly
            by streamed radix selection (official); ``per_tensor``: one per tensor (mergekit's scope),
            the same radix selection over the row chunks of a tensor larger than ``chunk_numel``
            (streamed merges), ``kthvalue`` of the whole tensor otherwise: the same threshold.
        trim_count ("official"): how many entries a trim keeps out of d. ``official``: the TIES
            rule, int(d·k/100) + 1 (plus ties at the threshold); ``exact``: int(d·k/100), the count
            mergekit and peft keep (``density = k/100``), ties at the threshold still kept.

    Dense ``ties`` on peft adapter folders trims over every parameter of the model, most of them
    unchanged (τ = 0); for LoRA adapters use ``lora_merge`` (or ``knots``), which trims ΔW = B·A.

    Deviations: none in the math. The official code flattens keys in sorted order; element-wise
    results do not depend on the order. The majority sign is summed in float64 (exact).
    """
    check_percent("k", k)
    stream = task_stream(pretrained, finetuned, device, chunk_numel)
    chunked = (chunked_thresholds(pretrained, finetuned, k, trim_count == "exact", device, chunk_numel)
               if trim_scope == "per_tensor" else None)
    for item, tau in ties_stream(stream, k=k, merge=merge, trim_scope=trim_scope, trim_count=trim_count,
                                 chunked=chunked):
        yield item, Update(tau, scaling, owned=True)
