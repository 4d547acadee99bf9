"""OPCM and the continual baselines: invariants and hand-computed steps (specs/methods.md §5)."""
import pytest
import torch

from taskmerge.merging import get_method, merge
from taskmerge.merging.opcm import crossing_rank, project_update


def steps_of(name, pre, fts, **hp):
    return list(get_method(name).steps(pre, fts, hp))


def make_models(num_tasks=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    pre = {"fc.weight": torch.randn(6, 5, generator=g), "fc.bias": torch.randn(6, generator=g),
           "emb.class_embedding": torch.randn(5, generator=g), "ln.weight": torch.ones(5),
           "position_ids": torch.arange(4)}
    fts = [{k: (v + torch.randn(v.shape, generator=g) * 0.1 if v.is_floating_point() else v.clone())
            for k, v in pre.items()} for _ in range(num_tasks)]
    cast = lambda sd: {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}  # noqa: E731
    return cast(pre), [cast(f) for f in fts]


def tv_norm(sd, pre):
    return sum(float((sd[k].double() - pre[k].double()).pow(2).sum()) for k in pre if pre[k].is_floating_point()) ** .5


def test_registered_sequential():
    for name in ("opcm", "continual_task_arithmetic", "continual_average", "continual_ties"):
        assert get_method(name).sequential
    assert get_method("opcm").defaults == {"alpha": 0.5, "zero_diagonal": True, "official_class_embedding": False}


def test_first_step_returns_first_model_and_steps_match_final():
    pre, fts = make_models(3)
    steps = steps_of("opcm", pre, fts)
    assert len(steps) == 3
    for k in pre:
        assert torch.equal(steps[0][k], fts[0][k])
    final = merge("opcm", pre, fts)
    for k in pre:
        assert torch.equal(final[k], steps[-1][k])
    single = merge("opcm", pre, fts[:1])
    assert all(torch.equal(single[k], fts[0][k]) for k in pre)


def test_crossing_rank():
    s = torch.tensor([3.0, 1.0, 1.0])  # cumulative fractions 0.6, 0.8, 1.0
    assert crossing_rank(s, 0.5) == 0  # first index above 0.5 is 0 → nothing protected (official argmax)
    assert crossing_rank(s, 0.7) == 1
    assert crossing_rank(s, 0.9) == 2
    assert crossing_rank(s, 1.0) == 0  # never strictly above 1
    assert crossing_rank(torch.zeros(3), 0.5) == 0


def test_projection_removes_top_r_subspace():
    g = torch.Generator().manual_seed(3)
    tau_bar, tau = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    u, s, vh = torch.linalg.svd(tau_bar, full_matrices=True)
    for alpha in (0.3, 0.6, 0.9):
        r = crossing_rank(s, alpha)
        for zero_diag in (False, True):
            got = project_update(tau_bar, tau, alpha, zero_diag)
            # official: P = Uᵀ τ V with full U, V; zero P[:r,:r] (and P_ii); τ' = U P Vᵀ
            p = u.T @ tau @ vh.T
            p[:r, :r] = 0
            if zero_diag:
                p.diagonal().fill_(0)
            torch.testing.assert_close(got, u @ p @ vh, atol=1e-5, rtol=1e-5)
            if r:
                assert (u[:, :r].T @ got @ vh[:r].T).abs().max() < 1e-5
    assert [crossing_rank(s, a) for a in (0.3, 0.6, 0.9)] != [0, 0, 0]
    # zero_diagonal changes the result (it also removes u_iᵀ τ v_i for i ≥ r)
    assert not torch.allclose(project_update(tau_bar, tau, 0.6, True), project_update(tau_bar, tau, 0.6, False))


def test_hand_computed_two_steps():
    # θ0 = 0; τ1 = diag(3, 1), τ2 = [[1, 2], [2, 1]]; α = 0.5: s = (3, 1), fractions (0.75, 1) → r = 0.
    # zero_diagonal: P = Uᵀτ2V with U = V = I → P = τ2, diagonal zeroed → τ2' = [[0,2],[2,0]].
    # τ̄ = 1·τ1 + τ2' = [[3,2],[2,1]] (norm √18); avg = (√10 + √10)/2 = √10 → rescale by √10/√18.
    pre = {"w": torch.zeros(2, 2)}
    fts = [{"w": torch.tensor([[3.0, 0.0], [0.0, 1.0]])}, {"w": torch.tensor([[1.0, 2.0], [2.0, 1.0]])}]
    out = merge("opcm", pre, fts, {"alpha": 0.5, "zero_diagonal": True})
    torch.testing.assert_close(out["w"], torch.tensor([[3.0, 2.0], [2.0, 1.0]]) * (10 / 18) ** 0.5)
    # paper commit (diagonal fill was a no-op): τ2' = τ2 → τ̄ = [[4,2],[2,2]] (norm √28), rescale √10/√28
    out = merge("opcm", pre, fts, {"alpha": 0.5, "zero_diagonal": False})
    torch.testing.assert_close(out["w"], torch.tensor([[4.0, 2.0], [2.0, 2.0]]) * (10 / 28) ** 0.5)
    # α = 0.8 → r = 1: P[0,0] zeroed → τ2' = [[0,2],[2,1]] without diagonal zeroing
    out = merge("opcm", pre, fts, {"alpha": 0.8, "zero_diagonal": False})
    torch.testing.assert_close(out["w"], torch.tensor([[3.0, 2.0], [2.0, 2.0]]) * (10 / 21) ** 0.5)


def test_norm_rescale_equals_mean_task_norm():
    pre, fts = make_models(4)
    norms = [tv_norm(f, pre) for f in fts]
    for t, step in enumerate(steps_of("opcm", pre, fts), start=1):
        assert tv_norm(step, pre) == pytest.approx(sum(norms[:t]) / t, rel=1e-5)


def test_alpha_one_without_diagonal_is_rescaled_sequential_sum():
    pre, fts = make_models(3)
    out = merge("opcm", pre, fts, {"alpha": 1.0, "zero_diagonal": False})
    # λ recursion with no projection: direction ∝ Σ τ_t, norm = mean norm
    total = {k: sum(f[k] - pre[k] for f in fts) for k in pre if pre[k].is_floating_point()}
    norms = [tv_norm(f, pre) for f in fts]
    scale = (sum(norms) / 3) / sum(float(v.double().pow(2).sum()) for v in total.values()) ** 0.5
    for k, v in total.items():
        torch.testing.assert_close(out[k], pre[k] + scale * v, atol=1e-5, rtol=1e-5)
    # with zero_diagonal the diagonal is still removed at α = 1
    out_zd = merge("opcm", pre, fts, {"alpha": 1.0, "zero_diagonal": True})
    assert not torch.allclose(out_zd["fc.weight"], out["fc.weight"])


def test_official_class_embedding_keeps_first_model_direction():
    pre, fts = make_models(3)
    out = merge("opcm", pre, fts, {"official_class_embedding": True})
    d0 = fts[0]["emb.class_embedding"] - pre["emb.class_embedding"]
    d = out["emb.class_embedding"] - pre["emb.class_embedding"]
    assert torch.allclose(d / d.norm(), d0 / d0.norm(), atol=1e-5)
    assert d.norm() < d0.norm()  # shrunk by the global rescales
    default = merge("opcm", pre, fts)
    assert not torch.allclose(default["emb.class_embedding"], out["emb.class_embedding"])


def test_kinds_decide_projection():
    pre, fts = make_models(3)
    a = merge("opcm", pre, fts, kinds={"fc.weight": "other"})
    b = merge("opcm", pre, fts, {"alpha": 1.0, "zero_diagonal": False}, kinds={"fc.weight": "other"})
    torch.testing.assert_close(a["fc.weight"], b["fc.weight"])  # not projected: α has no effect


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_preserved_no_nan(dtype):
    pre, fts = make_models(3, dtype=dtype)
    for name in ("opcm", "continual_task_arithmetic", "continual_average", "continual_ties"):
        out = merge(name, pre, fts)
        for k, v in out.items():
            assert v.dtype == pre[k].dtype
            if v.is_floating_point():
                assert torch.isfinite(v.float()).all()
        assert torch.equal(out["position_ids"], pre["position_ids"])


def test_continual_task_arithmetic_steps_and_linear_in():
    pre, fts = make_models(3)
    steps = steps_of("continual_task_arithmetic", pre, fts, scaling=0.3)
    for t, step in enumerate(steps, start=1):
        expect = pre["fc.weight"] + 0.3 * sum(f["fc.weight"] - pre["fc.weight"] for f in fts[:t])
        torch.testing.assert_close(step["fc.weight"], expect)
    one = merge("continual_task_arithmetic", pre, fts, {"scaling": 1.0})
    two = merge("continual_task_arithmetic", pre, fts, {"scaling": 0.4})
    torch.testing.assert_close(two["fc.bias"], pre["fc.bias"] + 0.4 * (one["fc.bias"] - pre["fc.bias"]))


def test_continual_average_is_running_mean():
    pre, fts = make_models(4)
    for t, step in enumerate(steps_of("continual_average", pre, fts), start=1):
        torch.testing.assert_close(step["fc.weight"], torch.stack([f["fc.weight"] for f in fts[:t]]).mean(0))


def test_continual_ties_hand_computed():
    # τ1 = (4, -1, 2, 0.5), c = 0.5 → τ̄1 = (2, -0.5, 1, 0.25). τ2 = (-3, 1, 1, 0.1).
    # k = 50 % per row: row τ̄1 keeps |·| ≥ 1 → (2, 0, 1, 0); row τ2 keeps ≥ 1 → (-3, 1, 1, 0).
    # sum = (-1, 1, 2, 0): signs (-, +, +, 0→majority +); disjoint sum → (-3, 1, 2, 0).
    # τ̄2 = τ̄1 + 0.5·(-3, 1, 2, 0) = (0.5, 0, 2, 0.25).
    pre = {"v": torch.zeros(4)}
    fts = [{"v": torch.tensor([4.0, -1.0, 2.0, 0.5])}, {"v": torch.tensor([-3.0, 1.0, 1.0, 0.1])}]
    steps = steps_of("continual_ties", pre, fts, k=50, merge="sum", scaling=0.5)
    torch.testing.assert_close(steps[0]["v"], torch.tensor([2.0, -0.5, 1.0, 0.25]))
    torch.testing.assert_close(steps[1]["v"], torch.tensor([0.5, 0.0, 2.0, 0.25]))


def test_opcm_order_matters():
    pre, fts = make_models(3)
    a, b = merge("opcm", pre, fts), merge("opcm", pre, fts[::-1])
    assert not torch.allclose(a["fc.weight"], b["fc.weight"])


class Recording(dict):
    """A scratch that remembers the largest tensor it was given for each tensor name."""

    def __init__(self):
        super().__init__()
        self.largest = {}

    def __setitem__(self, item, tensor):
        key = getattr(item, "key", item)
        self.largest[key] = max(self.largest.get(key, 0), tensor.numel())
        super().__setitem__(item, tensor)


def chunk_models(dtype):
    g = torch.Generator().manual_seed(7)
    pre = {"emb.weight": torch.randn(37, 6, generator=g), "fc.weight": torch.randn(9, 6, generator=g),
           "fc.bias": torch.randn(9, generator=g), "ln.weight": torch.ones(6)}
    fts = [{k: v + torch.randn(v.shape, generator=g) * 0.1 for k, v in pre.items()} for _ in range(3)]
    cast = lambda sd: {k: v.to(dtype) for k, v in sd.items()}  # noqa: E731
    return cast(pre), [cast(f) for f in fts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,hp", [("opcm", {}), ("opcm", {"zero_diagonal": False, "alpha": 0.8}),
                                     ("continual_task_arithmetic", {}), ("continual_average", {})])
def test_streamed_row_chunks_equal_whole_keys(name, hp, dtype):
    """Streamed (chunk_numel), the element-wise keys are carried in row chunks: every step's values are the
    whole-key ones, and no whole float32 τ̄ of a chunked key is ever held. The SVD-projected matrix stays whole."""
    pre, fts = chunk_models(dtype)
    kinds = {"emb.weight": "embedding", "fc.weight": "linear"}
    whole = list(get_method(name).steps(pre, fts, hp, kinds=kinds))
    scratch = Recording()
    chunked = list(get_method(name).steps(pre, fts, hp, kinds=kinds, chunk_numel=24, scratch=scratch))
    assert len(whole) == len(chunked) == 3
    for a, b in zip(whole, chunked):
        for k in pre:
            assert a[k].dtype == b[k].dtype == dtype
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=0) if dtype == torch.float32 else \
                torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-2, atol=0)
    assert scratch.largest["emb.weight"] == 4 * 6  # 4 rows of 6 = 24 elements, not 37 × 6
    assert scratch.largest["fc.bias"] == 9  # 1-D tensors have rows of one element: chunks of 9 ≤ 24 → whole
    if name == "opcm":
        assert scratch.largest["fc.weight"] == 9 * 6  # the projected matrix: its SVD needs all of it
    else:
        assert scratch.largest["fc.weight"] == 4 * 6


def test_opcm_streamed_to_disk_in_row_chunks_equals_in_memory(tmp_path):
    """write_merged (the CLI's path) passes chunk_numel: the row-chunked, spilled τ̄ gives the in-memory merge."""
    from taskmerge.io.merge_writer import write_merged
    from taskmerge.io.sharded import ShardedReader
    from taskmerge.merging.inputs import float_keys
    pre, fts = chunk_models(torch.float32)
    kinds = {"emb.weight": "embedding", "fc.weight": "linear"}
    out = write_merged(get_method("opcm"), pre, fts, tmp_path / "out", context={"kinds": kinds}, chunk_numel=24,
                       progress=False)
    merged = ShardedReader(out[0])
    expect = merge("opcm", pre, fts, kinds=kinds)
    for k in float_keys(pre):
        torch.testing.assert_close(merged[k], expect[k], rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["opcm", "continual_task_arithmetic", "continual_average"])
def test_step_progress_bars_on_large_models_only(name, capsys):
    """Each step's pass has a progress bar (OPCM's steps run for an hour at 8B before anything is written);
    models with fewer than 50 tensors show none."""
    g = torch.Generator().manual_seed(0)
    pre = {f"layer{i}.weight": torch.randn(3, 2, generator=g) for i in range(60)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(3)]
    merge(name, pre, fts)
    err = capsys.readouterr().err
    assert all(f"{name}: step {s}/3" in err for s in (1, 2, 3))
    small = {k: pre[k] for k in list(pre)[:10]}
    merge(name, small, [{k: f[k] for k in small} for f in fts])
    assert "step" not in capsys.readouterr().err
