"""Model Stock: interpolate the average of the fine-tuned models back toward θ0, per tensor.

Jang, Yun, Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024; as
implemented by mergekit (``mergekit/merge_methods/model_stock.py``), which this module follows.
FusionBench (``fusion_bench/method/model_stock``) differs only in how it averages the angle.

For each floating tensor, with τ_t = θ_t − θ0 flattened (or per row, ``filter_wise``) and K = T ≥ 2:

    cos θ_ij = ⟨τ_i, τ_j⟩ / max(‖τ_i‖ ‖τ_j‖, 1e-6), clamped to [−1, 1]   (every pair i < j)
    cos θ    = mean_{i<j} cos θ_ij                       (``average="cosine"``, mergekit)
             = cos(mean_{i<j} arccos cos θ_ij)           (``average="angle"``, FusionBench)
    t        = K cos θ / ((K − 1) cos θ + 1)
    θ        = t · (1/K) Σ_t θ_t + (1 − t) · θ0 = θ0 + t · τ̄

The two averages differ by ~1e-4 in t on real checkpoints. t is not clipped: a tensor whose task
vectors point in conflicting directions (cos θ < 0) gets t < 0, i.e. is pushed *away* from the
average, as in both reference implementations. Where |(K − 1) cos θ + 1| < 1e-6 (cos θ ≈ −1/(K−1),
t would be unbounded) t = 0, as the released mergekit 0.1.5 does; the older mergekit code divides
anyway and FusionBench adds 1e-8 to the denominator. A tensor no task changed (τ = 0) has cos θ = 0,
t = 0: it stays θ0. Identical fine-tuned models have cos θ = 1, t = 1: the merge is that model.

Arithmetic in float32 on ``device``; values come back in the input dtype. No hyperparameter to
search. Integer buffers are copied from θ0.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch

from taskmerge.merging.inputs import BLOCK, float_keys, part_of, parts, shape_of, task_stack
from taskmerge.merging.outputs import Update
from taskmerge.merging.registry import StateDict, register


def stock_ratio(taus: Sequence[torch.Tensor] | torch.Tensor, average: str = "cosine",
                filter_wise: bool = False) -> torch.Tensor:
    """t of one tensor (shape [] or, ``filter_wise``, one per row broadcastable to τ).

    ``taus``: the task vectors, a sequence or stacked as [T, *shape]. Every pairwise inner product
    comes from one Gram matrix of the stacked rows (one matrix product instead of T² passes).
    """
    x = taus if isinstance(taus, torch.Tensor) else torch.stack(list(taus))
    t = ratio_from_gram(_gram(x, filter_wise), average)
    return t.unsqueeze(-1) if filter_wise and x.dim() > 2 else t


def _gram(x: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """The T×T Gram of stacked task vectors [T, *shape]: one for the tensor, or one per row ([*rows, T, T])
    when ``filter_wise`` (rows: the last dimension, as mergekit; a 0-/1-D tensor is one row)."""
    k = x.shape[0]
    if filter_wise and x.dim() > 2:
        rows = x.reshape(k, -1, x.shape[-1]).transpose(0, 1)  # [R, T, C]
        return (rows @ rows.transpose(1, 2)).reshape(*x.shape[1:-1], k, k)
    flat = x.reshape(k, -1)
    return flat @ flat.T


def ratio_from_gram(gram: torch.Tensor, average: str = "cosine") -> torch.Tensor:
    """t from the Gram matrix [..., T, T] of the task vectors (one t per leading index)."""
    if average not in ("cosine", "angle"):
        raise ValueError(f"model_stock: average={average!r}: choose cosine or angle")
    k = gram.shape[-1]
    norms = gram.diagonal(dim1=-2, dim2=-1).sqrt()
    i, j = torch.triu_indices(k, k, 1, device=gram.device)  # every pair i < j, in lexicographic order
    cosines = (gram[..., i, j] / (norms[..., i] * norms[..., j]).clamp(min=1e-6)).clamp(-1, 1)
    cos = cosines.mean(-1) if average == "cosine" else torch.cos(torch.arccos(cosines).mean(-1))
    denominator = (k - 1) * cos + 1
    singular = denominator.abs() < 1e-6  # mergekit 0.1.5: no finite estimate there, keep θ0 (t = 0)
    return torch.where(singular, 0.0, k * cos / torch.where(singular, 1.0, denominator))


def _stock_update(key: str, pretrained: StateDict, finetuned: Sequence[StateDict], average: str,
                  filter_wise: bool, device, buffer: list) -> torch.Tensor:
    """t · τ̄ of one tensor, in float32, read in row chunks of about ``inputs.BLOCK`` elements: each chunk's
    [T, …] task stack adds its Σ_t τ_t into the result's rows and its Gram to the tensor's (or its rows'),
    so no stack of the whole key is held (memory: the result and one chunk's stack). ``buffer`` holds the
    largest stack so far, whose storage the next stacks reuse (no allocation per chunk)."""
    out, grams = None, []
    for item in parts(pretrained, [key], BLOCK):
        stack = task_stack(item, pretrained, finetuned, device, buffer)
        if out is None:
            out = stack.new_empty(shape_of(pretrained, key))
        torch.sum(stack, 0, out=part_of(out, item))
        grams.append(_gram(stack, filter_wise))
    per_row = filter_wise and out.dim() > 1
    gram = torch.cat(grams) if per_row else torch.stack(grams).sum(0)
    t = ratio_from_gram(gram, average)
    return out.div_(len(finetuned)).mul_(t.unsqueeze(-1) if per_row else t)


@register("model_stock", key_local=True, memory="one key's result and one row chunk of every input (≈ inputs.BLOCK elements each, "
          "as one [T, …] stack); nothing across the model")
def model_stock(pretrained: StateDict, finetuned: Sequence[StateDict], *,
                average: Literal["cosine", "angle"] = "cosine",
                filter_wise: bool = False,
                device=None):
    """Model Stock per tensor: θ = θ0 + t · τ̄, t = K cos θ / ((K−1) cos θ + 1) (module docstring).

    Hyperparameters (none is searched; the method has no scaling):
        average (default ``cosine``): ``cosine`` averages the pairwise cosines (mergekit);
            ``angle`` averages the pairwise angles and takes their cosine (FusionBench; it also
            adds 1e-8 to two denominators, which we do not).
        filter_wise (default False, mergekit's option): one t per row (last dimension; 1-D tensors
            are one row) instead of one per tensor.

    Needs at least two fine-tuned models (the angle is between task vectors), as both references.
    Deviations: none from mergekit's math (θ0 + t·τ̄ is its t·w_avg + (1−t)·w0 rearranged, in float32).
    """
    if len(finetuned) < 2:
        raise ValueError(f"model_stock needs at least 2 fine-tuned models (got {len(finetuned)}): "
                         f"t comes from the angle between task vectors")
    buffer = []  # one chunk's [T, …] stack, reused from key to key
    for key in float_keys(pretrained):
        yield key, Update(_stock_update(key, pretrained, finetuned, average, filter_wise, device, buffer), 1.0,
                          owned=True)
