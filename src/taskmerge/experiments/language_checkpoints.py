"""The files of the language experiments' per-task checkpoints (reuse: ``train.checkpoints.TaskCheckpoints``).

Layout ``<paths.checkpoints>/<experiment>/<task>/``:

- T5 full: ``model.safetensors`` (the trainable state, tied aliases dropped);
- T5 IA3: ``adapter/`` (a peft adapter folder with the IA3 vectors);
- Llama LoRA: ``adapter/`` (peft) and ``head.safetensors`` (the task's ``score`` head);
- ``statistics-train_<N>.safetensors`` (T5, written the first time a method needs statistics);
- ``metadata.json`` (written last): fingerprint, train time, validation accuracy.

``load_state`` and ``load_lora`` also read imported checkpoints (``finetuned.pattern``): peft adapter
folders, ``.safetensors`` files and Hugging Face folders.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from taskmerge.io.load import load_model
from taskmerge.io.peft import load_lora_factors, read_adapter
from taskmerge.io.tensors import load_safetensors

HEAD, ADAPTER, FULL = "head.safetensors", "adapter", "model.safetensors"


# ---------------------------------------------------------------- saving and loading weights

def save_full(folder: Path, state: Mapping[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(folder / FULL))


def save_lora(folder: Path, peft_model, head_weight: torch.Tensor) -> None:
    peft_model.save_pretrained(str(folder / ADAPTER))
    save_file({"weight": head_weight.detach().contiguous()}, str(folder / HEAD))


def _adapter_folder(src: Path) -> Path | None:
    for folder in (src, src / ADAPTER):
        if (folder / "adapter_config.json").is_file():
            return folder
    return None


def _bare(key: str) -> str:
    """A tensor name without peft's prefix, adapter name or ``modules_to_save`` wrapper."""
    key = key.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")
    return key.removesuffix(".default")


def load_state(src: Path, template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of ``template`` (names and shapes of the trainable state) read from ``src``: a peft
    adapter folder (IA3), a checkpoint folder of ours, a ``.safetensors`` file or a Hugging Face folder."""
    adapter = _adapter_folder(src)
    if adapter is not None:
        tensors, where = read_adapter(adapter)[1], adapter / "adapter_model.safetensors"
    elif (src / FULL).is_file():
        tensors, where = load_safetensors(src / FULL), src / FULL
    else:
        tensors, where = load_model(src), src
    by_name = {_bare(k): k for k in tensors}
    extra = sorted(set(by_name) - {_bare(k) for k in template})
    if adapter is not None and extra:  # an adapter on other modules would be silently half-used
        raise ValueError(f"{where}: adapter tensors the model does not train here: {extra[:3]}")
    out = {}
    for k, ref in template.items():
        name = by_name.get(_bare(k))
        if name is None:
            raise ValueError(f"{where}: lacks {k} (a checkpoint of another model or mode?)")
        t = tensors[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{where}: {name} has shape {tuple(t.shape)}, the model's {k} is {tuple(ref.shape)}")
        out[k] = t.to(ref.dtype)
    return out


def load_lora(src: Path, pretrained: Mapping[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(factors, head)`` of a LoRA checkpoint: our folder (``adapter/`` + ``head.safetensors``) or a
    peft SEQ_CLS adapter folder whose saved ``score`` module is the head."""
    adapter = _adapter_folder(src)
    if adapter is None:
        raise ValueError(f"{src}: not a peft adapter folder (adapter_config.json missing)")
    factors = load_lora_factors(adapter, pretrained)
    for head_file in (src / HEAD, adapter / HEAD):
        if head_file.is_file():
            return factors, {"weight": load_safetensors(head_file)["weight"]}
    tensors = read_adapter(adapter)[1]
    score = [k for k in tensors if _bare(k) == "score.weight"]
    if not score:
        raise ValueError(f"{src}: no {HEAD} and the adapter saved no score head (modules_to_save)")
    return factors, {"weight": tensors[score[0]]}
