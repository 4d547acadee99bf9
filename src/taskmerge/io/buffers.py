"""Reconcile non-persistent integer buffers between a pretrained model and its fine-tunes.

Hub folders can hold integer buffers that a later ``save_pretrained`` omits: all-MiniLM-L6-v2's
``model.safetensors`` holds the int64 ``embeddings.position_ids``, which transformers 5 registers
as a non-persistent buffer and does not save. Such a folder and ``save_pretrained`` copies of it
describe the same model, and merging never touches integer buffers (they are copied from θ0), so:

- an integer/bool tensor of θ0 that a fine-tuned model lacks is taken from θ0;
- an integer/bool tensor of a fine-tuned model that θ0 lacks is ignored (the merged model has
  θ0's names, so it would be dropped anyway).

Floating tensors are never filled in or dropped: a missing weight is still the clear error of
``merging.inputs.check_models``. Everything stays lazy: a ``LazyStateDict`` is wrapped, not read.
"""
from __future__ import annotations

import logging
from typing import Iterator, Mapping, Sequence

import torch

log = logging.getLogger(__name__)


def _dtype(sd: Mapping[str, torch.Tensor], key: str) -> torch.dtype:
    """A tensor's dtype, from the header when ``sd`` is lazy (nothing is read)."""
    dtype = getattr(sd, "dtype", None)
    return dtype(key) if callable(dtype) else sd[key].dtype


def _is_buffer(sd: Mapping[str, torch.Tensor], key: str) -> bool:
    d = _dtype(sd, key)
    return not (d.is_floating_point or d.is_complex)


class BufferFilled(Mapping[str, torch.Tensor]):
    """``sd`` with integer buffers ``filled`` from ``pretrained`` and ``dropped`` ones hidden (lazy)."""

    def __init__(self, sd: Mapping[str, torch.Tensor], pretrained: Mapping[str, torch.Tensor],
                 filled: Sequence[str], dropped: Sequence[str]):
        self.sd, self.pretrained = sd, pretrained
        self.filled, self.dropped = frozenset(filled), frozenset(dropped)
        # θ0's order, then the fine-tune's other names (check_models reports those)
        mine = [k for k in sd if k not in self.dropped]
        present = set(mine) | self.filled
        self._keys = [k for k in pretrained if k in present] + [k for k in mine if k not in pretrained]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self.filled:
            return self.pretrained[key]
        if key in self.dropped:
            raise KeyError(key)
        return self.sd[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self.filled or (key not in self.dropped and key in self.sd)

    def _source(self, key: str):
        return self.pretrained if key in self.filled else self.sd

    def dtype(self, key: str) -> torch.dtype:
        return _dtype(self._source(key), key)

    def shape(self, key: str) -> tuple[int, ...]:
        src = self._source(key)
        shape = getattr(src, "shape", None)
        return tuple(shape(key)) if callable(shape) else tuple(src[key].shape)

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of ``key`` (read alone when the source can, as ``LazyStateDict``/``ShardedReader``)."""
        src = self._source(key)
        rows = getattr(src, "rows", None)
        return rows(key, start, stop) if callable(rows) else src[key][start:stop]

    def __getattr__(self, name):  # metadata, source(), device … of the wrapped lazy state dict
        if name in ("sd", "pretrained", "filled", "dropped", "_keys"):
            raise AttributeError(name)
        return getattr(self.sd, name)

    def __repr__(self) -> str:
        return f"BufferFilled({self.sd!r}, filled={sorted(self.filled)}, dropped={sorted(self.dropped)})"


def reconcile_buffers(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
                      names: Sequence[str] | None = None) -> list[Mapping[str, torch.Tensor]]:
    """The fine-tuned models with θ0's integer buffers filled in and their own extra ones ignored.

    Returns one mapping per fine-tuned model, in order (the model itself when nothing changes).
    ``pretrained`` is never changed. ``names`` labels the models in the log (file paths).
    Call it before ``check_models``; floating tensors that differ in name are left for it to report.
    """
    names = list(names) if names is not None else [f"finetuned[{i}]" for i in range(len(finetuned))]
    out = []
    for name, sd in zip(names, finetuned):
        filled = [k for k in pretrained if k not in sd and _is_buffer(pretrained, k)]
        dropped = [k for k in sd if k not in pretrained and _is_buffer(sd, k)]
        if not filled and not dropped:
            out.append(sd)
            continue
        if filled:
            log.info("%s: integer buffers %s are not saved there; copied from the pretrained model", name, filled)
        if dropped:
            log.info("%s: integer buffers %s are not in the pretrained model; ignored", name, dropped)
        out.append(BufferFilled(sd, pretrained, filled, dropped))
    return out
