"""The LoRA-factor input of factor-space methods (KnOTS and its LoRA baselines).

One fine-tuned model is ``LoraModel = {module: LoraFactors(A, B, scale)}``:

- ``module``: the pretrained state dict key of the adapted weight *minus* ``".weight"``
  (peft's ``base_model.model.`` prefix and ``.base_layer`` already removed), so the merged update
  of ``module`` is added to ``pretrained[module + ".weight"]``;
- ``A``: [r, in], ``B``: [out, r], oriented like the base weight (for ``fan_in_fan_out`` layers such
  as GPT-2's Conv1D the loader swaps and transposes them, so that ΔW has the weight's shape);
- ``scale``: peft's ``lora_alpha / r`` (``/ √r`` with rsLoRA).

ΔW = scale · B @ A. ``taskmerge.io.peft.load_lora_factors`` produces this structure from a peft
adapter folder; any object with ``A``, ``B`` and ``scale`` attributes is accepted.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Protocol, Sequence

import torch

from taskmerge.merging.inputs import all_finite, dtype_of, shape_of
from taskmerge.merging.registry import StateDict


class LoraFactors(NamedTuple):
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float = 1.0

    def delta(self) -> torch.Tensor:
        """Dense ΔW = scale · B @ A in float32."""
        return self.scale * (self.B.float() @ self.A.float())


class _Factors(Protocol):
    A: torch.Tensor
    B: torch.Tensor
    scale: float


LoraModel = Mapping[str, _Factors]


def lora_delta(f: _Factors, apply_scale: bool = True, device=None) -> torch.Tensor:
    """ΔW = scale·B@A (``apply_scale=False``: B@A, as KnOTS' official code) in float32 on ``device``."""
    delta = f.B.to(device=device, dtype=torch.float32) @ f.A.to(device=device, dtype=torch.float32)
    return delta * f.scale if apply_scale and f.scale != 1 else delta


def concat_factors(factors: Sequence[_Factors], apply_scale: bool = True, device=None, weight: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B_cat, A_cat) with B_cat @ A_cat = weight · Σ_t scale_t B_t A_t: B_cat = [w·s_1 B_1 | …], A_cat = [A_1; …]."""
    Bs = [f.B.to(device=device, dtype=torch.float32) * (weight * (f.scale if apply_scale else 1.0)) for f in factors]
    As = [f.A.to(device=device, dtype=torch.float32) for f in factors]
    return torch.cat(Bs, dim=1), torch.cat(As, dim=0)


def check_lora_models(pretrained: StateDict, models: Sequence[LoraModel]) -> list[str]:
    """Validate LoRA inputs against the pretrained weights; return the module names, sorted.

    Every model must adapt the same modules; each ``module + ".weight"`` must be a floating
    pretrained tensor of shape [out, in] = [B.shape[0], A.shape[1]], with matching ranks.
    """
    if not models:
        raise ValueError("the list of LoRA adapters is empty")
    modules = sorted(models[0])
    for i, model in enumerate(models):
        if sorted(model) != modules:
            diff = sorted(set(model) ^ set(modules))
            raise ValueError(f"adapter {i}: adapts other modules than adapter 0 (differences: {diff[:5]})")
        for module in modules:
            f = model[module]
            if not all(hasattr(f, name) for name in ("A", "B", "scale")):
                raise ValueError(f"adapter {i}: module {module} is not LoRA factors (A, B, scale): {type(f).__name__}")
            key = module + ".weight"
            if key not in pretrained or not dtype_of(pretrained, key).is_floating_point:
                raise ValueError(f"adapter {i}: module {module} has no floating pretrained weight {key}")
            if f.A.ndim != 2 or f.B.ndim != 2 or f.A.shape[0] != f.B.shape[1]:
                raise ValueError(f"adapter {i}: module {module} has A {tuple(f.A.shape)}, B {tuple(f.B.shape)}: "
                                 f"expected A [r, in], B [out, r]")
            if (f.B.shape[0], f.A.shape[1]) != shape_of(pretrained, key):
                raise ValueError(f"adapter {i}: module {module} gives a {f.B.shape[0]}x{f.A.shape[1]} update, "
                                 f"pretrained {key} is {shape_of(pretrained, key)}")
            if not (all_finite(f.A) and all_finite(f.B)):
                raise ValueError(f"adapter {i}: module {module} contains NaN or Inf")
    return modules
