"""Fisher merging (Matena & Raffel, NeurIPS 2022, "Merging models with Fisher-weighted averaging").

θ = Σ_t F_t ⊙ θ_t / Σ_t F_t, element-wise, with the diagonal Fisher F_t of each fine-tuned
model (``<param>.fisher`` in its statistics, see ``taskmerge.stats``).
"""
from __future__ import annotations

import logging
from typing import Annotated, Sequence

import torch

from taskmerge.merging.inputs import BLOCK, blocks, float_keys, key_of, part_of, shapes, tensors, walk
from taskmerge.merging.registry import Range, StateDict, register
from taskmerge.stats.keys import check_stats_list, fisher_key, gather

log = logging.getLogger(__name__)


@register("fisher", memory="one key (row chunks of large tensors) of every input and its Fishers")
def fisher(pretrained: StateDict, finetuned: Sequence[StateDict], *,
           floor: Annotated[float, Range(0.0, None)] = 1e-8,
           pair_lambda: Annotated[float, Range(0.0, 1.0)] = 0.5,
           stats=None, device=None, chunk_numel=None):
    """Diagonal Fisher merging: θ = Σ_t F_t θ_t / Σ_t F_t per element (MaTS ``diagonal_fisherMerging.py``).

    Merges the fine-tuned weights themselves (not task vectors). Each Fisher is first floored,
    F_t ← max(F_t, floor), as the official ``set_minimum``, so elements no task cares about
    (all F = 0) get the plain average instead of 0/0. Floating tensors without a Fisher in the
    statistics are averaged uniformly. Needs ``stats``: one dict per fine-tuned model with
    ``<param>.fisher`` entries.

    Hyperparameters:
        floor (default 1e-8): the official minimum Fisher value.
        pair_lambda (default 0.5): the official ``--model_lambda`` quirk: with **exactly two**
            models the Fishers are weighted λ and 1−λ, θ = (λF_1θ_1 + (1−λ)F_2θ_2)/(λF_1 + (1−λ)F_2);
            with any other number of models the official code ignores λ, and so do we.
            0.5 is the unweighted merge. Official grid (2 models): {0, 0.1, …, 1}.
    """
    stats = check_stats_list(stats, len(finetuned), "fisher", shapes(pretrained))
    T = len(finetuned)
    weights = [pair_lambda, 1.0 - pair_lambda] if T == 2 else [1.0] * T
    with_fisher = {k for k in float_keys(pretrained) if any(fisher_key(k) in s for s in stats)}
    if not with_fisher:
        raise ValueError("method 'fisher': the statistics contain no '<param>.fisher' entry for any tensor "
                         "(collect them with fisher='empirical' or 'true')")
    log.info("fisher: %d tensors Fisher-weighted, the others averaged", len(with_fisher))
    for item in walk(pretrained, chunk_numel):
        thetas = tensors(item, finetuned, device)
        fishers = gather(stats, fisher_key(key_of(item)), "fisher")
        if fishers is None:
            yield item, torch.stack(thetas).mean(0)
            continue
        fishers = [part_of(f, item) for f in fishers]
        yield item, fisher_average(thetas, fishers, weights, floor)


def fisher_average(thetas: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor], weights: Sequence[float],
                   floor: float) -> torch.Tensor:
    """Σ_t w_t F̃_t θ_t / Σ_t w_t F̃_t element-wise, F̃_t = max(F_t, floor), in float32 (a new tensor).

    Block by block: only the result is the size of the tensor (the same operations per element, in the
    same order, as on whole tensors)."""
    flat = [th.reshape(-1) for th in thetas]
    flat_f = [f.reshape(-1) for f in fishers]
    num = torch.empty_like(flat[0])
    den = num.new_empty(min(num.numel(), BLOCK))  # the denominator and the floored Fisher: one block each
    weighted = torch.empty_like(den)
    for s, e in blocks(num.numel()):
        n, d = num[s:e].zero_(), den[:e - s].zero_()
        for w, f, th in zip(weights, flat_f, flat):
            wf = torch.clamp_min(f[s:e].to(device=n.device, dtype=torch.float32), floor, out=weighted[:e - s])
            if w != 1.0:
                wf.mul_(w)
            n.addcmul_(wf, th[s:e])
            d += wf
        n.div_(d)
    return num.view(thetas[0].shape)
