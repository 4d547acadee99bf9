"""Input Grams block by block through a model being merged: RegMean++'s ``layer_stats`` callback.

For a model made of an input stage (embeddings), a sequence of blocks and an output stage,
:class:`LayerwiseGrams` keeps every task's activations at the current block. Called by the method
with ``(block, merged)``:

- block 0: ``merged`` holds the merged tensors before the blocks; they are loaded into the merged
  model and each task's batches are embedded by it (``embed``);
- block ℓ > 0: ``merged`` holds block ℓ−1's merged tensors; they are loaded and every task's
  activations are forwarded through that merged block;

then each task's activations go through task t's *own* block ℓ with hooks on its ``nn.Linear``
modules, giving ``{"<prefix>.<ℓ>.<module>.gram_in": XᵀX / #rows}`` per task, accumulated batch by
batch in float32 as ``taskmerge.stats.collect`` does. Rows: every token position by default (the
official code on CLIP, which has no padding), or those of the ``mask`` the family gives for padded
text (the rows regmean's Grams count: ``collect.default_token_mask``). The activations may be any
object ``forward`` understands (e.g. a (hidden states, attention mask, token mask) triple for a
text encoder whose blocks take a mask). Calling with block 0 again starts over (it can serve two merges).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from taskmerge.stats.collect import _rows


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class LayerwiseGrams:
    """``layer_stats`` for ``merging.regmean_plusplus`` (module docstring).

    Args:
        merged: a model to hold the merged weights (e.g. the pretrained model; it is modified),
            whose ``state_dict`` names are the names being merged.
        models: the fine-tuned models, in the merge's order.
        batches: per task, the inputs ``embed`` takes (the official code uses 256 training examples).
        blocks: ``model -> its sequence of blocks`` (e.g. ``lambda m: m.vision_model.encoder.layers``).
        prefix: the state-dict prefix of the blocks (``"vision_model.encoder.layers"``).
        embed: ``(model, batch) -> input of block 0`` (embeddings and pre-norm of that model).
        forward: ``(block, x) -> output`` (default ``block(x)``, or its first element when a block returns
            a tuple: FusionBench's CLIP forward indexes ``[0]``, which breaks where transformers 5
            layers return a tensor; both are accepted here).
        mask: ``activations -> bool [B, T] token mask`` (1 = real token) or None (every row counts);
            applied to Linear inputs of shape ``[B, T, in]``, as ``collect_statistics`` does.
    """

    def __init__(self, merged: nn.Module, models: Sequence[nn.Module], batches: Sequence[Sequence[Any]], *,
                 blocks: Callable[[nn.Module], Sequence[nn.Module]], prefix: str,
                 embed: Callable[[nn.Module, Any], torch.Tensor],
                 forward: Callable[[nn.Module, Any], Any] | None = None,
                 mask: Callable[[Any], torch.Tensor | None] | None = None):
        if len(models) != len(batches):
            raise ValueError(f"LayerwiseGrams: {len(models)} models but {len(batches)} batch lists")
        self.merged, self.models, self.batches = merged, list(models), list(batches)
        self.blocks, self.prefix, self.embed = blocks, prefix, embed
        self.forward = forward or (lambda block, x: _first(block(x)))
        self.mask = mask or (lambda x: None)
        self.inputs: list[list[torch.Tensor]] | None = None
        self.at = -1

    def _load(self, merged: Mapping[str, torch.Tensor]) -> None:
        own = self.merged.state_dict()
        unknown = sorted(set(merged) - set(own))
        if unknown:
            raise ValueError(f"LayerwiseGrams: the merged model has no tensor {unknown[:3]}")
        self.merged.load_state_dict({k: v.to(own[k].dtype) for k, v in merged.items()}, strict=False)

    @torch.no_grad()
    def __call__(self, block: int, merged: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        if block != 0 and block != self.at + 1:
            raise ValueError(f"LayerwiseGrams: asked for block {block} after block {self.at}; blocks come in order")
        self._load(merged)
        if block == 0:
            self.inputs = [[self.embed(self.merged, b) for b in task] for task in self.batches]
        else:
            below = self.blocks(self.merged)[block - 1]
            self.inputs = [[self.forward(below, x) for x in task] for task in self.inputs]
        self.at = block
        return [self._grams(self.blocks(model)[block], block, xs) for model, xs in zip(self.models, self.inputs)]

    def _grams(self, layer: nn.Module, block: int, inputs: Sequence[Any]) -> dict[str, torch.Tensor]:
        sums: dict[str, torch.Tensor] = {}
        rows: dict[str, int] = {}
        current: list = [None]  # the token mask of the batch being forwarded

        def hook(name):
            def record(module, args, output):
                x = args[0]
                x = _rows(x, current[0] if x.dim() > 2 else None, name)
                sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x
                rows[name] = rows.get(name, 0) + x.shape[0]
            return record

        handles = []
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                key = ".".join(filter(None, (self.prefix, str(block), name))) + ".gram_in"
                handles.append(module.register_forward_hook(hook(key)))
        try:
            for x in inputs:
                current[0] = self.mask(x)
                self.forward(layer, x)
        finally:
            for h in handles:
                h.remove()
        return {k: (v / max(rows[k], 1)).cpu() for k, v in sums.items()}
