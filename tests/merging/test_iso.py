"""Iso-C / Iso-CTS (Marczak et al., ICML 2025): invariants and hand-computed examples."""
import pytest
import torch

from taskmerge.merging import get_method, merge
from taskmerge.merging.iso_cts import subspace_sizes


def make_models(num_tasks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = {"layer.weight": torch.randn(7, 5, generator=g), "layer.bias": torch.randn(7, generator=g),
           "wide.weight": torch.randn(4, 9, generator=g), "big.weight": torch.randn(10, 8, generator=g), "conv.weight": torch.randn(2, 3, 2, 2, generator=g),
           "text_projection": torch.randn(5, 3, generator=g), "position_ids": torch.arange(4)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in pre.items()} for _ in range(num_tasks)]
    return pre, fts


def taus(pre, fts, key):
    return [ft[key] - pre[key] for ft in fts]


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_merged_2d_update_has_all_singular_values_equal(method):
    pre, fts = make_models(3)
    alpha = 0.7
    out = merge(method, pre, fts, {"scaling": alpha})
    for key in ("layer.weight", "wide.weight", "big.weight"):
        s = torch.linalg.svdvals(out[key] - pre[key])
        assert s.numel() == min(pre[key].shape)
        torch.testing.assert_close(s, torch.full_like(s, float(s.mean())), rtol=2e-5, atol=1e-6)
    if method == "iso_c":  # σ̄ is the mean singular value of Σ τ_t, times α
        total = torch.stack(taus(pre, fts, "layer.weight")).sum(0)
        s = torch.linalg.svdvals(out["layer.weight"] - pre["layer.weight"])
        torch.testing.assert_close(s.mean(), alpha * torch.linalg.svdvals(total).mean(), rtol=1e-5, atol=0)


def test_iso_c_one_task_is_the_task_with_its_spectrum_flattened():
    pre, fts = make_models(1)
    out = merge("iso_c", pre, fts, {"scaling": 1.0})
    for key in ("layer.weight", "wide.weight"):
        tau = fts[0][key] - pre[key]
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        delta = out[key] - pre[key]
        # same singular vectors as τ, every singular value the mean: Uᵀ Δ V = σ̄ I
        torch.testing.assert_close(u.T @ delta @ vh.T, s.mean() * torch.eye(s.numel()), atol=2e-6, rtol=0)
    for key in ("layer.bias", "conv.weight", "text_projection"):  # not SVD'd: the (one) task vector itself
        torch.testing.assert_close(out[key], fts[0][key])
    assert torch.equal(out["position_ids"], pre["position_ids"])


def test_iso_c_hand_computed():
    # τ1 = 2·e1e2ᵀ, τ2 = e2e1ᵀ: Σ = [[0,2],[1,0]] = 2·e1e2ᵀ + 1·e2e1ᵀ, σ = (2, 1), σ̄ = 1.5,
    # U Vᵀ = e1e2ᵀ + e2e1ᵀ = [[0,1],[1,0]]  →  Δ = 1.5·[[0,1],[1,0]]; with α = 2: θ = θ0 + [[0,3],[3,0]].
    # The bias (1-D) takes the mean: ((1) + (3))/2 = 2, times α = 4.
    pre = {"w": torch.ones(2, 2), "b": torch.zeros(1)}
    fts = [{"w": pre["w"] + torch.tensor([[0.0, 2.0], [0.0, 0.0]]), "b": torch.tensor([1.0])},
           {"w": pre["w"] + torch.tensor([[0.0, 0.0], [1.0, 0.0]]), "b": torch.tensor([3.0])}]
    out = merge("iso_c", pre, fts, {"scaling": 2.0})
    torch.testing.assert_close(out["w"], torch.tensor([[1.0, 4.0], [4.0, 1.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["b"], torch.tensor([4.0]))


def test_iso_c_other_tensors_take_the_mean_and_scaling_is_linear():
    pre, fts = make_models(3)
    one = merge("iso_c", pre, fts, {"scaling": 1.0})
    neg = merge("iso_c", pre, fts, {"scaling": -0.5})
    for key in ("layer.bias", "conv.weight", "text_projection"):
        torch.testing.assert_close(one[key], pre[key] + torch.stack(taus(pre, fts, key)).mean(0))
    for key in pre:
        if pre[key].is_floating_point():
            torch.testing.assert_close(neg[key], pre[key] - 0.5 * (one[key] - pre[key]), atol=1e-6, rtol=1e-6)
    assert get_method("iso_c").linear_in == "scaling" and get_method("iso_cts").linear_in == "scaling"


def test_iso_cts_with_full_common_space_equals_iso_c():
    pre, fts = make_models(3)
    for alpha in (1.0, 0.4):
        c = merge("iso_c", pre, fts, {"scaling": alpha})
        cts = merge("iso_cts", pre, fts, {"scaling": alpha, "common_space_fraction": 1.0})
        for key in pre:
            # polar(U_c) = U_c up to float error: equal to ~1e-7, not bit for bit
            torch.testing.assert_close(cts[key], c[key], atol=2e-6, rtol=0)
    # the default f = 0.8 does use task-specific directions where the rank allows them: k = 8, T = 3 → (5, 1)
    assert subspace_sizes(8, 3, 0.8) == (5, 1)
    default = merge("iso_cts", pre, fts, {"scaling": 1.0})
    c = merge("iso_c", pre, fts, {"scaling": 1.0})
    assert (default["big.weight"] - c["big.weight"]).abs().max() > 1e-3


def test_iso_cts_hand_computed():
    # 4x4, T = 2, f = 0.5: c = int(4·0.5) = 2, s = round(2/2)·2 = 2, so c = 2 and n = 1.
    # τ1 = diag(4, 0, 2, 0), τ2 = diag(0, 4, −0.5, 1): Σ = diag(4, 4, 1.5, 1) → common = span(e1, e2), σ_c = (4, 4).
    # τ1⊥ = diag(0, 0, 2, 0) → top-1: e3, σ = 2;  τ2⊥ = diag(0, 0, −0.5, 1) → top-1: e4, σ = 1.
    # U = [e3, e4, U_c] is orthonormal (polar = itself), V likewise, U Vᵀ = I; σ̄ = (2 + 1 + 4 + 4)/4 = 2.75.
    # Iso-CTS: θ0 + 2.75·I; Iso-C on the same: σ(Σ) = (4, 4, 1.5, 1) → σ̄ = 2.625, θ0 + 2.625·I.
    pre = {"w": torch.zeros(4, 4)}
    fts = [{"w": torch.diag(torch.tensor([4.0, 0.0, 2.0, 0.0]))}, {"w": torch.diag(torch.tensor([0.0, 4.0, -0.5, 1.0]))}]
    cts = merge("iso_cts", pre, fts, {"scaling": 1.0, "common_space_fraction": 0.5})
    c = merge("iso_c", pre, fts, {"scaling": 1.0})
    torch.testing.assert_close(cts["w"], 2.75 * torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(c["w"], 2.625 * torch.eye(4), atol=1e-5, rtol=0)


def test_subspace_sizes_follow_the_official_rounding():
    assert subspace_sizes(6, 3, 0.8) == (3, 1)     # c = 4, s = round(2/3)·3 = 3 → c = 3, n = 1
    assert subspace_sizes(5, 3, 0.8) == (5, 0)     # s = round(1/3)·3 = 0
    assert subspace_sizes(5, 8, 0.2) == (5, 0)     # round(0.5) = 0 (Python rounds half to even)
    assert subspace_sizes(768, 8, 0.8) == (616, 19)  # c = 614, s = round(154/8)·8 = 152
    with pytest.raises(ValueError, match="common_space_fraction"):
        subspace_sizes(6, 8, 0.1)                  # s = round(6/8)·8 = 8 > 6
