"""LiNeS: post-training layer scaling (Wang, Dimitriadis et al., ICLR 2025, "LiNeS: Post-training
Layer Scaling Prevents Forgetting and Enhances Model Merging"); official code github.com/wang-kee/LiNeS
(``src/eval/eval.py: LiNeS_scaling``, ``src/eval/aggregation.py``).

LiNeS composes with a model-merging method (the *base*: task_arithmetic, ties, consensus, …). The
base's merged update u = θ_base − θ0 (at the base's own scale 1 unless ``base_params`` sets it) is
rescaled by the depth ℓ of the residual block that holds each tensor:

    θ[k] = θ0[k] + (α + β · ℓ(k) / (L − 1)) · u[k]      for a tensor k in block ℓ(k) ∈ {0, …, L−1}
    θ[k] = θ0[k] + α · u[k]                              outside the blocks (embeddings, final norms, heads)

Multi-task rule for α (official ``alpha = norm_summed_tvs / norm_mtv / num_tasks``):

    α = ‖Σ_t τ_t‖₁ / (T · ‖u‖₁)

so the shallow layers keep the ℓ1 mass of the *average* task vector (α = 1/T for task arithmetic),
and β, the one searched hyperparameter, adds up to β more at the last block.

Block depth: the ``depths`` context (``{tensor name: block index}``), which the runner derives from
the model's block lists (``selection.module_depths``: an ``nn.Sequential`` index is not a depth);
otherwise the first ``.<i>.`` in the tensor name (``visual.transformer.resblocks.3.attn…``,
``model.layers.3.mlp…``). L is inferred as 1 + the largest index (official: hard-coded 12 for
ViT-B, 24 for ViT-L; ``num_blocks`` restores a fixed L, and indices ≥ L then get α, as there).
"""
from __future__ import annotations

import math
import re
from typing import Annotated, Mapping, Sequence

import torch

from taskmerge.merging.composition import inner_stream, update_of
from taskmerge.merging.inputs import Part, float_keys, read, task_stream
from taskmerge.merging.outputs import Update
from taskmerge.merging.primitives import memo
from taskmerge.merging.registry import Range, StateDict, register

BLOCK = re.compile(r"\.(\d+)\.")
PREFIX = "lines/"  # LiNeS' keys in the scratch mapping it shares with its base


def block_of(name: str) -> int | None:
    """The residual block of a tensor from its name: the first ``.<i>.`` (None outside the blocks)."""
    match = BLOCK.search(name)
    return int(match.group(1)) if match else None


def layer_scales(keys: Sequence[str], alpha: float, beta: float, num_blocks: int = 0,
                 depths: Mapping[str, int] | None = None) -> dict[str, float]:
    """α + β·ℓ/(L−1) per tensor of block ℓ < L, α elsewhere (L = ``num_blocks`` or 1 + the largest ℓ; L = 1: α)."""
    blocks = {k: (depths.get(k) if depths is not None else block_of(k)) for k in keys}
    depth = num_blocks or 1 + max((b for b in blocks.values() if b is not None), default=-1)
    return {k: alpha + beta * (b / (depth - 1) if depth > 1 else 0.0) if b is not None and b < depth else alpha
            for k, b in blocks.items()}


def _alpha(alpha: str) -> float | None:
    if alpha.strip().lower() == "auto":
        return None
    try:
        value = float(alpha)
    except ValueError:
        raise ValueError(f"lines: alpha={alpha!r}: write 'auto' (the paper's multi-task rule) or a number") from None
    if not math.isfinite(value):
        raise ValueError(f"lines: alpha={alpha!r} must be finite")
    return value


def _base_updates(stream, pretrained, store) -> float:
    """Write the base's float32 update u of every key into ``store``; return ‖u‖₁."""
    norm = 0.0
    for item, value in stream:
        if isinstance(item, Part):
            raise ValueError("lines: the base yielded a row chunk; LiNeS needs whole tensors")
        u = update_of(value, read(pretrained, item))
        store[PREFIX + item] = u
        norm += float(u.abs().sum(dtype=torch.float64))
    return norm


def _summed_norm(pretrained, finetuned, device) -> float:
    return sum(float(torch.stack(taus).sum(0).abs().sum(dtype=torch.float64))
               for _, taus in task_stream(pretrained, finetuned, device)())


@register("lines", memory="the base's float32 update u of every tensor (4 bytes per parameter, in `scratch`: memory, "
                          "or disk when streaming; kept across a search) plus what the base carries")
def lines(pretrained: StateDict, finetuned: Sequence[StateDict], *,
          base: str = "task_arithmetic", base_params: str = "",
          beta: float = 0.5, alpha: str = "auto",
          num_blocks: Annotated[int, Range(0, None)] = 0,
          kinds=None, depths=None, device=None, cache=None, scratch=None):
    """LiNeS on a base merge: θ = θ0 + (α + β·ℓ/(L−1))·u per tensor (module docstring).

    Hyperparameters:
        base ("task_arithmetic"): any registered method that returns one merged model and needs
            no statistics or LoRA factors (task_arithmetic, ties, consensus, dare, tsv_m, …).
        base_params (""): the base's hyperparameters, ``"k=20,merge=mean"``, checked by the base's
            signature. Its global scale (``linear_in``: TIES' and TA's ``scaling``) is 1 unless
            set here: LiNeS' α and β replace it, as in the official code (which applies LiNeS to
            the unscaled merged task vector). With the ``auto`` α the result does not depend on it.
        beta (β, 0.5): the scaling added at the deepest block. Official grids: task arithmetic and
            consensus {0.1, 0.2, …, 1.0}; TIES {0.1, 0.2, …, 1.5}. β = 0 with α = 1 is the base.
        alpha ("auto"): ``auto``, the paper's multi-task rule α = ‖Σ_t τ_t‖₁ / (T·‖u‖₁), or a number
            (the single-task editing setting uses α = λ, β = 1 − λ).
        num_blocks (L, 0): 0 infers L from the block indices; > 0 fixes it (official: 12 or 24).

    Deviations: the block is the first ``.<i>.`` in the name (official: the smallest i < L with
    ``.<i>.`` anywhere in the name; they differ only for names holding two indices). The ℓ1 norms
    are accumulated in float64. Bases that need statistics or LoRA factors are refused: LiNeS does
    not pass those on.
    """
    fixed_alpha = _alpha(alpha)
    stream = lambda: inner_stream(base, base_params, pretrained, finetuned, owner="lines",  # noqa: E731
                                  context={"kinds": kinds, "device": device, "cache": cache, "scratch": scratch})

    def updates():
        store = scratch if scratch is not None else {}
        return store, _base_updates(stream(), pretrained, store)
    store, norm_u = memo(cache, ("lines_base", base, base_params), updates)
    if fixed_alpha is None:
        summed = memo(cache, ("lines_summed_norm",), lambda: _summed_norm(pretrained, finetuned, device))
        fixed_alpha = summed / (len(finetuned) * norm_u) if norm_u > 0 else 1.0 / len(finetuned)
    keys = [k for k in float_keys(pretrained) if PREFIX + k in store]
    for key, scale in layer_scales(keys, fixed_alpha, beta, num_blocks, depths).items():
        yield key, Update(store[PREFIX + key], scale)
