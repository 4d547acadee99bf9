"""Llama family adapter (KnOTS NLI setting): ``LlamaForSequenceClassification`` + LoRA, class masking.

- Model: default checkpoint ``meta-llama/Meta-Llama-3-8B`` in bf16 (any name/path, or a
  ``LlamaConfig`` dict for tests), 3 labels in the unified NLI label space (``data.nli.LABELS``).
  Llama has no pad token: the EOS id is used (the classifier reads the last non-pad token).
- LoRA through peft: r=16, alpha 16, dropout 0.1 on q/k/v/o projections (KnOTS). peft's SEQ_CLS
  task also trains and saves the ``score`` head per task (``modules_to_save``); each task is
  evaluated with its own head, only the LoRA updates are merged.
- Class masking (``MaskedClassifier``): logits of classes a task does not have are set to -inf,
  in training and evaluation (the two-class tasks QNLI, RTE, SciTail use 2 of the 3 outputs).
- ``lora_factors(peft_model)`` → ``{module: LoraFactors}`` for the factor-space methods
  (KnOTS, and TIES/TA/DARE through ``lora_merge``).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from taskmerge.merging.lora import LoraFactors

DEFAULT_CHECKPOINT = "meta-llama/Meta-Llama-3-8B"
LORA_CONFIG = {"r": 16, "lora_alpha": 16, "lora_dropout": 0.1,
               "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
PEFT_PREFIX = "base_model.model."


def load_llama(name_or_path: str | None = DEFAULT_CHECKPOINT, config: dict | None = None, num_labels: int = 3,
               seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    if config is not None:
        torch.manual_seed(seed)
        cfg = LlamaConfig(**{"num_labels": num_labels, **config})
        model = LlamaForSequenceClassification(cfg)
    else:
        try:
            model = LlamaForSequenceClassification.from_pretrained(name_or_path, num_labels=num_labels, dtype=dtype)
        except OSError as e:
            offline = os.environ.get("HF_HUB_OFFLINE") == "1"
            raise OSError(f"cannot load {name_or_path!r}{' (offline: download it first)' if offline else ''}: "
                          f"{e}") from None
    if model.config.pad_token_id is None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    return model.to(dtype).eval()


def wrap_lora(model: nn.Module, lora: dict | None = None) -> nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    return get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, **(lora or LORA_CONFIG)))


class MaskedClassifier(nn.Module):
    """``forward(input_ids, attention_mask) -> [B, C]`` float32 logits, absent classes at -inf."""

    def __init__(self, model: nn.Module, classes: list[int] | None = None, num_labels: int = 3):
        super().__init__()
        self.model = model
        mask = torch.ones(num_labels, dtype=torch.bool)
        if classes is not None:
            mask[:] = False
            mask[list(classes)] = True
        self.register_buffer("allowed", mask, persistent=False)

    def forward(self, input_ids, attention_mask):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        return logits.masked_fill(~self.allowed.to(logits.device), float("-inf"))


def lora_factors(peft_model: nn.Module, adapter: str = "default") -> dict[str, LoraFactors]:
    """``{module: LoraFactors(A, B, scale)}`` of a peft LoRA model, modules named as the base weights."""
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and adapter in getattr(module, "lora_A", {}):
            bare = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
            out[bare] = LoraFactors(module.lora_A[adapter].weight.detach().to("cpu", copy=True),
                                    module.lora_B[adapter].weight.detach().to("cpu", copy=True),
                                    float(module.scaling[adapter]))
    if not out:
        raise ValueError("the model has no LoRA modules")
    return out


def base_state(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base weights with the pretrained model's names (``…q_proj.weight``)."""
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    out = {}
    for k, v in base.state_dict().items():
        if "lora_" in k or "modules_to_save" in k:
            continue
        out[k.replace(".base_layer.", ".").replace(".original_module.", ".")] = v.detach().clone()
    return out
