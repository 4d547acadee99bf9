"""Checkpoint layout: ``<root>/<suite>/<model>/<mode>/<task>/`` with weights, head and metadata.

- full: ``model.safetensors`` + ``config.json`` (a Hugging Face folder, loadable by ``taskmerge merge``);
- lora / ia3: ``adapter/`` (a peft adapter folder);
- ``head.safetensors``: the frozen head; ``metadata.json``: written last, so its presence marks a
  complete checkpoint. Writes go to a temporary sibling folder that is renamed into place, so an
  interrupted run never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import nn

from taskmerge.io.tensors import ModelFileError, load_safetensors
from taskmerge.provenance import write_json_atomic


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
    import copy

    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(copy.deepcopy(pretrained), str(path / "adapter"))
    except Exception as e:  # noqa: BLE001 — peft re-raises safetensors' errors without the file
        raise ModelFileError(f"{path / 'adapter'}: not a readable peft adapter ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return {k: v.detach().to("cpu", copy=True) for k, v in model.merge_and_unload().state_dict().items()}
