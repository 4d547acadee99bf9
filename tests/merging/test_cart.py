"""CART (Choi et al., "Revisiting Weight Averaging for Model Merging"): invariants and a hand example."""
import pytest
import torch

from taskmerge.merging import get_method, merge
from taskmerge.merging.cart import cart_rank


def make_models(num_tasks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = {"attn.weight": torch.randn(8, 6, generator=g), "attn.bias": torch.randn(8, generator=g),
           "mlp.weight": torch.randn(5, 9, generator=g), "ln.weight": torch.ones(6), "position_ids": torch.arange(3)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in pre.items()} for _ in range(num_tasks)]
    return pre, fts


@pytest.mark.parametrize("scaling", [0.3, 2.0, -1.0])
def test_full_rank_is_weight_averaging_whatever_lambda(scaling):
    # At ρ = 1, lowrank(τ_t − τ̄) = τ_t − τ̄, so θ = θ0 + τ̄ + λ(Σ_t τ_t − T τ̄) = θ0 + τ̄: CART equals task
    # arithmetic at λ_TA = 1/T (the official code's "AVG" = its "TA" with prior 1/T), for *every* CART λ.
    # It does not equal TA at the same λ: the official CART adds λ to the centred parts only, which sum to zero.
    pre, fts = make_models(3)
    out = merge("cart", pre, fts, {"rank_fraction": 1.0, "scaling": scaling})
    ta = merge("task_arithmetic", pre, fts, {"scaling": 1 / 3})
    for key in pre:
        torch.testing.assert_close(out[key], ta[key], atol=2e-6, rtol=0)  # SVD reconstruction error only


def test_low_rank_makes_lambda_matter():
    pre, fts = make_models(3)
    a = merge("cart", pre, fts, {"rank_fraction": 0.2, "scaling": 0.5})
    b = merge("cart", pre, fts, {"rank_fraction": 0.2, "scaling": 2.0})
    avg = merge("average", pre, fts)
    assert (a["attn.weight"] - b["attn.weight"]).abs().max() > 1e-3
    for key in ("attn.bias", "ln.weight"):  # not truncated: θ0 + τ̄ for any λ
        torch.testing.assert_close(a[key], avg[key])
        torch.testing.assert_close(b[key], avg[key])
    # affine in λ: θ(λ) = θ(0) + λ·L
    zero = merge("cart", pre, fts, {"rank_fraction": 0.2, "scaling": 0.0})
    torch.testing.assert_close(b["attn.weight"] - zero["attn.weight"], 4 * (a["attn.weight"] - zero["attn.weight"]),
                               atol=1e-6, rtol=1e-5)


def test_hand_computed():
    # 2x2, T = 3, ρ = 0.5 → r = max(1, int(0.5·2)) = 1.
    # τ1 = diag(4, 0), τ2 = diag(0, 4), τ3 = diag(2, −1) → τ̄ = diag(2, 1).
    # τ1 − τ̄ = diag(2, −1) → rank 1: diag(2, 0);  τ2 − τ̄ = diag(−2, 3) → diag(0, 3);
    # τ3 − τ̄ = diag(0, −2) → diag(0, −2).  L = diag(2, 1).
    # λ = 2: θ = θ0 + diag(2, 1) + 2·diag(2, 1) = θ0 + diag(6, 3). The bias is θ0 + τ̄ = (2 + 0 + 5)/3.
    pre = {"w": torch.zeros(2, 2), "b": torch.zeros(1)}
    fts = [{"w": torch.diag(torch.tensor([4.0, 0.0])), "b": torch.tensor([2.0])},
           {"w": torch.diag(torch.tensor([0.0, 4.0])), "b": torch.tensor([0.0])},
           {"w": torch.diag(torch.tensor([2.0, -1.0])), "b": torch.tensor([5.0])}]
    out = merge("cart", pre, fts, {"rank_fraction": 0.5, "scaling": 2.0}, kinds=None)
    torch.testing.assert_close(out["w"], torch.diag(torch.tensor([6.0, 3.0])), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["b"], torch.tensor([7.0 / 3]))
    zero_rank = merge("cart", pre, fts, {"rank_fraction": 0.0, "scaling": 2.0})  # official ρ = 0: θ0 + τ̄
    torch.testing.assert_close(zero_rank["w"], torch.diag(torch.tensor([2.0, 1.0])))


def test_rank_rule_and_scope():
    assert cart_rank(768, 0.12) == 92 and cart_rank(5, 0.12) == 1 and cart_rank(5, 1.0) == 5 and cart_rank(5, 0.0) == 0
    pre, fts = make_models(3)
    kinds = {"attn.weight": "linear", "mlp.weight": "other", "attn.bias": "linear", "ln.weight": "norm"}
    out = merge("cart", pre, fts, {"rank_fraction": 0.2, "scaling": 2.0}, kinds=kinds)
    avg = merge("average", pre, fts)
    torch.testing.assert_close(out["mlp.weight"], avg["mlp.weight"])          # kind "other": not truncated
    assert (out["attn.weight"] - avg["attn.weight"]).abs().max() > 1e-3
    assert torch.equal(out["position_ids"], pre["position_ids"])


def test_search_cache_gives_the_same_merge():
    pre, fts = make_models(3)
    cache = {}
    method = get_method("cart")
    for scaling in (0.5, 1.5):
        cached = method(pre, fts, {"rank_fraction": 0.2, "scaling": scaling}, cache=cache)
        plain = method(pre, fts, {"rank_fraction": 0.2, "scaling": scaling})
        for key in pre:
            assert torch.equal(cached[key], plain[key])
    (store,) = cache.values()
    assert set(store) == {"attn.weight", "mlp.weight"}  # L of the two 2-D weights, built once for both λ
    method(pre, fts, {"rank_fraction": 0.5, "scaling": 1.0}, cache=cache)
    assert len(cache) == 1  # a new rank_fraction replaces the old one's L (memory: one model's 2-D weights)
    assert method.linear_in is None  # θ0 + τ̄ + λL is affine in λ
