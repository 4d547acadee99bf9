"""What a method produces, and the in-memory consumer of it.

A registered method is a generator of ``(key, value)`` for every floating tensor of the model
(``key`` a name, or a row :class:`~taskmerge.merging.inputs.Part` of one); per-task methods yield
``(key, [value per task])``. A value is either

- an :class:`Update` ``(delta, scale)``: θ = θ0 + scale · delta, with ``delta`` the float32 update;
  a method that is linear in a hyperparameter yields that hyperparameter as ``scale`` and a ``delta``
  that does not depend on it, so the search caches ``delta`` and rescales exactly in every dtype;
- a :class:`LowRank` ``(B, A, scale)``: the same with delta = B @ A, for updates that are exactly
  low-rank (written as a peft adapter on request);
- a tensor: the merged value itself (Fisher, RegMean, MaTS merge weights, not task vectors).

Consumers turn the same stream into a state dict (:func:`collect`), a sharded folder on disk
(``taskmerge.io.merge_writer``) or the search's cached update (``search.engine``). Tensors a method
does not yield (integer buffers) are copied from θ0 by every consumer.
"""
from __future__ import annotations

from typing import Iterable, Mapping, NamedTuple

import torch

from taskmerge.merging.inputs import Part, key_of, read, shape_of


class Update(NamedTuple):
    """θ = θ0 + scale · delta (delta in float32).

    ``owned``: the producer keeps no other reference to ``delta`` (a fresh tensor, not a cache or
    carried state), so a consumer that resolves the value once may write the merged tensor into its
    storage: no second model-sized allocation (the in-memory and on-disk consumers do).
    """

    delta: torch.Tensor
    scale: float = 1.0
    owned: bool = False


class LowRank(NamedTuple):
    """θ = θ0 + scale · B @ A: an update that is exactly low-rank (LoRA-factor methods), so that it can be
    written as a peft adapter (``taskmerge merge --output-format adapter``) as well as densely."""

    B: torch.Tensor  # [out, r] float32
    A: torch.Tensor  # [r, in] float32
    scale: float = 1.0

    @property
    def delta(self) -> torch.Tensor:
        return self.B @ self.A


def resolve(base: torch.Tensor, value) -> torch.Tensor:
    """The merged tensor of one value, in ``base``'s dtype and device: θ0 + s·Δ in float32, or the value."""
    if isinstance(value, (Update, LowRank)):
        # s·Δ, then θ0 added in place (the same sum as θ0 + s·Δ, bit for bit; torch.add(θ0, Δ, alpha=s)
        # would round differently, through a fused multiply-add), in Δ's own storage when it is ours
        delta = value.delta
        owned = getattr(value, "owned", False) and delta.dtype == torch.float32
        out = delta.mul_(value.scale) if owned else torch.mul(delta.float(), value.scale)
        out.add_(base.to(device=out.device, dtype=torch.float32))
        return out.to(device=base.device, dtype=base.dtype)
    return value.to(device=base.device, dtype=base.dtype)


class Assembler:
    """Collects row chunks of tensors into whole tensors (for consumers that need whole tensors)."""

    def __init__(self, pretrained: Mapping):
        self.pretrained, self.partial, self.filled = pretrained, {}, {}

    def add(self, item, tensor: torch.Tensor) -> torch.Tensor | None:
        """The whole tensor once every row of ``item``'s key has arrived, else None."""
        if not isinstance(item, Part):
            return tensor
        shape = shape_of(self.pretrained, item.key)
        if item.key not in self.partial:
            self.partial[item.key] = tensor.new_empty(shape)
            self.filled[item.key] = 0
        self.partial[item.key][item.start:item.stop] = tensor
        self.filled[item.key] += item.stop - item.start
        if self.filled[item.key] < shape[0]:
            return None
        self.filled.pop(item.key)
        return self.partial.pop(item.key)


def collect(pretrained: Mapping, stream: Iterable, per_task: int | None = None):
    """A state dict (or, with ``per_task`` = T, a list of T) from a method's stream; keys in θ0's order,
    untouched tensors cloned from θ0."""
    n = per_task or 1
    merged = [{} for _ in range(n)]
    assemblers = [Assembler(pretrained) for _ in range(n)]
    for item, value in stream:
        base = read(pretrained, item)
        values = value if per_task else [value]
        if len(values) != n:
            raise ValueError(f"{key_of(item)}: a per-task method yielded {len(values)} values for {n} tasks")
        for t, v in enumerate(values):
            whole = assemblers[t].add(item, resolve(base, v))
            if whole is not None:
                merged[t][key_of(item)] = whole
    out = [{k: m[k] if k in m else pretrained[k].clone() for k in pretrained} for m in merged]
    return out if per_task else out[0]
