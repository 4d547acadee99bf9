"""Iso-C: isotropic merging in the common subspace.

Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer, "No Task Left Behind: Isotropic
Model Merging with Common and Task-Specific Subspaces", ICML 2025; official code
github.com/danielm1405/iso-merging (``src/utils/iso.py``, ``iso_c``).

For every 2-D weight (``svd_scope``, as TSV: all 2-D tensors but ``text_projection``):

    Δ   = Σ_t τ_t = U diag(σ_1 … σ_k) Vᵀ          (thin SVD, k = min(O, I))
    Δ_iso = σ̄ · U Vᵀ,   σ̄ = (1/k) Σ_i σ_i        (every singular value replaced by their mean)
    θ   = θ0 + α · Δ_iso

Every other floating tensor (biases, norms, 1-D/4-D tensors, excluded names) takes the mean task
vector, θ = θ0 + α · (1/T) Σ_t τ_t, with the same α (official: ``sum(tvs) / len(tvs)``, then the
evaluation applies ``scaling_coef`` to the whole merged vector). Flattening keeps the Frobenius
"energy direction" of Σ τ_t while giving every singular direction the same weight, so tasks
with a small spectrum are not drowned by the dominant ones.

SVDs and sums run in float32 on ``device`` (the official code runs them on CUDA in float32);
values come back in the input dtype. Integer buffers are copied from θ0.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch

from taskmerge.merging.inputs import shape_of, task_stream
from taskmerge.merging.lowrank_svd import full_top_svd
from taskmerge.merging.outputs import Update
from taskmerge.merging.registry import StateDict, register
from taskmerge.merging.tsv import _svd_this


def flatten_spectrum(matrix: torch.Tensor) -> torch.Tensor:
    """σ̄ · U Vᵀ for ``matrix`` = U diag(σ) Vᵀ: the same singular vectors, every σ_i = mean(σ).

    Every triplet is used, so this stays a full SVD (``lowrank_svd.full_top_svd``: a wide matrix is
    decomposed as its transpose, 2× faster in LAPACK). The Gram polar factor was not used: Σ τ_t of a
    square layer is often too ill-conditioned for it (κ = 3e4–2e6 on the peers.py inputs), and
    elsewhere it saved ≤ 0.1 s per [3072,768] matrix (benchmarks/README.md, "Profiles").
    """
    u, s, vh = full_top_svd(matrix, min(matrix.shape))
    return (u * s.mean()) @ vh


def mean_task_vector(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """(1/T) Σ_t τ_t: what Iso-C and Iso-CTS give every tensor they do not SVD."""
    return torch.stack(list(taus)).mean(0)


@register("iso_c", key_local=True, linear_in="scaling", memory="one key of every input (one SVD of Σ_t τ_t); nothing across the model")
def iso_c(pretrained: StateDict, finetuned: Sequence[StateDict], *,
          scaling: float = 1.0,
          svd_scope: Literal["all_2d", "linear"] = "all_2d",
          svd_exclude: str = "text_projection",
          kinds=None, device=None):
    """Iso-C: θ = θ0 + α · σ̄ U Vᵀ of Σ_t τ_t per 2-D weight, θ0 + α · mean τ elsewhere.

    Equations in the module docstring.

    Hyperparameters:
        scaling (α, default 1.0): FusionBench's ``scaling_factor`` default. The official code searches
            α ∈ ``linspace(0, 3, 31)[1:]`` = {0.1, 0.2, …, 3.0} on validation accuracy (as for TSV-M).
            Linear: merge(α) = θ0 + α · merge(1); negative α negates the merged update.
        svd_scope (default ``all_2d``, official): every 2-D floating tensor is flattened
            (for open_clip this includes ``positional_embedding`` and ``proj``); ``linear``: only
            tensors of kind ``linear`` (``selection.tensor_kinds``).
        svd_exclude (default ``text_projection``, official): comma-separated name substrings that
            take the mean instead; ``""`` excludes nothing.

    Deviations: none in the math. The official code forms Σ τ_t as ``(sum/T)·T``; we sum directly
    (a last-bit difference).
    """
    for key, taus in task_stream(pretrained, finetuned, device)():
        if _svd_this(key, shape_of(pretrained, key), svd_scope, svd_exclude, kinds):
            yield key, Update(flatten_spectrum(torch.stack(taus).sum(0)), scaling, owned=True)
        else:
            yield key, Update(mean_task_vector(taus), scaling, owned=True)
