"""Safetensors reading (lazy, sharded) and atomic writing.

``LazyStateDict`` is a read-only ``Mapping[str, Tensor]`` over one or more safetensors files
(the shards of a Hugging Face checkpoint): a tensor is read from disk (memory-mapped) only when
it is accessed, and nothing is cached, so a method that walks keys one at a time holds a few
tensors per model in memory, never the whole model. ``dtype(key)``/``shape(key)`` read the
header only.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


class ModelFileError(ValueError):
    """A checkpoint file or folder cannot be read (the message names it)."""


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
           "F8_E5M2": getattr(torch, "float8_e5m2", None)}


class LazyStateDict(Mapping[str, torch.Tensor]):
    """Tensors of safetensors ``files`` (shards: each key lives in exactly one), loaded on access."""

    def __init__(self, files, device: str = "cpu"):
        self.files = [Path(f) for f in files]
        self.device = device
        self._handles = {}
        self._where: dict[str, Path] = {}
        self.metadata: dict[str, str] = {}
        for f in self.files:
            handle = self._open(f)
            self.metadata.update(handle.metadata() or {})
            for key in handle.keys():
                if key in self._where:
                    raise ModelFileError(f"{f}: tensor {key} is also in {self._where[key]} (overlapping shards)")
                self._where[key] = f

    def _open(self, f: Path):
        if f not in self._handles:
            if not f.is_file():
                raise ModelFileError(f"{f}: no such file")
            try:
                self._handles[f] = safe_open(str(f), framework="pt", device=self.device)
            except (SafetensorError, OSError, ValueError) as e:
                raise ModelFileError(f"{f}: not a readable safetensors file ({e})") from None
        return self._handles[f]

    def __getitem__(self, key: str) -> torch.Tensor:
        f = self._where[key]
        try:
            return self._handles[f].get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelFileError(f"{f}: tensor {key} cannot be read ({e})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        return _DTYPES[self._handles[self._where[key]].get_slice(key).get_dtype()]

    def source(self, key: str) -> Path:
        """The file that holds ``key`` (for error messages)."""
        return self._where[key]

    def __repr__(self) -> str:
        return f"LazyStateDict({len(self)} tensors from {[str(f) for f in self.files]})"


def load_safetensors(path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, read now; a missing, truncated or corrupt file is a
    ``ModelFileError`` naming it (``safetensors.load_file`` raises a bare ``SafetensorError``)."""
    sd = LazyStateDict([path], device=device)
    return {k: sd[k] for k in sd}


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``state_dict`` to ``path`` as safetensors, atomically.

    The file is written to a temporary name in the same folder, fsynced, then renamed over
    ``path`` (``os.replace``), so a crash or error never leaves a partial file at ``path``.
    Tensors that share storage (tied weights) are written as separate copies.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, seen = {}, set()
    for key, t in state_dict.items():
        t = t.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr in seen or not t.is_contiguous():
            t = t.clone().contiguous()
        elif ptr is not None:
            seen.add(ptr)
        tensors[key] = t
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})})  # transformers 4.x needs "format"
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
