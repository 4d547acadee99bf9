"""The fine-tuning loop: full, LoRA or IA3 (through peft) with a frozen head.

AdamW with linear warm-up and decay, seeded batch order, tqdm progress. The head stays frozen, so
every fine-tuned encoder speaks to the same classifier as the pretrained one (as CLIP's zero-shot
heads do in the vision papers) and only the encoder is merged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from taskmerge.devices import module_device, to_device
from taskmerge.evaluate.metrics import Split

MODES = ("full", "lora", "ia3")


@dataclass
class FinetuneConfig:
    mode: str = "full"
    epochs: float = 2.0
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    lora: dict = field(default_factory=lambda: {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                                                "target_modules": ["query", "key", "value", "dense"]})
    ia3: dict = field(default_factory=lambda: {"target_modules": ["key", "value", "output.dense"],
                                               "feedforward_modules": ["output.dense"]})


def wrap_encoder(encoder: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    """The encoder made trainable in ``cfg.mode``: itself (full) or a peft model (lora / ia3)."""
    if cfg.mode not in MODES:
        raise ValueError(f"unknown fine-tuning mode {cfg.mode!r}; choose one of {MODES}")
    if cfg.mode == "full":
        return encoder.requires_grad_(True)
    from peft import IA3Config, LoraConfig, get_peft_model

    peft_cfg = LoraConfig(**cfg.lora) if cfg.mode == "lora" else IA3Config(**cfg.ia3)
    return get_peft_model(encoder, peft_cfg)


def finetune(model: nn.Module, train: Split, cfg: FinetuneConfig, progress: bool = True) -> list[float]:
    """Train ``model``'s trainable parameters in place on ``train``; returns the per-step losses.

    ``model(*inputs) -> logits`` for each batch ``(*inputs, labels)`` of ``train.batches``.
    """
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: the encoder has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = max(1, round(cfg.epochs * steps_per_epoch))
    warmup = int(cfg.warmup_fraction * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(warmup, 1) if s < warmup else max(0.0, (total - s) / max(total - warmup, 1)))
    gen = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    model.train()
    device = module_device(model)  # batches go where the model is (the script's `device`)
    bar = tqdm(total=total, desc=f"finetune[{cfg.mode}]", disable=not progress, leave=False)
    while len(losses) < total:
        order = torch.randperm(len(train), generator=gen)
        for *inputs, labels in train.batches(cfg.batch_size, order):
            inputs, labels = to_device(inputs, device), labels.to(device)
            loss = nn.functional.cross_entropy(model(*inputs), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if len(losses) >= total:
                break
    bar.close()
    model.eval()
    return losses
