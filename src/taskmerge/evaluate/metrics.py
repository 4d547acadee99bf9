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


@torch.inference_mode()
def macro_f1(model: torch.nn.Module, data: Split, batch_size: int = 64) -> float:
    """Macro-averaged F1 over the classes present in the labels or the predictions (sklearn's
    ``f1_score(average="macro")`` with ``zero_division=0``): mean over classes of 2·TP / (2·TP + FP + FN)."""
    model.eval()
    device = module_device(model)
    preds, gold = [], []
    for *inputs, labels in data.batches(batch_size):
        preds.append(model(*to_device(inputs, device)).argmax(-1).cpu())
        gold.append(torch.as_tensor(labels).cpu())
    if not preds:
        return 0.0
    p, y = torch.cat(preds), torch.cat(gold)
    scores = []
    for c in torch.unique(torch.cat([p, y])).tolist():
        tp = ((p == c) & (y == c)).sum().item()
        fp = ((p == c) & (y != c)).sum().item()
        fn = ((p != c) & (y == c)).sum().item()
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores)


METRICS = {"accuracy": accuracy, "macro_f1": macro_f1}


def score(model: torch.nn.Module, data: Split, batch_size: int = 64, metric: str = "accuracy") -> float:
    """The task's metric (``accuracy`` or ``macro_f1``); results CSVs keep it in the ``accuracy`` column."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return METRICS[metric](model, data, batch_size)
