"""Task Singular Vectors: TSV-M (merging) and TSV-C (compression).

Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025;
official code github.com/AntoAndGar/task_singular_vectors (specs/methods.md §3).

Which tensors are SVD'd (``svd_scope``):

- ``"all_2d"`` (default, official): every 2-D floating tensor whose name matches none of
  ``svd_exclude`` — for open_clip this includes ``positional_embedding`` and ``proj``.
- ``"linear"``: only tensors of kind ``linear`` (``selection.tensor_kinds``: by module type when
  a model is known, else by shape, where 2-D names containing ``embed`` are embeddings).

Arithmetic is float32 on ``device`` (as official, which runs the SVDs on CUDA in float32);
results come back in the input dtype and device. Integer buffers are copied from θ0.

Speed (same matrices as the official full SVDs, within their float error): each task's top r
triplets come from ``lowrank_svd.top_svd`` (float64 Gram eigendecomposition, checked, falling
back to the full SVD) and the polar factors from ``lowrank_svd.polar`` (x (xᵀx)^{-1/2}, falling
back to the SVD when ill-conditioned), a key's T decompositions and its two polar factors through
``lowrank_svd.parallel_map`` (one after the other on all threads, side by side when the CPU is busy).
When T does not divide k, the stacked U and V of the official code have zero trailing columns whose
singular value is 0: they do not change ΔW (polar([A 0]) = [polar(A) ·] for A of full column rank), so
the polar factors are taken of the r·T filled columns only.
"""
from __future__ import annotations

from typing import Iterator, Literal, Mapping, Sequence

import torch

from taskmerge.merging.inputs import float_keys, read, shape_of, task_stream, task_vectors
from taskmerge.merging.lowrank_svd import parallel_map, polar, top_svd
from taskmerge.merging.outputs import Update
from taskmerge.merging.registry import StateDict, register
from taskmerge.merging.selection import is_matrix, name_matches


def _svd_this(name: str, shape: tuple, scope: str, exclude: str, kinds: Mapping[str, str] | None) -> bool:
    if len(shape) != 2 or name_matches(name, exclude):
        return False
    return scope == "all_2d" or is_matrix(name, torch.empty(shape, device="meta"), kinds)


def _stack_top_triplets(taus: Sequence[torch.Tensor]):
    """Buffers of official TSV: slot i holds task i's top r = floor(k/T) triplets; trailing slots stay 0.

    Returns (sum_u [O,k], sum_s [k], sum_v [k,I]); r may be 0 (then everything is zero).
    """
    out_dim, in_dim = taus[0].shape
    k = min(out_dim, in_dim)
    r = int(k / len(taus))
    ref = taus[0]
    sum_u = ref.new_zeros(out_dim, k)
    sum_s = ref.new_zeros(k)
    sum_v = ref.new_zeros(k, in_dim)
    if r == 0:
        return sum_u, sum_s, sum_v
    for i, (u, s, vh) in enumerate(parallel_map(lambda tau: top_svd(tau, r), taus, ref.device)):
        sum_u[:, i * r:(i + 1) * r] = u
        sum_s[i * r:(i + 1) * r] = s
        sum_v[i * r:(i + 1) * r] = vh
    return sum_u, sum_s, sum_v


_polar = polar  # nearest matrix with orthonormal columns/rows: P Qᵀ from m = P Σ Qᵀ (lowrank_svd.polar)


def _inv_sqrt_psd(gram: torch.Tensor) -> torch.Tensor:
    """G^{-1/2} = Q diag(1/(sqrt|λ|+1e-12)) Qᵀ via eigh (official TSVM_2)."""
    lam, q = torch.linalg.eigh(gram)
    return q @ torch.diag(1.0 / (lam.abs().sqrt() + 1e-12)) @ q.T


def tsv_merge_matrix(taus: Sequence[torch.Tensor], variant: str = "polar") -> torch.Tensor:
    """TSV-M merged direction of one weight matrix (α = 1), in the dtype of ``taus``.

    polar:  ΔW = polar(U) · diag(s) · polar(V),  polar(X) = P Qᵀ for X = P Σ Qᵀ;
    eigen:  ΔW = U (UᵀU)^{-1/2} · diag(s) · (VVᵀ)^{-1/2} V, after sorting s ascending
            (official ``compute_and_sum_svd_mem_reduction_2``; same matrix up to float error).
    U [O,k], s [k], V [k,I] stack each task's top floor(k/T) singular triplets.
    """
    sum_u, sum_s, sum_v = _stack_top_triplets(taus)
    if not bool(sum_s.any()):
        return torch.zeros_like(taus[0])
    if variant == "polar":
        n = int(min(taus[0].shape) / len(taus)) * len(taus)  # the filled slots (module docstring)
        polar_u, polar_v = parallel_map(polar, [sum_u[:, :n], sum_v[:n]], sum_u.device)
        return (polar_u * sum_s[:n]) @ polar_v
    if variant == "eigen":
        sum_s, order = torch.sort(sum_s, stable=True)
        sum_u, sum_v = sum_u[:, order], sum_v[order]
        u_orth = sum_u @ _inv_sqrt_psd(sum_u.T @ sum_u)
        v_orth = _inv_sqrt_psd(sum_v @ sum_v.T) @ sum_v
        return torch.linalg.multi_dot([u_orth, torch.diag(sum_s), v_orth])
    raise ValueError(f"tsv_m: unknown variant {variant!r} (polar or eigen)")


def tsv_m_directions(pretrained: StateDict, finetuned: Sequence[StateDict], *, variant: str = "polar",
                     svd_scope: str = "all_2d", svd_exclude: str = "text_projection",
                     kinds: Mapping[str, str] | None = None, device=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, ΔW) in float32 for every floating key: the TSV-M merge at α = 1 minus θ0."""
    for key, taus in task_stream(pretrained, finetuned, device)():
        if _svd_this(key, shape_of(pretrained, key), svd_scope, svd_exclude, kinds):
            yield key, tsv_merge_matrix(taus, variant)
        else:
            yield key, torch.stack(taus).mean(0)


@register("tsv_m", key_local=True, linear_in="scaling", memory="one key of every input (its SVDs); nothing across the model")
def tsv_m(pretrained: StateDict, finetuned: Sequence[StateDict], *,
          scaling: float = 1.0,
          variant: Literal["polar", "eigen"] = "polar",
          svd_scope: Literal["all_2d", "linear"] = "all_2d",
          svd_exclude: str = "text_projection",
          kinds=None, device=None):
    """TSV-M: θ = θ0 + α·ΔW per tensor, specs §3(a)/(a′).

    For each 2-D weight (see ``svd_scope``): SVD every task's τ_t = U_t S_t V_tᵀ; keep each
    task's top r = floor(min(O,I)/T) triplets, stacked as U = [U_1,r … U_T,r] (trailing
    columns zero when T does not divide k), s, V likewise; replace U and V by their
    nearest orthogonal matrices (polar factor) and set ΔW = polar(U)·diag(s)·polar(V)ᵀ.
    Every other floating tensor takes the mean task vector ΔW = (1/T) Σ_t τ_t.
    The same α multiplies both.

    Hyperparameters:
        scaling (α, default 1.0): FusionBench's default; the official TSV code searches
            α ∈ {0.1, 0.2, …, 3.0} on validation. ``merge(α) = θ0 + α·(merge(1) − θ0)``.
        variant (default ``polar``): ``polar`` = official TSVM (SVD-based orthogonalisation);
            ``eigen`` = official TSVM_2 (inverse square roots of UᵀU, VVᵀ through eigh,
            with s sorted ascending first); the same matrix up to float32 error.
        svd_scope (default ``all_2d``, official): which tensors get the SVD (module docstring).
        svd_exclude (default ``text_projection``, official): comma-separated name substrings
            that are averaged instead of SVD'd; ``""`` excludes nothing.
    """
    for key, delta in tsv_m_directions(pretrained, finetuned, variant=variant, svd_scope=svd_scope,
                                       svd_exclude=svd_exclude, kinds=kinds, device=device):
        yield key, Update(delta, scaling, owned=True)


def low_rank(tau: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Rank floor(min(O,I)/T) truncated-SVD reconstruction U_r diag(s_r) V_rᵀ of one matrix."""
    r = int(min(tau.shape) / num_tasks)
    if r == 0:
        return torch.zeros_like(tau)
    u, s, vh = top_svd(tau, r)
    return (u * s) @ vh


@register("tsv_c", key_local=True, output="per_task", memory="one key of every input and its T outputs")
def tsv_c(pretrained: StateDict, finetuned: Sequence[StateDict], *,
          svd_scope: Literal["all_2d", "linear"] = "all_2d",
          svd_exclude: str = "",
          kinds=None, device=None):
    """TSV-C: one compressed model per task, specs §3(a″).

    For each 2-D weight (see ``svd_scope``), task t keeps its top r = floor(min(O,I)/T)
    singular triplets: θ_t' = θ0 + 1.0·U_t,r diag(s_t,r) V_t,rᵀ. Every other tensor is the
    fine-tuned tensor itself (τ kept in full). No α: the official code evaluates each task
    with its own reconstruction at scale 1.0.

    Hyperparameters:
        svd_scope (default ``all_2d``, official): which tensors are compressed.
        svd_exclude (default ``""``): comma-separated name substrings kept in full. The official
            TSV-C *includes* ``text_projection`` (its exclusion is commented out there).
    """
    for key in float_keys(pretrained):
        if _svd_this(key, shape_of(pretrained, key), svd_scope, svd_exclude, kinds):
            taus = task_vectors(key, pretrained, finetuned, device=device)
            compressed = parallel_map(lambda tau: low_rank(tau, len(finetuned)), taus, taus[0].device)
            yield key, [Update(delta, 1.0, owned=True) for delta in compressed]
        else:
            yield key, [read(sd, key).clone() for sd in finetuned]
