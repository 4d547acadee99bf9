"""RegMean (Jin et al., ICLR 2023, "Dataless knowledge fusion by merging weights of language models").

Per Linear layer, the weight minimising Σ_t ‖X_t W − X_t W_t‖² (inputs X_t of task t) is

    Wᵀ = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_tᵀ,   G̃_t = λ·G_t + (1−λ)·diag(G_t),   G_t = X_tᵀX_t / #tokens,

with the input Grams ``<module>.gram_in`` of ``taskmerge.stats``. Also home of the Gram helpers
MaTS (``taskmerge.merging.mats``) shares: off-diagonal scaling, sanity checks, SPD solve.
"""
from __future__ import annotations

import logging
import math
from typing import Annotated, Sequence

import torch

from taskmerge.merging.inputs import float_keys, shape_of, shapes, tensors
from taskmerge.merging.registry import Range, StateDict, register
from taskmerge.stats.keys import check_stats_list, gather, gram_in_key

log = logging.getLogger(__name__)


def scale_off_diagonal(gram: torch.Tensor, scale: float) -> torch.Tensor:
    """λ·G + (1−λ)·diag(G): the off-diagonal entries times λ, the diagonal kept."""
    if scale == 1.0:
        return gram
    out = gram * scale
    out.diagonal(dim1=-2, dim2=-1).copy_(gram.diagonal(dim1=-2, dim2=-1))
    return out


def check_gram(gram: torch.Tensor, name: str) -> None:
    """Cheap O(d²) necessary conditions for a positive semi-definite Gram; a ValueError otherwise.

    Finite, symmetric, non-negative diagonal and every 2×2 principal minor non-negative
    (|G_ij| ≤ √(G_ii G_jj)), with a tolerance of 1e-4 × the largest diagonal entry for float32
    accumulation. This catches corrupted or non-Gram inputs (negative variances, sign flips,
    random symmetric matrices) without an O(d³) eigendecomposition per task; an indefinite
    matrix passing it is still caught when the summed system fails its Cholesky (see
    :func:`solve_spd`).
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"{name}: a Gram must be square, got shape {tuple(gram.shape)}")
    # symmetry through random probes (G v vs vᵀG): O(d²) with contiguous reads, unlike G − Gᵀ; a NaN or
    # Inf anywhere in G makes its row of G v non-finite, so the same product checks finiteness
    probe = torch.randn(gram.shape[0], 2, generator=torch.Generator().manual_seed(0)).to(gram)
    right = gram @ probe
    if not bool(torch.isfinite(right).all()):
        raise ValueError(f"{name}: Gram contains NaN or Inf")
    diag = gram.diagonal()
    tol = 1e-4 * float(diag.abs().max()) + 1e-30
    if float(diag.min()) < -tol:
        raise ValueError(f"{name}: Gram is not positive semi-definite (negative diagonal entry {float(diag.min()):.3g})")
    if float((right - (probe.T @ gram).T).abs().max()) > tol * float(probe.abs().sum(0).max()):
        raise ValueError(f"{name}: Gram is not symmetric")
    # 2×2 minors |G_ij| ≤ √G_ii √G_jj, checked row-wise as max_j |G_ij| / √G_jj ≤ √G_ii; the roots are
    # floored at √tol so that float32 noise around all-zero features passes
    root = diag.clamp_min(0).sqrt().clamp_min(math.sqrt(tol))
    ratio = gram.abs().div_(root).amax(1)
    if bool((ratio > root * (1 + 1e-3)).any()):
        raise ValueError(f"{name}: Gram is not positive semi-definite (an off-diagonal |G_ij| exceeds sqrt(G_ii G_jj))")


def solve_spd(A: torch.Tensor, B: torch.Tensor, name: str) -> torch.Tensor:
    """X with A X = B for a symmetric positive (semi-)definite ``A`` ([n, n]) and ``B`` ([n, m]).

    Singular handling, in order:
    1. rows/columns of A that are entirely zero (input features no task ever activated) are
       dropped; the caller decides what those rows of X are (RegMean: the average weights);
    2. Cholesky solve of the rest;
    3. if Cholesky fails, the eigenvalues decide: a clearly negative one (< −1e-5·‖A‖) means
       the statistics are not a Gram, and we raise instead of returning a garbage merge;
       otherwise A is PSD but (numerically) singular and we retry with a jitter
       ε·‖A‖·I, ε ∈ {1e-7, …, 1e-3}, then fall back to ``torch.linalg.lstsq``.

    Returns X with NaN rows where A had all-zero rows (for the caller to fill).
    """
    keep = A.diagonal() != 0
    if bool(keep.all()):  # the usual case: no row to drop, no copies
        return _solve_kept(A, B, name)
    X = torch.full((A.shape[0], B.shape[1]), float("nan"), dtype=A.dtype, device=A.device)
    if keep.any():
        X[keep] = _solve_kept(A[keep][:, keep], B[keep], name)
    return X


def _solve_kept(Ak: torch.Tensor, Bk: torch.Tensor, name: str) -> torch.Tensor:
    """X with Ak X = Bk, Ak without all-zero rows: Cholesky, then jitter, then least squares."""
    L, info = torch.linalg.cholesky_ex(Ak)
    if int(info) == 0:
        return torch.cholesky_solve(Bk, L)
    evals = torch.linalg.eigvalsh(Ak)
    scale = float(evals.abs().max())
    if float(evals.min()) < -1e-5 * scale:
        raise ValueError(f"{name}: the summed Gram is not positive definite (eigenvalue {float(evals.min()):.3g}, "
                         f"largest {scale:.3g}); the statistics are corrupt or not Grams")
    eye = torch.eye(Ak.shape[0], dtype=Ak.dtype, device=Ak.device)
    for eps in (1e-7, 1e-6, 1e-5, 1e-4, 1e-3):
        L, info = torch.linalg.cholesky_ex(Ak + eps * scale * eye)
        if int(info) == 0:
            log.debug("%s: singular Gram, solved with jitter %.0e", name, eps)
            return torch.cholesky_solve(Bk, L)
    log.warning("%s: Gram too ill-conditioned for a jittered Cholesky; using least squares", name)
    return torch.linalg.lstsq(Ak, Bk).solution


@register("regmean", memory="one key of every input and its Grams (one [in, in] system at a time)")
def regmean(pretrained: StateDict, finetuned: Sequence[StateDict], *,
            off_diagonal_scale: Annotated[float, Range(0.0, 1.0)] = 0.9,
            stats=None, device=None):
    """RegMean: per Linear, Wᵀ = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_tᵀ with G̃_t = λG_t + (1−λ)diag(G_t).

    Merges full weights (not task vectors), as MaTS ``regmean.py``. Every 2-D ``*.weight`` whose
    ``<module>.gram_in`` is in the statistics is RegMean-merged (this includes ``lm_head``
    when a Gram was saved for it, as official); every other floating tensor (biases, norms,
    embeddings) is averaged uniformly.

    Hyperparameters:
        off_diagonal_scale (λ, default 0.9): scales the Grams' off-diagonal entries. λ = 1 is
            plain RegMean; λ = 0 keeps only the diagonal (an activation-weighted average).
            The official MaTS code has no working default (it crashes without one) and searches
            λ ∈ {0, 0.1, …, 1}. 0.9 keeps the Grams positive definite whenever every input
            feature is active.

    Numerics and deviations from the official code:
        - float32, solved with a Cholesky factorisation (``solve_spd``) instead of
          ``torch.linalg.inv`` followed by a product: same result up to float32 rounding, more
          stable. Singular Grams: see ``solve_spd``.
        - Input features that no task ever activated (all-zero Gram row/column) get the
          average of the task weights' columns; the official code writes zeros there.
        - A Gram that is not positive semi-definite (``check_gram``), or a summed Gram that is
          not positive definite after the official zero-row removal, raises a ValueError.
    """
    stats = check_stats_list(stats, len(finetuned), "regmean", shapes(pretrained))
    linear = {k for k in float_keys(pretrained) if k.endswith(".weight") and len(shape_of(pretrained, k)) == 2
              and any(gram_in_key(k) in s for s in stats)}
    if not linear:
        raise ValueError("method 'regmean': the statistics contain no '<module>.gram_in' entry for any Linear weight")
    log.info("regmean: %d Linear weights solved, the other tensors averaged", len(linear))
    for key in float_keys(pretrained):
        grams = gather(stats, gram_in_key(key), "regmean") if key in linear else None
        yield key, regmean_tensor(key, tensors(key, finetuned, device), grams, off_diagonal_scale)


def regmean_tensor(key: str, weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor] | None,
                   off_diagonal_scale: float) -> torch.Tensor:
    """One merged tensor: the RegMean solve of a Linear weight with one input Gram per task, the
    average of ``weights`` without Grams (and for input features no task activated)."""
    mean = lambda: torch.stack(list(weights)).mean(0)  # noqa: E731  (built only where it is used)
    if grams is None:
        return mean()
    out_dim, in_dim = weights[0].shape
    A = weights[0].new_zeros(in_dim, in_dim)
    B = weights[0].new_zeros(in_dim, out_dim)
    for t, (g, w) in enumerate(zip(grams, weights)):
        g = g.to(device=A.device, dtype=torch.float32)
        check_gram(g, f"stats[{t}]: {gram_in_key(key)}")
        g = scale_off_diagonal(g, off_diagonal_scale)
        A += g
        B.addmm_(g, w.T)  # B += G̃_t W_tᵀ without a temporary
    X = solve_spd(A, B, gram_in_key(key)).T
    missing = torch.isnan(X)
    return torch.where(missing, mean(), X) if bool(missing.any()) else X.contiguous()
