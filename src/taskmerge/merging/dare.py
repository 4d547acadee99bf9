"""DARE: Drop And REscale (Yu et al., ICML 2024, "Language Models are Super Mario"), as the
KnOTS repository uses it for its DARE-TIES baselines (specs/methods.md §1(d)).

    τ̃_t = τ_t ⊙ m_t / (1 − p),   m_t ~ Bernoulli(1 − p) element-wise
    θ   = θ0 + λ Σ_t τ̃_t                          (base = task_arithmetic)
    θ   = TIES(τ̃_1 … τ̃_T; k, merge, λ)            (base = ties; k=100: sign election only)

Masks follow the official RNG call order exactly (``primitives.dare_rng_states``): seed once,
then per task in input order, per tensor name in *sorted* order, ``randint(2, shape)`` (discarded)
then ``.bernoulli(1 − p)``. They are drawn from a private generator (global RNG untouched).
"""
from __future__ import annotations

from typing import Annotated, Literal, Sequence

import torch

from taskmerge.merging.inputs import task_stream
from taskmerge.merging.outputs import Update
from taskmerge.merging.primitives import dare_stream
from taskmerge.merging.registry import Range, StateDict, register
from taskmerge.merging.ties import Percent, check_percent, ties_stream


@register("dare", linear_in="scaling",
          memory="one key of every input (whole tensors: the masks follow the official RNG order); base=ties adds "
                 "TIES' global-trim histograms; masks and task vectors are kept when they total <= 1 GiB")
def dare(pretrained: StateDict, finetuned: Sequence[StateDict], *,
         drop_rate: Annotated[float, Range(0.0, 1.0, hi_open=True)] = 0.2,
         seed: int = 424,
         base: Literal["task_arithmetic", "ties"] = "ties",
         scaling: float = 0.6,
         k: Percent = 100.0,
         merge: Literal["mean", "sum", "max"] = "mean",
         trim_scope: Literal["global", "per_tensor"] = "global",
         device=None):
    """DARE on every task vector, then Task Arithmetic or TIES (equations in the module docstring).

    Defaults are the KnOTS DARE-TIES baseline for ViT-B/32 and ViT-L/14 (configs
    ``vit{B,L}_r16_dare_ties``): p=0.2, seed 424, TIES with k=100 (sign election only), disjoint
    mean, λ=0.6. KnOTS' commented search grid: p ∈ {0.99, 0.9, …, 0.1}, λ ∈ {0.1, …, 2.0}.

    Hyperparameters:
        drop_rate (p, 0.2): probability of dropping each entry; survivors are scaled by 1/(1−p).
        seed (424): seeds the mask RNG (official call order, see module docstring).
        base ("ties"): ``task_arithmetic`` (θ0 + λ Σ τ̃_t) or ``ties``.
        scaling (λ, 0.6): applied after the merge (linear in λ; negative negates the merged vector).
        k (100), merge ("mean"), trim_scope ("global"): TIES parameters, used when base=ties.

    Deviation: KnOTS applies DARE to LoRA B@A products; here it applies to every floating tensor
    of a state dict (keys sorted for the RNG order). For the LoRA baseline use ``lora_merge``.
    """
    check_percent("k", k)
    stream = dare_stream(task_stream(pretrained, finetuned, device), drop_rate, seed)
    if base == "task_arithmetic":
        merged = ((key, torch.stack(list(taus)).sum(0)) for key, taus in stream())
    elif base == "ties":
        merged = ties_stream(stream, k=k, merge=merge, trim_scope=trim_scope)
    else:
        raise ValueError(f"base={base!r}: choose task_arithmetic or ties")
    for key, tau in merged:
        yield key, Update(tau, scaling, owned=True)
