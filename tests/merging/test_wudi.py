"""WUDI: the closed-form gradient is the official loss's, orthogonal tasks do not move, the loss minimiser
is reached, one Adam step by hand, layouts of q/k/v, which tensors move."""
import pytest
import torch

from taskmerge.merging import merge
from taskmerge.merging.wudi import wudi_matrix


def official_reference(taus, iterations, lr):
    """The official loop, autograd on Σ_t ‖(τ_m − τ_t) τ_tᵀ‖² / ‖τ_t‖² (written from the paper's equation)."""
    vectors = torch.stack(taus)
    merged = torch.nn.Parameter(vectors.sum(0))
    opt = torch.optim.Adam([merged], lr=lr, weight_decay=0)
    norms = vectors.flatten(1).norm(dim=1).square()
    for _ in range(iterations):
        loss = (((merged.unsqueeze(0) - vectors) @ vectors.transpose(1, 2)).square() / norms.view(-1, 1, 1)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return merged.detach()


@pytest.mark.parametrize("shape", [(6, 4), (4, 10), (2, 20)])  # Gram form (tall, wide), per-task form
def test_matches_the_official_loss_under_autograd(shape):
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(shape, generator=g) for _ in range(3)]
    got = wudi_matrix(taus, iterations=50, lr=1e-2)
    want = official_reference(taus, iterations=50, lr=1e-2)
    assert not torch.allclose(got, sum(taus), atol=1e-2)  # it moved
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_hand_computed_step_and_minimiser():
    # τ1 = [1, 0], τ2 = [1, 1] (1×2): ∇ at Σ τ = [2, 1] is 2[(Σ−τ1)τ1ᵀτ1/1 + (Σ−τ2)τ2ᵀτ2/2] = [3, 1],
    # so Adam's first step is −lr·sign(∇); L's minimiser solves τ_m A = B, A = [[1.5, .5], [.5, .5]], B = [2, 1]
    taus = [torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])]
    torch.testing.assert_close(wudi_matrix(taus, iterations=1, lr=1e-3), torch.tensor([[2 - 1e-3, 1 - 1e-3]]))
    torch.testing.assert_close(wudi_matrix(taus, iterations=3000, lr=1e-2), torch.tensor([[1.0, 1.0]]),
                               atol=1e-3, rtol=0)
    # orthogonal task vectors do not interfere: ∇ = 0, τ_m stays Σ τ
    ortho = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])]
    assert torch.equal(wudi_matrix(ortho, iterations=20, lr=1e-1), torch.tensor([[1.0, 2.0]]))
    assert torch.equal(wudi_matrix(taus, iterations=0), torch.tensor([[2.0, 1.0]]))


def clip_like(seed=0, tasks=3):
    g = torch.Generator().manual_seed(seed)
    d = 4
    pre = {"tok.embed.weight": torch.randn(9, d, generator=g), "blocks.0.attn.in_proj_weight": torch.randn(3 * d, d, generator=g),
           "blocks.0.attn.in_proj_bias": torch.randn(3 * d, generator=g), "blocks.0.mlp.c_fc.weight": torch.randn(8, d, generator=g),
           "ln.weight": torch.ones(d)}
    fts = [{k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(tasks)]
    return pre, fts


def test_only_linear_weights_move_and_the_rest_is_theta0_or_average():
    pre, fts = clip_like()
    out = merge("wudi", pre, fts, {"iterations": 5, "lr": 1e-2})
    for k in ("tok.embed.weight", "blocks.0.attn.in_proj_bias", "ln.weight"):
        assert torch.equal(out[k], pre[k]), k
    taus = [f["blocks.0.mlp.c_fc.weight"] - pre["blocks.0.mlp.c_fc.weight"] for f in fts]
    torch.testing.assert_close(out["blocks.0.mlp.c_fc.weight"] - pre["blocks.0.mlp.c_fc.weight"],
                               wudi_matrix(taus, 5, 1e-2), rtol=0, atol=1e-6)
    avg = merge("wudi", pre, fts, {"iterations": 5, "lr": 1e-2, "others": "average"})
    mean = merge("average", pre, fts)
    torch.testing.assert_close(avg["ln.weight"], mean["ln.weight"])
    assert torch.equal(avg["blocks.0.mlp.c_fc.weight"], out["blocks.0.mlp.c_fc.weight"])


def test_qkv_layouts():
    pre, fts = clip_like()
    key = "blocks.0.attn.in_proj_weight"
    taus = [f[key] - pre[key] for f in fts]
    stacked = merge("wudi", pre, fts, {"iterations": 20, "lr": 1e-2})[key] - pre[key]
    split = merge("wudi", pre, fts, {"iterations": 20, "lr": 1e-2, "qkv": "split"})[key] - pre[key]
    torch.testing.assert_close(stacked, wudi_matrix(taus, 20, 1e-2), rtol=0, atol=1e-6)
    apart = torch.cat([wudi_matrix([t.chunk(3)[i] for t in taus], 20, 1e-2) for i in range(3)])
    torch.testing.assert_close(split, apart, rtol=0, atol=1e-6)
    assert not torch.allclose(stacked, split, atol=1e-4)
    # an HF layout: q/k/v apart (as_stored) or stacked into the open_clip matrix (stacked)
    hf = lambda sd: {"attn.q_proj.weight": sd[key][:4], "attn.k_proj.weight": sd[key][4:8],  # noqa: E731
                     "attn.v_proj.weight": sd[key][8:]}
    hf_pre, hf_fts = hf(pre), [hf(f) for f in fts]
    as_one = merge("wudi", hf_pre, hf_fts, {"iterations": 20, "lr": 1e-2, "qkv": "stacked"})
    as_three = merge("wudi", hf_pre, hf_fts, {"iterations": 20, "lr": 1e-2})
    for i, name in enumerate(("q", "k", "v")):
        k = f"attn.{name}_proj.weight"
        torch.testing.assert_close(as_one[k] - hf_pre[k], stacked[4 * i:4 * i + 4], rtol=0, atol=1e-6)
        torch.testing.assert_close(as_three[k] - hf_pre[k], split[4 * i:4 * i + 4], rtol=0, atol=1e-6)
    bert = lambda sd: {f"self.{n}.weight": sd[f"attn.{n[0]}_proj.weight"] for n in ("query", "key", "value")}  # noqa: E731
    as_bert = merge("wudi", bert(hf_pre), [bert(f) for f in hf_fts], {"iterations": 20, "lr": 1e-2, "qkv": "stacked"})
    for k, v in bert(as_one).items():
        assert torch.equal(as_bert[k], v), k


def test_a_zero_task_vector_drops_out():
    taus = [torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2), torch.tensor([[1.0, 1.0]])]
    out = wudi_matrix(taus, iterations=10, lr=1e-2)
    assert torch.isfinite(out).all()
    assert torch.equal(out, wudi_matrix([taus[0], taus[2]], iterations=10, lr=1e-2))
