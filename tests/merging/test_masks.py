"""TALL masks and Consensus merging: official flattened formulas, invariants, mask files."""
import pytest
import torch
from safetensors.torch import load_file

from taskmerge.merging import get_method, merge
from taskmerge.merging.masks import (consensus_from_masks, load_masks, multitask_vector, save_masks,
                                     tall_masks_from_mtl)
from test_ties import SHAPES, flat, make_models, official_ties, unflat

KEYS = sorted(SHAPES)


def official_masks(pre, fts, tau_mtl_flat, lam):
    ptm = flat(pre, KEYS)
    multi = ptm + tau_mtl_flat
    return [(ptm - flat(ft, KEYS)).abs() > (multi - flat(ft, KEYS)).abs() * lam for ft in fts]


def official_mtl(pre, fts, use_ties):
    if use_ties:  # ties_merging(τ, k=20, 'dis-sum') at λ=1, as a vector
        return flat(official_ties(pre, fts, 20, "sum", 1.0), KEYS) - flat(pre, KEYS)
    return sum(flat(ft, KEYS) - flat(pre, KEYS) for ft in fts)


@pytest.mark.parametrize("use_ties", [False, True])
@pytest.mark.parametrize("lam", [0.2, 0.6])
def test_tall_masks_match_official(use_ties, lam):
    pre, fts = make_models(num_tasks=4, seed=8)
    tau_mtl = multitask_vector(pre, fts, use_ties=use_ties)
    torch.testing.assert_close(flat(tau_mtl, KEYS), official_mtl(pre, fts, use_ties), rtol=0, atol=1e-6)
    masks = tall_masks_from_mtl(pre, fts, tau_mtl, lam)
    ref = official_masks(pre, fts, flat(tau_mtl, KEYS), lam)
    for m, r in zip(masks, ref):
        assert torch.equal(flat(m, KEYS).bool(), r)
    models = merge("tall_mask", pre, fts, {"mask_lambda": lam, "use_ties": use_ties})
    assert len(models) == 4
    for model, r in zip(models, ref):
        expected = unflat(flat(pre, KEYS) + r * flat(tau_mtl, KEYS), pre, KEYS)
        for key in SHAPES:
            torch.testing.assert_close(model[key], expected[key], rtol=0, atol=1e-6)
        assert torch.equal(model["position_ids"], pre["position_ids"])


def test_tall_mask_by_hand_strict_inequality():
    pre = {"w": torch.zeros(4)}
    fts = [{"w": torch.tensor([1.0, 0.5, -1.0, 0.0])}, {"w": torch.tensor([1.0, -0.5, 3.0, 0.0])}]
    # τ_MTL = [2, 0, 2, 0]; |τ_1| = [1, .5, 1, 0]; |τ_MTL − τ_1| = [1, .5, 3, 0]
    masks = tall_masks_from_mtl(pre, fts, {"w": torch.tensor([2.0, 0.0, 2.0, 0.0])}, 1.0)
    assert masks[0]["w"].tolist() == [False, False, False, False]  # equality is not kept (strict >)
    assert masks[1]["w"].tolist() == [False, False, True, False]   # |3| > |2 − 3|
    masks = tall_masks_from_mtl(pre, fts, {"w": torch.tensor([2.0, 0.0, 2.0, 0.0])}, [0.5, 0.5])
    assert masks[0]["w"].tolist() == [True, True, False, False]    # 1 > .5, .5 > .25, 1 < 1.5
    out = merge("tall_mask", pre, fts, {"mask_lambda": 0.5})
    assert out[0]["w"].tolist() == [2.0, 0.0, 0.0, 0.0] and out[1]["w"].tolist() == [2.0, 0.0, 2.0, 0.0]


def test_one_task_tall_returns_finetuned():
    pre, fts = make_models(num_tasks=1)
    out = merge("tall_mask", pre, fts, {"mask_lambda": 0.5})[0]
    for key in SHAPES:  # τ_MTL = τ → every non-zero entry is kept
        torch.testing.assert_close(out[key], fts[0][key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("use_ties", [False, True])
def test_consensus_k0_equals_ta_or_ties_sum(use_ties):
    pre, fts = make_models(seed=9)
    out = merge("consensus", pre, fts, {"min_tasks": 0, "use_ties": use_ties, "scaling": 0.4})
    if use_ties:
        ref = merge("ties", pre, fts, {"k": 20, "merge": "sum", "scaling": 0.4})
    else:
        ref = merge("task_arithmetic", pre, fts, {"scaling": 0.4})
    for key in SHAPES:
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=1e-6)


def test_consensus_matches_official_count_and_extremes():
    pre, fts = make_models(num_tasks=4, seed=10)
    tau_mtl = multitask_vector(pre, fts)
    masks = tall_masks_from_mtl(pre, fts, tau_mtl, [0.2, 0.3, 0.4, 0.6])
    out = consensus_from_masks(pre, tau_mtl, masks, 2, 0.5)
    count = sum(flat(m, KEYS) for m in masks)
    ref = unflat(flat(pre, KEYS) + 0.5 * flat(tau_mtl, KEYS) * (count >= 2), pre, KEYS)
    assert 0 < (count >= 2).sum() < count.numel()  # a non-trivial mask
    for key in SHAPES:
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=1e-6)
    empty = merge("consensus", pre, fts, {"min_tasks": 5})  # k > T → zero-shot
    for key in SHAPES:
        assert torch.equal(empty[key], pre[key])


def test_consensus_linear_and_permutation_invariant():
    pre, fts = make_models(num_tasks=3, seed=11)
    method = get_method("consensus")
    assert method.linear_in == "scaling"
    one = method(pre, fts, {"scaling": 1.0})
    out = method(pre, fts, {"scaling": 0.35})
    perm = method(pre, fts[::-1], {"scaling": 0.35})
    for key in SHAPES:
        torch.testing.assert_close(out[key], pre[key] + 0.35 * (one[key] - pre[key]), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(perm[key], out[key], rtol=0, atol=1e-6)


def test_masks_round_trip(tmp_path):
    pre, fts = make_models(num_tasks=3, seed=12)
    pre["scalar"] = torch.tensor(1.0)
    for ft in fts:
        ft["scalar"] = torch.tensor(2.0)
    masks = tall_masks_from_mtl(pre, fts, multitask_vector(pre, fts), 0.4)
    path = tmp_path / "masks.safetensors"
    save_masks(path, masks)
    back = load_masks(path)
    assert len(back) == 3
    for m, b in zip(masks, back):
        assert list(m) == list(b)
        for key in m:
            assert b[key].dtype == torch.bool and b[key].shape == m[key].shape and torch.equal(b[key], m[key])
    raw = load_file(str(path))  # bit-packed: ceil(numel / 8) uint8 per tensor and task
    assert all(raw[f"{t}/{k}"].dtype == torch.uint8 and raw[f"{t}/{k}"].numel() == -(-m.numel() // 8)
               for t in range(3) for k, m in masks[0].items())


def test_bad_input_raises(tmp_path):
    pre, fts = make_models()
    with pytest.raises(ValueError):
        merge("consensus", pre, fts, {"min_tasks": -1})
    with pytest.raises(ValueError):
        merge("tall_mask", pre, fts, {"mask_lambda": -0.1})
    with pytest.raises(ValueError):
        tall_masks_from_mtl(pre, fts, multitask_vector(pre, fts), [0.2])
    with pytest.raises(ValueError):
        save_masks(tmp_path / "m.safetensors", [{"w": torch.ones(3)}])
    (tmp_path / "x.safetensors").write_bytes(b"junk")
    with pytest.raises(Exception):
        load_masks(tmp_path / "x.safetensors")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_preserved_no_nan(dtype):
    pre, fts = make_models(dtype=dtype)
    for out in [*merge("tall_mask", pre, fts), merge("consensus", pre, fts, {"use_ties": True})]:
        for key in SHAPES:
            assert out[key].dtype == dtype and torch.isfinite(out[key].float()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pass_merge_equals_the_searchs_memoised_mtl(dtype):
    """A single merge sums τ_MTL key by key in the pass that builds the masks; a search (``cache``)
    builds the whole τ_MTL once and reuses it. Both routes give the same tensors, bit for bit."""
    pre, fts = make_models(num_tasks=4, seed=3)
    pre = {k: v.to(dtype) if v.is_floating_point() else v for k, v in pre.items()}
    fts = [{k: v.to(dtype) if v.is_floating_point() else v for k, v in ft.items()} for ft in fts]
    for name, hp in [("tall_mask", {"mask_lambda": 0.3}), ("consensus", {"min_tasks": 2, "scaling": 0.7})]:
        one_pass = merge(name, pre, fts, hp)
        memoised = merge(name, pre, fts, hp, cache={})
        for a, b in zip(*[x if isinstance(x, list) else [x] for x in (one_pass, memoised)]):
            assert a.keys() == b.keys()
            for key in a:
                assert a[key].dtype == pre[key].dtype and torch.equal(a[key], b[key]), (name, key)


def test_tall_block_by_block_equals_the_whole_tensor_masks_and_merges():
    from taskmerge.merging.masks import _BLOCK, _key_masks, _tall_key

    g = torch.Generator().manual_seed(2)
    base = torch.randn(3, _BLOCK // 2 + 5, generator=g)  # more than one block, the last one partial
    thetas = [base + 0.1 * torch.randn(base.shape, generator=g) for _ in range(3)]
    multi = base + sum(t - base for t in thetas)
    lambdas = [0.2, 0.4, 0.6]
    merged, masks = _tall_key(base, multi, thetas, lambdas, keep_masks=True)
    for m, out, want in zip(masks, merged, _key_masks(base, multi, thetas, lambdas)):
        assert torch.equal(m, want)
        assert torch.equal(out, torch.where(want, multi, base))
    assert _tall_key(base, multi, thetas, lambdas, keep_masks=False)[1] == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_consensus_block_by_block_equals_the_whole_tensor_count(dtype):
    from taskmerge.merging.masks import _BLOCK, _consensus_key, _key_masks

    g = torch.Generator().manual_seed(3)
    base = torch.randn(3, _BLOCK // 2 + 5, generator=g)  # more than one block, the last one partial
    thetas = [(base + 0.1 * torch.randn(base.shape, generator=g)).to(dtype) for _ in range(4)]
    tau = sum(t.float() - base for t in thetas)
    lambdas = [0.2, 0.4, 0.6, 0.5]
    count = sum(m.to(torch.int16) for m in _key_masks(base, base + tau, thetas, lambdas))
    for k in (0, 2, 5):
        want = tau * (count >= k)
        assert torch.equal(_consensus_key(base, tau, thetas, lambdas, k), want)
        mine = tau.clone()
        assert _consensus_key(base, mine, thetas, lambdas, k, out=mine).data_ptr() == mine.data_ptr()
        assert torch.equal(mine, want)
