"""Fine-tuned checkpoints, one folder per task, and the one mechanism that reuses them (every family).

:class:`TaskCheckpoints` is how every experiment (text, vision, language) gets a task's checkpoint:

- a complete folder (``metadata.json`` present) is reused when its recorded ``fingerprint`` (sha256 of
  what training and the recorded accuracies depend on, given by the family) matches the config, and
  refused with one clear error when it does not (``force=true`` retrains; or change the suite /
  experiment name to keep both);
- a folder without ``metadata.json`` (a crash mid-write) is retrained;
- a new checkpoint is written into a hidden sibling and renamed into place with ``metadata.json``
  written last (:func:`install_checkpoint`), so a crash never leaves a folder that looks complete;
- ``finetuned.pattern`` imports checkpoints instead (fingerprint ``import:<file hash>``);
- statistics (Fisher / Gram) are cached beside the checkpoint, keyed by the weights' hash and the
  statistics settings, and recomputed when either changes.

The family decides what goes into the folder (text: ``model.safetensors`` + ``config.json`` or
``adapter/``, and ``head.safetensors``; CLIP: ``model.safetensors`` or ``adapter/``; T5: the trainable
state or an IA3 ``adapter/``; Llama: ``adapter/`` + ``head.safetensors``).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from peft import PeftModel
from safetensors.torch import save_file
from torch import nn

from taskmerge.io.tensors import ModelFileError, load_safetensors
from taskmerge.provenance import file_hash, git_commit, package_versions, write_json_atomic
from taskmerge.stats import load_statistics, save_statistics

log = logging.getLogger(__name__)
META = "metadata.json"


def checkpoint_dir(root: str | Path, suite: str, model: str, mode: str, task: str) -> Path:
    return Path(root) / suite / model / mode / task


def heads_dir(root: str | Path, suite: str, model: str) -> Path:
    return Path(root) / suite / model / "heads"


def is_complete(path: Path) -> bool:
    return (Path(path) / "metadata.json").exists()


def save_head(head: nn.Linear, path: Path, labels: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({"weight": head.weight.detach().cpu().contiguous(), "bias": head.bias.detach().cpu().contiguous()},
              str(tmp), metadata={"labels": json.dumps(labels)})
    os.replace(tmp, path)


def load_head(path: Path) -> nn.Linear:
    if not Path(path).exists():
        raise FileNotFoundError(f"no head at {path}")
    sd = load_safetensors(path)
    head = nn.Linear(sd["weight"].shape[1], sd["weight"].shape[0])
    head.load_state_dict(sd)
    return head.requires_grad_(False)


def install_checkpoint(path: Path, write: Callable[[Path], dict | None], metadata: dict) -> dict:
    """Build a checkpoint folder atomically and return its metadata.

    ``write(folder)`` writes the weights into a hidden temporary sibling of ``path`` (one per process,
    so parallel jobs never share it) and may return more metadata; ``metadata.json`` is written
    last, then the folder is renamed into place. A crash leaves no folder that looks complete.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta = {**metadata, **(write(tmp) or {})}
        write_json_atomic(tmp / "metadata.json", meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():  # a parallel job (or force=true) got there first: the newest complete one wins
        shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return meta


def save_checkpoint(path: Path, encoder: nn.Module, head: nn.Linear, labels: list[str], metadata: dict) -> None:
    """Write a complete checkpoint atomically (:func:`install_checkpoint`)."""
    def write(folder: Path) -> None:
        if metadata["mode"] == "full":
            encoder.save_pretrained(str(folder), safe_serialization=True)
        else:
            encoder.save_pretrained(str(folder / "adapter"))
        save_head(head, folder / "head.safetensors", labels)

    install_checkpoint(path, write, metadata)


def load_metadata(path: Path) -> dict:
    meta = Path(path) / "metadata.json"
    if not meta.exists():
        raise FileNotFoundError(f"no complete checkpoint at {path} (metadata.json missing): "
                                "run training_scripts/finetune.py for this task first")
    try:
        return json.loads(meta.read_text())
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{meta}: not a readable metadata file ({e}); delete the checkpoint folder "
                             "or pass force=true to retrain it") from None


def load_encoder_state(path: Path, pretrained: nn.Module) -> dict[str, torch.Tensor]:
    """The fine-tuned encoder as a dense state dict with the pretrained model's tensor names.

    LoRA / IA3 adapters are applied to a copy of ``pretrained`` and merged into its weights.
    """
    path = Path(path)
    mode = load_metadata(path)["mode"]
    if mode == "full":
        sd = load_safetensors(path / "model.safetensors")
        ref = pretrained.state_dict()
        return {k: sd[k] if k in sd else v.detach().to("cpu", copy=True) for k, v in ref.items()}
    try:
        model = PeftModel.from_pretrained(copy.deepcopy(pretrained), str(path / "adapter"))
    except Exception as e:  # noqa: BLE001 — peft re-raises safetensors' errors without the file
        raise ModelFileError(f"{path / 'adapter'}: not a readable peft adapter ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return {k: v.detach().to("cpu", copy=True) for k, v in model.merge_and_unload().state_dict().items()}


def fingerprint(parts: Mapping[str, Any]) -> str:
    """sha256 prefix of what a checkpoint and its recorded accuracies depend on (JSON, sorted keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_hash(path: Path) -> str:
    """Hash of a checkpoint's weight files: not its metadata, cached statistics or peft's README."""
    path = Path(path)
    extra = {p.name for p in path.rglob("statistics*.safetensors")} if path.is_dir() else set()
    return file_hash(path, 64, exclude={META, "README.md", *extra})


class TaskCheckpoints:
    """Where each task's fine-tuned weights live (``<root>/<task>/``) and whether they can be reused.

    ``parts(task)``: what the task's checkpoint depends on (hashed into its fingerprint);
    ``metadata``: recorded in every new ``metadata.json`` (with the task, the fingerprint, the train
    time, package versions and the git commit); ``pattern``: import ``pattern.format(task=...)``
    instead of training; ``writer``: False in the non-main processes of a multi-process fine-tune
    (they train, but only the main process installs the folder).
    """

    def __init__(self, root: Path, parts: Callable[[str], Mapping], *, force: bool = False,
                 pattern: str | None = None, metadata: Mapping | None = None, writer: bool = True):
        self.root, self.parts, self.force, self.pattern = Path(root), parts, bool(force), pattern
        self.metadata, self.writer = dict(metadata or {}), writer
        self._ids: dict[str, tuple[str, str]] = {}

    def path(self, task: str) -> Path:
        return self.root / task

    def source(self, task: str) -> Path:
        """The weights to load: the imported checkpoint (``pattern``) or our own folder."""
        if self.pattern:
            src = Path(self.pattern.format(task=task))
            if not src.exists():
                raise FileNotFoundError(f"finetuned.pattern gives {src} for task {task}: no such file or folder")
            return src
        return self.path(task)

    def identity(self, task: str) -> tuple[str, str]:
        """``(fingerprint, weights hash)`` of the task's checkpoint; ``import:<hash>`` when imported."""
        if task not in self._ids:
            weights = weights_hash(self.source(task))
            fp = f"import:{weights[:16]}" if self.pattern else load_metadata(self.path(task))["fingerprint"]
            self._ids[task] = (fp, weights)
        return self._ids[task]

    def ensure(self, task: str, train: Callable[[Path], dict | None]) -> dict:
        """Reuse ``task``'s complete checkpoint, or call ``train(folder)`` (writes the weights into
        ``folder``, returns metadata such as ``validation_accuracy``) and install the result."""
        if self.pattern:
            log.info("%s: using %s (finetuned.pattern)", task, self.source(task))
            return {"fingerprint": self.identity(task)[0], "source": str(self.source(task))}
        path, fp = self.path(task), fingerprint(self.parts(task))
        if is_complete(path) and not self.force:
            meta = load_metadata(path)
            if meta.get("fingerprint") != fp:
                raise RuntimeError(
                    f"{path} holds a checkpoint fine-tuned with another config (fingerprint "
                    f"{meta.get('fingerprint')}, this config {fp}); pass force=true to retrain it, or change "
                    f"the suite / experiment name to keep both")
            log.info("%s: reusing %s (val %.3f)", task, path, meta.get("validation_accuracy", float("nan")))
            return meta
        if path.exists():
            log.info("%s: %s", task, "force=true: retraining" if is_complete(path) else
                     f"{path} is incomplete (no {META}): retraining")
        meta = {**self.metadata, "task": task, "fingerprint": fp, "versions": package_versions(),
                "git_commit": git_commit()}

        def timed(folder: Path) -> dict | None:
            t0 = time.perf_counter()
            out = train(folder)
            return {"train_seconds": round(time.perf_counter() - t0, 1), **(out or {})}

        if not self.writer:  # another process installs it
            with tempfile.TemporaryDirectory() as scratch:
                timed(Path(scratch))
            return {}
        meta = install_checkpoint(path, timed, meta)
        self._ids.pop(task, None)
        log.info("%s: fine-tuned in %.0fs, val %.3f -> %s", task, meta["train_seconds"],
                 meta.get("validation_accuracy", float("nan")), path)
        return meta

    def checkpoints_id(self, tasks, extra: str = "") -> str:
        """Identity of the fine-tuned set for the CSV rows: fingerprints and a hash of the weight files
        (``extra``: anything else the merges depend on, e.g. the statistics budget)."""
        h = hashlib.sha256(extra.encode())
        for t in tasks:
            fp, weights = self.identity(t)
            h.update(f"{t}:{fp}:{weights};".encode())
        return h.hexdigest()[:16]

    def stats_path(self, task: str, tag: str) -> Path:
        return self.path(task) / f"statistics-{tag}.safetensors"

    def statistics(self, task: str, tag: str, settings: Mapping, compute: Callable[[], tuple[dict, dict]]) -> dict:
        """``task``'s statistics (``compute() -> (stats, metadata)``), cached beside its checkpoint as
        ``statistics-<tag>.safetensors`` and reused while the weights and ``settings`` match."""
        path = self.stats_path(task, tag)
        want = {"checkpoint_weights": self.identity(task)[1], **{k: v for k, v in settings.items()}}
        if path.exists():
            stats, meta = load_statistics(path)
            if all(meta.get(k) == v for k, v in want.items()):
                log.info("%s: reusing statistics %s", task, path)
                return stats
        t0 = time.perf_counter()
        stats, meta = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_statistics(path, stats, {**meta, **want})
        log.info("%s: statistics in %.0fs -> %s", task, time.perf_counter() - t0, path)
        return stats
