"""Streamed reading and writing of sharded safetensors checkpoints (8B-scale merging on a small machine).

- ``ShardedReader``: a read-only ``Mapping[str, Tensor]`` over a model folder (``model.safetensors``
  or shards + ``model.safetensors.index.json``) or a list of files. Each access reads that tensor's
  bytes with ``pread`` into a fresh tensor. Unlike ``safe_open`` it never memory-maps a shard, so
  the process's resident memory is what it holds, not the shards' pages it has touched (with mmap,
  ``ru_maxrss`` grows with every byte read and a 16 GB model "uses" 16 GB).
- ``ShardedWriter``: writes tensors in any order into shards planned up front from the names,
  shapes and dtypes (safetensors needs every offset in the header before the data), each tensor
  written at its offset as soon as it is produced and then dropped; ``close()`` writes
  ``model.safetensors.index.json`` (Hugging Face's format) and moves the finished folder into place.
  With ``partial=FOLDER`` the shards are built in that fixed folder, with a manifest of the plan and a
  journal of the tensors known to be on disk (fsynced first, every ``SYNC_SECONDS``); a later writer
  with the same plan reopens them and skips those tensors (``resumed``): an interrupted merge resumes.

A read → write round trip is bit-identical (same bytes for every tensor; tested).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch

from taskmerge.io.load import hf_weight_files
from taskmerge.io.tensors import _DTYPES, ModelFileError

INDEX = "model.safetensors.index.json"
_CODES = {v: k for k, v in _DTYPES.items() if v is not None}
DEFAULT_SHARD_BYTES = 5 * 2**30  # Hugging Face's default max_shard_size ("5GB")
MANIFEST, JOURNAL = "taskmerge-partial.json", "taskmerge-written.txt"  # in a partial folder only
SYNC_SECONDS = 30.0  # a partial writer fsyncs and journals its finished tensors at most this often


def _read_header(path: Path) -> tuple[dict, int]:
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 100 * 2**20:
                raise ValueError(f"header of {n} bytes")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise ModelFileError(f"{path}: not a readable safetensors file ({e})") from None
    return header, 8 + n


def weight_files(path) -> list[Path]:
    """The safetensors files of ``path`` (a file, or a folder with or without an index), in index order."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ModelFileError(f"{path}: no such file or folder")
    return hf_weight_files(path)


class ShardedReader(Mapping[str, torch.Tensor]):
    """Tensors of one checkpoint (all its shards), read with ``pread`` on access, nothing cached."""

    def __init__(self, path_or_files):
        files = weight_files(path_or_files) if isinstance(path_or_files, (str, Path)) else \
            [Path(f) for f in path_or_files]
        self.files = files
        self.metadata: dict[str, str] = {}
        self._where: dict[str, tuple[Path, str, tuple, int, int]] = {}
        for f in files:
            header, start = _read_header(f)
            self.metadata.update(header.pop("__metadata__", None) or {})
            for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                if key in self._where:
                    raise ModelFileError(f"{f}: tensor {key} is also in {self._where[key][0]} (overlapping shards)")
                if info["dtype"] not in _DTYPES or _DTYPES[info["dtype"]] is None:
                    raise ModelFileError(f"{f}: tensor {key} has unsupported dtype {info['dtype']}")
                lo, hi = info["data_offsets"]
                self._where[key] = (f, info["dtype"], tuple(info["shape"]), start + lo, hi - lo)

    def __getitem__(self, key: str) -> torch.Tensor:
        f, code, shape, offset, nbytes = self._where[key]
        out = torch.empty(shape, dtype=_DTYPES[code])
        if nbytes != out.numel() * out.element_size():
            raise ModelFileError(f"{f}: tensor {key} has {nbytes} bytes for shape {shape} {code}")
        return self._read(key, out, offset, nbytes)

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """``self[key][start:stop]`` read from disk without reading the rest of the tensor."""
        f, code, shape, offset, nbytes = self._where[key]
        if not shape or not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"{f}: rows {start}:{stop} of tensor {key} with shape {shape}")
        row_bytes = nbytes // shape[0] if shape[0] else 0
        out = torch.empty((stop - start, *shape[1:]), dtype=_DTYPES[code])
        return self._read(key, out, offset + start * row_bytes, (stop - start) * row_bytes)

    def _read(self, key, out, offset, nbytes):
        f = self._where[key][0]
        if nbytes:
            view = memoryview(out.view(-1).view(torch.uint8).numpy())
            with open(f, "rb", buffering=0) as fh:
                got = 0
                while got < nbytes:
                    n = os.preadv(fh.fileno(), [view[got:]], offset + got)
                    if n <= 0:
                        raise ModelFileError(f"{f}: tensor {key} is truncated")
                    got += n
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key][2]

    def dtype(self, key: str) -> torch.dtype:
        return _DTYPES[self._where[key][1]]

    def nbytes(self, key: str) -> int:
        return self._where[key][4]

    def source(self, key: str) -> Path:
        return self._where[key][0]

    def __repr__(self) -> str:
        return f"ShardedReader({len(self)} tensors in {len(self.files)} file(s))"


def plan_shards(specs: Iterable[tuple[str, tuple, torch.dtype]], max_shard_bytes: int = DEFAULT_SHARD_BYTES
                ) -> list[list[tuple[str, tuple, torch.dtype]]]:
    """Greedy split of ``(name, shape, dtype)`` in order into shards of at most ``max_shard_bytes``
    (a single larger tensor gets a shard of its own), as ``save_pretrained`` does."""
    shards, current, size = [], [], 0
    for name, shape, dtype in specs:
        n = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, tuple(shape), dtype))
        size += n
    if current:
        shards.append(current)
    return shards


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def journaled(partial) -> list[str]:
    """The tensors a partial folder's journal records as durably written (a torn last line, from a kill
    while journaling, is not counted)."""
    path = Path(partial) / JOURNAL
    return path.read_text().split("\n")[:-1] if path.is_file() else []


class ShardedWriter:
    """Write a sharded safetensors checkpoint tensor by tensor, in any order, with bounded memory.

    ``specs``: ``(name, shape, dtype)`` of every tensor, in the order they should be laid out.
    ``write(name, tensor)`` checks shape/dtype and writes the bytes at the tensor's planned offset.
    ``close()`` checks every tensor was written, fsyncs, writes the index, and renames the folder
    built next to ``out_dir`` into place (an error leaves nothing at ``out_dir``). Use as a context
    manager.
    """

    def __init__(self, out_dir, specs, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 metadata: Mapping[str, str] | None = None, partial=None, fingerprint=None):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and (not self.out_dir.is_dir() or any(self.out_dir.iterdir())):
            raise ValueError(f"{self.out_dir}: the output folder must not exist or be empty")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        specs = list(specs)
        self.metadata = dict(metadata or {})
        self.partial = partial is not None
        reopen = False
        if partial is None:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.", suffix=".tmp", dir=self.out_dir.parent))
        else:
            self.tmp = Path(partial)
            manifest = json.loads(json.dumps({"specs": [[k, list(s), _CODES.get(d, str(d))] for k, s, d in specs],
                                              "max_shard_bytes": max_shard_bytes, "metadata": self.metadata,
                                              "fingerprint": fingerprint}))
            reopen = (self.tmp / MANIFEST).is_file()
            if reopen:
                _check_manifest(self.tmp, manifest)
            else:
                if self.tmp.exists():
                    raise ValueError(f"{self.tmp}: exists but is not a partial merge (no {MANIFEST}); move it away")
                self.tmp.mkdir(parents=True)
        shards = plan_shards(specs, max_shard_bytes)
        self._slots: dict[str, tuple[int, tuple, torch.dtype, int, int]] = {}
        self._files, self._names = [], []
        self._pending: set[str] = set()
        total = 0
        for i, shard in enumerate(shards):
            name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            header, offset = {}, 0
            for key, shape, dtype in shard:
                if key in self._slots:
                    raise ValueError(f"tensor {key} is listed twice")
                if dtype not in _CODES:
                    raise ValueError(f"tensor {key}: dtype {dtype} cannot be stored in safetensors")
                n = _numel(shape) * torch.empty((), dtype=dtype).element_size()
                header[key] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
                self._slots[key] = (i, shape, dtype, offset, n)
                offset += n
            if self.metadata:
                header["__metadata__"] = self.metadata
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
            size = 8 + len(raw) + offset
            if reopen:
                if not (self.tmp / name).is_file() or (self.tmp / name).stat().st_size != size:
                    raise ValueError(f"{self.tmp / name}: missing or not {size} bytes; the partial merge is damaged, "
                                     f"delete {self.tmp} to start again")
                fh = open(self.tmp / name, "rb+", buffering=0)
            else:
                fh = open(self.tmp / name, "wb+", buffering=0)
                fh.write(struct.pack("<Q", len(raw)) + raw)
                fh.truncate(size)
            self._files.append((fh, 8 + len(raw)))
            self._names.append(name)
            total += offset
        self.total_bytes = total
        self._pending = set(self._slots)
        self._rows: dict[str, int] = {}
        self._unsynced: list[str] = []
        self._synced_at = time.monotonic()
        self.resumed: frozenset[str] = frozenset()
        if reopen:
            written = journaled(self.tmp)
            if (self.tmp / JOURNAL).is_file():  # rewritten whole: a line torn by a kill is dropped, appends stay whole
                (self.tmp / JOURNAL).write_text("".join(k + "\n" for k in written))
            self.resumed = frozenset(k for k in written if k in self._slots)
            self._pending -= self.resumed
        elif self.partial:
            (self.tmp / MANIFEST).write_text(json.dumps(manifest) + "\n")

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if key not in self._slots:
            raise ValueError(f"tensor {key} is not in the planned checkpoint")
        if key not in self._pending:
            raise ValueError(f"tensor {key} was already written")
        i, shape, dtype, offset, n = self._slots[key]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"tensor {key}: got {tuple(tensor.shape)} {tensor.dtype}, planned {shape} {dtype}")
        if n:
            data = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
            fh, start = self._files[i]
            view, done = memoryview(data), 0
            while done < n:
                done += os.pwrite(fh.fileno(), view[done:], start + offset + done)
        self._finished(key)

    def write_rows(self, key: str, start: int, rows: torch.Tensor) -> None:
        """Write ``rows`` as ``key[start:start + len(rows)]`` (a tensor produced in row chunks)."""
        if key not in self._slots or key not in self._pending:
            raise ValueError(f"tensor {key} is not planned or was already written")
        i, shape, dtype, offset, n = self._slots[key]
        if tuple(rows.shape[1:]) != tuple(shape[1:]) or rows.dtype != dtype or start + rows.shape[0] > shape[0]:
            raise ValueError(f"tensor {key}: rows {start}:{start + rows.shape[0]} of {tuple(rows.shape)} "
                             f"{rows.dtype} do not fit the planned {shape} {dtype}")
        row_bytes = n // shape[0]
        data = rows.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
        fh, begin = self._files[i]
        view, done = memoryview(data), 0
        while done < len(data):
            done += os.pwrite(fh.fileno(), view[done:], begin + offset + start * row_bytes + done)
        self._rows[key] = self._rows.get(key, 0) + rows.shape[0]
        if self._rows[key] == shape[0]:
            self._finished(key)

    def _finished(self, key: str) -> None:
        self._pending.discard(key)
        if self.partial:
            self._unsynced.append(key)
            if time.monotonic() - self._synced_at >= SYNC_SECONDS:
                self.checkpoint()

    def checkpoint(self) -> None:
        """Make the finished tensors durable, then journal them (a partial writer; a no-op otherwise)."""
        if not self.partial:
            return
        if self._unsynced:
            for fh, _ in self._files:
                os.fsync(fh.fileno())
            with open(self.tmp / JOURNAL, "a") as journal:
                journal.write("".join(k + "\n" for k in self._unsynced))
                journal.flush()
                os.fsync(journal.fileno())
            self._unsynced = []
        self._synced_at = time.monotonic()

    def keep(self) -> int:
        """Stop, leaving the partial folder for a later writer to resume; returns how many tensors it holds."""
        if not self.partial:
            raise ValueError("only a writer with partial=FOLDER can keep its unfinished shards")
        self.checkpoint()
        for fh, _ in self._files:
            if not fh.closed:
                fh.close()
        return len(self._slots) - len(self._pending)

    def pending(self) -> list[str]:
        """Planned tensors not yet (completely) written, in plan order."""
        return [k for k in self._slots if k in self._pending and k not in self._rows]

    def close(self) -> Path:
        if self._pending:
            missing = sorted(self._pending)
            self.abort()
            raise ValueError(f"{self.out_dir}: {len(missing)} tensors were never written ({missing[:5]})")
        weight_map = {}
        for key, (i, *_rest) in self._slots.items():
            weight_map[key] = self._names[i]
        for fh, _ in self._files:
            os.fsync(fh.fileno())
            fh.close()
        index = {"metadata": {"total_size": self.total_bytes, **self.metadata}, "weight_map": weight_map}
        for name in (MANIFEST, JOURNAL):
            (self.tmp / name).unlink(missing_ok=True)
        (self.tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if self.out_dir.is_dir():
            self.out_dir.rmdir()  # empty (checked in __init__)
        os.replace(self.tmp, self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        for fh, _ in self._files:
            if not fh.closed:
                fh.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _check_manifest(folder: Path, manifest: dict) -> None:
    """A partial folder is resumed only by the same plan, metadata and inputs; else a clear error."""
    try:
        old = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder / MANIFEST}: unreadable ({e}); delete {folder} to start again") from None
    for field in ("specs", "max_shard_bytes", "metadata", "fingerprint"):
        if old.get(field) != manifest[field]:
            raise ValueError(f"{folder}: a partial merge with a different {field} (other inputs, method, "
                             f"hyperparameters or shard size); delete it to start again, or resume with the same ones")


def specs_of(state: Mapping[str, torch.Tensor]) -> list[tuple[str, tuple, torch.dtype]]:
    """``(name, shape, dtype)`` of every tensor, from headers when ``state`` is lazy (no data read)."""
    out = []
    for key in state:
        if hasattr(state, "shape") and hasattr(state, "dtype") and callable(state.shape):
            out.append((key, tuple(state.shape(key)), state.dtype(key)))
        else:
            t = state[key]
            out.append((key, tuple(t.shape), t.dtype))
    return out


def copy_checkpoint(src, out_dir, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Re-shard a checkpoint tensor by tensor (the bit-identical round trip)."""
    reader = ShardedReader(src)
    with ShardedWriter(out_dir, specs_of(reader), max_shard_bytes=max_shard_bytes, metadata=reader.metadata) as w:
        for key in reader:
            w.write(key, reader[key])
    return Path(out_dir)
