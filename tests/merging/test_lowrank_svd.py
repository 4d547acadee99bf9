"""lowrank_svd: the Gram route equals the full SVD within float32 SVD error, is taken where it is
accurate, and falls back to the full SVD where its check fails; TSV-M/C and Iso-CTS built on it
agree with the official full-SVD computations."""
import os
import threading

import pytest
import torch

from taskmerge.merging import lowrank_svd as L
from taskmerge.merging.iso_cts import iso_cts_matrix, subspace_sizes
from taskmerge.merging.tsv import low_rank, tsv_merge_matrix


def low_rank_plus_noise(o, i, rank=8, noise=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(o, rank, generator=g) @ torch.randn(rank, i, generator=g) / rank ** 0.5 \
        + noise * torch.randn(o, i, generator=g)


class CountingSVD:
    """Stands in for torch.linalg.svd and counts calls (or refuses them)."""

    def __init__(self, real, refuse=False):
        self.real, self.refuse, self.calls = real, refuse, 0

    def __call__(self, *a, **kw):
        self.calls += 1
        if self.refuse:
            raise AssertionError("the full SVD was called on the fast path")
        return self.real(*a, **kw)


def reconstruction(u, s, vh):
    return (u.double() * s.double()) @ vh.double()


@pytest.mark.parametrize("shape", [(300, 120), (120, 300)])
@pytest.mark.parametrize("noise", [0.02, 1.0])  # rank 8 + noise floor (r reaches into it); pure flat spectrum-ish
def test_fast_path_is_taken_and_as_exact_as_the_float32_svd(monkeypatch, shape, noise):
    a = low_rank_plus_noise(*shape, noise=noise)
    r = 30
    ref32 = L.full_top_svd(a, r)
    u64, s64, vh64 = torch.linalg.svd(a.double(), full_matrices=False)
    truth = reconstruction(u64[:, :r], s64[:r], vh64[:r])
    monkeypatch.setattr(torch.linalg, "svd", CountingSVD(torch.linalg.svd, refuse=True))
    u, s, vh = L.top_svd(a, r)
    assert u.shape == (shape[0], r) and s.shape == (r,) and vh.shape == (r, shape[1]) and u.dtype == a.dtype
    assert bool((s[:-1] >= s[1:]).all())
    torch.testing.assert_close(s.double(), s64[:r], rtol=2e-6, atol=0)
    eye = torch.eye(r, dtype=torch.float64)
    assert (u.double().T @ u.double() - eye).abs().max() < 1e-6
    assert (vh.double() @ vh.double().T - eye).abs().max() < 1e-6
    # the rank-r reconstruction: at least as close to the float64 truth as LAPACK's float32 SVD is
    err = float((reconstruction(u, s, vh) - truth).norm() / truth.norm())
    err32 = float((reconstruction(*ref32) - truth).norm() / truth.norm())
    assert err <= max(2 * err32, 1e-6), (err, err32)
    # the well-separated signal directions match the float32 SVD's up to sign
    dots = (u[:, :8] * ref32[0][:, :8]).sum(0).abs()
    if noise < 1:
        torch.testing.assert_close(dots, torch.ones(8), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(200, 100), (100, 200)])
def test_fallback_triggers_on_a_rank_deficient_matrix_and_equals_the_full_svd(monkeypatch, shape):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(shape[0], 4, generator=g) @ torch.randn(4, shape[1], generator=g)  # rank 4 < r
    r = 10
    assert L.gram_top_svd(a, r) is None  # σ_5…σ_10 ≈ 0: u = x v / s is not orthonormal, the check fails
    assert L.gram_top_svd(a, 4) is not None  # the same matrix at its rank passes
    expect = L.full_top_svd(a, r)
    counter = CountingSVD(torch.linalg.svd)
    monkeypatch.setattr(torch.linalg, "svd", counter)
    got = L.top_svd(a, r)
    assert counter.calls == 1
    for x, y in zip(got, expect):
        assert torch.equal(x, y)


def test_large_rank_uses_the_full_svd_and_bad_input_is_refused(monkeypatch):
    a = low_rank_plus_noise(40, 30)
    counter = CountingSVD(torch.linalg.svd)
    monkeypatch.setattr(torch.linalg, "svd", counter)
    got = L.top_svd(a, 16)  # r > k/2
    assert counter.calls == 1
    assert all(torch.equal(x, y) for x, y in zip(got, L.full_top_svd(a, 16)))
    assert [t.shape for t in L.top_svd(a, 0)] == [(40, 0), (0,), (0, 30)]
    with pytest.raises(ValueError, match="rank 31 outside"):
        L.top_svd(a, 31)
    with pytest.raises(ValueError, match="2-D"):
        L.top_svd(a[0], 1)


@pytest.mark.parametrize("shape", [(300, 90), (90, 300), (64, 64)])
def test_polar_without_svd_equals_the_svd_polar_factor(monkeypatch, shape):
    x = low_rank_plus_noise(*shape, rank=4, noise=0.5, seed=2)
    truth = L.svd_polar(x.double())
    ref32 = L.svd_polar(x)
    monkeypatch.setattr(torch.linalg, "svd", CountingSVD(torch.linalg.svd, refuse=True))
    got = L.polar(x)
    assert got.dtype == x.dtype and got.shape == x.shape
    err, err32 = float((got.double() - truth).abs().max()), float((ref32.double() - truth).abs().max())
    assert err <= max(2 * err32, 1e-6), (err, err32)
    small = min(shape)
    ortho = got.double().T @ got.double() if shape[0] >= shape[1] else got.double() @ got.double().T
    assert (ortho - torch.eye(small, dtype=torch.float64)).abs().max() < 1e-6


def test_polar_falls_back_when_rank_deficient(monkeypatch):
    x = low_rank_plus_noise(50, 6, rank=6, noise=0.1)
    x = torch.cat([x, x[:, :1]], 1)  # a repeated column: xᵀx is singular
    assert L.gram_polar(x) is None
    counter = CountingSVD(torch.linalg.svd)
    monkeypatch.setattr(torch.linalg, "svd", counter)
    got = L.polar(x)
    assert counter.calls == 1 and torch.equal(got, L.svd_polar(x))


# --- the methods against the official full-SVD computations ------------------------------------------

def official_tsv_m(taus):
    """Official TSVM: full SVD per task, zero-padded k-column stacks, polar factors by SVD."""
    out_dim, in_dim = taus[0].shape
    k = min(out_dim, in_dim)
    r = int(k / len(taus))
    su, ss, sv = torch.zeros(out_dim, k), torch.zeros(k), torch.zeros(k, in_dim)
    for i, tau in enumerate(taus):
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        su[:, i * r:(i + 1) * r], ss[i * r:(i + 1) * r], sv[i * r:(i + 1) * r] = u[:, :r], s[:r], vh[:r]
    return L.svd_polar(su) @ torch.diag(ss) @ L.svd_polar(sv)


def official_iso_cts(taus, fraction):
    common, n = subspace_sizes(min(taus[0].shape), len(taus), fraction)
    u, s, vh = torch.linalg.svd(torch.stack(taus).sum(0), full_matrices=False)
    uc = u[:, :common]
    parts = [torch.linalg.svd(t - uc @ (uc.T @ t), full_matrices=False) for t in taus]
    u_all = torch.cat([p[0][:, :n] for p in parts] + [uc], 1)
    s_all = torch.cat([p[1][:n] for p in parts] + [s[:common]])
    vh_all = torch.cat([p[2][:n] for p in parts] + [vh[:common]], 0)
    return L.svd_polar(u_all) * s_all.mean() @ L.svd_polar(vh_all)


def task_vectors(num_tasks, shape, seed=3):
    return [low_rank_plus_noise(*shape, rank=6, noise=0.05, seed=seed + t) for t in range(num_tasks)]


def assert_as_exact_as_official(got, official, taus):
    """``got`` (float32) is at least as close to the official computation run in float64 as the
    official float32 computation is (the kept ranks cut into the noise floor, where the float32
    SVD itself is only accurate to ~1e-5 of the largest entry)."""
    truth = official([t.double() for t in taus])
    scale = float(truth.abs().max())
    err = float((got.double() - truth).abs().max()) / scale
    err32 = float((official(taus).double() - truth).abs().max()) / scale
    assert err <= 2 * err32 + 1e-6, (err, err32)


@pytest.mark.parametrize("num_tasks,shape", [(4, (96, 64)), (3, (96, 64)), (3, (64, 160))])  # 3 ∤ 64: zero slots
def test_tsv_m_and_tsv_c_agree_with_the_official_full_svd_computation(monkeypatch, num_tasks, shape):
    taus = task_vectors(num_tasks, shape)
    r = int(min(shape) / num_tasks)
    svd = torch.linalg.svd
    with monkeypatch.context() as m:
        m.setattr(torch.linalg, "svd", CountingSVD(svd, refuse=True))  # all on the fast path
        got = tsv_merge_matrix(taus, "polar")
        got_c = [low_rank(tau, num_tasks) for tau in taus]
    assert_as_exact_as_official(got, official_tsv_m, taus)
    for tau, low in zip(taus, got_c):
        assert_as_exact_as_official(low, lambda ts: (lambda u, s, vh: (u * s) @ vh)(*L.full_top_svd(ts[0], r)), [tau])


@pytest.mark.parametrize("fraction", [0.8, 0.3])
def test_iso_cts_agrees_with_the_official_full_svd_computation(fraction):
    taus = task_vectors(4, (120, 80))
    assert_as_exact_as_official(iso_cts_matrix(taus, fraction), lambda ts: official_iso_cts(ts, fraction), taus)


def test_full_top_svd_of_a_wide_matrix_is_its_thin_svd():
    a = low_rank_plus_noise(20, 50, rank=5, noise=0.3, seed=4)  # wide: decomposed as aᵀ
    u, s, vh = L.full_top_svd(a, 20)
    assert u.shape == (20, 20) and vh.shape == (20, 50)
    torch.testing.assert_close(s, torch.linalg.svdvals(a), rtol=1e-5, atol=0)
    torch.testing.assert_close((u * s) @ vh, a, atol=1e-5, rtol=0)
    torch.testing.assert_close(u.T @ u, torch.eye(20), atol=1e-5, rtol=0)
    torch.testing.assert_close(vh @ vh.T, torch.eye(20), atol=1e-5, rtol=0)
    torch.testing.assert_close(L.svd_polar(a), L.svd_polar(a.double()).float(), atol=1e-5, rtol=0)


def test_opcm_projection_of_a_wide_matrix_matches_the_official_full_svd():
    from taskmerge.merging.opcm import crossing_rank, project_update

    g = torch.Generator().manual_seed(5)
    tau_bar, tau = torch.randn(5, 9, generator=g), torch.randn(5, 9, generator=g)
    u, s, vh = torch.linalg.svd(tau_bar, full_matrices=True)  # official: full U [5,5], V [9,9]
    for alpha in (0.3, 0.6, 0.9):
        r = crossing_rank(s, alpha)
        p = u.T @ tau @ vh.T
        p[:r, :r] = 0
        p.diagonal().fill_(0)
        torch.testing.assert_close(project_update(tau_bar, tau, alpha, True), u @ p @ vh, atol=1e-5, rtol=1e-5)


def test_torch_backend_as_on_a_gpu_matches_the_scipy_one(monkeypatch):
    # on a GPU the Gram and eigh run in torch; run that branch on CPU and compare with SciPy's
    a, x = low_rank_plus_noise(200, 80, seed=6), low_rank_plus_noise(200, 80, rank=80, noise=0.5, seed=7)
    cpu = L.top_svd(a, 20), L.polar(x), L.top_svd(a.T.contiguous(), 20)
    monkeypatch.setattr(L, "_use_scipy", lambda device: False)
    monkeypatch.setattr(torch.linalg, "svd", CountingSVD(torch.linalg.svd, refuse=True))
    other = L.top_svd(a, 20), L.polar(x), L.top_svd(a.T.contiguous(), 20)
    for (u, s, vh), (u2, s2, vh2) in ((cpu[0], other[0]), (cpu[2], other[2])):
        torch.testing.assert_close(s2, s, rtol=1e-6, atol=0)
        torch.testing.assert_close((u2 * s2) @ vh2, (u * s) @ vh, atol=1e-5 * float(s[0]), rtol=0)
    torch.testing.assert_close(other[1], cpu[1], atol=1e-6, rtol=0)


def test_without_threadpoolctl_the_result_is_the_same(monkeypatch):
    import sys

    a = low_rank_plus_noise(120, 60, seed=8)
    expect = L.top_svd(a, 10)
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import fails: no thread limit, same maths
    got = L.top_svd(a, 10)
    for x, y in zip(got, expect):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


@pytest.mark.parametrize("busy", [True, False])
def test_parallel_map_keeps_order_and_results_and_restores_the_threads(monkeypatch, busy):
    monkeypatch.setattr(L, "machine_is_busy", lambda: busy)
    g = torch.Generator().manual_seed(3)
    mats = [torch.randn(60, 40, generator=g) for _ in range(5)]
    threads = torch.get_num_threads()
    seen = []

    def fn(m):
        seen.append((threading.get_ident(), torch.get_num_threads()))
        assert L.parallel_map(lambda x: x + 1, [1, 2]) == [2, 3]  # nested: sequential, still right
        return L.top_svd(m, 10)

    got = L.parallel_map(fn, mats)
    want = [L.top_svd(m, 10) for m in mats]
    for a, b in zip(got, want):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)  # the same route, in input order
    assert torch.get_num_threads() == threads
    side_by_side = busy and threads > 1  # busy: workers with one BLAS thread each; quiet: here, on all threads
    assert {n for _, n in seen} == ({1} if side_by_side else {threads})
    assert (threading.get_ident() in {t for t, _ in seen}) == (not side_by_side)
    assert L.parallel_map(fn, []) == []


def test_machine_is_busy_compares_the_load_average_with_the_cores(monkeypatch):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 0.4, 0.0, 0.0))
    assert not L.machine_is_busy()  # this process on every core, nothing beside it
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 1.0, 0.0, 0.0))
    assert L.machine_is_busy()

    def unavailable():
        raise OSError("no load average")

    monkeypatch.setattr(os, "getloadavg", unavailable)
    assert not L.machine_is_busy()


def test_parallel_map_passes_a_worker_error_on():
    def boom(x):
        raise ValueError(f"bad {x}")

    with pytest.raises(ValueError, match="bad"):
        L.parallel_map(boom, [1, 2, 3])
    with pytest.raises(ValueError, match="bad"):
        L.parallel_map(boom, [1, 2], device="meta")  # another device: sequential

