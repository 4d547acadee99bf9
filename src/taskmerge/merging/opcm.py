"""OPCM: Orthogonal Projection-based Continual Merging (Tang et al., 2025, "Merging Models on the
Fly Without Retraining: A Sequential Approach to Scalable Continual Model Merging").

Official code: tanganke/opcm @f083162 (paper) and FusionBench ``OPCMForCLIP`` (≥2c3df13);
specs/methods.md §5. Task order = the order of ``finetuned``.

Algorithm (τ_t = θ_t − θ0, τ̄ = merged − θ0, λ_1 = 1):

- step 1: θ̄_1 = θ_1 (the first model at full strength); norms = [‖τ_1‖].
- step t ≥ 2: avg_t = mean(‖τ_1‖, …, ‖τ_t‖) (global L2 norms over every floating tensor).
  - linear weights W (2-D, kind ``linear``): thin SVD τ̄ = U diag(s) Vᵀ; r = the first index i
    with cumsum(s)_i / Σs > α (0 if none, e.g. α = 1); P = Uᵀ τ_t V; zero P[:r, :r] and, if
    ``zero_diagonal``, every P_ii; τ'_t = U P Vᵀ; τ̄ ← λ_{t−1} τ̄ + τ'_t.
  - every other floating tensor (biases, norms, conv, embeddings): τ̄ ← λ_{t−1} τ̄ + τ_t.
  - n = ‖τ̄‖ (global); λ_t = n / avg_t; τ̄ ← τ̄ · avg_t / n, so the merged task vector always
    has the mean norm of the task vectors seen so far.

Notes on fidelity:

- Official uses a *full* SVD (gesvd driver on CUDA). We use the thin SVD: U P Vᵀ with the
  block/diagonal zeroed equals τ_t − U_r U_rᵀ τ_t V_r V_rᵀ − Σ_{i≥r} (u_iᵀ τ_t v_i) u_i v_iᵀ,
  which needs only the first min(O, I) singular vectors — the same matrix, at a fraction of
  the cost. Note r counts the components *before* the crossing index (argmax of a boolean).
- ``class_embedding``: official OPCM only merges parameters of *leaf* modules, so HF CLIP's
  ``embeddings.class_embedding`` (owned by a non-leaf module) is never merged: it keeps the first
  model's value, shrunk by every global rescale. We treat it like any other non-linear tensor
  (λ recursion) by default; ``official_class_embedding=True`` reproduces the quirk for every
  tensor whose name ends in ``class_embedding``.
- Official merges ``named_parameters`` only; we merge every floating tensor (float buffers
  included). Integer buffers are copied from θ0.
- Norms are accumulated in float64 per tensor; the SVD and updates run in float32.
- Streamed (``chunk_numel`` given, as ``taskmerge merge`` does), every tensor whose update is
  element-wise (all but the SVD-projected linear weights: embeddings, norms, biases) is carried in row
  chunks, so an 8B model's [128256, 4096] embedding never has a whole float32 copy in memory. The
  values are those of whole tensors; only the float64 norm sums are associated differently.
- Degenerate guards (not in official, which would produce NaN): a zero τ̄ gives r = 0; a zero
  global norm skips the rescale.
"""
from __future__ import annotations

from typing import Annotated, Sequence

import torch
from tqdm.auto import tqdm

from taskmerge.merging.inputs import BLOCK, float_keys, key_of, parts, read, shape_of, upcastable
from taskmerge.merging.lowrank_svd import full_top_svd
from taskmerge.merging.outputs import Update
from taskmerge.merging.registry import Range, StateDict, register
from taskmerge.merging.selection import is_matrix

CARRIES_TAU_BAR = ("τ̄ in float32 (4 bytes per parameter, in `scratch`: memory, or disk when streaming), "
                   "plus one key of θ0 and of the current task (streamed: a row chunk of the element-wise keys)")


def crossing_rank(s: torch.Tensor, alpha: float) -> int:
    """First index i with cumsum(s)_i / sum(s) > α (strict), or 0 if there is none (official ``argmax``)."""
    total = s.sum()
    if total <= 0:
        return 0
    above = (s.cumsum(0) / total) > alpha
    return int(above.int().argmax()) if bool(above.any()) else 0


def project_update(tau_bar: torch.Tensor, tau: torch.Tensor, alpha: float, zero_diagonal: bool) -> torch.Tensor:
    """τ' = U P Vᵀ with P = Uᵀ τ V, P[:r,:r] = 0 and optionally P_ii = 0, for τ̄ = U diag(s) Vᵀ.

    Every triplet is used (the crossing rank needs every s_i, the diagonal term every u_i, v_i), so
    this is a full SVD (``lowrank_svd.full_top_svd``: a wide τ̄ is decomposed as its transpose, 2×
    faster in LAPACK for [768,3072]; benchmarks/README.md, "Profiles").
    """
    u, s, vh = full_top_svd(tau_bar, min(tau_bar.shape))
    r = crossing_rank(s, alpha)
    out = tau
    if r > 0:
        ur, vr = u[:, :r], vh[:r].T
        out = out - ur @ (ur.T @ tau @ vr) @ vr.T
    if zero_diagonal and r < s.numel():
        u_rest, vh_rest = u[:, r:], vh[r:]
        diag = ((u_rest.T @ tau) * vh_rest).sum(1)  # u_iᵀ τ v_i for i ≥ r
        out = out - (u_rest * diag) @ vh_rest
    return out


def tau_of(sd: StateDict, pretrained: StateDict, item, device) -> torch.Tensor:
    """τ = θ − θ0 for one key (or row :class:`~taskmerge.merging.inputs.Part`), float32 on ``device``."""
    theta = upcastable(read(sd, item).to(device=device))  # upcast inside the subtraction: no float32 copy of θ
    base = read(pretrained, item).to(device=device, dtype=torch.float32, copy=True)  # fresh: written into below
    return torch.sub(theta, base, out=base)  # θ − θ0 in θ0's float32 copy: one key-sized float32 buffer


def sq_norm(t: torch.Tensor) -> float:
    """‖t‖² in float64, block by block: a float32 square is exact in float64, and no float64 copy of a
    large key (an 8B model's embedding: 4.2 GB) is made."""
    flat = t.reshape(-1)
    return sum(float(b.double().pow_(2).sum()) for b in flat.split(BLOCK)) if flat.numel() else 0.0


def step_bar(items, name: str, step: int, steps: int):
    """``items`` with a progress bar for one step's pass (a step of OPCM at 8B takes an hour before the first
    merged tensor exists); off for small models, as the other methods' pre-pass bars."""
    return tqdm(items, desc=f"{name}: step {step}/{steps}", unit="tensor", leave=False, disable=len(items) < 50)


def first_view(items, finetuned0: StateDict):
    """The first step of every continual method: θ_1 exactly (keys or row chunks ``items``)."""
    return _View(lambda: ((item, read(finetuned0, item).clone()) for item in items))


class _View:
    """One step's merged model as a re-iterable stream of ``(key, value)`` (read before the next step)."""

    def __init__(self, produce):
        self.produce = produce

    def __iter__(self):
        return iter(self.produce())


def scratch_view(items, scratch, scale: float = 1.0) -> _View:
    """θ0 + scale·τ̄ for every key or row chunk, τ̄ read from ``scratch``."""
    return _View(lambda: ((item, Update(scratch[item], scale)) for item in items))


@register("opcm", sequential=True, memory=CARRIES_TAU_BAR)
def opcm(pretrained: StateDict, finetuned: Sequence[StateDict], *,
         alpha: Annotated[float, Range(0.0, 1.0)] = 0.5,
         zero_diagonal: bool = True,
         official_class_embedding: bool = False,
         kinds=None, device=None, scratch=None, chunk_numel=None):
    """OPCM (Tang et al., 2025; equations in the module docstring): one step view per task, the merge is the last.

    Hyperparameters:
        alpha (α, default 0.5, as in the paper's main results; ablation grid {0.1, …, 1.0}, no
            validation search): cumulative singular-value fraction (of s, not s²) that sets the
            protected rank r. α = 1 protects nothing (r = 0).
        zero_diagonal (default True = FusionBench ≥2c3df13, which zeroes every P_ii;
            False = paper commit f083162, where the diagonal fill was a no-op).
        official_class_embedding (default False): True keeps ``*class_embedding`` at the first
            model's value (only rescaled), as the official leaf-module loop does.

    τ̄ lives in ``scratch`` (a dict in memory; float32 files when streaming), one key (or row chunk of
    an element-wise key) at a time in memory; each step is one pass over the model, with the global
    rescale of the previous step folded into the next pass.
    """
    keys = float_keys(pretrained)
    tau_bar = {} if scratch is None else scratch
    matrices = {k for k in keys if is_matrix(k, torch.empty(shape_of(pretrained, k), device="meta"), kinds)}
    # the projected matrices whole (their SVD needs all of τ̄), the element-wise rest in row chunks
    items = [item for k in keys for item in ([k] if k in matrices else parts(pretrained, [k], chunk_numel))]
    sq = 0.0
    for item in step_bar(items, "opcm", 1, len(finetuned)):
        tau_bar[item] = t = tau_of(finetuned[0], pretrained, item, device)
        sq += sq_norm(t)
    norms, lam_prev, rescale = [sq ** 0.5], 1.0, 1.0
    yield first_view(items, finetuned[0])
    for step, sd in enumerate(finetuned[1:], start=2):
        sq_tau, sq_new = 0.0, 0.0
        for item in step_bar(items, "opcm", step, len(finetuned)):
            tau = tau_of(sd, pretrained, item, device)
            sq_tau += sq_norm(tau)
            bar = tau_bar[item].to(device)
            if rescale != 1.0:
                bar = bar * rescale  # the previous step's global rescale, applied as τ̄ is read
            if official_class_embedding and key_of(item).endswith("class_embedding"):
                new = bar
            elif item in matrices:
                new = lam_prev * bar + project_update(bar, tau, alpha, zero_diagonal)
            else:
                new = lam_prev * bar + tau
            tau_bar[item] = new
            sq_new += sq_norm(new)
            del tau, bar, new
        norms.append(sq_tau ** 0.5)
        avg, n = sum(norms) / len(norms), sq_new ** 0.5
        lam_prev = n / avg if avg > 0 else 1.0
        rescale = avg / n if n > 0 else 1.0
        yield _View(lambda r=rescale: ((item, Update(tau_bar[item] * r if r != 1.0 else tau_bar[item], 1.0))
                                       for item in items))
