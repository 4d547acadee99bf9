"""Lazily readable inputs: what a method reads, key by key or row chunk by row chunk.

A model is any ``Mapping[str, Tensor]``: an in-memory state dict, a ``LazyStateDict`` or a
``ShardedReader`` (which also answer ``shape(key)``/``dtype(key)`` from the file header and read
``rows(key, start, stop)`` alone). Methods never hold a whole model: they walk keys through
:func:`task_stream` (or :func:`float_keys` + :func:`read`), and a key of a large tensor may be split
into row chunks (:class:`Part`) where the method's math is element-wise.
"""
from __future__ import annotations

import math
from typing import Iterator, Mapping, NamedTuple, Sequence

import torch

from taskmerge.merging.primitives import TaskStream, cached_stream


StateDict = dict[str, torch.Tensor]


class Part(NamedTuple):
    """Rows ``start:stop`` of tensor ``key`` (a chunk of an element-wise computation)."""

    key: str
    start: int
    stop: int


def key_of(item) -> str:
    """The tensor name of a stream item's key (a name or a :class:`Part`)."""
    return item.key if isinstance(item, Part) else item


def shape_of(state: Mapping, key: str) -> tuple[int, ...]:
    shape = getattr(state, "shape", None)
    return tuple(shape(key)) if callable(shape) else tuple(state[key].shape)


def dtype_of(state: Mapping, key: str) -> torch.dtype:
    dtype = getattr(state, "dtype", None)
    return dtype(key) if callable(dtype) else state[key].dtype


def float_keys(state: Mapping) -> list[str]:
    """Names of the tensors methods merge (floating point), in the model's order; integer and bool
    buffers are copied from the pretrained model by the consumers."""
    return [k for k in state if dtype_of(state, k).is_floating_point]


def read(state: Mapping, item) -> torch.Tensor:
    """``state[key]``, or only the rows of a :class:`Part` (read alone from disk when the reader can)."""
    if not isinstance(item, Part):
        return state[item]
    rows = getattr(state, "rows", None)
    if callable(rows):
        return rows(item.key, item.start, item.stop)
    return state[item.key][item.start:item.stop]


def part_of(tensor: torch.Tensor, item) -> torch.Tensor:
    """The rows of a whole-key ``tensor`` (a statistic, a mask, an output) that a stream item covers: a view."""
    return tensor[item.start:item.stop] if isinstance(item, Part) else tensor


def parts(state: Mapping, keys: Sequence[str], chunk_numel: int | None) -> list:
    """``keys`` with every tensor larger than ``chunk_numel`` elements split into row :class:`Part` s."""
    out = []
    for key in keys:
        shape = shape_of(state, key)
        numel = math.prod(shape)
        if chunk_numel is None or len(shape) == 0 or numel <= chunk_numel or shape[0] < 2:
            out.append(key)
            continue
        step = max(1, chunk_numel // max(1, numel // shape[0]))
        out += [Part(key, s, min(s + step, shape[0])) for s in range(0, shape[0], step)]
    return out


def shapes(state: Mapping) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of every tensor, from headers when ``state`` is lazy (no data read)."""
    return {k: shape_of(state, k) for k in state}


def numel_of(state: Mapping, item) -> int:
    shape = shape_of(state, key_of(item))
    if isinstance(item, Part):
        return (item.stop - item.start) * math.prod(shape[1:])
    return math.prod(shape)


def task_vectors(item, pretrained: Mapping, finetuned: Sequence[Mapping], dtype: torch.dtype = torch.float32,
                 device=None) -> list[torch.Tensor]:
    """τ_t = θ_t − θ0 for one key (or row chunk), upcast to ``dtype`` on ``device``."""
    base = read(pretrained, item).to(device=device, dtype=dtype)
    return [read(sd, item).to(device=device, dtype=dtype) - base for sd in finetuned]


BLOCK = 1 << 18  # elements: a temporary this size stays in cache and is never a model-sized allocation


def blocks(numel: int, size: int = BLOCK) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive blocks of ``size`` elements covering a flattened tensor: element-wise
    work done block by block on small reused buffers (only the result is tensor-sized)."""
    return ((s, min(numel, s + size)) for s in range(0, numel, size))


def task_stack(item, pretrained: Mapping, finetuned: Sequence[Mapping], device=None,
               buffer: list | None = None) -> torch.Tensor:
    """[τ_1 … τ_T] of one key (or row chunk) as one float32 [T, *shape] tensor, written in place (the
    values of ``torch.stack(task_vectors(...))`` with one allocation instead of T + 1). ``buffer``: a list
    holding the largest flat stack so far, whose storage is used when it is large enough and on the same
    device, else the new stack takes its place (a loop over chunks then allocates once)."""
    base = read(pretrained, item).to(device=device, dtype=torch.float32)
    shape = (len(finetuned), *base.shape)
    held = buffer[0] if buffer else None
    fits = held is not None and held.numel() >= math.prod(shape) and held.device == base.device
    out = held[:math.prod(shape)].view(shape) if fits else base.new_empty(shape)
    if buffer is not None and not fits:
        buffer[:] = [out.reshape(-1)]
    for t, sd in enumerate(finetuned):
        torch.sub(upcastable(read(sd, item).to(device=base.device)), base, out=out[t])
    return out


def upcastable(theta: torch.Tensor) -> torch.Tensor:
    """``theta`` as a float32 subtraction may take it: bf16/fp16/fp32 are upcast exactly inside the
    operation (no float32 copy); float64 is rounded first, as ``.float()`` would."""
    return theta.float() if torch.promote_types(theta.dtype, torch.float32) != torch.float32 else theta


def task_vector_sum(item, pretrained: Mapping, finetuned: Sequence[Mapping], device=None) -> torch.Tensor:
    """Σ_t (θ_t − θ0) for one key (or row chunk) in float32, accumulated in place in task order.

    The same sums, in the same order, as ``torch.stack(task_vectors(...)).sum(0)``, with one buffer
    the size of the key (the result) and one small difference buffer reused block by block: one task
    tensor is read at a time and upcast inside the subtraction (no float32 copy of a bf16 input).
    (Task Arithmetic, averaging, τ_MTL of TALL/Consensus.)
    """
    base = read(pretrained, item).to(device=device, dtype=torch.float32)
    if not finetuned:
        raise ValueError("the list of fine-tuned models is empty")
    flat_base, n = base.reshape(-1), base.numel()
    acc = torch.empty_like(flat_base)
    tmp = flat_base.new_empty(min(n, BLOCK))
    for t, sd in enumerate(finetuned):
        theta = upcastable(read(sd, item).to(device=base.device)).reshape(-1)
        for s, e in blocks(n):
            if t == 0:
                torch.sub(theta[s:e], flat_base[s:e], out=acc[s:e])
            else:
                acc[s:e].add_(torch.sub(theta[s:e], flat_base[s:e], out=tmp[:e - s]))
    return acc.view(base.shape)


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or ±Inf in ``tensor``: its smallest and largest entries are finite (``aminmax`` propagates NaN).
    One reduction and no tensor-sized bool mask: 50× faster than ``isfinite(t).all()`` on a [128256, 4096]
    bf16 tensor (0.036 against 1.8 s here)."""
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return True
    lo, hi = torch.aminmax(tensor)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def task_stream(pretrained: Mapping, finetuned: Sequence[Mapping], device=None, chunk_numel: int | None = None,
                keys: Sequence[str] | None = None) -> TaskStream:
    """Task stream of τ_t = θ_t − θ0 (float32) over every floating tensor (or ``keys``), in the model's
    order, large tensors in row chunks when ``chunk_numel`` is given (element-wise methods only).
    Kept in memory after its first pass when small enough (``primitives.cached_stream``)."""
    items = parts(pretrained, float_keys(pretrained) if keys is None else keys, chunk_numel)
    nbytes = 4 * len(finetuned) * sum(numel_of(pretrained, i) for i in items)
    return cached_stream(lambda: ((i, task_vectors(i, pretrained, finetuned, device=device)) for i in items), nbytes)


def tensors(item, models: Sequence[Mapping], device=None) -> list[torch.Tensor]:
    """``[model[key]]`` for one key (or chunk) of each model, in float32 on ``device``."""
    return [read(m, item).to(device=device, dtype=torch.float32) for m in models]


def walk(pretrained: Mapping, chunk_numel: int | None = None) -> Iterator:
    """Every floating key of the model (row chunks when ``chunk_numel`` is given)."""
    return iter(parts(pretrained, float_keys(pretrained), chunk_numel))


class Cast(Mapping):
    """A model whose floating tensors read as ``dtype`` (``taskmerge merge --dtype``); lazy like its source."""

    def __init__(self, state: Mapping, dtype: torch.dtype):
        self.state, self.to = state, dtype

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.to) if t.is_floating_point() else t

    def __getitem__(self, key):
        return self._cast(self.state[key])

    def rows(self, key, start, stop):
        return self._cast(read(self.state, Part(key, start, stop)))

    def shape(self, key):
        return shape_of(self.state, key)

    def dtype(self, key):
        d = dtype_of(self.state, key)
        return self.to if d.is_floating_point else d

    def __iter__(self):
        return iter(self.state)

    def __len__(self):
        return len(self.state)

    def __contains__(self, key):
        return key in self.state


class Without(Mapping):
    """A model minus the keys ``skip``, lazy like its source: what a key-local method is handed to finish
    an interrupted streamed merge (``io.merge_writer.write_merged(resume=True)``) without recomputing
    the keys already written."""

    def __init__(self, state: Mapping, skip):
        self.state, self.skip = state, frozenset(skip)

    def __getitem__(self, key):
        if key in self.skip:
            raise KeyError(key)
        return self.state[key]

    def rows(self, key, start, stop):
        return read(self.state, Part(key, start, stop))

    def shape(self, key):
        return shape_of(self.state, key)

    def dtype(self, key):
        return dtype_of(self.state, key)

    def __iter__(self):
        return (k for k in self.state if k not in self.skip)

    def __len__(self):
        return sum(1 for _ in self)

    def __contains__(self, key):
        return key not in self.skip and key in self.state


def check_models(pretrained: StateDict, finetuned: Sequence[StateDict], names: Sequence[str] | None = None,
                 finite: bool = True) -> None:
    """Raise a clear ValueError when the models cannot be merged together.

    Checks: a non-empty list; identical key sets; equal shapes; one floating dtype per tensor
    name across models (from the headers of lazy inputs); with ``finite``, no NaN/Inf (reads every
    tensor once). ``names`` labels the models in messages (file paths).
    """
    if not finetuned:
        raise ValueError("the list of fine-tuned models is empty")
    names = list(names) if names is not None else [f"finetuned[{i}]" for i in range(len(finetuned))]
    ref = set(pretrained)
    for name, sd in zip(names, finetuned):
        missing, extra = sorted(ref - set(sd)), sorted(set(sd) - ref)
        if missing or extra:
            raise ValueError(f"{name}: tensor names differ from the pretrained model "
                             f"(missing: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                             f"unexpected: {extra[:5]}{'...' if len(extra) > 5 else ''})")
        for key in pretrained:
            shape, shape0 = shape_of(sd, key), shape_of(pretrained, key)
            if shape != shape0:
                raise ValueError(f"{name}: tensor {key} has shape {shape}, pretrained has {shape0}")
            dtype, dtype0 = dtype_of(sd, key), dtype_of(pretrained, key)
            if dtype != dtype0:
                raise ValueError(f"{name}: tensor {key} has dtype {dtype}, pretrained has {dtype0} (mixed dtypes: "
                                 f"cast every input with --dtype float32|bfloat16|float16)")
    if not finite:
        return
    for name, sd in zip(["pretrained", *names], [pretrained, *finetuned]):
        for key in sd:
            if dtype_of(sd, key).is_floating_point and not all_finite(sd[key]):
                raise ValueError(f"{name}: tensor {key} contains NaN or Inf")
