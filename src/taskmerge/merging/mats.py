"""MaTS: merging by matching models in task parameter subspaces (Tam, Bansal & Raffel, TMLR 2024).

Each block (a parameter tensor) of the merged model solves the normal equations of a
quadratic merging objective, Σ_t C_t (θ − θ_t) = 0, i.e. A θ = b with A = Σ_t C_t and
b = Σ_t C_t θ_t, by conjugate gradient (CG) from an initial merge. The objectives:

- ``average``: C_t = I (CG returns the average);
- ``diagonal_fisher``: C_t = diag(F_t) (the diagonal Fisher ``<param>.fisher``);
- ``regmean``: per Linear, W·(Σ_t G̃_in,t) = Σ_t W_t G̃_in,t;
- ``blockwise_fisher``: per Linear the Kronecker-factored Fisher,
  Σ_t G̃_out,t · W · G̃_in,t = Σ_t G̃_out,t · W_t · G̃_in,t (the official Σ G_in X G_out with
  X = Wᵀ), both Grams off-diagonal-scaled by λ; for IA3 vectors the full block Fisher,
  (Σ_t F_t) w = Σ_t F_t w_t (``<param>.fisher_block``).

Tensors the objective has no statistics for are averaged, as official (e.g. ``lm_head``,
which has no output Gram, and biases/norms/embeddings for the Linear objectives).

Unlike the official code (SciPy ``cg`` on CPU numpy arrays with a device round trip per
matrix product), CG here is torch-native on ``device``: blocks of the same shape and kind are
stacked and iterated together, each with its own convergence mask, and SciPy's stopping rule
(‖r‖ < max(rtol·‖b‖, atol), checked before each iteration; b = 0 returns 0) is reproduced.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections import defaultdict
from typing import Annotated, Callable, Literal, Sequence

import torch

from taskmerge.merging.inputs import float_keys, shape_of, shapes, tensors
from taskmerge.merging.outputs import collect
from taskmerge.merging.regmean import check_gram, scale_off_diagonal
from taskmerge.merging.registry import Range, StateDict, register
from taskmerge.stats.keys import check_stats_list, fisher_block_key, fisher_key, gather, gram_in_key, gram_out_key

log = logging.getLogger(__name__)

Objective = Literal["average", "diagonal_fisher", "regmean", "blockwise_fisher"]
BATCH_NUMEL = 2 ** 26  # operator elements stacked into one CG batch (256 MB of float32)


# ---------- batched conjugate gradient ---------------------------------------------------------------

def _bdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-block dot products. A BLAS ``dot`` per block for a few large blocks (a batched
    ``bmm`` of [K,1,n]@[K,n,1] is ~30x slower on CPU); ``vecdot`` for many small ones (IA3)."""
    K = a.shape[0]
    a2, b2 = a.reshape(K, -1), b.reshape(K, -1)
    if K <= 32:
        return torch.stack([torch.dot(a2[k], b2[k]) for k in range(K)])
    return torch.linalg.vecdot(a2, b2)


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, x0: torch.Tensor, *,
                       maxiter: int = 100, rtol: float = 1e-5, atol: float = 0.0, names: Sequence[str] = ()):
    """Solve A_k x_k = b_k for K stacked SPD systems (leading dim K) at once.

    ``matvec`` maps a stacked [K, ...] tensor to A applied blockwise. SciPy's rules per block:
    stop when ‖r_k‖ < max(atol, rtol·‖b_k‖) (checked before each iteration), x = 0 when b = 0;
    ``converged`` is False when ``maxiter`` iterations ran without meeting the test (SciPy's
    ``info = maxiter``). A block whose operator gives pᵀAp ≤ 0 is not positive definite: ValueError.

    Returns ``(x, info)`` with ``info = {"iterations": [K], "residual": [K] relative residual
    ‖r‖/‖b‖, "converged": [K] bool, "history": per-iteration max relative residual of the active blocks}``.
    """
    K = b.shape[0]
    bnorm = _bdot(b, b).sqrt()
    thresh = torch.clamp(rtol * bnorm, min=atol)
    zero_b = bnorm == 0
    x = torch.where(zero_b.view(-1, *[1] * (b.dim() - 1)), torch.zeros_like(b), x0.clone())
    r = b - matvec(x) if bool(x.any()) else b.clone()
    active = ~zero_b
    converged = zero_b.clone()
    iterations = torch.zeros(K, dtype=torch.long, device=b.device)
    rho_prev, p = None, None
    history = []
    shape = (-1, *[1] * (b.dim() - 1))
    rho = _bdot(r, r)
    for it in range(maxiter):
        rnorm = rho.sqrt()
        done = active & (rnorm < thresh)
        converged |= done
        active &= ~done
        rel = (rnorm / torch.where(zero_b, torch.ones_like(bnorm), bnorm))
        if not bool(active.any()):
            break
        history.append(float(rel[active].max()))
        if p is None:
            p = r.clone()
        else:
            beta = torch.where(active, rho / torch.where(rho_prev == 0, torch.ones_like(rho), rho_prev),
                               torch.zeros_like(rho))
            p.mul_(beta.view(shape)).add_(r)  # in place: the blocks are large, the cores few
        q = matvec(p)
        pq = _bdot(p, q)
        bad = active & (pq <= 0) & (rho > 0)
        if bool(bad.any()):
            k = int(bad.nonzero()[0])
            name = names[k] if k < len(names) else f"block {k}"
            raise ValueError(f"{name}: the merging objective is not positive definite (pᵀAp = {float(pq[k]):.3g} "
                             f"in CG iteration {it}); the statistics are corrupt or not Grams/Fishers")
        alpha = torch.where(active, rho / torch.where(pq == 0, torch.ones_like(pq), pq), torch.zeros_like(pq))
        x.addcmul_(alpha.view(shape), p)
        r.addcmul_(alpha.view(shape), q, value=-1.0)
        rho_prev, rho = rho, _bdot(r, r)
        iterations += active.long()
    rnorm = rho.sqrt()
    rel = rnorm / torch.where(zero_b, torch.ones_like(bnorm), bnorm)
    return x, {"iterations": iterations, "residual": rel, "converged": converged, "history": history}


# ---------- blocks: one linear system per tensor ------------------------------------------------------

@dataclasses.dataclass
class _Block:
    key: str
    kind: str  # "diag": A(w)=D⊙w | "right": A(W)=W·S | "kron": A(W)=Σ_t Gout_t·W·Gin_t | "dense": A(w)=F·w
    ops: tuple  # operator tensors (see kind)
    b: torch.Tensor
    x0: torch.Tensor

    def signature(self):
        return (self.kind, tuple(self.b.shape), tuple(tuple(o.shape) for o in self.ops))

    def numel(self):
        return sum(o.numel() for o in self.ops) + self.b.numel()


def _matvec(kind: str, ops: tuple) -> Callable[[torch.Tensor], torch.Tensor]:
    if kind == "diag":
        (D,) = ops
        return lambda x: D * x
    if kind == "right":
        (S,) = ops
        return lambda x: x @ S
    if kind == "dense":
        (F,) = ops
        return lambda x: (F @ x.unsqueeze(-1)).squeeze(-1)
    n = len(ops) // 2
    gouts, gins = ops[:n], ops[n:]
    return lambda x: sum(go @ x @ gi for go, gi in zip(gouts, gins))


def _stack(tensors):
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _solve_batches(blocks, iterations: int, tolerance: float, batch_numel: int, report: dict):
    """Yield ``(key, solution)`` for a stream of blocks, running CG on stacks of same-signature blocks of
    at most ``batch_numel`` operator elements, each stack as soon as it is full (so the batches, and the
    results, do not depend on whether the model is held in memory or streamed)."""
    pending: dict = defaultdict(list)
    sizes: dict = defaultdict(int)

    def run(sig):
        chunk = pending.pop(sig)
        sizes.pop(sig)
        ops = tuple(_stack([c.ops[j] for c in chunk]) for j in range(len(chunk[0].ops)))
        b, x0 = _stack([c.b for c in chunk]), _stack([c.x0 for c in chunk])
        x, info = conjugate_gradient(_matvec(sig[0], ops), b, x0, maxiter=iterations, rtol=tolerance,
                                     names=[c.key for c in chunk])
        for k, c in enumerate(chunk):
            report[c.key] = {"iterations": int(info["iterations"][k]), "residual": float(info["residual"][k]),
                             "converged": bool(info["converged"][k])}
            log.debug("mats CG %s: %d iterations, relative residual %.3g", c.key,
                      report[c.key]["iterations"], report[c.key]["residual"])
            yield c.key, x[k]

    for blk in blocks:
        if isinstance(blk, tuple):  # (key, averaged tensor): no system to solve
            yield blk
            continue
        sig = blk.signature()
        if pending[sig] and sizes[sig] + blk.numel() > batch_numel:
            yield from run(sig)
        pending[sig].append(blk)
        sizes[sig] += blk.numel()
    for sig in list(pending):
        yield from run(sig)


def _initial(init: str, init_scaling: float, pretrained: StateDict, finetuned: Sequence[StateDict]):
    """``key -> x0`` (float32 on the device of the finetuned tensors)."""
    if init in ("average", "pretrained", "task_arithmetic", "zeros"):
        def x0(key, device):
            base, *thetas = tensors(key, [pretrained, *finetuned], device)
            if init == "average":
                return torch.stack(thetas).mean(0)
            if init == "pretrained":
                return base
            if init == "zeros":
                return torch.zeros_like(base)
            return base + init_scaling * sum(t - base for t in thetas)
        return x0
    if not init.endswith(".safetensors") or not os.path.exists(init):
        raise ValueError(f"mats: init={init!r} is not average, pretrained, task_arithmetic, zeros, "
                         f"or an existing merged .safetensors file")
    from safetensors.torch import load_file

    merged = load_file(init)
    for key in float_keys(pretrained):
        shape = shape_of(pretrained, key)
        if key not in merged or tuple(merged[key].shape) != shape:
            got = tuple(merged[key].shape) if key in merged else "missing"
            raise ValueError(f"mats: init file {init}: tensor {key} is {got}, the model has {shape}")
    return lambda key, device: merged[key].to(device=device, dtype=torch.float32)


def mats_stream(pretrained: StateDict, finetuned: Sequence[StateDict], *, objective: Objective = "blockwise_fisher",
                off_diagonal_scale: float = 1.0, iterations: int = 100, tolerance: float = 1e-5,
                init: str = "task_arithmetic", init_scaling: float = 0.3, stats=None, device=None,
                batch_numel: int = BATCH_NUMEL, report: dict | None = None):
    """:func:`mats` as a stream of ``(key, merged float32)``; ``report[key]`` receives each block's CG log
    (iterations, relative residual, converged)."""
    report = {} if report is None else report
    if objective != "average":
        stats = check_stats_list(stats, len(finetuned), "mats", shapes(pretrained))
        suffix = {"diagonal_fisher": (".fisher",), "regmean": (".gram_in",),
                  "blockwise_fisher": (".gram_out", ".fisher_block")}[objective]
        if not any(k.endswith(suffix) for s in stats for k in s):
            raise ValueError(f"mats: objective {objective!r} found no statistics for any tensor "
                             f"(need {' or '.join(suffix)} entries)")
    x0_of = _initial(init, init_scaling, pretrained, finetuned)
    lam = off_diagonal_scale

    def grams(key, which):
        gs = gather(stats, which(key), "mats")
        if gs is None:
            return None
        out = []
        for t, g in enumerate(gs):
            g = g.to(device=device, dtype=torch.float32)
            check_gram(g, f"stats[{t}]: {which(key)}")
            out.append(scale_off_diagonal(g, lam))
        return out

    def blocks():
        for key in float_keys(pretrained):
            base_shape = shape_of(pretrained, key)
            thetas = tensors(key, finetuned, device)
            dev = thetas[0].device
            is_linear = key.endswith(".weight") and len(base_shape) == 2
            blk = None
            if objective == "average":
                blk = _Block(key, "diag", (torch.ones_like(thetas[0]),), torch.stack(thetas).mean(0), x0_of(key, dev))
            elif objective == "diagonal_fisher":
                fs = gather(stats, fisher_key(key), "mats")
                if fs is not None:  # no 1e-8 floor here, as the official CG variant
                    fs = [f.to(device=dev, dtype=torch.float32) for f in fs]
                    blk = _Block(key, "diag", (sum(fs),), sum(f * th for f, th in zip(fs, thetas)), x0_of(key, dev))
            elif objective == "regmean" and is_linear:
                gin = grams(key, gram_in_key)
                if gin is not None:
                    blk = _Block(key, "right", (sum(gin),), sum(th @ g for g, th in zip(gin, thetas)), x0_of(key, dev))
            elif objective == "blockwise_fisher":
                fb = gather(stats, fisher_block_key(key), "mats")
                if fb is not None:
                    fb = [f.to(device=dev, dtype=torch.float32) for f in fb]
                    for t, f in enumerate(fb):
                        check_gram(f, f"stats[{t}]: {fisher_block_key(key)}")
                    b = sum(f @ th.flatten() for f, th in zip(fb, thetas))
                    blk = _Block(key, "dense", (sum(fb),), b, x0_of(key, dev).flatten())
                elif is_linear and gather(stats, gram_out_key(key), "mats") is not None:
                    gin, gout = grams(key, gram_in_key), grams(key, gram_out_key)
                    if gin is None:
                        raise ValueError(f"mats: {gram_out_key(key)} is present but {gram_in_key(key)} is missing")
                    b = sum(go @ th @ gi for go, gi, th in zip(gout, gin, thetas))
                    blk = _Block(key, "kron", tuple(gout) + tuple(gin), b, x0_of(key, dev))
            yield (key, torch.stack(thetas).mean(0)) if blk is None else blk

    for key, value in _solve_batches(blocks(), iterations, tolerance, batch_numel, report):
        yield key, value.reshape(shape_of(pretrained, key))
    not_conv = [k for k, r in report.items() if not r["converged"]]
    log.info("mats[%s]: %d blocks by CG (%d not converged in %d iterations, worst relative residual %.3g)",
             objective, len(report), len(not_conv), iterations,
             max((r["residual"] for r in report.values()), default=0.0))


def mats_merge(pretrained: StateDict, finetuned: Sequence[StateDict], **kwargs) -> tuple[StateDict, dict]:
    """:func:`mats` returning ``(merged, cg_log)``; ``cg_log[key]`` has iterations, relative residual, converged."""
    report: dict = {}
    merged = collect(pretrained, mats_stream(pretrained, finetuned, report=report, **kwargs))
    return merged, report


@register("mats", memory="the CG batches in flight: per shape and kind of block, at most 2^26 operator elements "
                         "(256 MB float32) of systems, each solved as soon as its batch is full")
def mats(pretrained: StateDict, finetuned: Sequence[StateDict], *,
         objective: Objective = "blockwise_fisher",
         off_diagonal_scale: Annotated[float, Range(0.0, 1.0)] = 1.0,
         iterations: Annotated[int, Range(1, None)] = 100,
         tolerance: Annotated[float, Range(0.0, None)] = 1e-5,
         init: str = "task_arithmetic",
         init_scaling: Annotated[float, Range(0.0, None)] = 0.3,
         stats=None, device=None):
    """MaTS: conjugate gradient on each block's merging objective (see the module docstring).

    Hyperparameters:
        objective (default ``blockwise_fisher``): ``average`` | ``diagonal_fisher`` | ``regmean`` |
            ``blockwise_fisher`` (K-FAC Grams for Linear layers, full blocks for IA3 vectors).
        off_diagonal_scale (λ, default 1.0 as the official README): G̃ = λG + (1−λ)diag(G) for
            every Gram; official grid {0, 0.1, …, 1}.
        iterations (default 100, official ``--num_iterations``; the README uses 10 for IA3).
        tolerance (default 1e-5): SciPy's default relative tolerance, which the official code uses.
        init (default ``task_arithmetic``): the CG starting point: ``average``, ``pretrained``,
            ``task_arithmetic`` (θ0 + init_scaling·Στ_t, the README's choice), ``zeros`` (SciPy's
            default x0, what the official code does when no initialisation is passed, e.g. its
            CG-diagonal-Fisher example), or a path to a merged ``.safetensors``.
        init_scaling (default 0.3; the README uses 0.3 for full fine-tuning, 0.2 for IA3).

    Deviations from the official code: torch CG on ``device`` (same float32 arithmetic and
    stopping rule as SciPy's ``cg``); the per-task Gram sums of the ``regmean``,
    ``diagonal_fisher`` and IA3 objectives are formed once instead of in every product (same
    operator, float32 rounding differs); Grams are checked (``regmean.check_gram``) and an
    operator that is not positive definite raises instead of iterating on garbage.
    The CG log (iterations and residual per block) is logged at DEBUG/INFO and returned by
    :func:`mats_merge`.
    """
    return mats_stream(pretrained, finetuned, objective=objective, off_diagonal_scale=off_diagonal_scale,
                       iterations=iterations, tolerance=tolerance, init=init, init_scaling=init_scaling,
                       stats=stats, device=device)
