"""KnOTS and the LoRA baselines: hand examples, factor space vs dense, invariants."""
import pytest
import torch

from taskmerge.merging import get_method, merge
from taskmerge.merging.knots import joint_svd, joint_svd_lora
from taskmerge.merging.lora import LoraFactors
from test_ties import official_ties

MODULES = {"enc.q": (6, 5), "enc.v": (4, 5), "head": (3, 6)}


def make_lora(num_tasks=3, rank=2, seed=0, dtype=torch.float32, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    pre = {f"{m}.weight": torch.randn(s, generator=gen).to(dtype) for m, s in MODULES.items()}
    pre["enc.q.bias"] = torch.randn(6, generator=gen).to(dtype)
    pre["position_ids"] = torch.arange(3)
    adapters = [{m: LoraFactors(torch.randn(rank, s[1], generator=gen).to(dtype),
                                torch.randn(s[0], rank, generator=gen).to(dtype), scale)
                 for m, s in MODULES.items()} for _ in range(num_tasks)]
    return pre, adapters


def dense(pre, adapter, apply_scale=True):
    out = dict(pre)
    for m, f in adapter.items():
        delta = f.B.float() @ f.A.float() * (f.scale if apply_scale else 1.0)
        out[f"{m}.weight"] = (pre[f"{m}.weight"].float() + delta).to(pre[f"{m}.weight"].dtype)
    return out


def weights_only(sd):
    return {k: v for k, v in sd.items() if k.endswith(".weight")}


def test_joint_svd_reconstructs_and_drops_zero_directions():
    pre, adapters = make_lora(num_tasks=2, rank=1)
    deltas = [a["enc.q"].B @ a["enc.q"].A for a in adapters]
    u, sv = joint_svd(deltas)
    assert u.shape == (6, 2) and sv[0].shape == (2, 5)  # rank 2 kept of min(6, 10) = 6
    for d, block in zip(deltas, sv):
        torch.testing.assert_close(u @ block, d, rtol=0, atol=1e-5)


@pytest.mark.parametrize("out,inp,rank,tasks", [(40, 30, 3, 4), (5, 30, 3, 4), (40, 2, 3, 4), (6, 5, 2, 1)])
def test_factor_space_joint_svd_equals_dense(out, inp, rank, tasks):
    """Same U·diag(s)·V_t per task and the same kept spectrum as the dense float64 SVD, including
    B_cat wider than out (out < T·r), A with fewer columns than r, and a rank-deficient adapter."""
    g = torch.Generator().manual_seed(out + inp)
    factors = [LoraFactors(torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g), 0.5 + t)
               for t in range(tasks)]
    if tasks > 1:  # adapter 1 only repeats a direction of adapter 0: drops rank
        factors[1] = LoraFactors(factors[0].A[:1].repeat(rank, 1), factors[1].B, 2.0)
    for apply_scale in (True, False):
        deltas = [f.B.double() @ f.A.double() * (f.scale if apply_scale else 1.0) for f in factors]
        u_d, sv_d = joint_svd(deltas)
        u_f, sv_f = joint_svd_lora(factors, apply_scale)
        assert u_f.shape == u_d.shape and all(a.shape == b.shape for a, b in zip(sv_f, sv_d))
        s_d = torch.stack([b.norm(dim=1) for b in sv_d]).norm(dim=0)  # singular values = row norms of [sV_t]
        s_f = torch.stack([b.norm(dim=1) for b in sv_f]).norm(dim=0)
        torch.testing.assert_close(s_f, s_d, rtol=1e-5, atol=1e-5)
        for d, b_f in zip(deltas, sv_f):
            torch.testing.assert_close(u_f @ b_f, d.float(), rtol=0, atol=1e-4)
        torch.testing.assert_close(u_f.T @ u_f, torch.eye(u_f.shape[1]), rtol=0, atol=1e-5)


def test_knots_merge_with_factor_space_svd_equals_dense_svd(monkeypatch):
    import taskmerge.merging.knots as kn
    pre, adapters = make_lora(seed=11)
    fast = {inner: merge("knots", pre, adapters, {"inner": inner, "k": 30, "scaling": 0.7})
            for inner in ("ties", "task_arithmetic", "dare_ties")}
    monkeypatch.setattr(kn, "joint_svd_lora", lambda fs, apply_scale=True, device=None: joint_svd(
        [f.B.double() @ f.A.double() * (f.scale if apply_scale else 1.0) for f in fs]))
    for inner, got in fast.items():
        ref = merge("knots", pre, adapters, {"inner": inner, "k": 30, "scaling": 0.7})
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-5)


def test_hand_example_global_trim_across_modules():
    # layer a: ΔW_1 = [[3,0],[0,0]], ΔW_2 = [[0,0],[0,-1]]; layer b: ΔW_1 = [[.5,0],[0,0]], ΔW_2 = [[0,0],[0,2]]
    # sV entries per task over both layers: task 1 {3, .5}, task 2 {-1, 2}; k=10 of d=8 keeps the max
    # only (int(0.8) = 0) → task 1 keeps 3 (layer a), task 2 keeps 2 (layer b).
    e = lambda i, j, v: LoraFactors(torch.eye(2)[j:j + 1] * v, torch.eye(2)[:, i:i + 1])  # noqa: E731
    pre = {"a.weight": torch.zeros(2, 2), "b.weight": torch.zeros(2, 2)}
    adapters = [{"a": e(0, 0, 3.0), "b": e(0, 0, 0.5)}, {"a": e(1, 1, -1.0), "b": e(1, 1, 2.0)}]
    out = merge("knots", pre, adapters, {"k": 10, "scaling": 1.0})
    torch.testing.assert_close(out["a.weight"], torch.tensor([[3.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(out["b.weight"], torch.tensor([[0.0, 0.0], [0.0, 2.0]]))
    # k=100, λ=0.5, disjoint mean: nothing overlaps, so each ΔW is kept at half
    out = merge("knots", pre, adapters, {"k": 100, "scaling": 0.5})
    torch.testing.assert_close(out["a.weight"], torch.tensor([[1.5, 0.0], [0.0, -0.5]]))
    torch.testing.assert_close(out["b.weight"], torch.tensor([[0.25, 0.0], [0.0, 1.0]]))


@pytest.mark.parametrize("inner", ["ties", "task_arithmetic", "dare_ties"])
def test_one_adapter_returns_it(inner):
    pre, adapters = make_lora(num_tasks=1, scale=2.0)
    out = merge("knots", pre, adapters, {"inner": inner, "k": 100, "scaling": 1.0, "drop_rate": 0.0})
    ref = dense(pre, adapters[0])
    for key in pre:
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=1e-5)


def test_apply_lora_scale_flag():
    pre, adapters = make_lora(num_tasks=1, scale=2.0)
    out = merge("knots", pre, adapters, {"k": 100, "scaling": 1.0, "apply_lora_scale": False})
    ref = dense(pre, adapters[0], apply_scale=False)  # official: B @ A, alpha/r ignored
    for key in pre:
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=1e-5)


def test_knots_ta_sum_equals_dense_task_arithmetic():
    pre, adapters = make_lora(seed=1, scale=0.5)
    out = merge("knots", pre, adapters, {"inner": "task_arithmetic", "k": 100, "merge": "sum", "scaling": 0.3})
    ta = merge("task_arithmetic", pre, [dense(pre, a) for a in adapters], {"scaling": 0.3})
    for key in pre:
        torch.testing.assert_close(out[key], ta[key], rtol=0, atol=1e-5)


@pytest.mark.parametrize("inner,k,merge_rule", [("ties", 30, "mean"), ("ties", 100, "sum"), ("ties", 20, "max"),
                                                ("task_arithmetic", 100, "sum"), ("task_arithmetic", 100, "mean")])
def test_lora_merge_factor_space_equals_dense(inner, k, merge_rule):
    pre, adapters = make_lora(seed=2, scale=1.5)
    got = merge("lora_merge", pre, adapters, {"inner": inner, "k": k, "merge": merge_rule, "scaling": 0.4})
    dense_models = [weights_only(dense(pre, a)) for a in adapters]
    if inner == "ties":  # the official flattened TIES over the adapted weights only
        ref = official_ties(weights_only(pre), dense_models, k, merge_rule, 0.4)
    else:
        ref = merge("task_arithmetic", weights_only(pre), dense_models,
                    {"scaling": 0.4 / (len(adapters) if merge_rule == "mean" else 1)})
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-5)
    torch.testing.assert_close(got["enc.q.bias"], pre["enc.q.bias"], rtol=0, atol=0)


def test_knots_matches_flattened_official_pipeline():
    """SVD per module, flatten sV over modules, official TIES at λ=1 on the flat vector, then U·sV."""
    pre, adapters = make_lora(seed=3)
    modules = sorted(MODULES)
    svd = {m: joint_svd([a[m].B @ a[m].A for a in adapters]) for m in modules}
    zero = {f"{m}": torch.zeros_like(svd[m][1][0]) for m in modules}
    per_task = [{m: svd[m][1][t] for m in modules} for t in range(len(adapters))]
    merged_sv = official_ties(zero, per_task, 20, "mean", 1.0)  # λ after mean = before (up to rounding)
    got = merge("knots", pre, adapters, {"k": 20, "scaling": 1.0})
    for m in modules:
        ref = pre[f"{m}.weight"] + svd[m][0] @ merged_sv[m]
        torch.testing.assert_close(got[f"{m}.weight"], ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["knots", "lora_merge"])
def test_permutation_invariant_and_linear(method):
    pre, adapters = make_lora(seed=4)
    m = get_method(method)
    assert m.linear_in == "scaling" and m.inputs == "lora"
    one = m(pre, adapters, {"scaling": 1.0})
    out = m(pre, adapters, {"scaling": 0.25})
    perm = m(pre, adapters[::-1], {"scaling": 0.25})
    for key in pre:
        if pre[key].is_floating_point():
            torch.testing.assert_close(out[key], pre[key] + 0.25 * (one[key] - pre[key]), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(perm[key], out[key], rtol=1e-5, atol=1e-5)


def test_dare_ties_uses_official_rng_order_on_sv_blocks():
    pre, adapters = make_lora(seed=5)
    got = merge("knots", pre, adapters, {"inner": "dare_ties", "k": 100, "drop_rate": 0.3, "seed": 7, "scaling": 1.0})
    modules = sorted(MODULES)
    svd = {m: joint_svd([a[m].B @ a[m].A for a in adapters]) for m in modules}
    torch.manual_seed(7)
    dared = [{m: svd[m][1][t] * torch.randint(2, tuple(svd[m][1][t].shape)).bernoulli(0.7) * (1 / 0.7)
              for m in modules} for t in range(len(adapters))]
    zero = {m: torch.zeros_like(svd[m][1][0]) for m in modules}
    merged_sv = official_ties(zero, dared, 100, "mean", 1.0)
    for m in modules:
        torch.testing.assert_close(got[f"{m}.weight"], pre[f"{m}.weight"] + svd[m][0] @ merged_sv[m],
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["knots", "lora_merge"])
def test_dtype_preserved_no_nan(dtype, method):
    pre, adapters = make_lora(dtype=dtype)
    out = merge(method, pre, adapters, {"inner": "dare_ties", "k": 100})
    for key, value in out.items():
        assert value.dtype == pre[key].dtype
        if value.is_floating_point():
            assert torch.isfinite(value.float()).all()


def test_lora_context_argument():
    pre, adapters = make_lora()
    a = merge("knots", pre, adapters)
    b = get_method("knots")(pre, [None] * len(adapters), lora=adapters)  # lora= takes the place of the models
    assert all(torch.equal(a[k], b[k]) for k in pre)


@pytest.mark.parametrize("hparams", [{"inner": "tsv"}, {"k": 0}, {"drop_rate": 1.0}, {"scaling": -1.0},
                                     {"merge": "median"}, {"inner": "task_arithmetic", "merge": "max"}])
@pytest.mark.parametrize("method", ["knots", "lora_merge"])
def test_bad_hyperparameters_raise(hparams, method):
    pre, adapters = make_lora()
    with pytest.raises(ValueError):
        merge(method, pre, adapters, hparams)


def test_bad_lora_inputs_raise():
    pre, adapters = make_lora()
    bad_shape = [dict(adapters[0], head=LoraFactors(torch.ones(2, 5), torch.ones(3, 2)))]
    missing = [adapters[0], {k: v for k, v in adapters[1].items() if k != "head"}]
    unknown = [{"nope": adapters[0]["head"]}]
    nan = [dict(adapters[0], head=LoraFactors(adapters[0]["head"].A * float("nan"), adapters[0]["head"].B))]
    for bad in (bad_shape, missing, unknown, nan, [{"head": torch.ones(3, 6)}]):
        with pytest.raises(ValueError):
            merge("knots", pre, bad)


def test_search_cache_reuses_joint_svds_and_changes_nothing(monkeypatch):
    import taskmerge.merging.knots as kn
    from taskmerge.merging.lora import LoraFactors

    g = torch.Generator().manual_seed(0)
    pre = {"l.weight": torch.randn(6, 5, generator=g)}
    models = [{"l": LoraFactors(torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g), 1.0)}
              for _ in range(3)]
    calls = []
    real = kn.joint_svd_lora
    monkeypatch.setattr(kn, "joint_svd_lora", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = {}
    for k in (20.0, 60.0, 100.0):
        cached = get_method("knots")(pre, models, {"k": k}, cache=cache)
        n_before = len(calls)
        fresh = get_method("knots")(pre, models, {"k": k})
        assert len(calls) == n_before + 1  # the uncached call recomputes
        assert torch.equal(cached["l.weight"], fresh["l.weight"])
    assert len(calls) == 1 + 3  # one cached SVD for the whole k grid, plus the three uncached calls
