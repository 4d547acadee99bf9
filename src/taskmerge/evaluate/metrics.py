"""Accuracy of a classifier on a split, and normalized accuracy (merged ÷ fine-tuned).

A *split* is any object with ``len()`` and ``batches(batch_size, order=None)`` yielding
``(*inputs, labels)``; the classifier is called as ``model(*inputs) -> logits``. Text splits
(``models.text_encoder.Encoded``) and image splits follow this protocol.
"""
from __future__ import annotations

from typing import Iterator, Protocol

import torch

from taskmerge.devices import module_device, to_device


class Split(Protocol):
    def __len__(self) -> int: ...

    def batches(self, batch_size: int, order: torch.Tensor | None = None) -> Iterator[tuple]: ...


@torch.inference_mode()
def accuracy(model: torch.nn.Module, data: Split, batch_size: int = 64) -> float:
    """Top-1 accuracy of ``model(*inputs)`` over the split."""
    model.eval()
    device = module_device(model)  # inputs go where the model is
    correct = 0
    for *inputs, labels in data.batches(batch_size):
        correct += (model(*to_device(inputs, device)).argmax(-1).cpu() == labels.cpu()).sum().item()
    return correct / max(len(data), 1)


def normalized(acc: float, finetuned_acc: float) -> float:
    """Normalized accuracy as in TALL/TSV: merged accuracy divided by the fine-tuned model's."""
    return acc / finetuned_acc if finetuned_acc > 0 else float("nan")
