"""Collect Fisher and Gram statistics of any ``nn.Module`` (MaTS §2.1 of the specs).

Two passes per batch, both in eval mode:

1. **Gram pass** (batched forward, one backward of Σ_n log p_n): forward hooks on every
   ``nn.Linear`` accumulate G_in += XᵀX over unmasked rows; a tensor hook on the Linear's
   output accumulates G_out += GyᵀGy with Gy = ∂(log p)/∂y, the gradient of −loss as in MaTS
   (a tensor hook sees exactly the ``grad_output`` a full backward hook would, and also works
   when the Linear's input needs no gradient). Because examples are independent, each
   output row's gradient in the batched backward equals the batch-of-one gradient, so
   batching changes nothing. Both Grams are divided by the number of rows (tokens) that
   module saw, float32.
2. **Fisher pass**: per-example gradients g_n of log p(y_n|x_n) for every trainable parameter,
   vectorised with ``torch.func.vmap(grad(...))`` over a ``functional_call``; or a
   batch-of-one loop (``per_example="loop"``, or ``"auto"`` after vmap fails on a model).
   Diagonal Fisher F = (1/N) Σ g_n², blockwise F = (1/N) Σ g_n g_nᵀ for selected parameters
   (IA3 vectors).

Labels: gold (``fisher="empirical"``, or no Fisher) or sampled from the model once per
batch with a seeded ``torch.Generator`` (``fisher="true"``); the same labels feed both passes.
"""
from __future__ import annotations

import logging
import re
import time
from typing import Any, Callable, Iterable, Literal, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from taskmerge.devices import module_device, to_device
from taskmerge.stats.keys import fisher_block_key, fisher_key, gram_in_key, gram_out_key
from taskmerge.stats.objectives import Batch, Objective

log = logging.getLogger(__name__)

TokenMaskFn = Callable[[str, Batch, torch.Tensor], "torch.Tensor | None"]


def default_token_mask(module_name: str, batch: Batch, labels: torch.Tensor) -> torch.Tensor | None:
    """``batch["attention_mask"]`` (1 = real token); None (every row counts) when absent.

    Applied only where a Linear's input has the mask's leading shape ``[B, T]``: inputs of
    shape ``[B, in]`` (a head over pooled features) count one row per example.
    """
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return None if mask is None else mask.bool()


def _name_mapper(name_map: Callable[[str], str | None] | str | None) -> Callable[[str], str | None]:
    if name_map is None:
        return lambda n: n
    if isinstance(name_map, str):
        prefix = name_map
        return lambda n: n[len(prefix):] if n.startswith(prefix) else n
    return name_map


def _slice_batch(batch: Batch, start: int, stop: int) -> dict:
    return {k: v[start:stop] if isinstance(v, (torch.Tensor, list, tuple)) else v for k, v in batch.items()}


def _batch_size(batch: Batch) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
    raise ValueError("a batch needs at least one tensor with a leading batch dimension")


class _Accumulator:
    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}

    def add(self, key: str, value: torch.Tensor, rows: int) -> None:
        if key in self.sums:
            self.sums[key] += value
        else:
            self.sums[key] = value.clone()
        self.rows[key] = self.rows.get(key, 0) + rows

    def means(self) -> dict[str, torch.Tensor]:
        return {k: (v / max(self.rows[k], 1)).cpu() for k, v in self.sums.items()}


class _LogLikelihood(nn.Module):
    """Wraps (model, objective) so ``torch.func.functional_call`` can swap its parameters."""

    def __init__(self, model: nn.Module, objective: Objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch, labels):
        return self.objective.log_likelihood(self.model, batch, labels)


def _rows(x: torch.Tensor, mask: torch.Tensor | None, module: str) -> torch.Tensor:
    """Flatten ``x`` to ``[rows, features]`` (float32), keeping rows where ``mask`` is true."""
    flat = x.detach().reshape(-1, x.shape[-1]).float()
    if mask is None or x.dim() == 2:
        return flat
    if tuple(mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"token mask for {module} has shape {tuple(mask.shape)}, "
                         f"but its input has leading shape {tuple(x.shape[:-1])}")
    return flat[mask.reshape(-1).to(flat.device)]


def _gram_pass(model, objective, linears, batch, labels, mask_fn, want_out, acc: _Accumulator, names) -> None:
    handles = []

    def make_hook(name):
        def hook(module, inputs, output):
            x = inputs[0]
            mask = mask_fn(name, batch, labels) if x.dim() > 2 else None
            rows = _rows(x, mask, name)
            acc.add(gram_in_key(names[name]), rows.T @ rows, rows.shape[0])
            if want_out(name) and output.requires_grad:
                def grad_hook(g, name=name, mask=mask):
                    grows = _rows(g, mask, name)
                    acc.add(gram_out_key(names[name]), grows.T @ grows, grows.shape[0])
                output.register_hook(grad_hook)
        return hook

    for name, module in linears:
        handles.append(module.register_forward_hook(make_hook(name)))
    try:
        if any(want_out(n) for n, _ in linears):
            ll = objective.log_likelihood(model, batch, labels)
            params = [p for p in model.parameters() if p.requires_grad]
            if ll.requires_grad:  # autograd.grad, not backward: the model's .grad stays untouched
                torch.autograd.grad(ll.sum(), params, allow_unused=True)
        else:
            with torch.no_grad():
                objective.log_likelihood(model, batch, labels)
    finally:
        for h in handles:
            h.remove()


def _per_example_grads_vmap(wrapper, params, batch, labels, chunk_size):
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
    others = {k: v for k, v in batch.items() if k not in tensors}

    def one(p, example, label):
        b = {k: v.unsqueeze(0) for k, v in example.items()}
        b.update(others)
        return torch.func.functional_call(wrapper, p, (b, label.unsqueeze(0)))[0]

    return torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, tensors, labels)


def _per_example_grads_loop(wrapper, params, batch, labels):
    plist = [dict(wrapper.named_parameters())[k] for k in params]
    out = {k: [] for k in params}
    for n in range(labels.shape[0]):
        ll = wrapper(_slice_batch(batch, n, n + 1), labels[n:n + 1]).sum()
        grads = torch.autograd.grad(ll, plist, allow_unused=True)
        for k, p, g in zip(params, plist, grads):
            out[k].append(torch.zeros_like(p) if g is None else g)
    return {k: torch.stack(v) for k, v in out.items()}


def collect_statistics(
    model: nn.Module,
    batches: Iterable[Batch],
    objective: Objective,
    *,
    fisher: Literal["empirical", "true"] | None = "empirical",
    grams: bool = True,
    grad_grams: bool = True,
    grad_gram_exclude: str | None = r"(^|\.)lm_head$",
    blockwise: bool | Callable[[str], bool] = False,
    max_examples: int = 1000,
    seed: int = 0,
    token_mask_fn: TokenMaskFn | None = None,
    name_map: Callable[[str], str | None] | str | None = None,
    per_example: Literal["auto", "vmap", "loop"] = "auto",
    vmap_chunk_size: int | None = None,
    split: str | None = None,
    model_id: str | None = None,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Statistics of ``model`` on at most ``max_examples`` examples from ``batches``.

    Args:
        model: any module; put on the device you want; set to eval mode here (restored after).
        batches: iterable of dicts of tensors with a leading batch dimension.
        objective: per-example log-likelihood and label handling (see ``taskmerge.stats.objectives``).
        fisher: ``"empirical"`` (gold labels), ``"true"`` (labels sampled from the model, seeded),
            or None (no diagonal Fisher; gradient statistics then use gold labels).
        grams: input Grams ``<module>.gram_in`` of every ``nn.Linear``.
        grad_grams: output-gradient Grams ``<module>.gram_out``, except modules whose name
            matches ``grad_gram_exclude`` (MaTS excludes ``lm_head``; None excludes nothing).
        blockwise: full Fisher blocks ``<param>.fisher_block`` for trainable parameters selected by
            this predicate on the parameter name; True selects PEFT IA3 vectors (``ia3_l`` in the name).
        token_mask_fn: ``(module name, batch, labels) -> bool [B, T] mask or None`` for Linear
            inputs of shape ``[B, T, in]``; default: the batch's ``attention_mask``.
            See ``objectives.seq2seq_token_mask`` for MaTS's encoder/decoder masks.
        name_map: model parameter name → checkpoint tensor name (None skips it), or a prefix
            to strip; Gram keys follow the mapped name of the Linear's weight.
        per_example: ``"vmap"`` (torch.func), ``"loop"`` (batch of one), or ``"auto"`` (vmap,
            falling back to the loop with a warning when the model does not support vmap).
        split, model_id: recorded in the metadata.

    Returns ``(stats, metadata)``: float32 CPU tensors keyed as in ``taskmerge.stats.keys``, and
    metadata with ``examples``, ``tokens``, ``split``, ``seed``, ``fisher``, ``labels``, ``model``.
    """
    if fisher not in ("empirical", "true", None):
        raise ValueError(f"fisher must be 'empirical', 'true' or None, not {fisher!r}")
    mapper = _name_mapper(name_map)
    if blockwise is True:
        blockwise = lambda n: "ia3_l" in n  # noqa: E731
    elif blockwise is False:
        blockwise = lambda n: False  # noqa: E731
    mask_fn = token_mask_fn or default_token_mask
    exclude = re.compile(grad_gram_exclude) if grad_gram_exclude else None
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # Grams key on the Linear's weight name as stored in the checkpoint.
    linears, module_names = [], {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            mapped = mapper(f"{n}.weight" if n else "weight")
            if mapped is not None:
                linears.append((n, m))
                module_names[n] = mapped
    want_out = (lambda n: grad_grams and not (exclude and exclude.search(n)))
    if not grams:
        linears = []
    if linears and grad_grams and not trainable:
        raise ValueError("output-gradient Grams need a differentiable model: no parameter requires grad")
    grad_params = {n: p for n, p in trainable.items() if mapper(n) is not None and (fisher or blockwise(n))}

    wrapper = _LogLikelihood(model, objective)
    generator = torch.Generator().manual_seed(seed)
    acc = _Accumulator()
    fisher_sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in grad_params.items() if fisher}
    block_sums = {n: torch.zeros(p.numel(), p.numel(), device=p.device) for n, p in grad_params.items() if blockwise(n)}
    mode = per_example
    examples, tokens, start = 0, 0, time.perf_counter()
    was_training = model.training
    model.eval()
    bar = tqdm(total=max_examples, desc="statistics", unit="ex", disable=not progress)
    device = module_device(model)  # batches go where the model is
    try:
        for batch in batches:
            if examples >= max_examples:
                break
            batch = to_device(batch, device)
            size = _batch_size(batch)
            if examples + size > max_examples:
                batch, size = _slice_batch(batch, 0, max_examples - examples), max_examples - examples
            labels = objective.sample_labels(model, batch, generator) if fisher == "true" else objective.gold_labels(batch)
            if linears:
                _gram_pass(model, objective, linears, batch, labels, mask_fn, want_out, acc, module_names)
            if grad_params:
                params = {f"model.{n}": p.detach() for n, p in grad_params.items()}
                grads = None
                if mode in ("auto", "vmap"):
                    try:
                        grads = _per_example_grads_vmap(wrapper, params, batch, labels, vmap_chunk_size)
                        mode = "vmap"
                    except Exception as e:  # vmap has no batching rule, or data-dependent control flow
                        if mode == "vmap":
                            raise
                        log.warning("per-example gradients: vmap failed (%s: %s); using the batch-of-one loop",
                                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                        mode = "loop"
                if grads is None:
                    grads = _per_example_grads_loop(wrapper, params, batch, labels)
                for n in grad_params:
                    g = grads[f"model.{n}"].float()
                    if n in fisher_sums:
                        fisher_sums[n] += (g * g).sum(0)
                    if n in block_sums:
                        flat = g.reshape(g.shape[0], -1)
                        block_sums[n] += flat.T @ flat
            mask = batch.get("attention_mask")
            tokens += int(mask.sum()) if isinstance(mask, torch.Tensor) else size
            examples += size
            bar.update(size)
    finally:
        bar.close()
        model.train(was_training)
    if examples == 0:
        raise ValueError("no examples: the batches iterable was empty")
    stats = acc.means()
    for n, s in fisher_sums.items():
        stats[fisher_key(mapper(n))] = (s / examples).cpu()
    for n, s in block_sums.items():
        stats[fisher_block_key(mapper(n))] = (s / examples).cpu()
    seconds = time.perf_counter() - start
    log.info("statistics: %d examples, %d tokens, %d tensors in %.1f s (%s)", examples, tokens, len(stats),
             seconds, mode if grad_params else "no per-example gradients")
    metadata = {"examples": examples, "tokens": tokens, "split": split, "seed": seed, "fisher": fisher,
                "labels": "sampled" if fisher == "true" else "gold", "model": model_id,
                "per_example": mode if grad_params else None, "seconds": round(seconds, 3)}
    return stats, metadata
