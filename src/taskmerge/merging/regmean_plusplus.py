"""RegMean++ (Nguyen et al., 2025, "RegMean++: Enhancing Effectiveness and Generalization of
Regression Mean for Model Merging"); official code github.com/nthehai01/RegMean-plusplus
(``fusion_bench/method/regmean_plusplus/``, a FusionBench fork).

RegMean's closed form per Linear weight (``merging.regmean``),

    Wᵀ = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_tᵀ,   G̃_t = λ·G_t + (1−λ)·diag(G_t),

but the input Grams of block ℓ are not those of the fine-tuned model t on its own data: they are
X_tᵀX_t / #tokens for X_t the inputs that task t's data reach *after the already merged blocks
below ℓ* (and the merged embeddings), taken inside task t's own block ℓ. Block by block:

    ℓ = 0: the tensors before the first block (embeddings, pre-norm) are averaged;
    for ℓ = 0 … L−1: grams_t = layer_stats(ℓ, merged tensors so far); solve block ℓ; hand it on;
    the tensors after the last block: θ0 (official: ``post_layernorm`` is never merged) or averaged.

Inside a block every non-Linear tensor (biases, norms) is averaged, as RegMean.

``layer_stats`` is the statistics pipeline's callback, a context argument:
``layer_stats(block, merged) -> [per task {"<module>.gram_in": [in, in]}]`` for the Linear weights
of ``block``, where ``merged`` holds the tensors merged since the previous call (before block 0: the
tensors before the blocks; then block ℓ−1's). ``taskmerge.stats.layerwise.LayerwiseGrams`` is one for
models made of a sequence of blocks; a call with block 0 starts over. Blocks are read from the
``depths`` context, or from the first ``.<i>.`` of each name as in LiNeS; one tower only. The runner
gives it where the family says where its blocks are and how to embed and forward them
(``Adapter.layer_stats``): the text setting (``models.text_encoder.layerwise_grams``: BERT blocks
``encoder.layer``, forwarded with the attention mask, Gram rows on real tokens only, on the same
examples and batches as regmean's Grams); the vision setting computes no statistics and skips it.

Fidelity notes (FusionBench's ``regmean_plusplus``, the official code, run on tiny CLIP models):

- ``post_layernorm`` (and any tensor after the last block) is never merged there: it stays at θ0.
  That is ``after_blocks="pretrained"`` (the default); ``"average"`` is RegMean's rule.
- Its block forward is ``layer(x, attention_mask=None, causal_attention_mask=None)[0]``: it relies on
  the tuple output of transformers 4's ``CLIPEncoderLayer``; transformers 5 layers return a tensor,
  where ``[0]`` indexes the first example instead. Here the family's forward takes either.
- The embeddings (and ``pre_layrnorm``) are averaged and block 0's inputs come from the merged ones,
  so a one-block model equals RegMean only when the models agree below the block.
- Its CLIP Grams count every token (no padding on images); text Grams here count real tokens only,
  as this package's RegMean statistics do.
"""
from __future__ import annotations

from typing import Annotated, Literal, Sequence

from taskmerge.merging.inputs import float_keys, shape_of, tensors
from taskmerge.merging.lines import block_of
from taskmerge.merging.registry import Range, StateDict, register
from taskmerge.merging.regmean import regmean_tensor
from taskmerge.stats.keys import gather, gram_in_key


def _layout(keys: Sequence[str], depths) -> tuple[list[str], list[list[str]], list[str]]:
    """(tensors before the first block, the tensors of each block 0 … L−1, tensors after), model order within each."""
    blocks = {k: (depths.get(k) if depths is not None else block_of(k)) for k in keys}
    first = next((i for i, k in enumerate(keys) if blocks[k] is not None), len(keys))
    depth = 1 + max((b for b in blocks.values() if b is not None), default=-1)
    per_block = [[k for k in keys if blocks[k] == b] for b in range(depth)]
    outside = [(i, k) for i, k in enumerate(keys) if blocks[k] is None]
    return [k for i, k in outside if i < first], per_block, [k for i, k in outside if i > first]


@register("regmean_plusplus",
          memory="one block's merged tensors (handed to the statistics callback) and one Linear system at a time; "
                 "the callback holds every task's activations at the current block")
def regmean_plusplus(pretrained: StateDict, finetuned: Sequence[StateDict], *,
                     off_diagonal_scale: Annotated[float, Range(0.0, 1.0)] = 0.95,
                     after_blocks: Literal["pretrained", "average"] = "pretrained",
                     layer_stats=None, depths=None, device=None):
    """RegMean++: RegMean block by block on inputs forwarded through the merged blocks (module docstring).

    Hyperparameters:
        off_diagonal_scale (λ, 0.95): the official CLIP config's ``reduce_non_diagonal_ratio``
            (the GPT-2 config too); MaTS-style grid {0, 0.1, …, 1}.
        after_blocks ("pretrained"): the tensors after the last block (final norm, projection)
            stay at θ0, as the official code (which never merges ``post_layernorm``), or are
            averaged (``average``, RegMean's rule).

    Deviations: solves with a Cholesky factorisation (``regmean.solve_spd``) instead of
    ``torch.inverse``; unused input features get the average weights (official: zeros).
    """
    if layer_stats is None:
        raise ValueError("method 'regmean_plusplus' needs the layer_stats callback (Grams forwarded through the "
                         "merged blocks, e.g. taskmerge.stats.layerwise.LayerwiseGrams)")
    before, blocks, after = _layout(float_keys(pretrained), depths)
    if not any(blocks):
        raise ValueError("method 'regmean_plusplus': no tensor name holds a block index '.<i>.' (pass depths)")
    merged = {}
    for key in before:
        merged[key] = regmean_tensor(key, tensors(key, finetuned, device), None, off_diagonal_scale)
        yield key, merged[key]
    for block, keys in enumerate(blocks):
        grams = list(layer_stats(block, merged))
        if len(grams) != len(finetuned):
            raise ValueError(f"regmean_plusplus: layer_stats gave {len(grams)} Gram sets for {len(finetuned)} models")
        merged = {}
        for key in keys:
            linear = key.endswith(".weight") and len(shape_of(pretrained, key)) == 2
            found = gather(grams, gram_in_key(key), "regmean_plusplus") if linear else None
            merged[key] = regmean_tensor(key, tensors(key, finetuned, device), found, off_diagonal_scale)
            yield key, merged[key]
    for key in after:
        if after_blocks == "average":
            yield key, regmean_tensor(key, tensors(key, finetuned, device), None, off_diagonal_scale)
