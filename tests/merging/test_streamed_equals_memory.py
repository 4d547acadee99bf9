"""Every registered method, streamed to disk from lazily read shards, equals its in-memory result bit for bit.

One producer per method (``Method.stream``), two consumers: ``Method.__call__`` (a state dict) and
``io.merge_writer.write_merged`` (sharded safetensors, row chunks for element-wise methods, a disk
``scratch`` for carried state). The models have layers named ``l.1`` and ``l.10`` (a name prefix of
each other), statistics hold bias Fishers, and a bf16 variant checks the cast back.
"""
import pytest
import torch

from taskmerge.io.merge_writer import write_merged
from taskmerge.io.sharded import ShardedReader, ShardedWriter, specs_of
from taskmerge.merging import METHODS, get_method
from taskmerge.merging.lora import LoraFactors
from taskmerge.merging.masks import load_masks

LINEARS = {"l.1": (6, 5), "l.10": (7, 6), "l.2": (5, 7)}


def base_model(dtype):
    g = torch.Generator().manual_seed(0)
    sd = {"embed_tokens.weight": torch.randn(40, 5, generator=g)}
    for name, (out, inp) in LINEARS.items():
        sd[f"{name}.weight"] = torch.randn(out, inp, generator=g)
        sd[f"{name}.bias"] = torch.randn(out, generator=g)
    sd["norm.weight"] = torch.ones(5)
    sd["position_ids"] = torch.arange(8)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def finetuned(base, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: ((v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point()
                else v.clone()) for k, v in base.items()}


def spd(n, g):
    x = torch.randn(3 * n, n, generator=g)
    return x.T @ x / (3 * n)


def statistics(base, seed):
    g = torch.Generator().manual_seed(100 + seed)
    stats = {f"{k}.fisher": torch.rand(v.shape, generator=g) for k, v in base.items() if v.is_floating_point()}
    for name, (out, inp) in LINEARS.items():
        stats[f"{name}.gram_in"] = spd(inp, g)
        stats[f"{name}.gram_out"] = spd(out, g)
    return stats


def adapters(base, seed, rank=2):
    g = torch.Generator().manual_seed(200 + seed)
    return {name: LoraFactors(torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g), 0.5)
            for name, (out, inp) in LINEARS.items() if name != "l.2"}


def layer_stats_from(stats):
    """A RegMean++ ``layer_stats`` callback over fixed Grams, task t's scaled by 1 + t + a number drawn from the
    merged tensors it is handed, so that the merge depends on what each consumer hands on."""
    def callback(block, merged):
        shift = sum(float(v.double().abs().sum()) for v in merged.values()) % 1
        return [{k: v * (1 + t + shift) for k, v in s.items()} for t, s in enumerate(stats)]
    return callback


def method_inputs(method, dtype):
    """(θ0, three fine-tuned models, the context the method declares) for one registered method."""
    base = base_model(dtype)
    fts = [finetuned(base, s) for s in (1, 2, 3)]
    context = {"kinds": None}
    if "stats" in method.context:
        context["stats"] = [statistics(base, s) for s in (1, 2, 3)]
    if "layer_stats" in method.context:
        context["layer_stats"] = layer_stats_from([statistics(base, s) for s in (1, 2, 3)])
    if method.inputs == "lora":
        context["lora"] = [adapters(base, s) for s in (1, 2, 3)]
    return base, fts, context


def write(state, folder):
    with ShardedWriter(folder, specs_of(state), max_shard_bytes=300) as w:
        for k in reversed(list(state)):
            w.write(k, state[k])
    return ShardedReader(folder)


# every registered method with the settings it is compared at (mats: every objective)
CASES = [(name, {}) for name in sorted(METHODS) if name != "mats"] + \
    [("mats", {"objective": o, "iterations": 30}) for o in ("average", "diagonal_fisher", "regmean",
                                                             "blockwise_fisher")] + \
    [("ties", {"trim_scope": "per_tensor", "trim_count": "exact"}), ("dare", {"base": "task_arithmetic"}),
     ("knots", {"inner": "dare_ties", "k": 100}), ("tall_mask", {"use_ties": True}),
     ("iso_cts", {"common_space_fraction": 1.0}), ("cart", {"svd_scope": "all_2d", "rank_fraction": 0.5}),
     ("model_stock", {"average": "angle", "filter_wise": True}), ("breadcrumbs", {"scope": "row"}),
     ("della", {"elect": False, "epsilon": 0.0, "rescale": "l1"}),
     ("lines", {"base": "consensus", "base_params": "use_ties=true", "beta": 1.0}),
     ("emr", {"rescale": "flat_mean"}), ("wudi", {"others": "average", "iterations": 20}),
     ("core_space", {"inner": "ties", "inner_params": "k=50"}), ("core_space", {"inner": "task_arithmetic"}),
     ("core_space", {"inner": "iso_c"}), ("core_space", {"inner": "cart"}),
     ("regmean_plusplus", {"after_blocks": "average"})]
# where a reduction order changes between the two consumers, the tolerance is stated here (relative)
TOLERANCE: dict[str, float] = {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,hp", CASES, ids=[f"{n}-{'-'.join(map(str, h.values()))}" for n, h in CASES])
def test_streamed_equals_in_memory(tmp_path, name, hp, dtype):
    method = get_method(name)
    base, fts, context = method_inputs(method, dtype)
    want = method(base, fts, hp, **context)

    lazy_base = write(base, tmp_path / "base")
    lazy_fts = [write(ft, tmp_path / f"ft{i}") for i, ft in enumerate(fts)]
    out = tmp_path / "out"
    written = write_merged(method, lazy_base, lazy_fts, out, hparams=hp, context=context, chunk_numel=16,
                           max_shard_bytes=400, progress=False)
    wants = want if method.output == "per_task" else [want]
    assert len(written) == len(wants)
    for path, expect in zip(written, wants):
        got = ShardedReader(path)
        assert list(got) == list(base)
        for k in base:
            g, e = got[k], expect[k]
            assert g.dtype == e.dtype, k
            if name in TOLERANCE:
                torch.testing.assert_close(g.float(), e.float(), rtol=TOLERANCE[name], atol=0)
            else:
                assert torch.equal(g, e), (name, k)
    if name == "tall_mask":  # the masks are saved beside the per-task models
        assert len(load_masks(out / "masks.safetensors")) == len(fts)


def test_every_method_is_covered():
    assert {name for name, _ in CASES} == set(METHODS)


def test_stream_yields_only_floating_keys_and_one_key_at_a_time():
    base = base_model(torch.float32)
    fts = [finetuned(base, s) for s in (1, 2)]
    keys = [k for k, _ in get_method("task_arithmetic").stream(base, fts, {"scaling": 0.5})]
    assert keys == [k for k, v in base.items() if v.is_floating_point()]
