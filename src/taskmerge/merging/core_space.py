"""Core Space merging of LoRA adapters (Panariello, Marczak et al., NeurIPS 2025, "Accurate and
Efficient Low-Rank Model Merging in Core Space"); official code github.com/apanariello4/core-space-merging
(``task_merger.py: get_core_matrices``, ``merge_space='core'``).

For every LoRA module, with ΔW_t = s_t·B_t A_t (B_t [m, r_t], A_t [r_t, n], s_t = alpha/r):

    A_stack = [A_1; …; A_T]  [Σr, n]     = U_A Σ_A V_Aᵀ      (reference basis of the inputs)
    B_stack = [s_1 B_1 | … | s_T B_T] [m, Σr] = U_B Σ_B W_Bᵀ  (reference basis of the outputs)
    M_t     = U_Bᵀ (s_t B_t)(A_t V_A)     [≤Σr, ≤Σr]          (task t in the core space)
    ΔM      = inner(M_1, …, M_T)                             (any registered merge, run on the cores)
    W       = W0 + λ · U_B ΔM V_Aᵀ

The bases span every B_t's columns and every A_t's rows, so U_B M_t V_Aᵀ = ΔW_t exactly (no
information lost): with inner task arithmetic the result is dense LoRA task arithmetic, and
adapters of different ranks need nothing special (Σr is just the sum of their ranks).

``inner`` is any registered model-output method, run through the registry on a model made of the
cores (``{module.weight: M_t}``, θ0 = 0, every core of kind ``linear``): task_arithmetic, ties,
dare (``dare_ties`` = dare with base=ties), tsv_m, average, and iso_c / cart once they are
registered. ``inner_params`` passes its hyperparameters (``"k=30,trim_scope=per_tensor"``); its own
global scale (``linear_in``) is 1 unless set, and λ (``scaling``) is applied after mapping back, as
the official ``param += scaling_coeffs · ΔW``. The official inner merges are per module (TIES:
top-k per matrix, ``trim_scope=per_tensor``); our TIES default trims globally over all cores.

Numerics: SVDs and M_t in float64 as official, then the cores and bases in float32 (the precision
of the registered inner merges; official keeps float64 throughout). M_t is the direct product above
(the official code reaches it through each factor's own SVD, the same matrix up to rounding).
"""
from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from taskmerge.merging.composition import inner_stream, update_of
from taskmerge.merging.lora import LoraModel, check_lora_models
from taskmerge.merging.outputs import Update
from taskmerge.merging.primitives import memo
from taskmerge.merging.registry import StateDict, register

ALIASES = {"dare_ties": ("dare", "base=ties")}  # the paper's names that are one of our methods with a setting


def core_matrices(factors: Sequence, apply_scale: bool = True, device=None
                  ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(U_B [m, k_B], V_Aᵀ [k_A, n], [M_t [k_B, k_A]]) of one module (module docstring), float32."""
    f64 = lambda t: t.to(device=device, dtype=torch.float64)  # noqa: E731
    bs = [f64(f.B) * (f.scale if apply_scale else 1.0) for f in factors]
    a_s = [f64(f.A) for f in factors]
    u_b = torch.linalg.svd(torch.cat(bs, dim=1), full_matrices=False)[0]
    vh_a = torch.linalg.svd(torch.cat(a_s, dim=0), full_matrices=False)[2]
    cores = [(u_b.T @ b) @ (a @ vh_a.T) for b, a in zip(bs, a_s)]
    return u_b.float(), vh_a.float(), [c.float() for c in cores]


def _all_cores(modules, models, apply_scale, device):
    return {m: core_matrices([x[m] for x in models], apply_scale, device)
            for m in tqdm(modules, desc="core_space: reference bases", unit="module", disable=len(modules) < 50)}


@register("core_space", linear_in="scaling", inputs="lora",
          memory="the bases and T cores of every adapted module (≈ Σr·(m + n + T·Σr) floats per module, kept across "
                 "a search), the inner merge's state over the cores, and one module's dense update")
def core_space(pretrained: StateDict, finetuned: Sequence[LoraModel], *,
               inner: str = "tsv_m", inner_params: str = "", scaling: float = 0.2,
               apply_lora_scale: bool = True, lora=None, device=None, cache=None):
    """Core Space merging: W = W0 + λ·U_B·inner(M_1 … M_T)·V_Aᵀ per LoRA module (module docstring).

    Defaults: the official ``vitB_r16_core_tsv`` config (TSV in core space, λ = 0.2, no
    isotropisation). Official search (``8vision_pertask_linearsearch.py``, one coordinate at a time,
    λ first): λ ∈ {0.1, 0.2, …, 9.9}, TIES top-k ∈ {100, 90, …, 10} (default 30), DARE p ∈
    {1e-5, 0.1, …, 0.9, 0.99}, CART rank fraction ∈ {0.04, 0.08, 0.16, 0.32}.

    Hyperparameters:
        inner ("tsv_m"): the merge run on the cores: any registered model-output method that needs
            no statistics, or ``dare_ties``.
        inner_params (""): its hyperparameters, ``"name=value,…"``, checked by its signature.
        scaling (λ, 0.2): multiplies the mapped-back update (negative: task negation).
        apply_lora_scale (True): ΔW_t = s_t·B_t A_t, s_t folded into B_t before the bases are
            computed (it matters with mixed ranks); False uses B_t A_t, as the official code, whose
            adapters all have alpha = r.

    Not offered: the official ``isotropize`` flag on top of other inner merges (inner=iso_c is
    task arithmetic + isotropisation in core space, the paper's Iso-C row).
    """
    models = list(lora) if lora is not None else list(finetuned)
    modules = check_lora_models(pretrained, models)
    name, preset = ALIASES.get(inner, (inner, ""))
    params = ",".join(filter(None, (preset, inner_params)))
    cores = memo(cache, ("core_space", apply_lora_scale), lambda: _all_cores(modules, models, apply_lora_scale, device))
    zero = {m + ".weight": torch.zeros_like(cores[m][2][0]) for m in modules}
    tasks = [{m + ".weight": cores[m][2][t] for m in modules} for t in range(len(models))]
    inner_cache = memo(cache, ("core_space_inner", apply_lora_scale), dict) if cache is not None else None
    stream = inner_stream(name, params, zero, tasks, owner="core_space",
                          context={"kinds": dict.fromkeys(zero, "linear"), "device": device, "cache": inner_cache})
    for key, value in stream:
        u_b, vh_a, _ = cores[key[:-len(".weight")]]
        yield key, Update(u_b @ update_of(value, zero[key]) @ vh_a, scaling)
