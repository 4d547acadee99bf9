"""CART: Centered Arithmetic with Rank-reduced Task vectors.

Choi, Kim, Lee, Hong, "Revisiting Weight Averaging for Model Merging" (arXiv 2412.12153);
official code github.com/JH-GEECS/CART (``src/merging.py``: ``_merge_weights("CART")`` and
``_get_truncated_task_vectors``).

Task vectors are re-centred on the weight average θ_avg = θ0 + τ̄, τ̄ = (1/T) Σ_t τ_t, and each
centred vector is replaced by its rank-r truncated SVD:

    θ = θ0 + τ̄ + λ Σ_t lowrank_r(τ_t − τ̄),   r = max(1, int(ρ · min(O, I)))   (ρ = 1: full rank)

per 2-D weight chosen by ``svd_scope``. On every other tensor the official code adds
λ Σ_t (τ_t − τ̄) untruncated, which is exactly zero (Σ_t τ_t = T τ̄): those tensors are θ0 + τ̄,
and we yield τ̄ without the zero term.

At full rank lowrank(τ_t − τ̄) = τ_t − τ̄, so the λ-term vanishes everywhere and CART is weight
averaging, i.e. task arithmetic at λ_TA = 1/T, *whatever its own λ*; the low rank is what makes
λ matter. ρ = 0 (official: every truncated vector is zero) also gives θ0 + τ̄.

θ = θ0 + τ̄ + λ·L is affine, not linear, in λ, so the method is not ``linear_in`` its scaling; a
search keeps L (which depends on ρ only) in its ``cache`` and re-adds it for every λ.
Each task's rank-r truncation comes from ``lowrank_svd.top_svd`` (the float64 Gram route, equal to the
float32 SVD's truncation within its error; the full SVD when r > k/2), the T of a matrix through
``lowrank_svd.parallel_map`` (side by side on the CPU's threads when it is busy). Float32 on
``device``; values come back in the input dtype.
"""
from __future__ import annotations

from typing import Annotated, Literal, Sequence

import torch

from taskmerge.merging.inputs import shape_of, task_stream
from taskmerge.merging.iso_c import mean_task_vector
from taskmerge.merging.lowrank_svd import parallel_map, top_svd
from taskmerge.merging.outputs import Update
from taskmerge.merging.primitives import memo
from taskmerge.merging.registry import Range, StateDict, register
from taskmerge.merging.tsv import _svd_this


def cart_rank(k: int, rank_fraction: float) -> int:
    """Official rank rule: 0 for ρ = 0, k for ρ = 1, else max(1, int(ρ·k))."""
    if rank_fraction <= 0:
        return 0
    if rank_fraction >= 1:
        return k
    return max(1, int(rank_fraction * k))


def centred_low_rank_sum(taus: Sequence[torch.Tensor], mean: torch.Tensor, rank_fraction: float) -> torch.Tensor:
    """L = Σ_t lowrank_r(τ_t − τ̄) of one weight matrix (rank rule: :func:`cart_rank`)."""
    r = cart_rank(min(mean.shape), rank_fraction)
    total = torch.zeros_like(mean)
    if r == 0:
        return total
    for u, s, vh in parallel_map(lambda tau: top_svd(tau - mean, r), taus, mean.device):
        total += (u * s) @ vh
    return total


def _low_rank_store(cache: dict | None, setting: tuple) -> dict | None:
    """The search cache's {key: L} for one (ρ, scope, exclude) setting. Only the latest setting is kept:
    the config's grid puts rank_fraction first, so λ varies fastest and each L is built once."""
    if cache is None:
        return None
    name = ("cart_low_rank",) + setting
    for old in [k for k in cache if isinstance(k, tuple) and k[:1] == ("cart_low_rank",) and k != name]:
        del cache[old]
    return cache.setdefault(name, {})


@register("cart", key_local=True, memory="one key of every input (T SVDs of one matrix); in a search, the cache keeps "
                         "Σ_t lowrank(τ_t − τ̄) of every SVD'd matrix for the current rank_fraction")
def cart(pretrained: StateDict, finetuned: Sequence[StateDict], *,
         scaling: float = 2.0,
         rank_fraction: Annotated[float, Range(0.0, 1.0)] = 0.12,
         svd_scope: Literal["linear", "all_2d"] = "linear",
         svd_exclude: str = "",
         kinds=None, device=None, cache=None):
    """CART: θ = θ0 + τ̄ + λ Σ_t lowrank_r(τ_t − τ̄) (equations in the module docstring).

    Hyperparameters:
        scaling (λ, default 2.0): the official config ``prior`` for 8 ViT-B/32 tasks (1.9 for 20
            tasks). Negative λ subtracts the low-rank centred parts (the mean τ̄ stays).
        rank_fraction (ρ, default 0.12): the official ``initial_rank_ratio`` for 8 tasks (0.32 for
            20; the paper finds ranks around 8% best); r = max(1, int(ρ·min(O, I))), ρ = 1 full rank,
            ρ = 0 nothing.
        svd_scope (default ``linear``): tensors of kind ``linear`` (``selection.tensor_kinds``). The
            official name rule ("attn" or "mlp" in the name, no "ln"/"bias") picks, on open_clip
            ViTs, exactly the attention and MLP weight matrices, which ``linear`` with the model's
            kinds also picks (``positional_embedding`` and ``proj`` are not linear). ``all_2d``:
            every 2-D tensor.
        svd_exclude (default ``""``): comma-separated name substrings never truncated.

    The official configs fix (λ, ρ) per number of tasks and publish no search grid; the config's
    grid spans them (configs/method/cart.yaml).

    Deviations: the zero term λ Σ_t (τ_t − τ̄) on untruncated tensors is dropped (see the module
    docstring); the official name rule is replaced by the kind rule above.
    """
    store = _low_rank_store(cache, (rank_fraction, svd_scope, svd_exclude))
    for key, taus in task_stream(pretrained, finetuned, device)():
        mean = mean_task_vector(taus)
        if not _svd_this(key, shape_of(pretrained, key), svd_scope, svd_exclude, kinds):
            yield key, Update(mean, 1.0)
            continue
        low = memo(store, key, lambda: centred_low_rank_sum(taus, mean, rank_fraction))
        yield key, Update(mean + scaling * low, 1.0)
