"""LiNeS: β=0, α=1 is its base; the layer scaling and the multi-task α by hand; depth from names or a mapping."""
import pytest
import torch

from taskmerge.merging import get_method, merge
from taskmerge.merging.lines import block_of, layer_scales


def models(num_tasks=3, blocks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = {"embed.weight": torch.randn(7, 4, generator=g)}
    for i in range(blocks):
        pre[f"enc.layers.{i}.fc.weight"] = torch.randn(4, 4, generator=g)
        pre[f"enc.layers.{i}.fc.bias"] = torch.randn(4, generator=g)
    pre["norm.weight"] = torch.randn(4, generator=g)
    pre["position_ids"] = torch.arange(5)
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in pre.items()} for _ in range(num_tasks)]
    return pre, fts


@pytest.mark.parametrize("base,params", [("task_arithmetic", ""), ("task_arithmetic", "scaling=0.3"),
                                         ("ties", "k=50"), ("consensus", "min_tasks=2,scaling=0.7"),
                                         ("tsv_m", "")])
def test_beta_zero_alpha_one_is_the_base(base, params):
    pre, fts = models()
    got = merge("lines", pre, fts, {"base": base, "base_params": params, "alpha": "1", "beta": 0.0})
    want_params = dict(p.split("=") for p in params.split(",") if p)
    linear_in = get_method(base).linear_in
    want_params.setdefault(linear_in, 1.0)  # the base's global scale is 1 unless base_params sets it
    want = merge(base, pre, fts, want_params)
    for k in pre:
        assert torch.equal(got[k], want[k]), k


def test_layer_scaling_by_hand():
    # L = 3 blocks: scales α, α + β/2, α + β in blocks 0, 1, 2; α outside (embedding, final norm)
    pre, fts = models(num_tasks=2)
    alpha, beta = 0.4, 0.6
    out = merge("lines", pre, fts, {"base": "task_arithmetic", "alpha": str(alpha), "beta": beta})
    summed = {k: sum(f[k] - pre[k] for f in fts) for k in pre if pre[k].is_floating_point()}
    expect = {"embed.weight": alpha, "norm.weight": alpha, "enc.layers.0.fc.weight": alpha,
              "enc.layers.1.fc.bias": alpha + beta / 2, "enc.layers.2.fc.weight": alpha + beta}
    for k, c in expect.items():
        torch.testing.assert_close(out[k], pre[k] + c * summed[k], rtol=0, atol=1e-6)
    assert torch.equal(out["position_ids"], pre["position_ids"])


def test_multitask_alpha_rule():
    # task arithmetic: u = Σ τ_t, so α = ‖Σ τ‖₁ / (T ‖u‖₁) = 1/T; with β = 0 every layer is the task average
    pre, fts = models(num_tasks=4)
    out = merge("lines", pre, fts, {"base": "task_arithmetic", "beta": 0.0})
    mean = merge("average", pre, fts)
    for k in pre:
        torch.testing.assert_close(out[k], mean[k], rtol=0, atol=1e-6)
    # TIES: α = ‖Σ τ‖₁ / (T ‖τ_ties‖₁), by hand on one tensor
    pre = {"w": torch.zeros(3)}
    fts = [{"w": torch.tensor([1.0, -2.0, 0.0])}, {"w": torch.tensor([3.0, 1.0, 4.0])}]
    # k=100: no trim; γ = [+, −, +]; disjoint mean u = [2, −2, 4]; ‖Σ τ‖₁ = 4 + 1 + 4 = 9; α = 9 / (2·8)
    out = merge("lines", pre, fts, {"base": "ties", "base_params": "k=100", "beta": 0.0})
    torch.testing.assert_close(out["w"], 9 / 16 * torch.tensor([2.0, -2.0, 4.0]))


def test_depth_from_names_and_from_a_mapping():
    assert block_of("visual.transformer.resblocks.11.attn.in_proj_weight") == 11
    assert block_of("model.layers.3.mlp.experts.7.w1.weight") == 3
    assert block_of("embeddings.position_embedding.weight") is None
    keys = ["b.0.w", "b.1.w", "b.5.w", "head.w"]
    assert layer_scales(keys, 0.1, 1.0) == {"b.0.w": 0.1, "b.1.w": 0.1 + 0.2, "b.5.w": 1.1, "head.w": 0.1}
    assert layer_scales(keys, 0.1, 1.0, num_blocks=2) == {"b.0.w": 0.1, "b.1.w": 1.1, "b.5.w": 0.1, "head.w": 0.1}
    by_family = layer_scales(keys, 0.0, 1.0, depths={"head.w": 2, "b.0.w": 0})
    assert by_family == {"b.0.w": 0.0, "b.1.w": 0.0, "b.5.w": 0.0, "head.w": 1.0}
    assert layer_scales(["a.0.w", "b"], 0.5, 1.0) == {"a.0.w": 0.5, "b": 0.5}  # one block: L − 1 = 0


def test_depths_context_reaches_the_method():
    pre, fts = models(num_tasks=2)
    depths = {"embed.weight": 1}  # only the embedding is "deep": everything else gets α
    out = merge("lines", pre, fts, {"alpha": "0", "beta": 1.0}, depths=depths)
    for k in pre:
        want = fts[0][k] + fts[1][k] - pre[k] if k == "embed.weight" else pre[k]
        torch.testing.assert_close(out[k], want, rtol=0, atol=1e-6)


def test_bad_inputs_fail_clearly():
    pre, fts = models(num_tasks=2)
    with pytest.raises(ValueError, match="lines: .*no hyperparameter kk"):
        merge("lines", pre, fts, {"base": "ties", "base_params": "kk=3"})
    with pytest.raises(ValueError, match="does not produce one merged model"):
        merge("lines", pre, fts, {"base": "tall_mask"})
    with pytest.raises(ValueError, match="needs stats"):
        merge("lines", pre, fts, {"base": "regmean"})
    with pytest.raises(ValueError, match="alpha='x'"):
        merge("lines", pre, fts, {"alpha": "x"})
    with pytest.raises(ValueError, match="unknown merging method"):
        merge("lines", pre, fts, {"base": "nope"})
