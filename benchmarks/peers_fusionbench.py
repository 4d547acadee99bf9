"""FusionBench 0.2.33 side of ``benchmarks/peers.py``: shims, and one adapter per method.

Imported only in a FusionBench worker process, after ``peers.py`` put the ``--target`` folder
(``.peers/`` by default) first on ``sys.path``. Each adapter takes the worker's inputs and returns
a zero-argument callable, the timed merge call; everything it needs (the algorithm object, its
Lightning Fabric, the model pool) is built before, untimed.

Shims (applied by :func:`apply_shims`, each only when needed):

1. ``transformers.models.clip.modeling_clip.CLIPVisionTransformer``: transformers 5 removed this
   class (``CLIPVisionModel`` now holds the vision tower's modules itself), and FusionBench imports it
   at module level in ``taskpool/clip_vision/clip_rankone_moe_taskpool.py``, which the
   ``fusion_bench.method.opcm`` import chain reaches. The shim binds the name to
   ``CLIPVisionModel``; FusionBench uses it only in type hints and that import.

2. ``fusion_bench.method.tall_mask.task_arithmetic``: its ``run`` mixes
   ``pretrained_model.state_dict(keep_vars=True)`` (``nn.Parameter`` values) with task vectors (plain
   tensors) in ``state_dict_diff_abs`` / ``state_dict_add``, whose key/type validation in 0.2.33
   (``utils/state_dict_arithmetic._validate_state_dict_same_keys``) rejects the mix: "Tensor type
   mismatch … expected Parameter, got Tensor", for any model (not a transformers 5 issue). The shim
   wraps the ``state_dict_*`` helpers *as that module imported them* so that Parameter values enter
   as ``.detach()``-ed views of the same storage (no copy, same arithmetic).

Nothing else is patched. Rows not backed by a FusionBench algorithm class:

- **consensus**: FusionBench 0.2.33 has no Consensus algorithm, only
  ``tall_mask.utils.construct_consensus_mask``, which loads TALL masks saved by an earlier run from
  disk. The adapter composes the official procedure (tall_masks repository, TA variant) from
  FusionBench's own functions: ``state_dict_to_vector``, ``tall_mask.utils.generate_task_masks``
  (masks of every task, λ), count ≥ k, θ = θ0 + λ_s·(m ⊙ Σ_t τ_t), ``vector_to_state_dict``.
- **knots**: FusionBench 0.2.33 has only ``knots.knots_utils.subspace_alignment`` (the dense
  float64 SVD of [ΔW_1 | … | ΔW_T], threshold 1e-4). The adapter densifies ΔW_t = B_t A_t per module,
  calls it, and TIES-merges the per-task sV blocks (flattened over all modules, one trim per task,
  as official) with FusionBench's ``ties_merging_utils.ties_merging``, then W = W0 + U·sV_m.
- **fisher / regmean**: FusionBench's own ``FisherMergingAlgorithm`` / ``RegMeanAlgorithm`` with
  ``get_fisher_weights`` / ``get_regmean_weights`` returning the benchmark's synthetic statistics
  (the subclasses would otherwise compute them from a data loader); the merge is theirs.
"""
from __future__ import annotations

from typing import Callable

import torch


def apply_shims() -> list[str]:
    """Apply the shims listed in the module docstring; return the names of those applied."""
    applied = []
    from transformers.models.clip import modeling_clip

    if not hasattr(modeling_clip, "CLIPVisionTransformer"):
        modeling_clip.CLIPVisionTransformer = modeling_clip.CLIPVisionModel
        applied.append("transformers.models.clip.modeling_clip.CLIPVisionTransformer = CLIPVisionModel")
    from fusion_bench.method.tall_mask import task_arithmetic as tall

    for name in [n for n in vars(tall) if n.startswith("state_dict_")]:
        if not getattr(getattr(tall, name), "_peers_shim", False):
            setattr(tall, name, _detaching(getattr(tall, name)))
    applied.append("fusion_bench.method.tall_mask.task_arithmetic.state_dict_*: Parameters detached")
    return applied


def _plain(x):
    if isinstance(x, dict):
        return type(x)((k, v.detach() if isinstance(v, torch.nn.Parameter) else v) for k, v in x.items())
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


def _detaching(fn):
    def wrapper(*args, **kwargs):
        return fn(*[_plain(a) for a in args], **{k: _plain(v) for k, v in kwargs.items()})

    wrapper._peers_shim = True
    return wrapper


def version() -> str:
    from importlib.metadata import version as v

    return v("fusion-bench")


def _pool(inp):
    from fusion_bench.modelpool import BaseModelPool

    models = {"_pretrained_": inp.pre, **{f"task_{t}": m for t, m in enumerate(inp.fts)}}
    pool = BaseModelPool(models)
    pool.load_train_dataset = lambda name, *a, **k: None  # statistics are given, no data is read
    return pool


def _with_fabric(algo):
    algo.fabric  # noqa: B018  (creates and launches the Lightning Fabric now, untimed)
    return algo


def task_arithmetic(inp, scaling: float) -> Callable:
    from fusion_bench.method.task_arithmetic.task_arithmetic import TaskArithmeticAlgorithm

    algo, pool = TaskArithmeticAlgorithm(scaling_factor=scaling), _pool(inp)
    return lambda: algo.run(pool)


def ties(inp, k: float, merge: str, scaling: float) -> Callable:
    from fusion_bench.method.ties_merging.ties_merging import TiesMergingAlgorithm

    algo = TiesMergingAlgorithm(scaling_factor=scaling, threshold=k, remove_keys=[], merge_func=merge)
    pool = _pool(inp)
    return lambda: algo.run(pool)


def tall_mask(inp, mask_lambda: float) -> Callable:
    from fusion_bench.method.tall_mask.task_arithmetic import TallMaskTaskArithmeticAlgorithm

    algo, pool = TallMaskTaskArithmeticAlgorithm(tall_mask_lambda=mask_lambda), _pool(inp)
    return lambda: algo.run(pool)


def consensus(inp, min_tasks: int, mask_lambda: float, scaling: float) -> Callable:
    from fusion_bench.method.tall_mask.utils import generate_task_masks
    from fusion_bench.utils import state_dict_to_vector, vector_to_state_dict

    def run():
        ptm_check = inp.pre.state_dict()
        flat_ptm = state_dict_to_vector(ptm_check, remove_keys=[])
        flat_ft = torch.vstack([state_dict_to_vector(m.state_dict(), remove_keys=[]) for m in inp.fts])
        tv_flat_checks = flat_ft - flat_ptm
        merged_tv = tv_flat_checks.sum(0)
        masks = generate_task_masks(tv_flat_checks, flat_ft, flat_ptm, tv=merged_tv, tall_mask_lambda=mask_lambda)
        consensus_mask = masks.float().sum(0) >= min_tasks
        merged = flat_ptm + scaling * (merged_tv * consensus_mask)
        inp.pre.load_state_dict(vector_to_state_dict(merged, ptm_check, remove_keys=[]))
        return inp.pre

    return run


def fisher(inp) -> Callable:
    from fusion_bench.method.fisher_merging.fisher_merging import FisherMergingAlgorithm

    fishers = {f"task_{t}": f for t, f in enumerate(inp.fishers)}

    class GivenFisher(FisherMergingAlgorithm):
        def get_fisher_weights(self, model_name, model, train_dataset, param_names_to_merge):
            return {n: fishers[model_name][n] for n in param_names_to_merge}

    algo = GivenFisher(exclude_param_names_regex=[], normalize_fisher_weight=True, minimal_fisher_weight=1e-6,
                       num_fisher_examples=256)
    pool = _pool(inp)
    return lambda: algo.run(pool)


def regmean(inp, off_diagonal_scale: float) -> Callable:
    from fusion_bench.method.regmean.regmean import RegMeanAlgorithm

    grams = {f"task_{t}": g for t, g in enumerate(inp.grams)}

    class GivenGrams(RegMeanAlgorithm):
        def get_regmean_weights(self, model_name, model, train_dataset, linear_modules_to_merge):
            return {n: grams[model_name][n] for n in linear_modules_to_merge}

    algo = GivenGrams(num_regmean_examples=256, exclude_param_names_regex=[],
                      reduce_non_diagonal_ratio=off_diagonal_scale, weight_transpose=True)
    pool = _pool(inp)
    return lambda: algo.run(pool)


def tsv_m(inp, scaling: float) -> Callable:
    from fusion_bench.method.task_singular_vector.TSVM import TaskSingularVectorMerging

    algo, pool = _with_fabric(TaskSingularVectorMerging(alpha=scaling, exclude_keys=[])), _pool(inp)
    return lambda: algo.run(pool)


def opcm(inp, alpha: float) -> Callable:
    from fusion_bench.method.opcm.opcm_general import OPCM

    algo = _with_fabric(OPCM(alpha=alpha, shuffle_order=False, seed=None, save_on_every_step=False,
                             evaluate_on_every_step=False))
    pool = _pool(inp)
    return lambda: algo.run(pool)


def knots(inp, k: float, merge: str, scaling: float) -> Callable:
    from fusion_bench.method.knots.knots_utils import subspace_alignment
    from fusion_bench.method.ties_merging.ties_merging_utils import ties_merging

    def run():
        modules = sorted(inp.lora[0])
        bases, blocks = {}, []
        for m in modules:
            deltas = [adapter[m][1] @ adapter[m][0] for adapter in inp.lora]  # ΔW_t = B_t A_t
            u, s, vhs = subspace_alignment(deltas)
            bases[m] = u
            blocks.append([s[:, None] * vh for vh in vhs])
        flat = torch.vstack([torch.cat([b[t].reshape(-1) for b in blocks]) for t in range(len(inp.lora))])
        merged = ties_merging(flat, reset_thresh=k, merge_func=merge) * scaling
        state, start = inp.pre.state_dict(), 0
        for m, b in zip(modules, blocks):
            sv = merged[start:start + b[0].numel()].view_as(b[0])
            start += b[0].numel()
            state[m + ".weight"] = state[m + ".weight"] + bases[m] @ sv
        inp.pre.load_state_dict(state)
        return inp.pre

    return run


def iso_c(inp, scaling: float) -> Callable:
    from fusion_bench.method.isotropic_merging import ISO_C_Merge

    algo, pool = _with_fabric(ISO_C_Merge(scaling_factor=scaling, exclude_keys=None)), _pool(inp)
    return lambda: algo.run(pool)


def iso_cts(inp, scaling: float, common_space_fraction: float) -> Callable:
    from fusion_bench.method.isotropic_merging import ISO_CTS_Merge

    algo = _with_fabric(ISO_CTS_Merge(scaling_factor=scaling, common_space_fraction=common_space_fraction,
                                      exclude_keys=None))
    pool = _pool(inp)
    return lambda: algo.run(pool)


def model_stock(inp) -> Callable:
    from fusion_bench.method.model_stock.model_stock import ModelStock

    algo, pool = ModelStock(ignore_keys=[]), _pool(inp)
    return lambda: algo.run(pool)


def wudi(inp, iter_num: int) -> Callable:
    from fusion_bench.method.wudi.wudi import WUDIMerging

    algo, pool = _with_fabric(WUDIMerging(iter_num=iter_num, exclude_keys=None)), _pool(inp)
    return lambda: algo.run(pool)
