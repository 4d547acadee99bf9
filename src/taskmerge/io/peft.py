"""peft adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``).

- LoRA: ``load_lora_factors`` gives the raw factors ``{module: LoraFactors(A, B, scale)}`` for
  factor-space methods (KnOTS), with ΔW = scale · B @ A (A [r, in], B [out, r]) and
  ``scale = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``; ``alpha_pattern``/``rank_pattern``
  honoured). ``module`` is the base weight's key in the pretrained state dict minus ``.weight``.
- IA3: ``load_ia3_vectors`` gives ``{module: l}``; l is [out, 1] (scales the output: weight rows
  and bias) or [1, in] for feed-forward modules (scales the weight's columns), as peft merges it.
- ``load_adapter_dense`` applies either on top of ``pretrained`` lazily: a Mapping whose tensors are
  computed on access (W0 + ΔW, or W0 ⊙ l), with ``modules_to_save`` tensors replacing theirs.

Module names are matched to the pretrained keys after dropping peft's ``base_model.model.``
prefix: exactly, or as the unique key that ends with the name (or that the name ends with).
DoRA and LoRA biases are not supported (clear error).
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Iterator, Mapping

import torch

from taskmerge.io.tensors import LazyStateDict, ModelFileError, save_state_dict
from taskmerge.merging.lora import LoraFactors  # the one factor type, shared with KnOTS

_PREFIX = "base_model.model."


def read_adapter(folder) -> tuple[dict, LazyStateDict]:
    folder = Path(folder)
    cfg_path = folder / "adapter_config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{cfg_path}: cannot read the adapter config ({e})") from None
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise ModelFileError(f"{folder / 'adapter_model.bin'}: pickled adapters are not supported; "
                                 f"re-save it with safe_serialization=True")
        raise ModelFileError(f"{folder}: adapter_model.safetensors is missing")
    return config, LazyStateDict([weights])


def _pattern_value(patterns: Mapping[str, object], module: str, default):
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _resolve(name: str, keys: Mapping[str, object] | None, what: str, source: Path) -> str:
    """Map an adapter-side tensor name to the pretrained model's key."""
    name = name[len(_PREFIX):] if name.startswith(_PREFIX) else name
    if keys is None or name in keys:
        return name
    hits = [k for k in keys if k.endswith("." + name) or name.endswith("." + k)]
    if len(hits) != 1:
        raise ModelFileError(f"{source}: {what} {name} matches {len(hits)} tensors of the pretrained model "
                             f"({hits[:3]}); cannot place the adapter")
    return hits[0]


def load_lora_factors(folder, pretrained: Mapping[str, torch.Tensor] | None = None) -> dict[str, LoraFactors]:
    """``{module: LoraFactors(A, B, scale)}`` of a peft LoRA adapter folder."""
    config, tensors = read_adapter(folder)
    source = Path(folder) / "adapter_model.safetensors"
    if config.get("peft_type") != "LORA":
        raise ModelFileError(f"{folder}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora") or config.get("lora_bias"):
        raise ModelFileError(f"{folder}: DoRA / LoRA-bias adapters are not supported")
    factors = {}
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        b_key = module + ".lora_B.weight"
        if b_key not in tensors:
            raise ModelFileError(f"{source}: tensor {key} has no matching {b_key}")
        a, b = tensors[key], tensors[b_key]
        bare = module[len(_PREFIX):] if module.startswith(_PREFIX) else module
        r = a.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, bare, config.get("lora_alpha", r))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        if config.get("fan_in_fan_out"):  # GPT-2 Conv1D stores W transposed: ΔWᵀ = scale·Aᵀ Bᵀ
            a, b = b.T.contiguous(), a.T.contiguous()
        weight_key = _resolve(module + ".weight", pretrained, "LoRA module", source)
        factors[weight_key[: -len(".weight")]] = LoraFactors(a, b, float(scale))
    if not factors:
        raise ModelFileError(f"{source}: no lora_A/lora_B tensors found")
    return factors


def load_ia3_vectors(folder, pretrained: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``{module: l}`` of a peft IA3 adapter folder ([out,1] output scaling or [1,in] feed-forward)."""
    config, tensors = read_adapter(folder)
    source = Path(folder) / "adapter_model.safetensors"
    if config.get("peft_type") != "IA3":
        raise ModelFileError(f"{folder}: peft_type {config.get('peft_type')!r} is not IA3")
    vectors = {}
    for key in tensors:
        if key.endswith(".ia3_l"):
            vec = tensors[key]
            if config.get("fan_in_fan_out"):
                vec = vec.T.contiguous()
            weight_key = _resolve(key[: -len(".ia3_l")] + ".weight", pretrained, "IA3 module", source)
            vectors[weight_key[: -len(".weight")]] = vec
    if not vectors:
        raise ModelFileError(f"{source}: no ia3_l tensors found")
    return vectors


class AdapterStateDict(Mapping[str, torch.Tensor]):
    """pretrained ⊕ adapter, computed one tensor at a time on access (keys/order of ``pretrained``)."""

    def __init__(self, pretrained: Mapping[str, torch.Tensor], lora=None, ia3=None, replaced=None):
        self.pretrained = pretrained
        self.lora = {m + ".weight": f for m, f in (lora or {}).items()}
        self.ia3 = {m: v for m, v in (ia3 or {}).items()}
        self.replaced = dict(replaced or {})

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self.replaced:
            return self.replaced[key]
        base = self.pretrained[key]
        if key in self.lora:
            return (base.float() + self.lora[key].delta().to(base.device)).to(base.dtype)
        module, _, leaf = key.rpartition(".")
        vec = self.ia3.get(module)
        if vec is not None and leaf == "weight":
            return (base.float() * vec.float().to(base.device)).to(base.dtype)
        if vec is not None and leaf == "bias" and vec.shape[1] == 1:
            return (base.float() * vec.float().to(base.device).reshape(base.shape)).to(base.dtype)
        return base

    def __iter__(self) -> Iterator[str]:
        return iter(self.pretrained)

    def __len__(self) -> int:
        return len(self.pretrained)

    def __contains__(self, key) -> bool:
        return key in self.pretrained


def load_adapter_dense(folder, pretrained: Mapping[str, torch.Tensor]) -> AdapterStateDict:
    """The dense weights of ``pretrained`` with the adapter at ``folder`` merged in (lazy Mapping)."""
    config, tensors = read_adapter(folder)
    source = Path(folder) / "adapter_model.safetensors"
    kind = config.get("peft_type")
    if kind == "LORA":
        lora, ia3, adapter_suffixes = load_lora_factors(folder, pretrained), None, (".lora_A.weight", ".lora_B.weight")
    elif kind == "IA3":
        lora, ia3, adapter_suffixes = None, load_ia3_vectors(folder, pretrained), (".ia3_l",)
    else:
        raise ModelFileError(f"{folder}: peft_type {kind!r} is not supported (LORA or IA3)")
    for module, f in (lora or {}).items():
        want = tuple(pretrained[module + ".weight"].shape)
        if (f.B.shape[0], f.A.shape[1]) != want:
            raise ModelFileError(f"{source}: LoRA {module} gives a {f.B.shape[0]}x{f.A.shape[1]} update, "
                                 f"pretrained {module}.weight is {want}")
    replaced = {}
    for key in tensors:
        if key.endswith(adapter_suffixes):
            continue
        bare = key.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
        target = _resolve(bare, pretrained, "saved module tensor", source)
        t = tensors[key]
        if tuple(t.shape) != tuple(pretrained[target].shape):
            raise ModelFileError(f"{source}: tensor {key} has shape {tuple(t.shape)}, "
                                 f"pretrained {target} has {tuple(pretrained[target].shape)}")
        replaced[target] = t
    return AdapterStateDict(pretrained, lora=lora, ia3=ia3, replaced=replaced)


def peft_module_names(folder, pretrained: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``{module (pretrained key minus .weight): the adapter's own module name}`` of a LoRA adapter folder."""
    _, tensors = read_adapter(folder)
    source = Path(folder) / "adapter_model.safetensors"
    out = {}
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            out[_resolve(module + ".weight", pretrained, "LoRA module", source)[: -len(".weight")]] = module
    return out


def save_lora_adapter(folder, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], template, names: Mapping[str, str],
                      dtype: torch.dtype = torch.float32) -> Path:
    """Write ``{module: (B [out, r_m], A [r_m, in])}`` (ΔW = B @ A exactly) as a peft LoRA adapter folder.

    Every module is zero-padded to the largest rank R (the padding adds nothing to B @ A), with
    ``r = lora_alpha = R`` so peft's scale is 1. ``template``: an input adapter folder whose
    ``adapter_config.json`` (base model, task type, target modules) is kept; ``names`` maps each module to
    that adapter's own module name (:func:`peft_module_names`). Written atomically.
    """
    folder = Path(folder)
    rank = max(B.shape[1] for B, _ in factors.values())
    tensors = {}
    for module, (B, A) in factors.items():
        pad = rank - B.shape[1]
        B = torch.cat([B, B.new_zeros(B.shape[0], pad)], 1) if pad else B
        A = torch.cat([A, A.new_zeros(pad, A.shape[1])], 0) if pad else A
        tensors[f"{names[module]}.lora_A.weight"] = A.to(dtype).contiguous()
        tensors[f"{names[module]}.lora_B.weight"] = B.to(dtype).contiguous()
    config, _ = read_adapter(template)
    config = {**config, "r": rank, "lora_alpha": rank, "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False,
              "use_dora": False}
    tmp = folder.parent / f".{folder.name}.tmp"
    tmp.mkdir(exist_ok=False)
    try:
        save_state_dict(tensors, tmp / "adapter_model.safetensors", {"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
