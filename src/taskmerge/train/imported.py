"""Checkpoints you already have: ``finetuned.pattern`` (``{task}`` substituted) against an explicit θ0.

Every setting (text, vision, language) imports the same way:

- :func:`require_theta0`: a pattern without ``model.path`` is refused: a task vector τ = θ_t − θ0 is
  only meaningful against the model the checkpoints were fine-tuned from, so θ0 is never a random
  initialisation used silently;
- :func:`load_imported`: the checkpoint (a ``.safetensors`` file, a Hugging Face folder, a peft
  adapter folder applied on θ0; pickles refused) as a dense state dict with θ0's names, checked by
  :func:`check_against_theta0`: the same tensor names, shapes and dtypes as θ0 (one error naming the
  file and the first offending tensor), and a warning when the task vector is all zeros (the file is
  θ0 itself) or when ‖τ‖ > ‖θ0‖ (probably not fine-tuned from this θ0).

The imported models' per-task accuracy is evaluated by the runner like any fine-tuned model's and
written as the ``finetuned`` rows of the results CSV; the rows' ``checkpoints`` column hashes the
imported files (``train.checkpoints.weights_hash``).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Mapping

import torch

log = logging.getLogger(__name__)


class ImportedCheckpointError(ValueError):
    """An imported checkpoint does not fit θ0 (names, shapes, dtypes) or θ0 is missing."""


def require_theta0(cfg) -> None:
    """Refuse ``finetuned.pattern`` without an explicit ``model.path`` (one line)."""
    pattern = (cfg.get("finetuned") or {}).get("pattern")
    model = cfg.get("model") or {}
    if pattern and not model.get("path"):
        raise ImportedCheckpointError(f"finetuned.pattern={pattern} is set but model.path is not: give the pretrained model θ0 "
                           "the checkpoints were fine-tuned from (model.path=<HF folder or .safetensors>); "
                           "a random θ0 is never used for imported checkpoints")


def check_against_theta0(task: str, source, pretrained: Mapping[str, torch.Tensor],
                         state: Mapping[str, torch.Tensor]) -> dict:
    """Names, shapes and dtypes of ``state`` equal θ0's (else one error naming the tensor); returns
    ``{"task_vector_norm", "theta0_norm"}`` and warns on an all-zero or larger-than-θ0 task vector."""
    missing = [k for k in pretrained if k not in state]
    extra = [k for k in state if k not in pretrained]
    if missing or extra:
        what = (f"lacks {len(missing)} of θ0's tensors (first: {missing[0]})" if missing else
                f"has {len(extra)} tensors θ0 lacks (first: {extra[0]})")
        raise ImportedCheckpointError(f"task {task!r}: {source} {what}: is it a checkpoint of this model (model.path)?")
    tau2 = base2 = 0.0
    for k, p in pretrained.items():
        t = state[k]
        if tuple(t.shape) != tuple(p.shape):
            raise ImportedCheckpointError(f"task {task!r}: {source}: tensor {k} has shape {tuple(t.shape)}, θ0's is {tuple(p.shape)}")
        if t.dtype != p.dtype:
            raise ImportedCheckpointError(f"task {task!r}: {source}: tensor {k} is {str(t.dtype).replace('torch.', '')}, θ0's is "
                               f"{str(p.dtype).replace('torch.', '')} (cast one of them, e.g. taskmerge merge --dtype)")
        if p.is_floating_point():
            tau2 += (t.double() - p.double()).pow(2).sum().item()
            base2 += p.double().pow(2).sum().item()
    tau, base = math.sqrt(tau2), math.sqrt(base2)
    if tau == 0.0:
        log.warning("task %s: %s equals θ0 (its task vector is all zeros): was it fine-tuned at all?", task, source)
    elif tau > base:
        log.warning("task %s: %s is farther from θ0 than θ0 is from zero (‖τ‖ = %.3g > ‖θ0‖ = %.3g): "
                    "was it fine-tuned from this model.path?", task, source, tau, base)
    return {"task_vector_norm": tau, "theta0_norm": base}


def load_imported(task: str, source, pretrained: Mapping[str, torch.Tensor], *, trust_pickle: bool = False,
                  name_map=None) -> dict[str, torch.Tensor]:
    """The imported checkpoint of ``task`` at ``source`` as a dense, checked state dict with θ0's names.

    ``name_map(key) -> key`` renames the file's tensors first (e.g. strip a ``model.`` prefix)."""
    from taskmerge.io.load import load_model

    source = Path(source)
    if source.is_dir() and (source / "adapter" / "adapter_config.json").is_file() \
            and not (source / "adapter_config.json").is_file() and not (source / "model.safetensors").is_file():
        source = source / "adapter"  # one of our own checkpoint folders with a peft adapter inside
    raw = load_model(source, pretrained=pretrained, trust_pickle=trust_pickle)
    state = {(name_map(k) if name_map else k): v for k, v in raw.items()}
    state = {k: torch.as_tensor(v).detach().clone() for k, v in state.items()}
    check_against_theta0(task, source, pretrained, state)
    return state
