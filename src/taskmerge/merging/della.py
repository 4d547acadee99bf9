"""DELLA: Drop and rEscaLe via sampLing with mAgnitude (MagPrune), then elect and fuse.

Deep, Bhardwaj, Poria, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling" (arXiv 2406.11617); official code github.com/declare-lab/della (a
mergekit fork: ``sparsify.rank_magnitude``), upstream in mergekit as ``della``/``della_linear``
(``sparsify.della_magprune``).

Drop (MagPrune), per task and per row (dim 0; 0-/1-D tensors are one row) of n entries:

    r_i  = rank of |τ_i| in its row, ascending, 0 … n−1 (stable)
    p_i  = (p − ε) + 2ε · r_i / (n − 1)          keep probability in [p − ε, p + ε] (n = 1: p)
    m_i  ~ Bernoulli(p_i),   τ̃_i = τ_i m_i / p_i = τ_i m_i / (1 − d_i),  d_i = 1 − p_i
                                                   (``rescale="inverse_prob"``, DARE's rescale)

Elect and fuse (mergekit's ``get_mask(method="sum")`` and GTA):

    γ    = +1 where Σ_t τ̃_t ≥ 0, else −1         (no zero sign: a zero sum elects +)
    τ_m  = Σ_t τ̃_t [sign τ̃_t = γ] / #{t : sign τ̃_t = γ}   (``normalize``; divisor 0 → 1)
    θ    = θ0 + λ τ_m
    elect=False: τ_m = Σ_t τ̃_t, divided by T when ``normalize`` (mergekit's weights sum).

Seeded sampling, and how ε = 0 is DARE exactly. The official code draws ``torch.bernoulli(p)`` from
the global RNG in mergekit's tensor order, which no seed here can replay. We draw from private
generators in DARE's official call order: m_t = b_t ∨ e_t, with b_t ~ Bernoulli(p − ε) the DARE
mask of ``primitives.dare_rng_states`` (seed once, tasks in order, tensor names sorted, drop rate
1 − (p − ε)) and e_t ~ Bernoulli((p_i − (p − ε)) / (1 − (p − ε))) drawn from a generator seeded
per (seed, task, name). Then P(m_i = 1) = p_i exactly, entries stay independent, and at ε = 0
(e_t ≡ 0, p_i = p) the masks, the rescale and the sum are those of
``dare(drop_rate=1−p, base=task_arithmetic, seed=seed)``: ``della(ε=0, elect=False,
normalize=False)`` equals it bit for bit. The global RNG is never touched.

Streamed (``chunk_numel``, as ``taskmerge merge`` runs it), a matrix goes through in row chunks (whole rows:
the ranks are per row). Each task's keep-mask of the current key is held whole (bool): DARE's draw b_t is
one whole-key draw in the official order, and the extra draws e_t go one per entry in order, so the chunks
get the values of whole keys bit for bit (tests/merging/test_della_chunked.py). ``rescale="l1"`` needs
each whole τ_t's norms first: a pass over the chunks draws the masks and sums ‖τ_t‖₁ and ‖τ̃_t‖₁ in
float64 (the official float32 sums differ from them by a few ulps), a second one fuses.

Within a chunk, MagPrune works in place on the chunk's [T, …] task stack a block of whole rows at a time,
and the fuse a block of entries at a time (``inputs.BLOCK`` elements), so the float64 probabilities and
the temporaries stay cache-sized; the values are the whole-chunk formulas' (l1's norms, summed block by
block, to float64 rounding). 2.3× faster than whole-chunk temporaries at Llama-3-8B width
(benchmarks/README.md, the mergekit rows' DELLA).

Arithmetic in float32 (probabilities and L1 norms in float64) on ``device``; values come back in the input
dtype.
"""
from __future__ import annotations

import math
import zlib
from typing import Annotated, Literal, Sequence

import torch

from taskmerge.merging.breadcrumbs import ascending_ranks
from taskmerge.merging.inputs import BLOCK, blocks, float_keys, part_of, parts, shape_of, task_stack, task_stream
from taskmerge.merging.outputs import Update
from taskmerge.merging.primitives import dare_mask, dare_rng_states, disjoint_merge, stream_cache_bytes
from taskmerge.merging.registry import Range, StateDict, register


def magprune_probs(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep probabilities p_i (float64, τ's shape) ranked by magnitude within each row."""
    rows = _rows(tau)
    n = rows.shape[-1]
    if n < 2:
        unit = torch.full(rows.shape, 0.5, dtype=torch.float64, device=tau.device)
    else:
        unit = ascending_ranks(rows).to(torch.float64) / (n - 1)
    return ((density - epsilon) + unit * (2 * epsilon)).reshape(tau.shape)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """The ranking's rows: dim 0 with the other dimensions flattened (0-/1-D tensors: one row)."""
    return tensor.reshape(1, -1) if tensor.dim() < 2 else tensor.reshape(tensor.shape[0], -1)


def _extra_generator(seed: int, task: int, key: str) -> torch.Generator:
    salt = zlib.crc32(f"della/{task}/{key}".encode())
    return torch.Generator().manual_seed((seed * 1_000_003 + salt) % (1 << 63))


def magprune_keep(probs: torch.Tensor, base_mask: torch.Tensor, floor: float, extra: torch.Generator
                  ) -> torch.Tensor:
    """``base_mask`` ∨ Bernoulli((p_i − floor)/(1 − floor)) (bool, on the CPU). The extra draws go one per
    entry in order from ``extra``, so rows drawn chunk by chunk get the values of one whole draw."""
    keep = base_mask.cpu().bool()
    if bool((probs > floor).any()):  # ε > 0: true of every chunk alike, so every chunk draws
        lift = ((probs - floor) / (1 - floor)).clamp(0, 1).to(torch.float32).cpu()
        keep = keep | torch.bernoulli(lift, generator=extra).bool()
    return keep


def magprune_(tau: torch.Tensor, keep_rows: torch.Tensor, density: float, epsilon: float, extra: torch.Generator,
              rescale: str, sums: torch.Tensor | None = None) -> None:
    """MagPrune ``tau`` in place: τ ⊙ m, times 1/p_i for ``rescale="inverse_prob"``. ``keep_rows``: DARE's
    draw b_t of these rows (bool, CPU), or, when ``sums`` is given (the first pass of ``rescale="l1"``),
    overwritten with m and ‖τ‖₁, ‖τ ⊙ m‖₁ added to ``sums`` (τ then left as is).

    Done a block of whole rows at a time, so that the float64 probabilities and the draws stay
    cache-sized: the values of the whole-tensor formulas (ranks per row, draws in order)."""
    rows = _rows(tau)
    masks = keep_rows.view(rows.shape)  # a view: the first pass of l1 writes m into the key's mask
    floor, step = density - epsilon, max(1, BLOCK // rows.shape[1])
    for r in range(0, rows.shape[0], step):
        block, base = rows[r:r + step], masks[r:r + step]
        probs = magprune_probs(block, density, epsilon)
        keep = magprune_keep(probs, base, floor, extra)
        if sums is not None:
            base.copy_(keep)
            sums += _l1_sums(block, keep.to(block.device)).cpu()
            continue
        block.mul_(keep.to(block.device))
        if rescale == "inverse_prob":
            block.mul_((1 / (1 - (1 - probs))).to(torch.float32))


def _l1_sums(tau: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(‖τ‖₁, ‖τ ⊙ keep‖₁) in float64, summed over a tensor's chunks by the caller."""
    return torch.stack([tau.abs().sum(dtype=torch.float64), (tau * keep).abs().sum(dtype=torch.float64)])


def l1_factor(before: torch.Tensor, after: torch.Tensor) -> float:
    """mergekit ≥ 0.1's ``rescale="l1"``: ‖τ‖₁ / ‖τ ⊙ m‖₁ (1 when either is below 1e-7)."""
    return 1.0 if before < 1e-7 or after < 1e-7 else float(before / after)


def della_fuse(stack: torch.Tensor, elect: bool, normalize: bool) -> torch.Tensor:
    """τ_m from the [T, …] stack of pruned task vectors (elect and fuse, module docstring), computed a block
    of entries at a time (cache-sized temporaries; each entry's sums are the whole stack's)."""
    flat = stack.reshape(stack.shape[0], -1)
    out = flat.new_empty(flat.shape[1])
    for start, stop in blocks(flat.shape[1], max(1, BLOCK // stack.shape[0])):
        out[start:stop] = _fuse(flat[:, start:stop], elect, normalize)
    return out.view(stack.shape[1:])


def _fuse(stack: torch.Tensor, elect: bool, normalize: bool) -> torch.Tensor:
    if not elect:
        total = stack.sum(0)
        return total / stack.shape[0] if normalize else total
    sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0).to(stack.dtype)
    return disjoint_merge(stack, sign, "mean" if normalize else "sum")


@register("della", linear_in="scaling",
          memory="one row chunk of every input (as one [T, …] stack) and each task's bool keep-mask of the "
                 "current key (DARE's draw is whole-key, in the official RNG order); the base masks are kept when "
                 "they total <= 1 GiB of task vectors, else regenerated from saved generator states")
def della(pretrained: StateDict, finetuned: Sequence[StateDict], *,
          density: Annotated[float, Range(0.0, 1.0, lo_open=True)] = 0.7,
          epsilon: Annotated[float, Range(0.0, 1.0, hi_open=True)] = 0.07,
          scaling: float = 1.1,
          elect: bool = True,
          normalize: bool = True,
          rescale: Literal["inverse_prob", "l1", "none"] = "inverse_prob",
          seed: int = 42,
          device=None, chunk_numel=None):
    """DELLA: MagPrune every task vector, elect signs, fuse, θ = θ0 + λ τ_m (module docstring).

    Hyperparameters (defaults: the official README's example run, ``--drop_rate 0.3
    --window_size 0.14 --lambda_factor 1.1 --weights 1 --rescale 1 --seed 42``):
        density (p, 0.7): mean keep probability (official ``1 − drop_rate``; mergekit ``density``).
            density = 1 keeps every τ whole (mergekit).
        epsilon (ε, 0.07): half the probability window (official ``window_size / 2``; mergekit's
            default 0.15). Needs p − ε > 0 and p + ε < 1 (mergekit's check).
        scaling (λ, 1.1): multiplies the fused vector (official ``lambda``). Linear in λ.
        elect (True): sign election (``della``); False is mergekit's ``della_linear``.
        normalize (True): divide by the agreeing count (by T without election); mergekit's default
            is True for ``della``, False for ``della_linear``.
        rescale (``inverse_prob``): 1/p_i, the paper's and the official code's DARE rescale;
            ``l1``: current mergekit (match ‖τ‖₁); ``none``.
        seed (42, the official default): seeds the private generators (module docstring).

    Deviations: the sampling stream (module docstring); for tensors of more than 2 dimensions rows
    are dim 0 with the other dimensions flattened (mergekit ranks along dim 1 only); a row of one
    entry gets p (mergekit divides 0 by 0 there).
    """
    if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
        raise ValueError(f"della: density ± epsilon = {density} ± {epsilon} must lie in (0, 1)")
    if rescale not in ("inverse_prob", "l1", "none"):
        raise ValueError(f"della: rescale={rescale!r}: choose inverse_prob, l1 or none")
    if density >= 1:
        for item, taus in task_stream(pretrained, finetuned, device, chunk_numel)():
            yield item, Update(della_fuse(torch.stack(taus), elect, normalize), scaling, owned=True)
        return
    floor = density - epsilon
    keys = float_keys(pretrained)
    shapes = {key: shape_of(pretrained, key) for key in keys}
    num_tasks = len(finetuned)
    nbytes = 4 * num_tasks * sum(math.prod(shape) for shape in shapes.values())
    kept = [] if nbytes <= stream_cache_bytes() else None
    states = dare_rng_states(shapes, num_tasks, 1 - floor, seed, masks=kept)
    for key in keys:
        # row chunks are whole rows of the ranking (dim 0); 0-/1-D tensors are one row, never split
        items = parts(pretrained, [key], chunk_numel if len(shapes[key]) >= 2 else None)
        keeps = [kept[t].pop(key) if kept is not None else dare_mask(shapes[key], 1 - floor, states[t][key])
                 for t in range(num_tasks)]
        extras = [_extra_generator(seed, t, key) for t in range(num_tasks)]
        buffer, factors = [], None
        if rescale == "l1":  # its factor needs the whole key: a first pass draws the masks and sums the norms
            sums = torch.zeros(num_tasks, 2, dtype=torch.float64)
            for item in items:
                stack = task_stack(item, pretrained, finetuned, device, buffer)
                for t in range(num_tasks):
                    magprune_(stack[t], part_of(keeps[t], item), density, epsilon, extras[t], rescale, sums[t])
            factors = [l1_factor(*sums[t]) for t in range(num_tasks)]
        for item in items:
            stack = task_stack(item, pretrained, finetuned, device, buffer)
            for t in range(num_tasks):
                if factors is not None:
                    stack[t].mul_(part_of(keeps[t], item).to(stack.device)).mul_(factors[t])
                else:
                    magprune_(stack[t], part_of(keeps[t], item), density, epsilon, extras[t], rescale)
            yield item, Update(della_fuse(stack, elect, normalize), scaling, owned=True)

