"""Seeded, in-RAM inputs for ``benchmarks/peers.py`` (identical for every peer, rebuilt in each worker).

- **Models**: an HF ``transformers.CLIPVisionModel`` built from a ``CLIPVisionConfig`` with random
  weights (``torch.manual_seed(seed)``; no download). Shapes: ``vit-b-32`` (width 768, 12 layers,
  patch 32, 88M parameters), ``vit-l-14`` (width 1024, 24 layers, patch 14, 303M), ``tiny`` (tests).
- **Fine-tuned models**: θ_t = θ0 + τ_t with a low-rank-plus-noise task vector per 2-D tensor,
  τ_t = a·U_t V_t + σ·N (U_t [O, 8], V_t [8, I] standard normal, a = 1e-3/√8, σ = 1e-4), and
  τ_t = σ·N for every other floating tensor; generator seeded with (seed, task). N is a slice, at a
  seeded offset, of one bank of 2²³ standard normals (drawing 700M fresh normals per worker took
  ≈ 50 s on the 2-core machine; the bank takes 0.15 s and changes no cost of any merge).
- **Statistics** (Fisher, RegMean): a diagonal Fisher per parameter, F = exp(N)·1e-3 (positive, N from
  the bank), and an SPD input Gram per ``nn.Linear``, G = XᵀX/256 + diag(u), X [256, in] ~ N(0,1),
  u ~ U(0.1, 1.1), one per (task, input width), the same tensor object for every layer of that
  width. Task t uses Fisher set ``t % stat_sets``: 8 (all distinct) for ViT-B/32, 2 for ViT-L/14 by
  default, so that 8 L/14 Fishers (9.7 GB) need not be resident. Shared tensors change no
  arithmetic, only how much input memory is resident (which the benchmark subtracts anyway).
- **LoRA** (KnOTS): r = 16, scale 1 (alpha = r) on q/k/v/out projections of every layer,
  A [16, in] ~ N(0, 1/in), B [out, 16] ~ N(0, 0.01²).
"""
from __future__ import annotations

import copy
import math

import torch

SHAPES = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 image_size=32, patch_size=16),
    "vit-b-32": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     image_size=224, patch_size=32),
    "vit-l-14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     image_size=224, patch_size=14),
}
DEFAULT_STAT_SETS = {"tiny": 8, "vit-b-32": 8, "vit-l-14": 2}
RANK, LORA_RANK, LORA_TARGETS = 8, 16, ("q_proj", "k_proj", "v_proj", "out_proj")


def clip_vision(shape: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised ``CLIPVisionModel`` of the named shape (float32, eval mode)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    torch.manual_seed(seed)
    model = CLIPVisionModel(CLIPVisionConfig(**SHAPES[shape]))
    return model.eval().requires_grad_(False)


BANK = 1 << 23


def _gen(seed: int, task: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(1_000_003 * seed + 7919 * task + salt)


_BANKS: dict[int, torch.Tensor] = {}


def _normal(shape, g: torch.Generator) -> torch.Tensor:
    """A view of the seed's normal bank at an offset drawn from ``g`` (shape of ≤ 2²³ elements)."""
    if not _BANKS:
        _BANKS[0] = torch.randn(BANK, generator=torch.Generator().manual_seed(12345))
    bank = _BANKS[0]
    n = math.prod(shape)
    if n > BANK:
        return torch.randn(shape, generator=g)
    start = int(torch.randint(0, BANK - n + 1, (1,), generator=g))
    return bank[start:start + n].view(shape)


@torch.no_grad()
def add_task_vector(model: torch.nn.Module, seed: int, task: int) -> None:
    """θ ← θ + τ_task in place (low rank plus noise on 2-D tensors, noise elsewhere)."""
    g = _gen(seed, task, 1)
    a = 1e-3 / math.sqrt(RANK)
    for _, p in sorted(model.state_dict().items()):
        if not p.is_floating_point():
            continue
        if p.ndim == 2:
            u = torch.randn(p.shape[0], RANK, generator=g)
            v = torch.randn(RANK, p.shape[1], generator=g)
            p.addmm_(u, v, alpha=a)
        p.add_(_normal(p.shape, g), alpha=1e-4)


def build_model(shape: str, seed: int, task: int | None) -> torch.nn.Module:
    """The pretrained model (``task=None``) or fine-tuned model ``task`` alone, as :func:`build_models` makes it."""
    model = clip_vision(shape, seed)
    if task is not None:
        add_task_vector(model, seed, task)
    return model


def build_models(shape: str, tasks: int, seed: int = 0) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """(pretrained, [fine-tuned …]) as modules; their ``state_dict()`` tensors are what taskmerge gets."""
    pre = clip_vision(shape, seed)
    fts = []
    for t in range(tasks):
        ft = copy.deepcopy(pre)
        add_task_vector(ft, seed, t)
        fts.append(ft)
    return pre, fts


def linear_modules(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


@torch.no_grad()
def fishers(model: torch.nn.Module, tasks: int, seed: int, sets: int) -> list[dict[str, torch.Tensor]]:
    """One ``{param name: diagonal Fisher}`` per task (task t gets set t % sets)."""
    pool = []
    for s in range(min(sets, tasks)):
        g = _gen(seed, s, 2)
        pool.append({k: _normal(v.shape, g).exp().mul_(1e-3)
                     for k, v in model.state_dict().items() if v.is_floating_point()})
    return [pool[t % len(pool)] for t in range(tasks)]


@torch.no_grad()
def grams(model: torch.nn.Module, tasks: int, seed: int, tokens: int = 256) -> list[dict[str, torch.Tensor]]:
    """One ``{linear module name: SPD input Gram [in, in]}`` per task (one Gram per task and input width)."""
    pool = []
    for s in range(tasks):
        g = _gen(seed, s, 3)
        by_width = {}
        for name in linear_modules(model):
            d = model.get_submodule(name).in_features
            if d not in by_width:
                x = torch.randn(tokens, d, generator=g)
                by_width[d] = x.T @ x / tokens
                by_width[d].diagonal().add_(torch.rand(d, generator=g) + 0.1)
        pool.append({name: by_width[model.get_submodule(name).in_features] for name in linear_modules(model)})
    return [pool[t % len(pool)] for t in range(tasks)]


@torch.no_grad()
def lora_factors(model: torch.nn.Module, tasks: int, seed: int) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """One ``{module name: (A [r, in], B [out, r])}`` per task, on q/k/v/out of every layer (scale 1)."""
    out = []
    for t in range(tasks):
        g = _gen(seed, t, 4)
        per = {}
        for name in linear_modules(model):
            if name.rsplit(".", 1)[-1] not in LORA_TARGETS:
                continue
            lin = model.get_submodule(name)
            a = torch.randn(LORA_RANK, lin.in_features, generator=g) / math.sqrt(lin.in_features)
            b = torch.randn(lin.out_features, LORA_RANK, generator=g) * 0.01
            per[name] = (a, b)
        out.append(per)
    return out


def fingerprint(tensors) -> float:
    """A cheap checksum of the inputs (sum of every tensor's first row), to show two workers got the same."""
    return float(sum(t.reshape(t.shape[0], -1)[0].double().sum() if t.ndim else t.double() for t in tensors))
