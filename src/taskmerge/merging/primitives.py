"""Shared primitives for merging methods: trim / elect / disjoint merge, DARE, the stream cache, memo.

Every method works tensor by tensor (``merging.inputs``): it never flattens a whole model into
one vector, so memory stays at a few tensors per task. Arithmetic runs in float32 (float64 where
the official code does) and results come back in the input dtype. Integer buffers (e.g.
``position_ids``) are never touched: every consumer copies them from the pretrained model.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Iterable, Literal, Mapping, Sequence

import torch


# ---------------------------------------------------------------------------------------------
# Trim / elect / disjoint merge / DARE (TIES-merging, TALL masks, KnOTS; specs §1, §4, §6).
#
# A *task stream* is a zero-argument callable returning an iterator of ``(key, [τ_1 … τ_T])``,
# one float32 tensor per task for each key, always in the same order. Methods that need a
# statistic of the whole model (the global top-k threshold, the majority sign) call it once per
# pass instead of flattening the model into a [T, D] matrix: memory stays at one key's tensors
# (unless the whole stream is small enough to keep: ``cached_stream``). ``inputs.task_stream``
# builds one from lazily readable models.
# ---------------------------------------------------------------------------------------------
TaskStream = Callable[[], Iterable[tuple[str, Sequence[torch.Tensor]]]]
MergeRule = Literal["mean", "sum", "max"]
# A stream whose tensors total at most this many bytes is kept after its first pass (see
# cached_stream). Override with the environment variable TASKMERGE_STREAM_CACHE_BYTES (0: never).
STREAM_CACHE_BYTES = 1 << 30


def stream_cache_bytes() -> int:
    return int(os.environ.get("TASKMERGE_STREAM_CACHE_BYTES", STREAM_CACHE_BYTES))


def cached_stream(stream: TaskStream, nbytes: int) -> TaskStream:
    """``stream``, replayed from memory after its first complete pass when its tensors total
    ``nbytes`` ≤ :func:`stream_cache_bytes`.

    Multi-pass methods (global top-k: 2 passes, majority sign, merge; DARE's masks) otherwise
    recompute every τ (and redraw every mask) on each pass. That is the right trade for a model
    that does not fit in memory, and a waste for one that does (a small model, or a search that
    merges many times): with the cache, the first pass costs what it did and the others are free.
    The decision is made up front from ``nbytes``, so a large model never holds a partial cache.
    Consumers must not modify the yielded tensors in place (none does).
    """
    if nbytes > stream_cache_bytes():
        passthrough = lambda: stream()  # noqa: E731
        passthrough.nbytes = nbytes
        return passthrough
    kept: list = []
    complete = False

    def replay():
        nonlocal complete
        if complete:
            yield from kept
            return
        kept.clear()  # an earlier pass stopped early: start over
        for key, taus in stream():
            kept.append((key, taus))
            yield key, taus
        complete = True
    replay.nbytes = nbytes  # streams derived from this one (trimmed, masked) have the same size
    return replay


def kth_index(numel: int, k: float, exact: bool = False) -> int:
    """1-based rank of the top-k threshold among |x| sorted ascending; 0 means "keep everything".

    ``k`` is the percentage *kept* (TIES k=20 keeps 20 %). Official: K = k/100, then
    ``kthvalue(d − int(d·K))`` and keep ``|x| >= thr``: int(d·K) + 1 values survive (plus ties at
    the threshold), one more than K·d. k=100 short-circuits (no trim); when
    int(d·K) = 0 the rank is d, so only the maximum (and its ties) survives.
    ``exact=True`` keeps int(d·K) values (mergekit's and peft's count): rank d − int(d·K) + 1, and
    d + 1 (nothing kept) when int(d·K) = 0.
    """
    if not 0 < k <= 100:
        raise ValueError(f"top-k percentage k={k} must be in (0, 100]")
    if k == 100 or numel == 0:
        return 0
    return numel - int(numel * (k / 100)) + (1 if exact else 0)


def kthvalue_abs(tensor: torch.Tensor, rank: int) -> torch.Tensor | None:
    """``torch.kthvalue(|x|.flatten(), rank)`` of one tensor (None when rank is 0: no trim; +inf when
    rank exceeds the tensor: nothing kept)."""
    if rank == 0:
        return None
    if rank > tensor.numel():
        return torch.tensor(float("inf"))
    return tensor.detach().abs().flatten().kthvalue(rank).values


def _abs_bits(tensor: torch.Tensor) -> torch.Tensor:
    # |x| ≥ 0 in float32: its IEEE bit pattern, read as int32, is ordered like the value.
    return tensor.detach().float().abs().flatten().view(torch.int32)


def streamed_kthvalue_abs(stream: TaskStream, ranks: Sequence[int] | Callable[[int], int]
                          ) -> list[torch.Tensor | None]:
    """Exact ``kthvalue(|concat_keys(τ_t)|, ranks[t])`` per task without concatenating anything.

    Radix selection on the float32 bit pattern of |x|, in two passes over the stream: pass 1
    histograms the high 16 bits and finds the bucket holding the rank-th value, pass 2 histograms
    the low 16 bits inside that bucket. The result equals ``torch.kthvalue`` bit for bit (it *is*
    one of the values); ties need no special care. A rank of 0 gives None (no trim).

    ``ranks``: one per task, or a function giving every task's rank from the number of values per
    task, which pass 1 counts while it histograms (no pass of its own over the inputs).
    """
    if callable(ranks):
        high, numel = _high_histograms(stream, None)
        ranks = [ranks(numel)] * len(high)
    else:
        todo = [t for t, r in enumerate(ranks) if r > 0]
        if not todo:
            return [None] * len(ranks)
        high, _ = _high_histograms(stream, todo)
    out: list[torch.Tensor | None] = [None] * len(ranks)
    prefix, rest = {}, {}
    for t in [t for t in high if ranks[t] > 0]:
        cum = high[t].cumsum(0)
        if int(cum[-1]) + 1 == ranks[t]:  # exact count of zero values: nothing is kept
            out[t] = torch.tensor(float("inf"))
            continue
        if int(cum[-1]) < ranks[t]:
            raise ValueError(f"rank {ranks[t]} exceeds the {int(cum[-1])} values of task {t}")
        prefix[t] = int(torch.searchsorted(cum, ranks[t]))  # first bucket with cum >= rank
        rest[t] = ranks[t] - (int(cum[prefix[t] - 1]) if prefix[t] > 0 else 0)
    if not prefix:
        return out
    low = {t: torch.zeros(1 << 16, dtype=torch.long) for t in prefix}
    for _, taus in stream():
        for t in prefix:
            bits = _abs_bits(taus[t])
            low[t] += torch.bincount(bits[(bits >> 16) == prefix[t]] & 0xFFFF, minlength=1 << 16).cpu()
    for t in prefix:
        bits = (prefix[t] << 16) | int(torch.searchsorted(low[t].cumsum(0), rest[t]))
        out[t] = torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0]
    return out


def _high_histograms(stream: TaskStream, todo: Sequence[int] | None) -> tuple[dict[int, torch.Tensor], int]:
    """Pass 1 of the radix selection: per task in ``todo`` (every task when None) the histogram of the
    high 16 bits of |τ_t|, and the number of values per task."""
    high: dict[int, torch.Tensor] | None = None
    numel = 0
    for _, taus in stream():
        if high is None:
            high = {t: torch.zeros(1 << 16, dtype=torch.long) for t in (range(len(taus)) if todo is None else todo)}
        numel += taus[0].numel()
        for t in high:
            high[t] += torch.bincount(_abs_bits(taus[t]) >> 16, minlength=1 << 16).cpu()
    return high or {}, numel


def global_topk_thresholds(stream: TaskStream, k: float, exact: bool = False) -> list[torch.Tensor | None]:
    """Official TIES/TALL/KnOTS trim thresholds: one per task over all keys of the stream (two passes;
    none for k=100, which reads one key for the number of tasks)."""
    kth_index(0, k)  # checks k
    if k == 100:
        first = next(iter(stream()), None)
        return [None] * (len(first[1]) if first is not None else 0)
    return streamed_kthvalue_abs(stream, lambda numel: kth_index(numel, k, exact))


def trim(tau: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
    """τ̂ = τ ⊙ [|τ| ≥ thr] (ties at the threshold kept); None means no trim."""
    if threshold is None:
        return tau
    return torch.where(tau.abs() >= threshold.to(tau.device), tau, 0.0)


def trim_tasks(taus: Sequence[torch.Tensor], k: float, thresholds: Sequence[torch.Tensor | None] | None = None,
               exact: bool = False) -> torch.Tensor:
    """Stack [T, …] of trimmed task tensors: global ``thresholds`` if given, else per tensor (mergekit)."""
    if thresholds is None:
        thresholds = [kthvalue_abs(tau, kth_index(tau.numel(), k, exact)) for tau in taus]
    return torch.stack([trim(tau, thr) for tau, thr in zip(taus, thresholds)])


def elect_sign(stack: torch.Tensor) -> torch.Tensor:
    """γ = sign(Σ_t τ̂_t) (TIES "mass" rule), with 0 where the sum is exactly 0."""
    return torch.sign(stack.sum(0))


def fill_zero_signs(sign: torch.Tensor, majority: float) -> torch.Tensor:
    """Replace γ = 0 by the majority sign of the whole model (TIES ``resolve_zero_signs``)."""
    return torch.where(sign == 0, torch.full_like(sign, majority), sign)


def majority_sign(trimmed: TaskStream) -> float:
    """sign(Σ_j γ_j) over the *whole* model, streamed: the majority of the elected signs.
    ``trimmed`` yields ``(key, [T, …] trimmed stack)``."""
    total = 0.0
    for _, stack in trimmed():
        total += float(elect_sign(stack).sum(dtype=torch.float64))
    return float(math.copysign(1.0, total)) if total != 0 else 0.0


def disjoint_merge(stack: torch.Tensor, sign: torch.Tensor | None, merge: MergeRule,
                   max_keeps_sign: bool = True) -> torch.Tensor:
    """Merge a [T, …] stack keeping only entries that agree with ``sign`` (None: keep all).

    keep_t = (τ̂_t > 0) where γ > 0, else (τ̂_t < 0) (so γ = 0 keeps negatives, as official).
    ``mean``: Σ kept / max(#non-zero kept, 1); ``sum``: Σ kept; ``max``: max_t |kept_t| · γ
    (``max_keeps_sign=False``: without re-applying γ, as KnOTS' ``masked_merge``).
    """
    if sign is None:
        kept, keep = stack, stack != 0
    else:
        keep = (stack * sign) > 0  # agrees with a non-zero γ; one product instead of two compares and a select
        zero = sign == 0
        if bool(zero.any()):  # only when the whole model's majority is 0 too: γ = 0 keeps negatives
            keep |= zero & (stack < 0)
        kept = torch.where(keep, stack, 0.0)
    if merge == "sum":
        return kept.sum(0)
    if merge == "mean":  # kept entries are exactly the non-zero ones: count them as floats (T is small)
        return kept.sum(0) / keep.sum(0, dtype=kept.dtype).clamp(min=1)
    if merge == "max":
        largest = kept.abs().max(0).values
        if not max_keeps_sign:
            return largest
        if sign is None:
            raise ValueError("merge='max' needs an elected sign")
        return largest * sign
    raise ValueError(f"merge={merge!r}: choose one of mean, sum, max")


def dare_rng_states(shapes: Mapping[str, torch.Size], num_tasks: int, drop_rate: float, seed: int,
                    masks: list[dict[str, torch.Tensor]] | None = None) -> list[dict[str, torch.Tensor]]:
    """Generator state at the start of each (task, key) draw of the official DARE call order.

    Official (KnOTS ``apply_dare``): ``torch.manual_seed(seed)`` once, then for each task in order
    and each key in *sorted* order ``torch.randint(2, shape).bernoulli(1 − p)`` (the randint only
    advances the RNG). We replay that sequence on a private CPU generator (same stream as the
    global one after ``manual_seed``, without touching global state) and remember the state before
    each draw, so masks can be regenerated in any order, key by key. Pass a list as ``masks`` to
    also keep the drawn masks (bool, one dict per task) instead of drawing them twice.
    """
    gen = torch.Generator().manual_seed(seed)
    states = []
    for _ in range(num_tasks):
        per_key, drawn = {}, {}
        for key in sorted(shapes):
            per_key[key] = gen.get_state()
            mask = _draw_dare_mask(shapes[key], drop_rate, gen)
            if masks is not None:
                drawn[key] = mask
        states.append(per_key)
        if masks is not None:
            masks.append(drawn)
    return states


_ADVANCE_BLOCK = 1 << 22  # elements of the throw-away randint drawn at a time


def _draw_dare_mask(shape, drop_rate: float, gen: torch.Generator) -> torch.Tensor:
    """``torch.randint(2, shape).bernoulli(1 − p)`` of the official code as a bool mask, without its int64
    tensor (4.2 GB at a [128256, 4096] embedding): the randint only advances the generator, one draw per
    element in order whatever the dtype (one 32-bit draw each), so it is drawn as uint8 block by block and
    thrown away; ``bernoulli_`` draws the same values into a bool tensor as into an int64 one. Both
    equalities are pinned by tests/merging/test_dare.py."""
    numel = math.prod(shape)
    for start in range(0, numel, _ADVANCE_BLOCK):
        torch.randint(2, (min(_ADVANCE_BLOCK, numel - start),), generator=gen, dtype=torch.uint8)
    return torch.empty(tuple(shape), dtype=torch.bool).bernoulli_(1 - drop_rate, generator=gen)


def dare_mask(shape, drop_rate: float, state: torch.Tensor) -> torch.Tensor:
    """The keep-mask (bool, CPU) drawn from a state returned by :func:`dare_rng_states`."""
    gen = torch.Generator()
    gen.set_state(state)
    return _draw_dare_mask(shape, drop_rate, gen)


def dare(tau: torch.Tensor, mask: torch.Tensor, drop_rate: float) -> torch.Tensor:
    """DARE (Yu et al., 2024): τ ⊙ m · 1/(1 − p), m ~ Bernoulli(1 − p)."""
    return tau * mask.to(tau.device) * (1 / (1 - drop_rate))


def dare_stream(stream: TaskStream, drop_rate: float, seed: int) -> TaskStream:
    """Wrap a task stream so each τ_t[key] is DARE-masked with the official RNG order."""
    if not 0 <= drop_rate < 1:
        raise ValueError(f"DARE drop_rate={drop_rate} must be in [0, 1)")
    shapes, num_tasks = {}, 0
    for key, taus in stream():
        shapes[key], num_tasks = taus[0].shape, len(taus)
    nbytes = 4 * num_tasks * sum(math.prod(shape) for shape in shapes.values())
    kept = [] if nbytes <= stream_cache_bytes() else None  # small: keep the masks (1 byte per entry)
    states = dare_rng_states(shapes, num_tasks, drop_rate, seed, masks=kept)

    def mask(t, key, shape):
        return kept[t][key] if kept is not None else dare_mask(shape, drop_rate, states[t][key])

    def masked():
        for key, taus in stream():
            yield key, [dare(tau, mask(t, key, tau.shape), drop_rate) for t, tau in enumerate(taus)]
    return cached_stream(masked, nbytes)


def memo(cache: dict | None, key, build):
    """``build()`` once per search and reuse it: ``cache`` is a dict the caller keeps for one set of
    inputs (the search engine passes one per method search), or None to always build."""
    if cache is None:
        return build()
    if key not in cache:
        cache[key] = build()
    return cache[key]
