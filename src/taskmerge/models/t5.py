"""T5 family adapter (MaTS setting): build, fine-tuning modes, rank classification, tied embeddings, statistics.

- Model: ``T5ForConditionalGeneration``; default checkpoint ``google/t5-large-lm-adapt`` (MaTS'
  T5-Large LM-adapted), any name/path or a ``T5Config`` dict (tests: tiny random weights).
- Modes: ``full`` (every parameter) or ``ia3`` through peft on the attention ``k``, ``v`` and the
  feed-forward output ``wo`` (a feed-forward module: its vector scales ``wo``'s input), as MaTS.
- Training objective: token cross-entropy of the target (``T5TargetLM``: ``model(ids, mask, target)``
  returns ``[B, V, L]`` logits, so the spine's ``finetune`` (cross-entropy with ignore_index -100)
  is the mean target-token NLL).
- Evaluation: rank classification (``T5RankClassifier``): each answer choice is scored by its
  length-normalised log-likelihood (1/|y_c|) Σ_i log p(y_c,i | y_c,<i, x); the prediction is the argmax.
- Tied embeddings: ``shared.weight`` and ``{encoder,decoder}.embed_tokens.weight`` (and ``lm_head``
  when ``tie_word_embeddings``) are one tensor. ``tied_aliases`` finds them from storage sharing;
  ``drop_aliases`` gives the state the merging methods see (each tensor once: TIES' global top-k
  and the norms of OPCM would otherwise count it three times, specs §6(b)); ``retie`` restores the
  aliases from the merged canonical tensor.
- Statistics: ``statistics`` wires ``taskmerge.stats`` with MaTS's masks (encoder tokens for
  encoder modules and cross-attention k/v, target tokens elsewhere) and IA3 Fisher blocks.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import nn

DEFAULT_CHECKPOINT = "google/t5-large-lm-adapt"
IA3_CONFIG = {"target_modules": ["k", "v", "wo"], "feedforward_modules": ["wo"]}
PEFT_PREFIX = "base_model.model."


def load_t5(name_or_path: str | None = DEFAULT_CHECKPOINT, config: dict | None = None, seed: int = 0,
            dtype: torch.dtype = torch.float32) -> nn.Module:
    """The pretrained T5 (``name_or_path``), or a random one from a ``T5Config`` dict (tests)."""
    from transformers import T5Config, T5ForConditionalGeneration

    if config is not None:
        torch.manual_seed(seed)
        return T5ForConditionalGeneration(T5Config(**config)).to(dtype).eval()
    try:
        return T5ForConditionalGeneration.from_pretrained(name_or_path, dtype=dtype).eval()
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise OSError(f"cannot load T5 checkpoint {name_or_path!r}"
                      f"{' (HF_HUB_OFFLINE=1: download it first)' if offline else ''}: {e}") from None


def wrap(model: nn.Module, mode: str, ia3: dict | None = None) -> nn.Module:
    """``full``: every parameter trainable; ``ia3``: a peft IA3 model on k, v and wo (MaTS)."""
    if mode == "full":
        return model.requires_grad_(True)
    if mode == "ia3":
        from peft import IA3Config, TaskType, get_peft_model

        return get_peft_model(model, IA3Config(task_type=TaskType.SEQ_2_SEQ_LM, **(ia3 or IA3_CONFIG)))
    raise ValueError(f"T5 mode {mode!r}: choose full or ia3")


class T5TargetLM(nn.Module):
    """``forward(input_ids, attention_mask, target_ids) -> [B, V, L]`` logits for the spine's ``finetune``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, target_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=target_ids)
        return out.logits.transpose(1, 2)


def choice_log_likelihoods(model: nn.Module, input_ids, attention_mask, choice_ids) -> torch.Tensor:
    """Length-normalised log-likelihood of each choice: ``choice_ids`` [B, C, L] (-100 = padding) → [B, C]."""
    B, C, L = choice_ids.shape
    encoder = model.get_encoder()
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    hidden = hidden.repeat_interleave(C, dim=0)
    mask = attention_mask.repeat_interleave(C, dim=0)
    labels = choice_ids.reshape(B * C, L)
    logits = model(encoder_outputs=(hidden,), attention_mask=mask, labels=labels).logits.float()
    valid = labels != -100
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    scores = (logp * valid).sum(-1) / valid.sum(-1).clamp_min(1)
    empty = ~valid.any(-1)  # padded (missing) choices never win
    return scores.masked_fill(empty, float("-inf")).reshape(B, C)


class T5RankClassifier(nn.Module):
    """``forward(input_ids, attention_mask, choice_ids) -> [B, C]`` scores (rank classification)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, choice_ids):
        return choice_log_likelihoods(self.model, input_ids, attention_mask, choice_ids)


# ---------------------------------------------------------------- tied embeddings

def tied_aliases(model_or_state) -> dict[str, str]:
    """``{alias: canonical}`` for tensors sharing storage (first name in state-dict order is canonical)."""
    state = model_or_state.state_dict(keep_vars=True) if isinstance(model_or_state, nn.Module) else model_or_state
    seen, aliases = {}, {}
    for key, t in state.items():
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if ident in seen:
            aliases[key] = seen[ident]
        else:
            seen[ident] = key
    return aliases


def drop_aliases(state: Mapping[str, torch.Tensor], aliases: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The state each merging method sees: every tied tensor once, under its canonical name."""
    for alias, canonical in aliases.items():
        if alias in state and canonical in state and not torch.equal(state[alias], state[canonical]):
            raise ValueError(f"{alias} should be tied to {canonical} but differs from it")
    return {k: v for k, v in state.items() if k not in aliases}


def retie(merged: Mapping[str, torch.Tensor], aliases: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Merged state with every alias pointing at its merged canonical tensor (loadable by the model)."""
    out = dict(merged)
    for alias, canonical in aliases.items():
        if canonical not in merged:
            raise ValueError(f"cannot re-tie {alias}: the merged state has no {canonical}")
        out[alias] = merged[canonical]
    return out


# ---------------------------------------------------------------- IA3 vectors and statistics

def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable tensors, named without peft's prefix (IA3: ``…SelfAttention.k.ia3_l.default``)."""
    return {_strip(n): p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def ia3_pretrained(ia3_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """IA3's "pretrained" point: every vector all ones (specs §6(b))."""
    return {k: torch.ones_like(v) for k, v in ia3_state.items()}


def load_trainable(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` (names as ``trainable_state``) into ``model``'s parameters, checking every name."""
    params = {_strip(n): p for n, p in model.named_parameters()}
    missing = sorted(set(state) - set(params))
    if missing:
        raise ValueError(f"state has tensors the model lacks: {missing[:5]}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def _strip(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def statistics(model: nn.Module, batches, *, fisher: str | None = "empirical", grams: bool | None = None,
               max_examples: int = 1000, seed: int = 0, progress: bool = False):
    """MaTS statistics of a (peft-wrapped or full) T5 on batches ``{input_ids, attention_mask, labels}``.

    Full fine-tuning: diagonal Fisher + input/output Grams of every Linear (``lm_head`` has no
    output Gram). IA3: diagonal Fisher + blockwise Fisher of every IA3 vector. Masks: MaTS's
    (``stats.seq2seq_token_mask``). Names follow ``trainable_state``.
    """
    from taskmerge.stats import Seq2SeqObjective, collect_statistics, seq2seq_token_mask

    is_ia3 = any("ia3_l" in n for n, _ in model.named_parameters())
    return collect_statistics(
        model, batches, Seq2SeqObjective(), fisher=fisher, grams=(not is_ia3) if grams is None else grams,
        blockwise=is_ia3, max_examples=max_examples, seed=seed, token_mask_fn=seq2seq_token_mask,
        name_map=PEFT_PREFIX, per_example="loop", progress=progress)
