"""Fisher merging: equal Fishers give the average, hand-computed weights, floor, bad statistics."""
import pytest
import torch

from taskmerge.merging import merge


def models(T=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = {"lin.weight": torch.randn(3, 4, generator=g), "lin.bias": torch.randn(3, generator=g),
           "pos": torch.arange(5)}
    fts = [{k: (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()) for k, v in pre.items()}
           for _ in range(T)]
    return pre, fts


def average(fts, key):
    return torch.stack([sd[key] for sd in fts]).mean(0)


def test_equal_fishers_give_the_average():
    pre, fts = models()
    F = torch.rand(3, 4) + 0.1
    stats = [{"lin.weight.fisher": F.clone(), "lin.bias.fisher": torch.full((3,), 2.0)} for _ in fts]
    out = merge("fisher", pre, fts, stats=stats)
    torch.testing.assert_close(out["lin.weight"], average(fts, "lin.weight"))
    torch.testing.assert_close(out["lin.bias"], average(fts, "lin.bias"))
    assert torch.equal(out["pos"], pre["pos"])


def test_hand_computed_weights_pair_lambda_and_floor():
    pre, fts = models(T=2)
    F1, F2 = torch.full((3, 4), 1.0), torch.full((3, 4), 3.0)
    F2[0, 0] = 0.0  # floored to 1e-8: element (0, 0) follows model 1
    stats = [{"lin.weight.fisher": F1}, {"lin.weight.fisher": F2}]
    a, b = fts[0]["lin.weight"], fts[1]["lin.weight"]
    out = merge("fisher", pre, fts, stats=stats)
    want = (a + 3 * b) / 4
    want[0, 0] = (a[0, 0] + 1e-8 * b[0, 0]) / (1 + 1e-8)
    torch.testing.assert_close(out["lin.weight"], want)
    torch.testing.assert_close(out["lin.bias"], average(fts, "lin.bias"))  # no Fisher: averaged
    # official 2-model λ: weights λ and 1−λ on the Fishers
    out = merge("fisher", pre, fts, {"pair_lambda": 0.25}, stats=stats)
    torch.testing.assert_close(out["lin.weight"][1:], ((0.25 * a + 0.75 * 3 * b) / (0.25 + 2.25))[1:])
    # all-zero Fishers: the floor makes it the plain average, not 0/0
    zero = [{"lin.weight.fisher": torch.zeros(3, 4)}] * 2
    torch.testing.assert_close(merge("fisher", pre, fts, stats=zero)["lin.weight"], average(fts, "lin.weight"))


def test_pair_lambda_is_ignored_for_three_models():
    pre, fts = models(T=3)
    stats = [{"lin.weight.fisher": torch.rand(3, 4) + 0.5} for _ in fts]
    a = merge("fisher", pre, fts, stats=stats)
    b = merge("fisher", pre, fts, {"pair_lambda": 0.9}, stats=stats)
    torch.testing.assert_close(a["lin.weight"], b["lin.weight"])


def test_bad_statistics():
    pre, fts = models(T=2)
    good = {"lin.weight.fisher": torch.ones(3, 4)}
    with pytest.raises(ValueError, match="needs statistics"):
        merge("fisher", pre, fts)
    with pytest.raises(ValueError, match="got 1 statistics files for 2"):
        merge("fisher", pre, fts, stats=[good])
    nan = {"lin.weight.fisher": torch.full((3, 4), float("nan"))}
    with pytest.raises(ValueError, match=r"stats\[1\]: lin.weight.fisher contains NaN"):
        merge("fisher", pre, fts, stats=[good, nan])
    with pytest.raises(ValueError, match=r"stats\[0\]: lin.weight.fisher has shape \(4, 3\)"):
        merge("fisher", pre, fts, stats=[{"lin.weight.fisher": torch.ones(4, 3)}, good])
    with pytest.raises(ValueError, match="not a tensor of the model"):
        merge("fisher", pre, fts, stats=[{"other.weight.fisher": torch.ones(3, 4)}, good])
    with pytest.raises(ValueError, match=r"missing from stats\[1\]"):
        merge("fisher", pre, fts, stats=[{**good, "lin.bias.fisher": torch.ones(3)}, good])
    with pytest.raises(ValueError, match="no '<param>.fisher' entry"):
        merge("fisher", pre, fts, stats=[{"lin.gram_in": torch.eye(4)}] * 2)


def test_block_by_block_equals_the_whole_tensor_formula_bit_for_bit():
    from taskmerge.merging.fisher import fisher_average
    from taskmerge.merging.inputs import BLOCK as _BLOCK

    g = torch.Generator().manual_seed(5)
    shape = (3, _BLOCK // 2 + 7)  # more than one block, the last one partial
    thetas = [torch.randn(shape, generator=g) for _ in range(3)]
    fishers = [torch.rand(shape, generator=g) * (torch.rand(shape, generator=g) > 0.3) for _ in range(3)]
    for weights in ([1.0, 1.0, 1.0], [0.3, 0.5, 0.2]):
        num, den = torch.zeros(shape), torch.zeros(shape)
        for w, f, th in zip(weights, fishers, thetas):
            wf = f.clamp_min(1e-8)
            if w != 1.0:
                wf = wf.mul_(w)
            num.addcmul_(wf, th)
            den += wf
        assert torch.equal(fisher_average(thetas, fishers, weights, 1e-8), num / den)
