"""Model Breadcrumbs: drop each task vector's largest outliers and its small perturbations, then add.

Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
ECCV 2024; official code github.com/rezazzr/breadcrumbs (``TaskVectorMiddleKeep``); mergekit
``sparsify.magnitude_outliers`` with ``merge_method: breadcrumbs``, which this module follows.

Per task and per tensor of n entries (``scope="tensor"``; ``"row"``: per row of the last dimension,
as the official code), ranking |τ_t| ascending (stable: ties by position):

    keep = int(density · n),  top = int(γ · n),  bottom = n − keep − top
    if bottom < 0:  top ← top + bottom, bottom ← 0        (the density wins over γ)
    τ̂_t  = τ_t ⊙ [bottom ≤ rank(|τ_t|) < n − top]        (drop the top γ and the smallest)
    θ    = θ0 + α Σ_t τ̂_t                                  (task arithmetic, mergekit's weight 1)

density ≥ 1 keeps τ_t whole. With γ = 0 it is a magnitude top-k keeping int(density·n) entries.

mergekit's git code (up to the snapshot read, a6e4028) keeps ``sorted_indices[bottom:-top]``, which
is empty when top = int(γ·n) = 0: every tensor with γ·n < 1 (fewer than 100 entries at mergekit's
γ = 0.01, e.g. small biases, and *every* tensor at γ = 0) loses its whole task vector and stays at
θ0. That is an artefact of Python's ``-0`` slice, not the method: the official code keeps the
top-k there, and the released mergekit 0.1.5 keeps ``sorted_indices[bottom:bottom + keep]``. We do
the same by default; ``mergekit_empty_slice=True`` reproduces the git code's output.

Arithmetic in float32 on ``device``; values come back in the input dtype.
"""
from __future__ import annotations

from typing import Annotated, Literal, Sequence

import torch

from taskmerge.merging.inputs import BLOCK, float_keys, read, upcastable
from taskmerge.merging.outputs import Update
from taskmerge.merging.primitives import streamed_kthvalue_abs
from taskmerge.merging.registry import Range, StateDict, register

Fraction = Annotated[float, Range(0.0, 1.0)]


def ascending_ranks(rows: torch.Tensor) -> torch.Tensor:
    """0-based rank of every entry of each row by |x| ascending (stable sort: ties by position)."""
    order = torch.sort(rows.abs(), dim=-1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(rows.shape[-1], device=rows.device).expand_as(order))
    return ranks


def _nth_true(mask: torch.Tensor, j: int) -> int:
    """Flat (row-major) position of the j-th (0-based) True of a 2-D bool mask, via per-row counts
    (a cumsum over every entry would be int64 per entry)."""
    per_row = mask.sum(-1).cumsum(0)
    row = int(torch.searchsorted(per_row, j, right=True))
    before = int(per_row[row - 1]) if row > 0 else 0
    return row * mask.shape[-1] + int(mask[row].nonzero()[j - before])


def _equal_run(a: torch.Tensor, value: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """Entries of ``a`` equal to ``value`` that are the ``first``-th to ``last``-th such by position
    (0-based, inclusive): where the stable sort puts equal values."""
    eq = a == value
    count = int(torch.count_nonzero(eq))  # (count_nonzero: a bool .sum() is several times slower)
    start = _nth_true(eq, first) if first > 0 else 0
    stop = _nth_true(eq, last) + 1 if last < count - 1 else a.numel()
    flat = eq.view(-1)
    flat[:start] = False
    flat[stop:] = False
    return eq


def middle_mask(tau: torch.Tensor, bottom: int, top: int) -> torch.Tensor:
    """Entries of ``tau`` whose stable ascending |τ| rank over the whole tensor is in [bottom, n − top)
    (not empty), without sorting: the two boundary values by TIES' exact radix selection
    (``primitives.streamed_kthvalue_abs``), the entries strictly between them, and of the entries
    equal to a boundary value those the stable sort ranks inside (by position)."""
    n = tau.numel()
    a = tau.detach().float().abs()
    a = a.reshape(-1, a.shape[-1]) if a.dim() >= 2 else a.reshape(1, -1)  # rows: _nth_true counts per row
    chunks = lambda: ((None, [c, c]) for c in a.split(max(1, 16 * BLOCK // a.shape[-1])))  # noqa: E731
    lo, hi = streamed_kthvalue_abs(chunks, [bottom + 1, n - top])  # row chunks: the selection's temporaries stay small
    below_lo, below_hi = int(torch.count_nonzero(a < lo)), int(torch.count_nonzero(a < hi))
    if lo == hi:
        keep = _equal_run(a, lo, bottom - below_lo, n - top - 1 - below_lo)
    else:
        keep = (a > lo) & (a < hi)
        keep |= _equal_run(a, lo, bottom - below_lo, n)
        keep |= _equal_run(a, hi, 0, n - top - 1 - below_hi)
    return keep.reshape(tau.shape)


def breadcrumbs_mask(tau: torch.Tensor, density: float, gamma: float, scope: str = "tensor",
                     mergekit_empty_slice: bool = False) -> torch.Tensor:
    """Boolean mask of the entries of ``tau`` that Breadcrumbs keeps (module docstring).

    ``scope="tensor"`` selects by :func:`middle_mask` (a full sort of a [128256, 4096] embedding took
    minutes); ``"row"`` sorts each row (short rows: the sort is cheap). Both are the stable order.
    """
    if scope not in ("tensor", "row"):
        raise ValueError(f"breadcrumbs: scope={scope!r}: choose tensor or row")
    if density >= 1 or tau.numel() == 0:
        return torch.ones_like(tau, dtype=torch.bool)
    rows = tau.reshape(1, -1) if scope == "tensor" or tau.dim() == 0 else tau.reshape(-1, tau.shape[-1])
    n = rows.shape[-1]
    keep, top = int(density * n), int(gamma * n)
    bottom = n - keep - top
    if bottom < 0:
        top, bottom = top + bottom, 0
    if (top == 0 and mergekit_empty_slice) or keep == 0:
        return torch.zeros_like(tau, dtype=torch.bool)
    if scope == "tensor":
        return middle_mask(tau, bottom, top)
    ranks = ascending_ranks(rows)
    return ((ranks >= bottom) & (ranks < n - top)).reshape(tau.shape)


@register("breadcrumbs", key_local=True, linear_in="scaling",
          memory="one key of θ0, one task's τ and the running sum (an exact selection per task; scope=row: a sort per "
                 "row); nothing across the model")
def breadcrumbs(pretrained: StateDict, finetuned: Sequence[StateDict], *,
                density: Fraction = 0.15,
                gamma: Fraction = 0.006,
                scaling: float = 0.2,
                scope: Literal["tensor", "row"] = "tensor",
                mergekit_empty_slice: bool = False,
                device=None):
    """Breadcrumbs: θ = θ0 + α Σ_t τ_t ⊙ m_t, m_t dropping the top γ and the bottom of |τ_t|.

    Equations in the module docstring.

    Hyperparameters (defaults: the official search's starting point {α 0.2, β 0.15, γ 0.006}):
        density (β, default 0.15): share of each tensor's entries kept. The official Bayesian
            search draws β ∈ U(0.05, 0.20) (``find_best_hyperparam.py``, ``middle_keep``);
            mergekit's default is 1.0 (no sparsification).
        gamma (γ, default 0.006): share of the largest-magnitude entries dropped; official search
            γ ∈ U(0.001, 0.01); mergekit's default 0.01.
        scaling (α, default 0.2): official search α ∈ U(0.01, 1). Linear in α; negative negates.
        scope (default ``tensor``, mergekit): ranks over the whole tensor; ``row``: per row of the
            last dimension (the official code's ``topk`` along ``dim=-1``; 0-D tensors kept whole).
        mergekit_empty_slice (default False): True reproduces mergekit's git code dropping every
            tensor with int(γ·n) = 0 (module docstring).

    Deviations: ties in |τ| are broken by position (mergekit's unstable sort breaks them
    arbitrarily); the official code's ``bottom < 0`` case (keep + top > n) keeps n − top entries,
    mergekit's and ours keep ``keep`` entries.
    """
    for key in float_keys(pretrained):
        base = read(pretrained, key).to(device=device, dtype=torch.float32)
        total = None  # Σ_t τ_t ⊙ m_t accumulated in task order (as a stack's sum), one τ_t read at a time
        for sd in finetuned:
            tau = torch.sub(upcastable(read(sd, key).to(device=base.device)), base)
            kept = tau.mul_(breadcrumbs_mask(tau, density, gamma, scope, mergekit_empty_slice))
            total = kept if total is None else total.add_(kept)
        yield key, Update(total, scaling, owned=True)
