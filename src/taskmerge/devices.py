"""One ``device`` for every script: the model, its inputs and the merging maths all live there.

``config_device(cfg)`` reads a script config's ``device`` key (default ``cpu``) and checks it with the
CLI's own ``merge_files.parse_device``: ``device=cuda`` on a machine without CUDA is one clear error.
The loops (``train.finetune``, ``evaluate``, ``stats.collect``) put each batch where the model is
(``module_device`` / ``to_device``), so an experiment only places the model; state dicts handed to
the search stay on the CPU, and methods compute on the device given as their ``device`` context.
"""
from __future__ import annotations

import torch
from torch import nn


def config_device(cfg) -> torch.device:
    """The config's ``device`` (``cpu`` when absent), refused clearly when it does not exist here."""
    from taskmerge.merge_files import parse_device

    device = cfg.get("device", None) if hasattr(cfg, "get") else getattr(cfg, "device", None)
    device = str(device or "cpu")
    try:
        return parse_device(device)
    except ValueError as e:  # the CLI's message names --device; a script's culprit is the config key
        raise ValueError(str(e).replace("--device ", "device=", 1)) from None


def module_device(module: nn.Module) -> torch.device:
    """Where ``module``'s first parameter (or buffer) lives; CPU for a module without tensors."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def to_device(obj, device):
    """Tensors in ``obj`` (a tensor, tuple, list or dict of them) moved to ``device``; the rest as is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj
