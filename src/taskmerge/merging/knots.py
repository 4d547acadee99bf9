"""KnOTS (Stoica et al., ICLR 2025, "Model merging with SVD to tie the KnOTS") and the LoRA baselines
of its repository; official code github.com/gstoica27/KnOTS (specs/methods.md §1).

For every LoRA module (sorted by name), with ΔW_t = scale_t · B_t A_t  [out, in]:

    [ΔW_1 | … | ΔW_T] = U diag(s) [V_1 | … | V_T]      (float64 SVD; keep s > 1e-5, absolute)
    sV_t = diag(s) V_t                                   (s folded into each task's block)
    sV_m = inner-merge(λ·sV_1, …, λ·sV_T)                (trim global per task over all modules)
    W    = W0 + U sV_m                                   (outer scale 1)

``inner``: ``ties`` (top-k, sign election by mass with global majority fill, disjoint merge),
``task_arithmetic`` (top-k only, no election, then disjoint mean or sum) or ``dare_ties`` (DARE
on the sV_t blocks first, official RNG order, then TIES). λ multiplies every trimmed block
*before* the merge, as the official code does (same result as after, up to rounding).

The joint SVD is computed in factor space (:func:`joint_svd_lora`: QR of the stacked B's and of
each Aᵀ, then the SVD of a [T·r, T·r] core), which equals the official dense float64 SVD of the
concatenated ΔW's up to rounding and the signs of singular vectors (to which the merge is
invariant); :func:`joint_svd` is the dense form, kept as the reference.

Memory: no ΔW is ever densified for the SVD; U and the sV blocks ([≤T·r, in] per task) are kept
per module between the streamed passes (the size of the T adapters times T). Only the final
U·sV_m is dense, one module at a time.

``lora_merge`` is the repository's ``representation='vector'`` baseline: the same inner merges on
the dense ΔW_t of each module, trimmed globally over all modules (TA: λ·Σ or λ·mean).

Inputs: ``finetuned`` is a list of LoRA models ``{module: LoraFactors(A, B, scale)}`` (see
``merging/lora.py``), or pass them as the ``lora`` context argument. The output is a state dict
with the pretrained tensors' names, ``module.weight`` updated, every other tensor copied.
"""
from __future__ import annotations

from typing import Annotated, Literal, Sequence

import torch
from tqdm.auto import tqdm

from taskmerge.merging.lora import LoraModel, check_lora_models, concat_factors, lora_delta
from taskmerge.merging.outputs import LowRank, Update
from taskmerge.merging.primitives import TaskStream, dare_stream, memo
from taskmerge.merging.registry import Range, StateDict, register
from taskmerge.merging.ties import Percent, check_percent, ties_stream

SVD_THRESHOLD = 1e-5  # official: absolute threshold on float64 singular values (FusionBench uses 1e-4)
Inner = Literal["ties", "task_arithmetic", "dare_ties"]
Merge = Literal["mean", "sum", "max"]
Scaling = Annotated[float, Range(0.0, None)]  # ≥ 0: λ must not flip the elected signs (see ``knots``)
DropRate = Annotated[float, Range(0.0, 1.0, hi_open=True)]


def joint_svd(deltas: Sequence[torch.Tensor], threshold: float = SVD_THRESHOLD
              ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """U [out, k] and per-task sV_t = diag(s) V_t [k, in] of [ΔW_1 | … | ΔW_T], float64 SVD, s > threshold.

    Results are cast back to float32 before folding s into V (as official).
    """
    cat = torch.cat([d.to(torch.float64) for d in deltas], dim=1)
    u, s, vh = torch.linalg.svd(cat, full_matrices=False)
    keep = s > threshold
    u, s, vh = u[:, keep].float(), s[keep].float(), vh[keep].float()
    sv = s[:, None] * vh
    return u, list(sv.split(deltas[0].shape[1], dim=1))


def joint_svd_lora(factors: Sequence, apply_scale: bool = True, device=None, threshold: float = SVD_THRESHOLD
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:func:`joint_svd` of the ΔW_t = scale_t·B_t A_t without forming them (same result up to rounding).

    [ΔW_1 | … | ΔW_T] = B_cat · blockdiag(A_1, …, A_T) with B_cat = [scale_1 B_1 | … | scale_T B_T].
    With thin QRs B_cat = Q_B R_B and A_tᵀ = Q_t R_t, the matrix is Q_B · C · blockdiag(Q_t)ᵀ with the
    small core C = R_B · blockdiag(R_tᵀ) [≤T·r, ≤T·r]; the SVD of C gives U = Q_B U_C and the task
    blocks V_t = V_C[:, block t] Q_tᵀ. All in float64, as the official dense SVD. The cost is
    O((out + T·in)·(T·r)²) instead of O(out·T·in·min(out, T·in)): at Llama-3-8B size with 6 rank-16
    adapters, milliseconds instead of minutes per module. Singular vectors may differ in sign from a
    dense SVD; the KnOTS merges are invariant to that (a flip changes U_i and row i of every sV_t).
    """
    f64 = lambda t: t.to(device=device, dtype=torch.float64)  # noqa: E731
    q_b, r_b = torch.linalg.qr(torch.cat([f64(f.B) * (f.scale if apply_scale else 1.0) for f in factors], dim=1))
    q_a, r_a = zip(*(torch.linalg.qr(f64(f.A).T) for f in factors))
    core = r_b @ torch.block_diag(*(r.T for r in r_a))
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    keep = s > threshold
    u, s, vh = (q_b @ u[:, keep]).float(), s[keep].float(), vh[keep]
    widths = [q.shape[1] for q in q_a]
    return u, [s[:, None] * (v @ q.T).float() for v, q in zip(vh.split(widths, dim=1), q_a)]


def _inner_merge(stream: TaskStream, *, inner: str, k: float, merge: str, drop_rate: float,
                 seed: int, max_keeps_sign: bool):
    check_percent("k", k)
    if inner == "dare_ties":
        stream = dare_stream(stream, drop_rate, seed)
    elif inner not in ("ties", "task_arithmetic"):
        raise ValueError(f"inner={inner!r}: choose ties, task_arithmetic or dare_ties")
    if inner == "task_arithmetic" and merge == "max":
        raise ValueError("inner=task_arithmetic has no sign election: use merge=mean or sum")
    return ties_stream(stream, k=k, merge=merge, elect=inner != "task_arithmetic", max_keeps_sign=max_keeps_sign)


def _factors(finetuned, lora) -> list[LoraModel]:
    return list(lora) if lora is not None else list(finetuned)


KNOTS_MEMORY = ("U and the sV blocks of every adapted module (≈ T²·r·(in+out) floats per module, kept across a "
                "search), plus one module's merged update")


@register("knots", linear_in="scaling", inputs="lora", memory=KNOTS_MEMORY)
def knots(pretrained: StateDict, finetuned: Sequence[LoraModel], *,
          inner: Inner = "ties", k: Percent = 20.0, merge: Merge = "mean", scaling: Scaling = 0.6,
          drop_rate: DropRate = 0.1, seed: int = 421, apply_lora_scale: bool = True, max_keeps_sign: bool = True,
          lora=None, device=None, cache=None):
    """KnOTS: joint SVD of the LoRA updates per module, merge in the shared basis (module docstring).

    Defaults: KnOTS-TIES ViT-B/32 config (``vitB_r16_knots_ties``): k=20, disjoint mean, λ=0.6
    (ViT-L/14: λ=0.5). KnOTS-DARE-TIES configs: inner=dare_ties, k=100, p=0.1, seed 421, λ=0.7
    (B/32) / 0.5 (L/14). Search grids in the repo (mostly commented out): λ ∈ {0.1, …, 2.0},
    k ∈ {10, 20, …, 100}, p ∈ {0.99, 0.9, …, 0.1}.

    Hyperparameters:
        inner ("ties"): ties | task_arithmetic (top-k only) | dare_ties (DARE on sV, then TIES).
        k (20): percentage of each task's sV entries kept, one threshold per task over all
            modules (kthvalue, ties kept; 100 = no trim; dare_ties uses 100 officially).
        merge ("mean"): disjoint mean / sum / max of the kept entries.
        scaling (λ, 0.6): the official code multiplies each task's trimmed sV before the merge; the
            disjoint merge is positively homogeneous, so we apply λ after it (the same matrix up to
            float32 rounding, and the search rescales one cached update exactly). λ must be ≥ 0: a
            negative λ before the merge would flip the elected signs, so the two orders disagree.
        drop_rate (p, 0.1), seed (421): DARE, only with inner=dare_ties.
        apply_lora_scale (True): ΔW = (alpha/r)·B@A. The official code uses B@A (it ignores the
            scale, which is 1 in all its configs); set False for the official behaviour.
        max_keeps_sign (True): merge=max returns max|kept|·γ as TIES does; the official KnOTS
            ``masked_merge`` returns max|kept| without the sign (False). Unused by its configs.

    The joint SVDs depend on no hyperparameter but ``apply_lora_scale``: a search computes them once
    (``cache``). Yields one adapted module's weight at a time.
    """
    models = _factors(finetuned, lora)
    modules = check_lora_models(pretrained, models)
    bases, blocks = memo(cache, ("knots_svd", apply_lora_scale),
                         lambda: _joint_svds(modules, models, apply_lora_scale, device))
    stream = lambda: ((module, blocks[module]) for module in modules)  # noqa: E731
    merged = _inner_merge(stream, inner=inner, k=k, merge=merge, drop_rate=drop_rate, seed=seed,
                          max_keeps_sign=max_keeps_sign)
    for module, sv in merged:
        yield module + ".weight", LowRank(bases[module], sv, scaling)


def _joint_svds(modules, models, apply_lora_scale, device) -> tuple[dict, dict]:
    bases, blocks = {}, {}
    for module in tqdm(modules, desc="knots: joint SVDs", unit="module", disable=len(modules) < 50):
        bases[module], blocks[module] = joint_svd_lora([m[module] for m in models], apply_lora_scale, device)
    return bases, blocks


@register("lora_merge", linear_in="scaling", inputs="lora",
          memory="one adapted module's dense ΔW per task (TIES: global-trim histograms, ΔW recomputed per pass)")
def lora_merge(pretrained: StateDict, finetuned: Sequence[LoraModel], *,
               inner: Inner = "ties", k: Percent = 20.0, merge: Merge = "mean", scaling: Scaling = 0.3,
               drop_rate: DropRate = 0.2, seed: int = 424, apply_lora_scale: bool = True, lora=None, device=None):
    """KnOTS' LoRA baselines (``representation='vector'``): merge the dense ΔW_t = scale·B_t A_t.

    inner=task_arithmetic: W = W0 + λ·Σ_t ΔW_t (merge=sum) or λ·(1/T)Σ_t ΔW_t (merge=mean).
    inner=ties / dare_ties: TIES over the ΔW_t of all adapted modules, top-k global per task
    over those modules, λ applied to the merged update (official: before the disjoint merge; the same
    matrix up to rounding, see ``knots``); dare_ties applies DARE to each ΔW_t first (official RNG
    order over sorted module names).

    Defaults: ViT-B/32 TIES baseline ``vitB_r16_ties`` uses k=30, λ=0.3 (ViT-L/14: k=20, λ=0.3);
    TA ``vitB_r16_tv``: merge=sum, λ=0.1 (ViT-L/14: merge=mean, λ=0.3); DARE-TIES: k=100,
    p=0.2, seed 424, λ=0.6. ``apply_lora_scale`` as in ``knots`` (official: False).
    Unlike the official baselines, ΔW_t is recomputed module by module in each pass, never
    concatenated over the model. Only the adapted modules are yielded; the rest stays θ0.
    """
    models = _factors(finetuned, lora)
    modules = check_lora_models(pretrained, models)
    stream = lambda: ((m, [lora_delta(x[m], apply_lora_scale, device) for x in models]) for m in modules)  # noqa: E731
    if inner == "task_arithmetic":  # Σ_t s_t B_t A_t = [s_1 B_1 | … | s_T B_T] · [A_1; …; A_T]: rank ≤ T·r
        if merge not in ("mean", "sum"):
            raise ValueError("inner=task_arithmetic: use merge=mean or sum")
        weight = 1.0 / len(models) if merge == "mean" else 1.0
        for m in modules:
            B, A = concat_factors([x[m] for x in models], apply_lora_scale, device, weight)
            yield m + ".weight", LowRank(B, A, scaling)
        return
    merged = _inner_merge(stream, inner=inner, k=k, merge=merge, drop_rate=drop_rate, seed=seed, max_keeps_sign=True)
    for m, delta in merged:
        yield m + ".weight", Update(delta, scaling)
