"""TALL masks and Consensus merging (Wang, Dimitriadis et al., ICML 2024, "Localizing Task
Information for Improved Model Merging and Compression"); official code github.com/nik-dim/tall_masks
(specs/methods.md §4).

    τ_MTL = Σ_t τ_t                       (use_ties=False; unscaled)
          = TIES(τ; k=20, disjoint sum)   (use_ties=True; global trim, official)
    m_t   = |θ0 − θ_t| > λ_t · |(θ0 + τ_MTL) − θ_t|      (strict >, as the code; the paper writes ≥)
    TALL:       θ_t' = θ0 + m_t ⊙ τ_MTL                  (one model per task, scale 1)
    Consensus:  c = Σ_t m_t,  θ = θ0 + α · (τ_MTL ⊙ [c ≥ k])

A per-task λ search should compute τ_MTL once with :func:`multitask_vector`, then call
:func:`tall_masks_from_mtl` per candidate λ (or with one λ per task) and :func:`apply_mask` /
:func:`consensus_from_masks`. Masks are saved bit-packed with :func:`save_masks`.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Annotated, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from taskmerge.merging.inputs import blocks, float_keys, read, task_stream, task_vector_sum, tensors, upcastable
from taskmerge.merging.outputs import Update, resolve
from taskmerge.merging.primitives import memo
from taskmerge.merging.registry import Range, StateDict, register
from taskmerge.merging.ties import ties_stream

Masks = list[dict[str, torch.Tensor]]  # one {tensor name: bool mask} per task, in input order
MASK_FORMAT = "taskmerge-packed-masks-v1"
Lambda = Annotated[float, Range(0.0, None)]
CARRIES_MTL = ("one key of every input for a single merge (τ_MTL summed key by key, one read pass); in a search "
               "or with use_ties, τ_MTL in float32 as well (4 bytes per parameter; in `scratch`: memory, or disk "
               "when streaming; computed once per search)")


def multitask_vector(pretrained: StateDict, finetuned: Sequence[StateDict], *, use_ties: bool = False,
                     device=None, out=None):
    """τ_MTL in float32 for every floating tensor, Σ_t τ_t or TIES (k=20, global trim, disjoint sum),
    written into ``out`` (a dict by default; a disk-backed scratch mapping when streaming)."""
    out = {} if out is None else out
    if use_ties:
        for key, tau in ties_stream(task_stream(pretrained, finetuned, device), k=20, merge="sum"):
            out[key] = tau
        return out
    for key in float_keys(pretrained):
        out[key] = task_vector_sum(key, pretrained, finetuned, device)
    return out


def _lambdas(mask_lambda, n: int) -> list[float]:
    lambdas = [float(mask_lambda)] * n if isinstance(mask_lambda, (int, float)) else list(mask_lambda)
    if len(lambdas) != n:
        raise ValueError(f"got {len(lambdas)} mask_lambda values for {n} tasks")
    if any(lam < 0 for lam in lambdas):
        raise ValueError(f"mask_lambda must be >= 0, got {lambdas}")
    return lambdas


def _key_masks(base: torch.Tensor, multi: torch.Tensor, thetas, lambdas: Sequence[float]):
    """Yield m_t = |θ0 − θ_t| > λ_t·|θ_MTL − θ_t| per task (θ_MTL = θ0 + τ_MTL), two float buffers reused."""
    near = far = None
    for theta, lam in zip(thetas, lambdas):
        theta = theta.to(device=base.device, dtype=torch.float32)
        near = torch.sub(base, theta, out=near).abs_()
        far = torch.sub(multi, theta, out=far).abs_().mul_(lam)
        yield near > far


def key_masks(key: str, pretrained: StateDict, finetuned: Sequence[StateDict], tau_mtl: torch.Tensor,
              lambdas: Sequence[float], device=None) -> list[torch.Tensor]:
    """m_t = |θ0 − θ_t| > λ_t·|(θ0 + τ_MTL) − θ_t| for one tensor, every task."""
    base, *thetas = tensors(key, [pretrained, *finetuned], device)
    return list(_key_masks(base, base + tau_mtl.to(base.device), thetas, lambdas))


def _mtl_by_key(pretrained, finetuned, use_ties, device, cache, scratch):
    """(key, θ0 in float32, τ_MTL, one lazy reader of the θ_t, fresh) for every floating tensor; ``fresh``:
    τ_MTL is this key's own new tensor (the caller may overwrite it), not the shared one's.

    In a search (``cache`` given) or with TIES, τ_MTL is built once for the whole model
    (:func:`multitask_vector`, memoised); for a single merge of the task-vector sum it is summed key by
    key from the same reads the masks make: one pass over the inputs instead of two, no model-sized τ_MTL.
    """
    tau_mtl = None if cache is None and not use_ties else _shared_mtl(pretrained, finetuned, use_ties, device,
                                                                      cache, scratch)
    for key in float_keys(pretrained):
        base = read(pretrained, key).to(device=device, dtype=torch.float32)
        tau = task_vector_sum(key, pretrained, finetuned, device) if tau_mtl is None else tau_mtl[key].to(base.device)
        yield key, base, tau, (read(sd, key) for sd in finetuned), tau_mtl is None


def tall_masks_from_mtl(pretrained: StateDict, finetuned: Sequence[StateDict], tau_mtl: StateDict,
                        mask_lambda: float | Sequence[float], device=None) -> Masks:
    """Every task's masks over the whole model; ``mask_lambda`` is one λ or one per task."""
    lambdas = _lambdas(mask_lambda, len(finetuned))
    masks: Masks = [{} for _ in finetuned]
    for key in float_keys(pretrained):
        for t, m in enumerate(key_masks(key, pretrained, finetuned, tau_mtl[key], lambdas, device)):
            masks[t][key] = m
    return masks


def apply_mask(pretrained: StateDict, tau_mtl: StateDict, mask: dict[str, torch.Tensor], scaling: float = 1.0
               ) -> StateDict:
    """θ0 + s·(mask ⊙ τ_MTL) in the input dtype; tensors without a mask are copied from θ0."""
    return {key: resolve(t, Update(tau_mtl[key] * mask[key].to(tau_mtl[key].device), scaling))
            if key in tau_mtl else t.clone() for key, t in pretrained.items()}


def consensus_mask(masks: Masks, min_tasks: int) -> dict[str, torch.Tensor]:
    """[Σ_t m_t ≥ k] per tensor: weights used by at least ``min_tasks`` tasks."""
    if min_tasks < 0:
        raise ValueError(f"min_tasks={min_tasks} must be >= 0")
    return {key: torch.stack([m[key] for m in masks]).sum(0) >= min_tasks for key in masks[0]}


def consensus_from_masks(pretrained: StateDict, tau_mtl: StateDict, masks: Masks, min_tasks: int,
                         scaling: float) -> StateDict:
    """Consensus merge from precomputed τ_MTL and (e.g. per-task selected) TALL masks."""
    return apply_mask(pretrained, tau_mtl, consensus_mask(masks, min_tasks), scaling)


def _shared_mtl(pretrained, finetuned, use_ties, device, cache, scratch):
    return memo(cache, ("tau_mtl", use_ties),
                lambda: multitask_vector(pretrained, finetuned, use_ties=use_ties, device=device, out=scratch))


@register("tall_mask", output="per_task", memory=CARRIES_MTL + " and its T outputs")
def tall_mask(pretrained: StateDict, finetuned: Sequence[StateDict], *,
              mask_lambda: Lambda = 0.4, use_ties: bool = False, device=None, cache=None, scratch=None,
              artifacts=None):
    """TALL masks: one model per task, θ_t' = θ0 + m_t ⊙ τ_MTL (equations in the module docstring).

    Every floating tensor takes part (official: the whole flattened state dict); integer buffers
    are copied from θ0. With ``artifacts`` (a dict), the masks are left in ``artifacts["masks"]``
    (one {name: bool mask} per task) for :func:`save_masks`.

    Hyperparameters:
        mask_lambda (λ, 0.4): the official code has no single default; it builds masks for
            λ ∈ {0.2, 0.3, 0.4, 0.5, 0.6} and picks the best λ *per task* on that task's val top-1
            (ties → the smaller λ). 0.4 is the grid's middle. For the per-task selection use
            :func:`multitask_vector` + :func:`tall_masks_from_mtl` with a list of λ.
        use_ties (False): τ_MTL from TIES (k=20, disjoint sum) instead of the task-vector sum.
    """
    lambdas = _lambdas(mask_lambda, len(finetuned))
    kept = artifacts.setdefault("masks", [{} for _ in finetuned]) if artifacts is not None else None
    for key, base, tau, thetas, fresh in _mtl_by_key(pretrained, finetuned, use_ties, device, cache, scratch):
        multi = tau.add_(base) if fresh else base + tau  # θ_MTL in τ_MTL's own storage when it is this key's
        merged, masks = _tall_key(base, multi, thetas, lambdas, keep_masks=kept is not None)
        for t, m in enumerate(masks):
            kept[t][key] = m.cpu()
        yield key, merged


_BLOCK = 1 << 16  # elements: a block's differences and mask stay in cache across the steps of one task (smaller
#                  than inputs.BLOCK: four buffers are live at once)


def _tall_key(base: torch.Tensor, multi: torch.Tensor, thetas, lambdas: Sequence[float], keep_masks: bool):
    """Every task's TALL merge of one tensor (and its masks if asked), block by block: the operations of
    :func:`_key_masks` and θ0 + m ⊙ τ_MTL at scale 1 (θ_MTL where m holds, θ0 elsewhere: one select), per
    element in the same order, but on small reused buffers: only the results are tensor-sized."""
    flat_base, flat_multi, n = base.reshape(-1), multi.reshape(-1), base.numel()
    merged = [torch.empty_like(flat_base) for _ in lambdas]
    masks = [torch.empty(n, dtype=torch.bool, device=base.device) for _ in lambdas] if keep_masks else []
    near, far = flat_base.new_empty(min(n, _BLOCK)), flat_base.new_empty(min(n, _BLOCK))
    mask = torch.empty(min(n, _BLOCK), dtype=torch.bool, device=base.device)
    for t, (theta, lam) in enumerate(zip(thetas, lambdas)):
        theta = upcastable(theta.to(device=base.device)).reshape(-1)  # bf16 upcast inside the subtractions
        for s, e in blocks(n, _BLOCK):
            b, mu, th = flat_base[s:e], flat_multi[s:e], theta[s:e]
            nr = torch.sub(b, th, out=near[:e - s]).abs_()
            fr = torch.sub(mu, th, out=far[:e - s]).abs_().mul_(lam)
            m = torch.gt(nr, fr, out=masks[t][s:e] if keep_masks else mask[:e - s])
            torch.where(m, mu, b, out=merged[t][s:e])
    return [x.view(base.shape) for x in merged], [m.view(base.shape) for m in masks]


@register("consensus", linear_in="scaling", memory=CARRIES_MTL)
def consensus(pretrained: StateDict, finetuned: Sequence[StateDict], *,
              min_tasks: Annotated[int, Range(0, None)] = 2,
              mask_lambda: Lambda = 0.4, use_ties: bool = False,
              scaling: float = 0.3, device=None, cache=None, scratch=None):
    """Consensus merging: θ = θ0 + α·(τ_MTL ⊙ [Σ_t m_t ≥ k]) (equations in the module docstring).

    Hyperparameters:
        min_tasks (k, 2): keep weights selected by at least k tasks' TALL masks; 2 drops
            "selfish" (1 task) and "catastrophic" (0 tasks) weights; 0 gives TA (or TIES with
            disjoint *sum*, use_ties), k > T gives θ0.
        mask_lambda (λ, 0.4): the TALL masks' λ, one value for all tasks here. Official Consensus
            loads masks whose λ was chosen per task from {0.2, …, 0.6}; reproduce that with
            :func:`consensus_from_masks`.
        use_ties (False): TIES (k=20, disjoint sum) for τ_MTL and the merged vector.
        scaling (α, 0.3): official grid {0.1, …, 1.0} (tall_masks) or {1/30, …, 1} (TSV fork);
            no official default, 0.3 is Task Arithmetic's. Negative α negates the merged vector.
    """
    if min_tasks < 0:
        raise ValueError(f"min_tasks={min_tasks} must be >= 0")
    lambdas = _lambdas(mask_lambda, len(finetuned))
    for key, base, tau, thetas, fresh in _mtl_by_key(pretrained, finetuned, use_ties, device, cache, scratch):
        yield key, Update(_consensus_key(base, tau, thetas, lambdas, min_tasks, out=tau if fresh else None),
                          scaling, owned=True)


def _consensus_key(base: torch.Tensor, tau: torch.Tensor, thetas, lambdas: Sequence[float], min_tasks: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """τ_MTL ⊙ [Σ_t m_t ≥ k] of one tensor (into ``out``, which may be ``tau`` itself), block by block: the
    masks of :func:`_key_masks`, θ_MTL = θ0 + τ_MTL included, per element in the same order, counted on
    small reused buffers; only the int16 count is tensor-sized besides the result (T < 2^15 tasks)."""
    flat_base, flat_tau, n = base.reshape(-1), tau.reshape(-1), base.numel()
    count = torch.zeros(n, dtype=torch.int16, device=base.device)
    multi, near, far = (flat_base.new_empty(min(n, _BLOCK)) for _ in range(3))
    mask = torch.empty(min(n, _BLOCK), dtype=torch.bool, device=base.device)
    for theta, lam in zip(thetas, lambdas):
        theta = upcastable(theta.to(device=base.device)).reshape(-1)
        for s, e in blocks(n, _BLOCK):
            b, th = flat_base[s:e], theta[s:e]
            mu = torch.add(b, flat_tau[s:e], out=multi[:e - s])
            nr = torch.sub(b, th, out=near[:e - s]).abs_()
            fr = torch.sub(mu, th, out=far[:e - s]).abs_().mul_(lam)
            count[s:e].add_(torch.gt(nr, fr, out=mask[:e - s]))
    return torch.mul(tau, count.view(tau.shape) >= min_tasks, out=out)


def save_masks(path: str | os.PathLike, masks: Masks) -> None:
    """Write masks bit-packed (``np.packbits``, big bit order) to one safetensors file, atomically.

    Tensor ``"{t}/{name}"`` holds task t's packed uint8 bits; the metadata records the format,
    the number of tasks and every tensor's shape, so :func:`load_masks` restores them exactly.
    """
    if not masks:
        raise ValueError("no masks to save")
    shapes = {key: list(m.shape) for key, m in masks[0].items()}
    packed = {}
    for t, task_masks in enumerate(masks):
        if {k: list(m.shape) for k, m in task_masks.items()} != shapes:
            raise ValueError(f"{path}: mask of task {t} has other tensor names or shapes than task 0")
        for key, m in task_masks.items():
            if m.dtype != torch.bool:
                raise ValueError(f"{path}: mask {key} of task {t} is {m.dtype}, expected torch.bool")
            packed[f"{t}/{key}"] = torch.from_numpy(np.packbits(m.detach().cpu().flatten().numpy()))
    meta = {"format": MASK_FORMAT, "num_tasks": str(len(masks)), "shapes": json.dumps(shapes)}
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    try:
        save_file(packed, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_masks(path: str | os.PathLike) -> Masks:
    """Read masks written by :func:`save_masks` (bool tensors, original shapes, task order kept)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != MASK_FORMAT:
        raise ValueError(f"{path}: not a taskmerge mask file (format {meta.get('format')!r})")
    shapes = json.loads(meta["shapes"])
    packed = load_file(str(path))
    masks: Masks = []
    for t in range(int(meta["num_tasks"])):
        task_masks = {}
        for key, shape in shapes.items():
            numel = int(np.prod(shape)) if shape else 1
            bits = np.unpackbits(packed[f"{t}/{key}"].numpy(), count=numel)
            task_masks[key] = torch.from_numpy(bits.astype(bool)).view(shape)
        masks.append(task_masks)
    return masks
