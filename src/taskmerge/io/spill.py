"""A disk-backed scratch mapping: float32 tensors in raw files under a temporary folder.

Methods that carry a model-sized state across the model (OPCM's τ̄, TALL's τ_MTL) write it into
their ``scratch`` context; when merging streams to disk, that is a :class:`Spill`, so memory holds
one tensor of the state at a time (4 bytes per parameter on disk).
"""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Hashable, MutableMapping
from pathlib import Path

import numpy as np
import torch


class Spill(MutableMapping):
    """``{name: float32 tensor}`` stored as raw files, read and written whole; ``close()`` removes them.
    A name is any hashable (a key, or a row ``Part`` of one)."""

    def __init__(self, parent=None, folder=None):
        """A fresh temporary folder under ``parent``, or the fixed ``folder`` (emptied first: what a killed
        run left there is no longer needed, as a resumed merge restarts the keys it was in)."""
        if folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="taskmerge-scratch-", dir=parent))
        else:
            self.folder = Path(folder)
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True)
        self._slots: dict[Hashable, tuple[tuple[int, ...], int]] = {}

    def _path(self, name: Hashable) -> Path:
        return self.folder / f"{self._slots[name][1]}.f32"

    def __setitem__(self, name: Hashable, tensor: torch.Tensor) -> None:
        if name not in self._slots:
            self._slots[name] = (tuple(tensor.shape), len(self._slots))
        self._slots[name] = (tuple(tensor.shape), self._slots[name][1])
        tensor.detach().to("cpu", torch.float32).contiguous().numpy().tofile(self._path(name))

    def __getitem__(self, name: Hashable) -> torch.Tensor:
        shape, _ = self._slots[name]
        return torch.from_numpy(np.fromfile(self._path(name), dtype=np.float32)).reshape(shape)

    def __delitem__(self, name: Hashable) -> None:
        self._path(name).unlink(missing_ok=True)
        del self._slots[name]

    def __iter__(self):
        return iter(self._slots)

    def __len__(self) -> int:
        return len(self._slots)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
