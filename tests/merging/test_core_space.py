"""Core Space: lossless bases, inner task arithmetic = dense LoRA task arithmetic (mixed ranks too),
the docstring's equation, inner merges through the registry."""
import pytest
import torch

from taskmerge.merging import merge
from taskmerge.merging.core_space import core_matrices
from taskmerge.merging.lora import LoraFactors

SHAPES = {"blk.0.q": (6, 5), "blk.0.fc": (4, 7)}


def setup(ranks=(2, 2, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = {f"{m}.weight": torch.randn(*s, generator=g) for m, s in SHAPES.items()}
    pre["blk.0.fc.bias"] = torch.randn(4, generator=g)
    adapters = [{m: LoraFactors(torch.randn(r, i, generator=g), torch.randn(o, r, generator=g), 8 / r)
                 for m, (o, i) in SHAPES.items()} for r in ranks]
    return pre, adapters


def dense_task_arithmetic(pre, adapters, scaling):
    return {k: v + scaling * sum(a[k[:-7]].delta() for a in adapters) if k[:-7] in SHAPES else v
            for k, v in pre.items()}


@pytest.mark.parametrize("ranks", [(2, 2, 2), (1, 3, 4)])
def test_inner_task_arithmetic_is_dense_lora_task_arithmetic(ranks):
    pre, adapters = setup(ranks)
    out = merge("core_space", pre, adapters, {"inner": "task_arithmetic", "scaling": 0.7})
    want = dense_task_arithmetic(pre, adapters, 0.7)
    for k in pre:
        torch.testing.assert_close(out[k], want[k], rtol=1e-5, atol=1e-5)
    lora_ta = merge("lora_merge", pre, adapters, {"inner": "task_arithmetic", "merge": "sum", "scaling": 0.7})
    for k in pre:
        torch.testing.assert_close(out[k], lora_ta[k], rtol=1e-5, atol=1e-5)


def test_bases_are_lossless_with_mixed_ranks():
    _, adapters = setup((1, 3, 4))
    factors = [a["blk.0.q"] for a in adapters]
    u_b, vh_a, cores = core_matrices(factors)
    assert u_b.shape == (6, 6) and vh_a.shape == (5, 5) and all(c.shape == (6, 5) for c in cores)  # Σr = 8
    torch.testing.assert_close(u_b.T @ u_b, torch.eye(6), atol=1e-5, rtol=0)
    for f, c in zip(factors, cores):
        torch.testing.assert_close(u_b @ c @ vh_a, f.delta(), atol=1e-4, rtol=1e-5)  # U_B M_t V_Aᵀ = ΔW_t


@pytest.mark.parametrize("inner,params", [("task_arithmetic", ""), ("ties", "k=100"), ("tsv_m", ""),
                                          ("average", ""), ("dare_ties", "k=100,drop_rate=0")])
def test_one_adapter_at_scale_one_is_w0_plus_its_update(inner, params):
    pre, adapters = setup((3,))
    out = merge("core_space", pre, adapters, {"inner": inner, "inner_params": params, "scaling": 1.0})
    want = dense_task_arithmetic(pre, adapters, 1.0)
    for k in pre:
        torch.testing.assert_close(out[k], want[k], rtol=1e-4, atol=1e-4)


def test_the_docstring_equation_with_ties_in_core_space():
    # W = W0 + λ U_B · TIES(M_1 … M_T) · V_Aᵀ with M_t = U_Bᵀ s_t B_t A_t V_A, U_B/V_A from the stacked factors
    pre, adapters = setup((2, 1, 3))
    hp = {"inner": "ties", "inner_params": "k=30,trim_scope=per_tensor", "scaling": 0.5}
    out = merge("core_space", pre, adapters, hp)
    for module in SHAPES:
        f = [a[module] for a in adapters]
        b_stack = torch.cat([x.B.double() * x.scale for x in f], dim=1)
        a_stack = torch.cat([x.A.double() for x in f], dim=0)
        u_b = torch.linalg.svd(b_stack, full_matrices=False)[0]
        v_a = torch.linalg.svd(a_stack, full_matrices=False)[2].T
        cores = [(u_b.T @ x.delta().double() @ v_a).float() for x in f]
        key = module + ".weight"
        tied = merge("ties", {key: torch.zeros_like(cores[0])}, [{key: c} for c in cores],
                     {"k": 30, "trim_scope": "per_tensor", "scaling": 1.0})[key]
        torch.testing.assert_close(out[key], pre[key] + 0.5 * (u_b.float() @ tied @ v_a.T.float()),
                                   rtol=1e-4, atol=1e-4)
    assert torch.equal(out["blk.0.fc.bias"], pre["blk.0.fc.bias"])
    dense_ties = merge("lora_merge", pre, adapters, {"inner": "ties", "k": 30, "scaling": 0.5})
    assert not torch.allclose(out["blk.0.q.weight"], dense_ties["blk.0.q.weight"], atol=1e-3)  # not the dense merge


def test_unknown_or_unsuitable_inner_fails_clearly():
    pre, adapters = setup()
    with pytest.raises(ValueError, match="core_space: unknown merging method 'nope'"):
        merge("core_space", pre, adapters, {"inner": "nope"})
    with pytest.raises(ValueError, match="core_space: .*regmean.* needs stats"):
        merge("core_space", pre, adapters, {"inner": "regmean"})
    with pytest.raises(ValueError, match="no hyperparameter kk"):
        merge("core_space", pre, adapters, {"inner": "ties", "inner_params": "kk=1"})


def test_hand_computed_cores():
    # A_stack = diag(1, 2): V_A's rows are ±e2 (σ 2), ±e1 (σ 1); B_stack = diag(3, 1): U_B's columns ±e1, ±e2.
    # ΔW_1 = 3 e1e1ᵀ → M_1 = ±3 at (0, 1); ΔW_2 = 2 e2e2ᵀ → M_2 = ±2 at (1, 0) (signs: the SVD's choice)
    f1 = LoraFactors(torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0], [0.0]]), 1.0)
    f2 = LoraFactors(torch.tensor([[0.0, 2.0]]), torch.tensor([[0.0], [1.0]]), 1.0)
    u_b, vh_a, (m1, m2) = core_matrices([f1, f2])
    torch.testing.assert_close(m1.abs(), torch.tensor([[0.0, 3.0], [0.0, 0.0]]))
    torch.testing.assert_close(m2.abs(), torch.tensor([[0.0, 0.0], [2.0, 0.0]]))
    torch.testing.assert_close(vh_a.abs(), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    torch.testing.assert_close(u_b.abs(), torch.eye(2))
