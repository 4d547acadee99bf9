"""Iso-CTS: isotropic merging in the common and task-specific subspaces.

Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces", ICML 2025; official code github.com/danielm1405/iso-merging (``src/utils/iso.py``,
``iso_cts``). Iso-C (``merging.iso_c``) keeps only the top directions of Σ τ_t; Iso-CTS reserves
part of the rank for directions each task has *outside* that common subspace.

For every 2-D weight of shape (O, I) (``svd_scope``, as Iso-C), with k = min(O, I) and T tasks:

    c  = int(k · f);  s = round((k − c) / T) · T;  c = k − s;  n = s / T
         (f = ``common_space_fraction``; the task-specific rank s is a multiple of T, Python round)
    Σ_t τ_t = U Σ Vᵀ;  U_c, σ_c, V_c = its top-c triplets                    (common subspace)
    τ_t^⊥ = τ_t − U_c U_cᵀ τ_t = U_t Σ_t V_tᵀ;  keep its top-n triplets        (task-specific)
    U = [U_1,n … U_T,n  U_c],  σ = [σ_1,n … σ_T,n  σ_c],  V likewise          (k columns in all)
    Δ_iso = polar(U) · σ̄ · polar(Vᵀ)ᵀ,  σ̄ = mean(σ),  polar(X) = P Qᵀ for X = P S Qᵀ
    θ = θ0 + α · Δ_iso

Every other floating tensor takes the mean task vector with the same α. With f = 1 there is no
task-specific part (n = 0) and polar(U_c) = U_c, so Iso-CTS is Iso-C up to float error.

SVDs run in float32 on ``device``; values come back in the input dtype. Only the kept triplets
are computed (``lowrank_svd.top_svd``: at the default f = 0.8 the common SVD keeps c > k/2
triplets and stays a full SVD; each τ_t^⊥ keeps n, through the checked float64 Gram route) and the polar factors come from
``lowrank_svd.polar`` (no SVD unless ill-conditioned); both equal the full SVD within its error.
"""
from __future__ import annotations

from typing import Annotated, Literal, Sequence

import torch

from taskmerge.merging.inputs import shape_of, task_stream
from taskmerge.merging.iso_c import mean_task_vector
from taskmerge.merging.lowrank_svd import parallel_map, polar, top_svd
from taskmerge.merging.outputs import Update
from taskmerge.merging.registry import Range, StateDict, register
from taskmerge.merging.tsv import _svd_this


def subspace_sizes(k: int, num_tasks: int, fraction: float) -> tuple[int, int]:
    """(c, n): the common rank and the per-task rank of a k-rank layer (official rounding)."""
    common = int(k * fraction)
    specific = round((k - common) / num_tasks) * num_tasks
    common = k - specific
    if common < 0:
        raise ValueError(f"iso_cts: a rank-{k} layer cannot hold {num_tasks} equal task-specific subspaces "
                         f"with common_space_fraction={fraction} (common rank {common}); raise the fraction")
    return common, specific // num_tasks


def iso_cts_matrix(taus: Sequence[torch.Tensor], fraction: float) -> torch.Tensor:
    """Δ_iso of one weight matrix (α = 1), equations in the module docstring."""
    common, per_task = subspace_sizes(min(taus[0].shape), len(taus), fraction)
    u_c, s_c, vh_c = top_svd(torch.stack(list(taus)).sum(0), common)
    specific = parallel_map(lambda tau: top_svd(tau - u_c @ (u_c.T @ tau), per_task), taus, u_c.device)
    us, ss, vs = zip(*specific) if specific else ((), (), ())
    u_all = torch.cat([*us, u_c], dim=1)
    s_all = torch.cat([*ss, s_c])
    vh_all = torch.cat([*vs, vh_c], dim=0)
    polar_u, polar_vh = parallel_map(polar, [u_all, vh_all], u_all.device)
    return (polar_u * s_all.mean()) @ polar_vh


@register("iso_cts", key_local=True, linear_in="scaling",
          memory="one key of every input (T + 3 SVDs of one matrix); nothing across the model")
def iso_cts(pretrained: StateDict, finetuned: Sequence[StateDict], *,
            scaling: float = 1.0,
            common_space_fraction: Annotated[float, Range(0.0, 1.0)] = 0.8,
            svd_scope: Literal["all_2d", "linear"] = "all_2d",
            svd_exclude: str = "text_projection",
            kinds=None, device=None):
    """Iso-CTS: common + task-specific subspaces, orthogonalised, isotropic spectrum, times α.

    Equations in the module docstring.

    Hyperparameters:
        scaling (α, default 1.0): FusionBench's default; the official code searches
            α ∈ {0.1, 0.2, …, 3.0} (``linspace(0, 3, 31)[1:]``). Linear in α.
        common_space_fraction (f, default 0.8, official and FusionBench): share of the rank given to
            the common subspace before rounding the task-specific rank to a multiple of T.
            A small f on a layer of rank < T can leave no valid split: a clear error then.
        svd_scope (``all_2d``), svd_exclude (``text_projection``): which tensors are SVD'd, as Iso-C.

    Deviations: the official code averages the other tensors with a running mean
    (m += (τ_i − m)/(i+1)); we use (1/T) Σ τ_t as Iso-C does (equal up to rounding). The official
    code places the task blocks first and the common block last, as here (with an isotropic
    spectrum the column order does not change Δ_iso anyway).
    """
    for key, taus in task_stream(pretrained, finetuned, device)():
        if _svd_this(key, shape_of(pretrained, key), svd_scope, svd_exclude, kinds):
            yield key, Update(iso_cts_matrix(taus, common_space_fraction), scaling, owned=True)
        else:
            yield key, Update(mean_task_vector(taus), scaling, owned=True)
