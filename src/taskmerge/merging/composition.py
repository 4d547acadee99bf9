"""Methods that run another registered method inside them (LiNeS on a base merge, Core Space's
inner merge): its name and its hyperparameters as one string, resolved through the registry.

``inner_stream(name, params, pretrained, finetuned, owner=..., context=...)`` returns the named
method's stream, with:

- ``params`` a comma-separated ``name=value`` string (``"k=20,merge=mean"``), parsed and checked
  by the inner method's own typed signature (``Method.resolve``), so a typo fails with that
  method's list of valid names;
- the inner method's ``linear_in`` hyperparameter (its global scale, e.g. TIES' λ) set to 1 unless
  ``params`` names it: the outer method applies its own scaling to the inner *update* (LiNeS'
  α, β; Core Space's λ), as the official code does with the unscaled merged task vector;
- only model-output, non-sequential methods accepted (one merged model), each handed the context
  it declares.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch

from taskmerge.merging.outputs import Update
from taskmerge.merging.registry import Method, get_method


def parse_params(text: str, owner: str) -> dict[str, str]:
    """``"k=20, merge=mean"`` → ``{"k": "20", "merge": "mean"}`` ("" → {})."""
    out = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        name, sep, value = entry.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{owner}: {entry!r} is not name=value (write e.g. 'k=20,merge=mean')")
        out[name.strip()] = value.strip()
    return out


def inner_method(name: str, params: str, owner: str) -> tuple[Method, dict[str, Any]]:
    """The registered method ``name`` and its resolved hyperparameters (its ``linear_in`` at 1 unless given)."""
    try:
        method = get_method(name)
    except KeyError as err:
        raise ValueError(f"{owner}: {err.args[0]}") from None
    if method.output != "model" or method.sequential:
        raise ValueError(f"{owner}: {name!r} does not produce one merged model (output={method.output}, "
                         f"sequential={method.sequential}); choose a model-output method")
    hparams: dict[str, Any] = dict(parse_params(params, owner))
    if method.linear_in is not None:
        hparams.setdefault(method.linear_in, 1.0)
    try:
        return method, method.resolve(hparams)
    except ValueError as err:
        raise ValueError(f"{owner}: {err}") from None


def inner_stream(name: str, params: str, pretrained, finetuned, *, owner: str,
                 context: Mapping[str, Any]) -> Iterator:
    """The stream of ``name`` on these inputs (see the module docstring)."""
    method, hparams = inner_method(name, params, owner)
    missing = sorted(method.context & {"stats", "lora"} - {k for k, v in context.items() if v is not None})
    if missing:
        raise ValueError(f"{owner}: {name!r} needs {', '.join(missing)}, which {owner} does not pass on")
    return method.stream(pretrained, finetuned, hparams, **context)


def update_of(value, base: torch.Tensor) -> torch.Tensor:
    """The float32 update a stream value adds to ``base``: s·Δ of an ``Update`` (Δ itself at s = 1), or value − θ0."""
    if isinstance(value, Update):
        delta = value.delta.float()
        return delta if value.scale == 1 else value.scale * delta
    return value.float() - base.to(device=value.device, dtype=torch.float32)
