"""Model Breadcrumbs (Davari & Belilovsky, ECCV 2024; mergekit sparsify.magnitude_outliers)."""
import pytest
import torch

from taskmerge.merging import merge
from taskmerge.merging.breadcrumbs import add_kept, ascending_ranks, breadcrumbs_mask
from taskmerge.merging.primitives import trim_tasks


def make_models(num_tasks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = {"w": torch.randn(20, 16, generator=g), "b": torch.randn(20, generator=g), "small": torch.randn(7, generator=g),
           "position_ids": torch.arange(4)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in pre.items()} for _ in range(num_tasks)]
    return pre, fts


@pytest.mark.parametrize("density", [0.25, 0.5, 0.75])
def test_gamma_zero_is_magnitude_top_k(density):
    # γ = 0: keep the int(density·n) largest |τ_t| per tensor, i.e. primitives.trim_tasks's per-tensor "exact" top-k
    # (mergekit's and peft's count), then task arithmetic. Random values: no ties at the threshold.
    pre, fts = make_models(3)
    out = merge("breadcrumbs", pre, fts, {"density": density, "gamma": 0.0, "scaling": 0.4})
    for key in ("w", "b", "small"):
        taus = [ft[key] - pre[key] for ft in fts]
        top_k = trim_tasks(taus, density * 100, exact=True).sum(0)
        assert torch.equal(out[key], (pre[key] + 0.4 * top_k))
        assert int(breadcrumbs_mask(taus[0], density, 0.0).sum()) == int(density * taus[0].numel())


def test_mergekit_empty_slice_flag_reproduces_mergekit():
    # mergekit's sorted[bottom:-top] is empty when top = int(γ·n) = 0: the whole τ is dropped (tensor stays θ0).
    pre, fts = make_models(3)
    at_zero = merge("breadcrumbs", pre, fts, {"density": 0.5, "gamma": 0.0, "mergekit_empty_slice": True})
    for key in pre:
        assert torch.equal(at_zero[key], pre[key])
    # γ = 0.01: int(0.01·320) = 3 for w (kept as usual), int(0.01·20) = 0 for b and small (dropped)
    flagged = merge("breadcrumbs", pre, fts, {"density": 0.5, "gamma": 0.01, "mergekit_empty_slice": True})
    fixed = merge("breadcrumbs", pre, fts, {"density": 0.5, "gamma": 0.01})
    assert torch.equal(flagged["w"], fixed["w"])
    assert torch.equal(flagged["b"], pre["b"]) and not torch.equal(fixed["b"], pre["b"])


def test_hand_computed():
    # n = 10, density 0.5, γ 0.1: keep = 5, top = 1, bottom = 10 − 5 − 1 = 4.
    # |τ| ascending: .05 .1 .15 .2 | .25 .3 .35 .4 .5 | 2.0 → drop the four smallest and the largest.
    tau = torch.tensor([0.1, -0.5, 0.3, 2.0, -0.05, 0.2, 0.4, -0.25, 0.15, 0.35])
    kept = torch.tensor([0.0, -0.5, 0.3, 0.0, 0.0, 0.0, 0.4, -0.25, 0.0, 0.35])
    pre = {"w": torch.zeros(10)}
    out = merge("breadcrumbs", pre, [{"w": tau}, {"w": 2 * tau}], {"density": 0.5, "gamma": 0.1, "scaling": 0.5})
    torch.testing.assert_close(out["w"], 0.5 * (kept + 2 * kept))  # θ0 + α Σ_t τ̂_t
    # density wins over γ: density 0.95, γ 0.2 → keep 9, top 2, bottom −1 → top 1, bottom 0: only 2.0 dropped
    assert torch.equal(breadcrumbs_mask(tau, 0.95, 0.2), tau.abs() < 2.0)
    assert bool(breadcrumbs_mask(tau, 1.0, 0.2).all())  # density ≥ 1: τ kept whole (mergekit)


def test_row_scope_ranks_each_last_dimension_row():
    # rows of 4, density 0.5, γ 0.25: keep 2, top 1, bottom 1 → each row keeps its 2nd and 3rd largest:
    # row 0 keeps −3 and 2, row 1 keeps −0.2 and 0.3.
    tau = torch.tensor([[4.0, 1.0, -3.0, 2.0], [0.1, 0.4, -0.2, 0.3]])
    want = torch.tensor([[False, False, True, True], [False, False, True, True]])
    assert torch.equal(breadcrumbs_mask(tau, 0.5, 0.25, scope="row"), want)
    # per tensor (n = 8): keep 4, top 2, bottom 2 → |τ| ranks 2…5: 0.3, 0.4, 1.0, 2.0
    assert torch.equal(breadcrumbs_mask(tau, 0.5, 0.25), torch.tensor([[False, True, False, True],
                                                                       [False, True, False, True]]))


def test_density_one_is_task_arithmetic_and_scaling_is_linear():
    pre, fts = make_models(3)
    out = merge("breadcrumbs", pre, fts, {"density": 1.0, "gamma": 0.01, "scaling": 0.3})
    ta = merge("task_arithmetic", pre, fts, {"scaling": 0.3})
    for key in pre:
        assert torch.equal(out[key], ta[key])
    one = merge("breadcrumbs", pre, fts, {"scaling": 1.0})
    neg = merge("breadcrumbs", pre, fts, {"scaling": -0.5})
    torch.testing.assert_close(neg["w"], pre["w"] - 0.5 * (one["w"] - pre["w"]))


def test_bad_scope_raises():
    with pytest.raises(ValueError, match="scope"):
        merge("breadcrumbs", {"w": torch.zeros(3)}, [{"w": torch.ones(3)}], {"scope": "layer"})


def stable_sort_mask(tau, density, gamma):
    # the definition: ranks of the stable sort of the whole tensor, kept in [bottom, n − top)
    n = tau.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = n - keep - top
    if bottom < 0:
        top, bottom = top + bottom, 0
    ranks = ascending_ranks(tau.reshape(1, -1)).reshape(tau.shape)
    return (ranks >= bottom) & (ranks < n - top)


@pytest.mark.parametrize("shape", [(1,), (7,), (20, 16), (13, 7), (4, 3, 5), (1, 50)])
@pytest.mark.parametrize("values", ["normal", "quarters", "signs", "zeros"])
def test_tensor_scope_selection_equals_the_stable_sort(shape, values):
    # the tensor scope selects without sorting; ties at either boundary (and both boundaries equal:
    # "signs", "zeros") are split by position exactly as the stable sort splits them
    g = torch.Generator().manual_seed(len(shape))
    tau = {"normal": torch.randn(shape, generator=g), "quarters": torch.randint(-3, 4, shape, generator=g) / 4,
           "signs": torch.randint(-1, 2, shape, generator=g).float(), "zeros": -torch.zeros(shape)}[values]
    for density in (0.01, 0.15, 0.5, 0.9, 0.99):
        for gamma in (0.0, 0.006, 0.1, 0.3):
            want = stable_sort_mask(tau, density, gamma)
            for chunk_rows in (None, 1, 2, 3):  # one chunk, and runs of boundary values cut across chunks
                assert torch.equal(breadcrumbs_mask(tau, density, gamma, chunk_rows=chunk_rows), want)


@pytest.mark.parametrize("scope", ["tensor", "row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_added_row_chunk_by_row_chunk_equals_the_whole_tensor(scope, dtype):
    """add_kept recomputes τ per row chunk at every pass: the same bits as the whole-tensor arithmetic."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(37, 11, generator=g).to(dtype)
    thetas = [(base.float() + torch.randint(-2, 3, (37, 11), generator=g) / 8).to(dtype) for _ in range(3)]
    want = None
    for theta in thetas:
        tau = theta.float() - base.float()
        kept = tau * breadcrumbs_mask(tau, 0.4, 0.05, scope)
        want = kept if want is None else want + kept
    for chunk_rows in (None, 1, 4, 36):
        got = None
        for theta in thetas:
            got = add_kept(got, theta, base, 0.4, 0.05, scope, chunk_rows=chunk_rows)
        assert got.dtype == torch.float32 and torch.equal(got, want)
    assert add_kept(None, torch.zeros(3, 0), torch.zeros(3, 0), 0.4, 0.05).shape == (3, 0)


def test_masked_task_vectors_are_summed_like_a_stack():
    # the merge accumulates τ_t ⊙ m_t one task at a time: the same values as summing their stack
    g = torch.Generator().manual_seed(7)
    pre = {"w": torch.randn(64, 33, generator=g)}
    fts = [{"w": pre["w"] + 0.1 * torch.randn(64, 33, generator=g)} for _ in range(4)]
    taus = [f["w"] - pre["w"] for f in fts]
    want = torch.stack([t * breadcrumbs_mask(t, 0.3, 0.05) for t in taus]).sum(0)
    got = merge("breadcrumbs", pre, fts, {"density": 0.3, "gamma": 0.05, "scaling": 1.0})["w"] - pre["w"]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert torch.equal(merge("breadcrumbs", pre, fts, {"density": 0.3, "gamma": 0.05, "scaling": 1.0})["w"],
                       pre["w"] + want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_ranks_from_the_bits_equal_the_float_sort(dtype):
    # |x| sorted as integers of its bits: zeros of both signs, infinities, subnormals and ties included
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, -1e-40, 2.0, -2.0, 2.0, 1e-3])
    rows = torch.cat([special, torch.randn(54, generator=torch.Generator().manual_seed(0))]).to(dtype)
    rows = torch.stack([rows, rows.flip(0), rows.round()])
    order = torch.sort(rows.abs().double(), dim=-1, stable=True).indices
    want = torch.empty_like(order).scatter_(-1, order, torch.arange(rows.shape[-1]).expand_as(order))
    assert torch.equal(ascending_ranks(rows), want)
