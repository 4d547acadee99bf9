"""Which tensors a method touches: a kind label for every tensor of a state dict.

``tensor_kinds(state_dict, model=None)`` returns ``{name: kind}`` with kind one of
``"linear" | "embedding" | "conv" | "norm" | "other"``. Methods that treat linear
layers specially (TSV's SVD, OPCM's projection) read it through the registry's
``kinds`` context argument.

The rule
--------
*With a model* (an ``nn.Module`` whose ``state_dict()`` names match), a tensor's kind
is the type of the module that owns it directly:

- ``nn.Linear`` (and subclasses, e.g. ``NonDynamicallyQuantizableLinear``) → ``linear``,
  bias included; ``nn.MultiheadAttention``'s own ``in_proj_weight``/``in_proj_bias``
  and ``q/k/v_proj_weight`` → ``linear`` (they are a packed linear map; its
  ``out_proj`` is an ``nn.Linear`` anyway);
- ``nn.Embedding``/``nn.EmbeddingBag`` → ``embedding``;
- ``nn.Conv1d/2d/3d`` and transposed convolutions → ``conv``;
- LayerNorm, GroupNorm, BatchNorm*, InstanceNorm*, LocalResponseNorm, and any module whose
  class name ends in ``Norm`` (RMSNorm, T5LayerNorm, …) → ``norm``;
- anything else → ``other``. This includes parameters owned directly by a non-leaf module
  (open_clip's ``class_embedding``, ``positional_embedding``, ``proj``; HF CLIP's
  ``class_embedding``) and other MultiheadAttention parameters (``bias_k``/``bias_v``).

A state-dict name the model does not own falls back to the shape rule.

*Without a model*, by shape: 2-D → ``linear``, except names containing ``embed`` →
``embedding``; more than 2 dims → ``conv``; 0-/1-D → ``other`` (biases and norm
weights cannot be told apart by shape, so they are ``other``).

Integer and bool buffers (``position_ids``, BatchNorm's ``num_batches_tracked``) get a
kind too but are never touched by any method: see ``inputs.float_keys``.
"""
from __future__ import annotations

from typing import Literal, Mapping

import torch
from torch import nn

Kind = Literal["linear", "embedding", "conv", "norm", "other"]
KINDS: tuple[str, ...] = ("linear", "embedding", "conv", "norm", "other")

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
               nn.modules.batchnorm._NormBase)  # _NormBase covers BatchNorm*/InstanceNorm*
_CONV_TYPES = (nn.modules.conv._ConvNd,)
_MHA_LINEAR = frozenset({"in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight"})


def kind_by_shape(name: str, tensor: torch.Tensor) -> Kind:
    """The shape rule (no model known); see the module docstring."""
    if tensor.ndim == 2:
        return "embedding" if "embed" in name.lower() else "linear"
    if tensor.ndim > 2:
        return "conv"
    return "other"


def _kind_of_module(module: nn.Module, attr: str) -> Kind:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.MultiheadAttention):
        return "linear" if attr in _MHA_LINEAR else "other"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    if isinstance(module, _CONV_TYPES):
        return "conv"
    if isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm"):
        return "norm"
    return "other"


def module_kinds(model: nn.Module) -> dict[str, Kind]:
    """Kind of every parameter and buffer of ``model``, keyed by its state-dict name.

    Tied weights appear under every name they are reachable by (as in ``state_dict()``).
    A parameter owned directly by a module that has children is ``other``, except the
    packed projection of ``nn.MultiheadAttention``.
    """
    kinds: dict[str, Kind] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        has_children = next(module.children(), None) is not None
        owned = list(module._parameters.items()) + list(module._buffers.items())
        for attr, tensor in owned:
            if tensor is None:
                continue
            kind = _kind_of_module(module, attr)
            if has_children and not isinstance(module, nn.MultiheadAttention):
                kind = "other"
            kinds[f"{prefix}.{attr}" if prefix else attr] = kind
    return kinds


def tensor_kinds(state_dict: Mapping[str, torch.Tensor], model: nn.Module | None = None) -> dict[str, Kind]:
    """``{name: kind}`` for every tensor of ``state_dict`` (see the module docstring for the rule)."""
    by_module = module_kinds(model) if model is not None else {}
    return {name: by_module.get(name) or kind_by_shape(name, t) for name, t in state_dict.items()}


def module_depths(model: nn.Module) -> dict[str, int]:
    """``{state-dict name: index of its residual block}`` from the model itself (LiNeS', RegMean++'s ``depths``).

    The blocks are the ``nn.ModuleList``s of two or more children of one class (BERT ``encoder.layer``,
    CLIP ``encoder.layers``, open_clip ``transformer.resblocks``, Llama ``model.layers``; T5 has two, one
    per stack). A list nested inside a block (e.g. experts) does not renumber it: the outermost wins.
    Names outside every block are absent (LiNeS gives them α).
    """
    depths: dict[str, int] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        children = list(module.children())
        if not isinstance(module, nn.ModuleList) or len(children) < 2 or len({type(c) for c in children}) > 1:
            continue
        for i, block in enumerate(children):
            for name in block.state_dict(keep_vars=True):
                depths.setdefault(f"{prefix}.{i}.{name}" if prefix else f"{i}.{name}", i)
    return depths


def is_matrix(name: str, tensor: torch.Tensor, kinds: Mapping[str, str] | None) -> bool:
    """True for a 2-D floating tensor that is a linear map (kind ``linear``; shape rule if no kinds)."""
    if tensor.ndim != 2 or not tensor.is_floating_point():
        return False
    kind = kinds.get(name) if kinds is not None else None
    return (kind or kind_by_shape(name, tensor)) == "linear"


def name_matches(name: str, patterns: str) -> bool:
    """True when any comma-separated substring in ``patterns`` occurs in ``name`` ("" matches nothing)."""
    return any(p and p in name for p in (s.strip() for s in patterns.split(",")))
