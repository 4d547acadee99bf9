"""WUDI-Merging (Cheng et al., ICML 2025, "Whoever Started the Interference Should End It: Guiding
Data-Free Model Merging via Task Vectors"); official code github.com/nathanielyvo/WUDI-Merging
(``vit/wudi_main.py: get_redundant_task_vector``; ``nlp_roberta/lamassu.py``).

Per linear weight (the task vectors of a linear layer span, approximately, its inputs), data-free:

    τ_m ← Σ_t τ_t,  then ``iterations`` Adam steps (lr, no weight decay) on
    L(τ_m) = Σ_t ‖(τ_m − τ_t) τ_tᵀ‖²_F / ‖τ_t‖²_F
    θ = θ0 + τ_m                                   (no scaling: ``scaling`` stays 1 officially)

∇L = 2 Σ_t (τ_m − τ_t) τ_tᵀ τ_t / ‖τ_t‖². We evaluate it in closed form rather than through
autograd, as 2(τ_m A − B) with A = Σ_t τ_tᵀτ_t / ‖τ_t‖² [in, in] and B = Σ_t τ_t τ_tᵀ τ_t / ‖τ_t‖²,
precomputed once (each as one product over the tasks side by side, B_t as (τ_t τ_tᵀ) τ_t when
in > out; then one [out, in]·[in, in] product per step), or, when in > 2·T·out makes that
Gram dearer, as the official per-task products (2·T·out²·in per step). Both are the official
gradient up to float32 rounding; Adam (torch.optim.Adam, betas (0.9, 0.999), eps 1e-8) is then
the official update. Adam on CPU is deterministic, and each matrix is optimised on its own, so
the method streams one linear layer at a time.

Which tensors: the official ViT code optimises exactly the open_clip block weights
``attn.in_proj_weight``, ``attn.out_proj.weight``, ``mlp.c_fc.weight``, ``mlp.c_proj.weight``; every
other tensor stays at θ0. Here: every 2-D weight of kind ``linear`` (``selection.is_matrix``: with a
model's ``kinds`` that is exactly the nn.Linear weights and MultiheadAttention's ``in_proj_weight``;
without, the shape rule, which also takes 2-D parameters like open_clip's ``proj``). ``others``
chooses θ0 (official) or the average task vector for the rest (FusionBench, which also optimises
``position_embedding``; that is not offered).

Attention layout (``qkv``): open_clip stores q, k and v as one stacked ``in_proj_weight`` [3d, d] and
the official code optimises it as one matrix, so its loss couples q, k and v (cross terms
(τ_m − τ_t)_q τ_{t,k}ᵀ); HF layouts store ``q_proj``/``k_proj``/``v_proj`` apart, and the merges
differ (issue 12's fidelity run measured up to 64 % on tiny models). ``as_stored`` (default) follows
the layout it is given: official on both, since the ViT code optimises open_clip's stacked
``in_proj_weight`` and the RoBERTa code (``nlp_roberta/merge.py``) HF's query, key and value apart;
``split`` optimises q, k, v apart everywhere (the HF behaviour on open_clip); ``stacked`` stacks HF
``q_proj``/``k_proj``/``v_proj`` (or BERT's ``query``/``key``/``value``) weights of one attention into
one matrix (the open_clip coupling on HF layouts).
"""
from __future__ import annotations

from typing import Annotated, Literal, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from taskmerge.merging.inputs import float_keys, shape_of, task_vectors
from taskmerge.merging.outputs import Update
from taskmerge.merging.registry import Range, StateDict, register
from taskmerge.merging.selection import is_matrix

QKV = (("q_proj.weight", "k_proj.weight", "v_proj.weight"),  # HF Llama/CLIP/… names
       ("query.weight", "key.weight", "value.weight"))         # HF BERT/RoBERTa names
IN_PROJ = "in_proj_weight"


def _gradient(taus: torch.Tensor, norms: torch.Tensor):
    """∇L(τ_m) as a function, in the cheaper of the two exact forms (module docstring)."""
    num_tasks, out_dim, in_dim = taus.shape
    weights = (1.0 / norms).view(-1, 1, 1)
    if in_dim > 2 * num_tasks * out_dim:
        return lambda m: 2 * ((((m - taus) @ taus.transpose(1, 2)) @ taus) * weights).sum(0)
    # A = Σ_t w_t τ_tᵀτ_t and B = Σ_t w_t τ_t τ_tᵀ τ_t (w_t = 1/‖τ_t‖²), each as one matrix product over the
    # tasks laid side by side (no [T, in, in] or [T, out, in] temporaries), B by the cheaper association
    rows = taus.reshape(num_tasks * out_dim, in_dim)  # [τ_1; …; τ_T]
    scaled = taus * weights
    if in_dim > out_dim:  # B_t = (τ_t τ_tᵀ) τ_t: [out, out] products
        a = scaled.reshape(num_tasks * out_dim, in_dim).T @ rows
        outer = scaled @ taus.transpose(1, 2)  # w_t τ_t τ_tᵀ  [T, out, out]
        b = outer.transpose(0, 1).reshape(out_dim, num_tasks * out_dim) @ rows
    else:  # B_t = τ_t (τ_tᵀ τ_t): [in, in] products
        grams = taus.transpose(1, 2) @ taus  # [T, in, in]
        a = (weights.view(1, -1) @ grams.reshape(num_tasks, -1)).view(in_dim, in_dim)
        b = scaled.transpose(0, 1).reshape(out_dim, num_tasks * in_dim) @ grams.reshape(num_tasks * in_dim, in_dim)
    return lambda m: 2 * (m @ a - b)


def wudi_matrix(taus: Sequence[torch.Tensor], iterations: int = 300, lr: float = 1e-5) -> torch.Tensor:
    """τ_m of one weight matrix: Σ_t τ_t, then ``iterations`` Adam steps on L (module docstring).

    Tasks with τ_t = 0 on this matrix drop out of L (their term is 0/0 in the official code)."""
    stack = torch.stack([t.float() for t in taus])
    norms = stack.flatten(1).square().sum(1)
    merged = torch.nn.Parameter(stack.sum(0))
    stack, norms = stack[norms > 0], norms[norms > 0]
    if iterations == 0 or len(norms) == 0:
        return merged.detach()
    gradient = _gradient(stack, norms)
    optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0)
    with torch.no_grad():
        for _ in range(iterations):
            merged.grad = gradient(merged)
            optimizer.step()
    return merged.detach()


def _groups(pretrained, keys: Sequence[str], qkv: str) -> dict[str, tuple[str, ...]]:
    """{linear key: the keys optimised with it as one row-stacked matrix} (a lone key: itself)."""
    groups = {k: (k,) for k in keys}
    if qkv != "stacked":
        return groups
    for key in keys:
        for names in QKV:
            if key.endswith(names[0]):
                members = tuple(key[:-len(names[0])] + s for s in names)
                if all(m in groups and shape_of(pretrained, m)[1] == shape_of(pretrained, key)[1] for m in members):
                    groups.update(dict.fromkeys(members, members))
    return groups


def _optimise(pretrained, finetuned, group, qkv, iterations, lr, device) -> dict[str, torch.Tensor]:
    taus = [task_vectors(k, pretrained, finetuned, device=device) for k in group]
    if len(group) > 1:  # HF q, k, v stacked row-wise into one matrix
        merged = wudi_matrix([torch.cat(parts) for parts in zip(*taus)], iterations, lr)
        return dict(zip(group, merged.split([shape_of(pretrained, k)[0] for k in group])))
    (key,), (task,) = group, taus
    if qkv == "split" and key.endswith(IN_PROJ) and task[0].shape[0] % 3 == 0:
        blocks = zip(*(t.chunk(3) for t in task))
        return {key: torch.cat([wudi_matrix(list(b), iterations, lr) for b in blocks])}
    return {key: wudi_matrix(task, iterations, lr)}


@register("wudi", key_local=True, cross_key={"qkv": ("stacked",)}, linear_in="scaling",
          memory="one linear layer's T task vectors, its [in, in] Gram and Adam's two moments (three for stacked "
                 "q, k, v); nothing across the model")
def wudi(pretrained: StateDict, finetuned: Sequence[StateDict], *,
         iterations: Annotated[int, Range(0, None)] = 300,
         lr: Annotated[float, Range(0.0, None)] = 1e-5,
         scaling: float = 1.0,
         qkv: Literal["as_stored", "split", "stacked"] = "as_stored",
         others: Literal["pretrained", "average"] = "pretrained",
         kinds: Mapping[str, str] | None = None, device=None):
    """WUDI-Merging: per linear weight, Adam on Σ_t ‖(τ_m − τ_t)τ_tᵀ‖²/‖τ_t‖² from Σ_t τ_t (module docstring).

    Hyperparameters (the paper tunes none; data-free, no validation):
        iterations (300): Adam steps per matrix (official ViT and RoBERTa).
        lr (1e-5): Adam's learning rate (official ViT; the RoBERTa script uses 2e-5).
        scaling (1.0): θ = θ0 + s·τ_m. Not in the paper (s = 1 there); kept so that task negation
            and the search's cached update work as for the other methods.
        qkv ("as_stored"): attention layout, see the module docstring (as_stored | split | stacked).
        others ("pretrained"): every tensor that is not a linear weight stays at θ0 (official) or
            takes the average task vector (``average``, FusionBench's treatment of non-2-D tensors).

    Deviations: the gradient in closed form (float32 rounding differs from autograd); a task whose
    τ_t is zero on a matrix drops out of that matrix's loss instead of giving NaN.
    """
    keys = float_keys(pretrained)
    linear = [k for k in keys if is_matrix(k, torch.empty(shape_of(pretrained, k), device="meta"), kinds)]
    groups = _groups(pretrained, linear, qkv)
    bar = tqdm(total=len(linear), desc="wudi: Adam per linear layer", unit="matrix", disable=len(linear) < 50)
    held: dict[str, torch.Tensor] = {}
    for key in keys:
        if key in groups and key not in held:  # the first of its group: optimise the group
            held.update(_optimise(pretrained, finetuned, groups[key], qkv, iterations, lr, device))
            bar.update(len(groups[key]))
        if key in held:
            yield key, Update(held.pop(key), scaling)
        elif key not in linear and others == "average":
            yield key, Update(torch.stack(task_vectors(key, pretrained, finetuned, device=device)).mean(0), scaling)
    bar.close()
