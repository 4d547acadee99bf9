"""EMR-Merging: Elect, Mask & Rescale (Huang et al., NeurIPS 2024, "EMR-Merging: Tuning-Free
High-Performance Model Merging"); official code github.com/harveyhuang18/EMR_Merging
(``merge_vit/src/main_emr_merging.py``, ``merge_lm/model_merging_methods/merging_methods.py``).

One model per task (like TALL masks), from one shared unified task vector, tuning-free:

    γ       = sign(mean_t τ_t), with 0 → −1               (official ``(mean > 0)·2 − 1``)
    m_t     = [τ_t ⊙ γ > 0]                               (the entries of τ_t that agree with γ)
    τ_uni   = γ ⊙ max_t |m_t ⊙ τ_t|                       (elect: the largest agreeing magnitude)
    r_t     = Σ_k mean|τ_t[k]| / Σ_k mean|m_t[k] ⊙ τ_uni[k]|   (rescale; k runs over the tensors)
    θ_t'    = θ0 + r_t · (m_t ⊙ τ_uni)

With one task, m_1 ⊙ τ_uni = τ_1 and r_1 = 1: the fine-tuned model itself.

Every floating tensor takes part (official ViT: every non-integer entry of the state dict; the
language-model code excludes the classification heads by regex, which here are simply not in
the merged state dict). Two streamed passes: the first accumulates the 2·T sums of r_t, the
second yields the per-task updates (the task vectors are kept in memory between the passes when
they total at most ``TASKMERGE_STREAM_CACHE_BYTES``, see ``primitives.cached_stream``).
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch

from taskmerge.merging.inputs import task_stream
from taskmerge.merging.outputs import Update
from taskmerge.merging.registry import StateDict, register

Rescale = Literal["sum_of_means", "flat_mean", "none"]


def elect_and_mask(taus: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(τ_uni, [m_t]) of one tensor: γ = sign(mean τ) with 0 → −1, m_t = τ_t·γ > 0, τ_uni = γ·max|m_t τ_t|."""
    stack = torch.stack(list(taus))
    flag = torch.where(stack.mean(0) > 0, 1.0, -1.0)
    masks = [tau * flag > 0 for tau in taus]
    largest = torch.stack([torch.where(m, tau.abs(), 0.0) for m, tau in zip(masks, taus)]).amax(0)
    return largest * flag, masks


def _magnitudes(taus, unified, masks, rescale: str) -> tuple[list[float], list[float]]:
    """This tensor's share of the numerator and denominator of each r_t."""
    if rescale == "sum_of_means":
        return ([float(t.abs().mean()) for t in taus],
                [float(torch.where(m, unified.abs(), 0.0).mean()) for m in masks])
    return ([float(t.abs().sum(dtype=torch.float64)) for t in taus],
            [float(torch.where(m, unified.abs(), 0.0).sum(dtype=torch.float64)) for m in masks])


@register("emr", output="per_task",
          memory="the 2·T sums of the rescalers; two passes over one key of every input (task vectors kept "
                 "between them when they total <= TASKMERGE_STREAM_CACHE_BYTES) and its T outputs")
def emr(pretrained: StateDict, finetuned: Sequence[StateDict], *,
        rescale: Rescale = "sum_of_means", device=None):
    """EMR-Merging: per task θ_t' = θ0 + r_t·(m_t ⊙ τ_uni) (equations in the module docstring).

    No hyperparameter is tuned (the paper's point: no grid, no validation data). The option:

        rescale ("sum_of_means"): how r_t is computed. ``sum_of_means``: the sum over tensors of
            the per-tensor mean |·| (the official ViT and language-model scripts, which loop over
            a state dict); ``flat_mean``: the mean over the whole flattened model (the official
            30-ViT script, which flattens the models first: Σ|τ_t| / Σ|m_t ⊙ τ_uni|); ``none``:
            r_t = 1 (the paper's "w/o rescale" ablation).

    Deviations: the sums of r_t are accumulated in float64 (official: a float32 tensor); a task
    whose masked unified vector is zero everywhere gets r_t = 1 instead of 0/0 (its update is zero
    either way).
    """
    stream = task_stream(pretrained, finetuned, device)
    num, den = [0.0] * len(finetuned), [0.0] * len(finetuned)
    if rescale != "none":
        for _, taus in stream():
            unified, masks = elect_and_mask(taus)
            for t, (a, b) in enumerate(zip(*_magnitudes(taus, unified, masks, rescale))):
                num[t] += a
                den[t] += b
    rescalers = [n / d if d > 0 else 1.0 for n, d in zip(num, den)]
    for key, taus in stream():
        unified, masks = elect_and_mask(taus)
        yield key, [Update(torch.where(m, unified, 0.0), r, owned=True) for m, r in zip(masks, rescalers)]
