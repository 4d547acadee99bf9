"""DARE against the official call order (global RNG, task-major, sorted keys), plus invariants."""
import pytest
import torch

from taskmerge.merging import get_method, merge
from test_ties import SHAPES, make_models, official_ties


def official_dare(pre, fts, p, seed):
    """KnOTS apply_dare: seed once; per task, per sorted key: randint(2, shape).bernoulli(1−p)."""
    torch.manual_seed(seed)
    keys = sorted(k for k in pre if pre[k].is_floating_point())
    out = []
    for ft in fts:
        masked = dict(pre)
        for k in keys:
            tau = ft[k].float() - pre[k].float()
            mask = torch.randint(2, tuple(tau.shape)).bernoulli(1 - p)
            masked[k] = pre[k].float() + tau * mask * (1 / (1 - p))
        out.append(masked)
    return out


def test_dare_ties_matches_official():
    pre, fts = make_models(seed=1)
    got = merge("dare", pre, fts, {"drop_rate": 0.3, "seed": 11, "base": "ties", "k": 40, "scaling": 0.6})
    ref = official_ties(pre, official_dare(pre, fts, 0.3, 11), 40, "mean", 0.6)
    for key in SHAPES:
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-5)


def test_dare_task_arithmetic_by_hand_and_official():
    pre, fts = make_models(seed=2)
    got = merge("dare", pre, fts, {"drop_rate": 0.5, "seed": 3, "base": "task_arithmetic", "scaling": 0.5})
    dared = official_dare(pre, fts, 0.5, 3)
    for key in SHAPES:
        ref = pre[key] + 0.5 * sum(d[key] - pre[key] for d in dared)
        torch.testing.assert_close(got[key], ref, rtol=0, atol=1e-5)
    # by hand: one task, p = 0.5 → every entry is either 0 or 2τ
    out = merge("dare", pre, fts[:1], {"drop_rate": 0.5, "base": "task_arithmetic", "scaling": 1.0})
    for key in SHAPES:
        tau, new = fts[0][key] - pre[key], out[key] - pre[key]
        dropped = new.abs() < 1e-6
        assert 0 < dropped.sum() < dropped.numel() or dropped.numel() < 8
        torch.testing.assert_close(new[~dropped], 2 * tau[~dropped], rtol=1e-5, atol=1e-5)


def test_no_drop_equals_task_arithmetic_and_ties():
    pre, fts = make_models(seed=4)
    ta = merge("task_arithmetic", pre, fts, {"scaling": 0.3})
    out = merge("dare", pre, fts, {"drop_rate": 0.0, "base": "task_arithmetic", "scaling": 0.3})
    ties = merge("ties", pre, fts, {"k": 20, "scaling": 0.8})
    out_ties = merge("dare", pre, fts, {"drop_rate": 0.0, "base": "ties", "k": 20, "scaling": 0.8})
    for key in SHAPES:
        torch.testing.assert_close(out[key], ta[key], rtol=0, atol=1e-6)
        torch.testing.assert_close(out_ties[key], ties[key], rtol=0, atol=1e-6)


def test_one_task_scale_one_no_drop_returns_finetuned():
    pre, fts = make_models(num_tasks=1)
    out = merge("dare", pre, fts, {"drop_rate": 0.0, "scaling": 1.0})
    for key in SHAPES:
        torch.testing.assert_close(out[key], fts[0][key], rtol=0, atol=1e-6)


def test_seed_changes_masks_and_is_reproducible():
    pre, fts = make_models()
    a = merge("dare", pre, fts, {"seed": 1})
    b = merge("dare", pre, fts, {"seed": 1})
    c = merge("dare", pre, fts, {"seed": 2})
    assert all(torch.equal(a[k], b[k]) for k in SHAPES)
    assert not all(torch.equal(a[k], c[k]) for k in SHAPES)


@pytest.mark.parametrize("base", ["task_arithmetic", "ties"])
def test_linear_in_scaling(base):
    pre, fts = make_models(seed=6)
    method = get_method("dare")
    assert method.linear_in == "scaling"
    one = method(pre, fts, {"base": base, "scaling": 1.0})
    for s in (0.0, 0.45, 1.7):
        out = method(pre, fts, {"base": base, "scaling": s})
        for key in SHAPES:
            torch.testing.assert_close(out[key], pre[key] + s * (one[key] - pre[key]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_preserved_no_nan(dtype):
    pre, fts = make_models(dtype=dtype)
    out = merge("dare", pre, fts, {"drop_rate": 0.9})
    for key in SHAPES:
        assert out[key].dtype == dtype and torch.isfinite(out[key].float()).all()
    assert torch.equal(out["position_ids"], pre["position_ids"])


@pytest.mark.parametrize("hparams", [{"drop_rate": 1.0}, {"drop_rate": -0.1}, {"base": "tsv"},
                                     {"k": 0}, {"seed": 1.5}])
def test_bad_hyperparameters_raise(hparams):
    pre, fts = make_models()
    with pytest.raises(ValueError):
        merge("dare", pre, fts, hparams)


@pytest.mark.parametrize("block", [7, 1 << 22])
@pytest.mark.parametrize("shape", [(5,), (33, 17), (4, 3, 9), ()])
def test_mask_draw_is_the_official_draw_without_its_int64_tensor(monkeypatch, shape, block):
    """The bool mask drawn block by block equals randint(2, shape).bernoulli(1 − p), and leaves the
    generator where the official draw does (the next key's mask depends on it)."""
    from taskmerge.merging import primitives
    monkeypatch.setattr(primitives, "_ADVANCE_BLOCK", block)
    official, ours = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(2):
        want = torch.randint(2, shape, generator=official).bernoulli(0.7, generator=official)
        got = primitives._draw_dare_mask(shape, 0.3, ours)
        assert got.dtype == torch.bool and torch.equal(got, want.bool())
        assert torch.equal(ours.get_state(), official.get_state())
