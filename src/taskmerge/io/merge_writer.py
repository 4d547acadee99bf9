"""The on-disk consumer of a method's stream: each merged tensor is written as soon as it exists.

``write_merged(method, pretrained, finetuned, output, ...)`` runs a registered method over lazily read
models and writes its ``(key, value)`` stream (``taskmerge.merging.outputs``) with
``io.sharded.ShardedWriter``: memory holds one key's outputs plus what the method itself declares
(``Method.memory``). State a method carries across the model goes to a disk-backed ``scratch``
(``io.spill``). Per-task methods write one model per task side by side, never holding all of them.

Outputs: a ``.safetensors`` path gives one file; any other path a folder (shards above
``max_shard_bytes`` with ``model.safetensors.index.json``), and for per-task methods a folder of
``task_<i>.safetensors`` plus the method's artifacts (TALL's ``masks.safetensors``). Every header
carries ``format: pt`` (transformers 4.x refuses files without it). Tensors the method does not
yield are byte copies of θ0. Nothing is left at ``output`` on error.

``resume=True`` (``taskmerge merge --resume``; key-local methods, one output model): the shards are
built in ``.<output name>.partial`` beside ``output`` and the tensors written so far are journaled
(``io.sharded``). An interrupted run (an error, Ctrl-C, a killed process) leaves that folder; the same
call again hands the method the model without the journaled keys (``merging.inputs.Without``) and
finishes the same shards, so the output is the one an uninterrupted run writes (tested, bit for bit).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from taskmerge.io.sharded import DEFAULT_SHARD_BYTES, ShardedWriter, specs_of
from taskmerge.io.spill import Spill
from taskmerge.merging.inputs import Part, Without, all_finite, float_keys, key_of, read, shape_of
from taskmerge.merging.masks import save_masks
from taskmerge.merging.outputs import resolve
from taskmerge.merging.registry import Method

log = logging.getLogger(__name__)
CHUNK_NUMEL = 2 ** 26  # 64M elements: 256 MB per float32 task-vector chunk of element-wise methods


def _save_masks(folder: Path, masks) -> None:
    save_masks(folder / "masks.safetensors", masks)


ARTIFACT_WRITERS = {"masks": _save_masks}  # artifact name -> writer into the per-task output folder


class _Target:
    """One output model: a folder of shards, or a single file (written as a one-shard folder, then moved)."""

    def __init__(self, path: Path, specs, max_shard_bytes: int, metadata: Mapping[str, str], partial=None,
                 fingerprint=None):
        self.path, self.single = path, path.suffix == ".safetensors"
        folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)) / "out" \
            if self.single else path
        limit = 2 ** 62 if self.single else max_shard_bytes
        try:
            self.writer = ShardedWriter(folder, specs, max_shard_bytes=limit, metadata=metadata, partial=partial,
                                        fingerprint=fingerprint)
        except BaseException:
            if self.single:
                shutil.rmtree(folder.parent, ignore_errors=True)
            raise
        self.done: dict[str, int] = {}

    def write(self, pretrained, item, tensor: torch.Tensor) -> bool:
        """Write one key or row chunk; True when its tensor is complete."""
        if not all_finite(tensor):
            raise ValueError(f"{self.path}: merged tensor {key_of(item)} contains NaN or Inf")
        if not isinstance(item, Part):
            self.writer.write(item, tensor)
            return True
        self.writer.write_rows(item.key, item.start, tensor)
        self.done[item.key] = self.done.get(item.key, 0) + tensor.shape[0]
        return self.done[item.key] == shape_of(pretrained, item.key)[0]

    def close(self, pretrained) -> Path:
        for key in self.writer.pending():  # untouched tensors: byte copies of the pretrained model
            self.writer.write(key, pretrained[key])
        folder = self.writer.close()
        if self.single:
            os.replace(folder / "model.safetensors", self.path)
            shutil.rmtree(folder.parent, ignore_errors=True)
        return self.path

    def abort(self, keep: bool = False) -> int:
        """Remove what was written, or with ``keep`` leave the partial shards; returns the tensors kept."""
        kept = self.writer.keep() if keep else 0
        if not keep:
            self.writer.abort()
        if self.single:
            shutil.rmtree(self.writer.out_dir.parent, ignore_errors=True)
        return kept


def partial_folder(output) -> Path:
    """Where ``write_merged(resume=True)`` builds ``output`` until it is complete."""
    output = Path(output)
    return output.parent / f".{output.name}.partial"


def _fingerprint(method: Method, hparams, finetuned: Sequence, pretrained: Mapping) -> dict:
    """What a partial merge must be resumed with: the method, its settings, the input files as found."""
    def files(model):
        paths = getattr(model, "files", None)
        if not paths:
            return type(model).__name__
        return [[str(f), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in paths]

    return {"method": method.name, "hparams": {k: repr(v) for k, v in method.resolve(hparams).items()},
            "inputs": [files(m) for m in (pretrained, *finetuned)]}


def write_merged(method: Method, pretrained: Mapping, finetuned: Sequence, output, *, hparams=None,
                 context: Mapping | None = None, metadata: Mapping[str, str] | None = None,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, chunk_numel: int = CHUNK_NUMEL,
                 progress: bool = True, on_write=None, resume: bool = False) -> list[Path]:
    """Merge and write ``output``; returns the written model paths (one per task for per-task methods).

    ``context``: the method context the caller has (kinds, stats, lora, device, cache); ``scratch``,
    ``chunk_numel`` and ``artifacts`` are provided here. ``on_write(key)`` is called after each merged
    tensor is completely written (benchmarks time it). ``resume``: see the module docstring.
    """
    output = Path(output)
    per_task = method.output == "per_task"
    if resume and per_task:
        raise ValueError(f"method {method.name!r} writes one model per task; only one-model merges resume")
    if resume and not method.is_key_local(hparams):
        joined = [f"{k}={v}" for k, v in method.resolve(hparams).items() if v in method.cross_key.get(k, ())]
        raise ValueError(f"method {method.name!r} cannot resume an interrupted merge"
                         + (f" with {', '.join(joined)}" if joined else "")
                         + ": a tensor's result depends on other tensors (or on statistics checked over the whole "
                           "model); run it without resume")
    n = len(finetuned) if per_task else 1
    specs = specs_of(pretrained)
    meta = {"format": "pt", **(metadata or {})}
    folder = None
    if per_task:
        folder = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
        targets = [_Target(folder / f"task_{i}.safetensors", specs, max_shard_bytes, {**meta, "taskmerge_task": str(i)})
                   for i in range(n)]
    elif resume:
        targets = [_Target(output, specs, max_shard_bytes, meta, partial=partial_folder(output),
                           fingerprint=_fingerprint(method, hparams, finetuned, pretrained))]
    else:
        targets = [_Target(output, specs, max_shard_bytes, meta)]
    done = targets[0].writer.resumed
    inputs = (Without(pretrained, done), [Without(f, done) for f in finetuned]) if done else (pretrained, finetuned)
    if done:
        log.info("%s: resuming, %d of %d tensors already written in %s", output, len(done), len(specs),
                 partial_folder(output))
    # a resumed merge's scratch has a fixed name, so a killed part leaves nothing behind once it is finished
    scratch = Spill(folder=output.parent / f".{output.name}.scratch") if resume else Spill(parent=output.parent)
    artifacts: dict = {}
    ctx = {**(context or {}), "scratch": scratch, "chunk_numel": chunk_numel, "artifacts": artifacts}
    bar = tqdm(total=len(float_keys(inputs[0])), desc=f"merge[{method.name}]", unit="tensor",
               disable=not progress, leave=False)
    try:
        for item, value in method.stream(*inputs, hparams, **ctx):
            base = read(pretrained, item)
            values = value if per_task else [value]
            if len(values) != n:
                raise ValueError(f"{key_of(item)}: method {method.name!r} yielded {len(values)} values for {n} tasks")
            finished = [t.write(pretrained, item, resolve(base, v)) for t, v in zip(targets, values)]
            del base, values, value
            if all(finished):
                bar.update(1)
                if on_write is not None:
                    on_write(key_of(item))
        written = [t.close(pretrained) for t in targets]
        if per_task:
            for name, items in artifacts.items():
                ARTIFACT_WRITERS[name](folder, items)
            if output.is_dir():
                output.rmdir()  # empty (checked by the caller): rename the finished folder into its place
            os.replace(folder, output)
            written = sorted(output.glob("task_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
        return written
    except BaseException:
        for t in targets:
            kept = t.abort(keep=resume)
        if resume:
            log.warning("%s: interrupted; %d of %d tensors are kept in %s: the same merge with resume continues",
                        output, kept, len(specs), partial_folder(output))
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        bar.close()
        scratch.close()
