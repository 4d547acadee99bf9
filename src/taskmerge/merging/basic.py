"""Weight averaging and Task Arithmetic.

- ``average``: θ = (1/T) Σ_t θ_t (Wortsman et al., 2022, "Model soups"; the "Weight average"
  rows of the TIES/TALL/TSV tables).
- ``task_arithmetic``: θ = θ0 + λ Σ_t (θ_t − θ0) (Ilharco et al., ICLR 2023, "Editing models with
  task arithmetic"). Official grid λ ∈ {0.1, …, 1.0}; KnOTS/MaTS/TSV grids differ (specs §7.2).
"""
from __future__ import annotations

from typing import Sequence

from taskmerge.merging.inputs import task_vector_sum, walk
from taskmerge.merging.outputs import Update
from taskmerge.merging.registry import StateDict, register

SUMMED = "one key (row chunk) of one input at a time, plus two float32 buffers of it; nothing across the model"


@register("average", key_local=True, memory=SUMMED)
def average(pretrained: StateDict, finetuned: Sequence[StateDict], *, device=None, chunk_numel=None):
    """Weight averaging: θ = (1/T) Σ_t θ_t, element-wise over every floating tensor.

    Computed as θ0 + mean_t τ_t (task arithmetic with λ = 1/T). No hyperparameters.
    """
    for item in walk(pretrained, chunk_numel):
        yield item, Update(task_vector_sum(item, pretrained, finetuned, device).div_(len(finetuned)), 1.0, owned=True)


@register("task_arithmetic", key_local=True, linear_in="scaling", memory=SUMMED)
def task_arithmetic(pretrained: StateDict, finetuned: Sequence[StateDict], *, scaling: float = 0.3,
                    device=None, chunk_numel=None):
    """Task Arithmetic: θ = θ0 + λ Σ_t τ_t with τ_t = θ_t − θ0.

    Hyperparameters:
        scaling (λ, default 0.3): the paper's default for 8 ViT tasks; searched over {0.1, …, 1.0}.
            Negative λ is task negation (forgetting by subtracting τ, the paper's §3).
    """
    for item in walk(pretrained, chunk_numel):
        yield item, Update(task_vector_sum(item, pretrained, finetuned, device), scaling, owned=True)
