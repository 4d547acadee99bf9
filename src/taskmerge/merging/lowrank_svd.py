"""Top-r singular triplets and polar factors without a full SVD (TSV-M/C, Iso-CTS).

The SVD-based methods keep only a few singular triplets of each task matrix (TSV: the top
r = floor(k/T); Iso-CTS: the top n of each τ_t^⊥), then orthogonalise the stacked factors.
A LAPACK float32 SVD computes all k triplets; on CPU it was 96–99 % of TSV-M's time
(benchmarks/README.md, "Profiles"). Here both steps go through one float64 Gram matrix instead.

``top_svd(a, r)`` — the r largest triplets (u [O,r], s [r], vh [r,I]) of ``a`` [O, I]:

    x = a in float64;  G = xᵀx  (G = x xᵀ when O < I: always the k×k side, k = min(O, I))
    (λ_i, v_i) = the r largest eigenpairs of G   (LAPACK dsyevr subset on CPU, eigh on a GPU)
    s_i = ‖x v_i‖,  u_i = x v_i / s_i           (roles of u, v swapped for a wide ``a``)

The eigenvectors are backward stable in float64: v_i are exact singular vectors of a matrix
within ≈ eps64·σ_1²/σ_i (absolute) of ``x``, orders of magnitude below what a float32 SVD achieves
(it is backward stable at eps32·σ_1). What can fail is the derived factor u = x v / s when σ_i
is tiny next to σ_1 (rank-deficient τ): its loss of orthogonality grows as eps64·σ_1²/(σ_i σ_j).
So the route has an a-posteriori check, and **falls back to ``torch.linalg.svd``** when it fails:

    accept  ⇔  every s_i finite and > 0  and  max |uᵀu − I| ≤ tol,  tol = 8·eps(a.dtype)

(9.5e-7 for float32: LAPACK's own float32 SVD reaches 0.8–3e-6 on ViT-B/32 shapes, measured).
For r > k/2 the full SVD is used directly (the Gram route saves little there, and its accuracy
then rests on the small singular values). Singular vectors are unique up to the sign of each
(u_i, v_i) pair (and a rotation within exactly repeated values): TSV, Iso-CTS and TSV-C are
invariant to both.

``polar(x)`` — P Qᵀ for x = P Σ Qᵀ, the nearest matrix with orthonormal columns (tall x) or rows
(wide x): x (xᵀx)^{-1/2} (or (x xᵀ)^{-1/2} x) from a float64 eigendecomposition of the Gram.
Its error is ≈ eps64·κ(x)² (measured: 1e-8 at κ = 1e5, where the float32 SVD's polar factor is
off by 1e-3). It falls back to the SVD when λ_min/λ_max < eps64/tol (κ ≳ 6.6e4 for float32),
which includes every rank-deficient x.

Measured (``benchmarks/svd_routes.py``, 1 thread, loaded machine; r = 96, ViT-B/32 shapes, the
peers.py task vectors): Gram route 0.116 s ([768,768]), 0.152 s ([3072,768]), 0.174 s ([768,3072])
against 0.218, 0.388, 0.920 s for the float32 SVD; error of the rank-r reconstruction against a
float64 SVD 4–5e-8, against 1.3–4.5e-6 for the float32 SVD. Why not a randomized SVD (range
finder with r/2 oversampling, q power iterations, residual check ‖A v_i − s_i u_i‖ ≤ 1e-5·s_1):
on these task vectors the kept triplets reach the noise floor (a flat spectrum at r) and it failed
its check at q = 2 and q = 8 (error 3e-2 and 7e-3–1.5e-2), so it would pay for the full SVD on top;
on a σ_i ∝ 1/i spectrum it passed only at q = 8, 10× less accurate than the float32 SVD and no
faster than the Gram route. Batching ([8,768,768] stacked SVD or eigh) gained ≤ 15 % over a loop,
less than the route; it is not used. Figures: benchmarks/README.md ("Profiles").

Threads on CPU: the Gram (BLAS dsyrk) and the eigensolver run in SciPy's OpenBLAS
(``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` apply; through ``threadpoolctl``, when installed, this
module gives them ``torch.get_num_threads()`` threads, or one inside a side-by-side worker). A key's
independent decompositions (its per-task SVDs, its two polar factors) run through
:func:`parallel_map`, which picks by the machine's load (measured, ``benchmarks/README.md``, "TSV-M"):

- quiet (1-minute load average ≤ cores + 0.5, i.e. nothing beside this process): one at a time on all
  threads. Two one-thread float64 eighs side by side share the memory bandwidth of their tridiagonal
  reductions: on 2 idle cores two 4096² ones took 25.3–25.6 s side by side against 14.7–15.4 s one after
  the other on 2 threads (768²: 0.20–0.22 s against 0.13–0.14 s);
- busy (more runnable threads than cores): side by side, one thread each. The eigensolver's tridiagonal
  reduction is many small parallel regions, and each one waits for a descheduled thread: with one
  busy process beside, the same pairs took 25.4–28.5 s side by side against 33.1–34.7 s on 2 threads
  (2048²: 3.3 s against 5.1–6.0 s); an earlier, more loaded day, a top-96 eigh of a [3072,768]
  matrix's Gram took 6.1 s (median) on 2 threads against 0.14 s on one.

Both orders run the same route, so results agree to float rounding. Keys with one decomposition each
(Iso-C, OPCM) run torch's float32 SVD on torch's threads: decomposing two keys side by side made them
1.3–1.5× slower on a quiet machine.
"""
from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import numpy as np
import torch

EPS64 = float(torch.finfo(torch.float64).eps)
_CONTROLLER = []
_WORKER = threading.local()
_T = TypeVar("_T")


def _lapack_threads(n: int):
    """A context in which SciPy's BLAS/LAPACK uses ``n`` threads (a no-op without threadpoolctl)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # optional: only speed depends on it
        return contextlib.nullcontext()
    if not _CONTROLLER:
        import scipy.linalg  # noqa: F401  (its OpenBLAS must be loaded when the controller looks)

        _CONTROLLER.append(ThreadpoolController())
    return _CONTROLLER[0].limit(limits=n, user_api="blas")


def _scipy_threads():
    """SciPy's BLAS/LAPACK threads for this call: one in a side-by-side worker, else torch's count."""
    return _lapack_threads(1 if getattr(_WORKER, "active", False) else torch.get_num_threads())


def machine_is_busy() -> bool:
    """Whether more threads want the CPU than it has (1-minute load average > cores + 0.5).

    This process counts itself: merging on all threads keeps the load near the core count. The
    average lags by about a minute; either answer gives the same results, only the speed differs.
    """
    try:
        load = os.getloadavg()[0]
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    except (OSError, AttributeError):
        return False
    return load > (cores or 1) + 0.5


def parallel_map(fn: Callable[..., _T], items: Iterable, device: torch.device | str | None = None) -> list[_T]:
    """``[fn(x) for x in items]`` in order, for a key's independent dense decompositions (a task's top-r SVD,
    a polar factor). On CPU, when the machine is busy (:func:`machine_is_busy`), they run side by side on
    ``torch.get_num_threads()`` Python threads with one BLAS/LAPACK thread each (torch's and SciPy's); when
    it is quiet, or on another device, or when nested, one after the other on all threads (module docstring).

    Each call runs the same route either way, so results agree to float rounding (a BLAS product on one
    thread may sum in another order than on two: ≤ 6e-8 relative on TSV-M's ViT-B/32 keys, tsv_speed.py).
    ``fn`` must not depend on the other calls (they may run concurrently).
    """
    items = list(items)
    workers = min(len(items), torch.get_num_threads())
    if (workers < 2 or torch.device(device or "cpu").type != "cpu" or getattr(_WORKER, "active", False)
            or not machine_is_busy()):
        return [fn(x) for x in items]

    def one_thread(x):
        _WORKER.active = True  # nested parallel_map calls in a worker run sequentially
        torch.set_num_threads(1)  # per thread for MKL and OpenMP: set in the worker itself
        return fn(x)

    threads = torch.get_num_threads()
    try:
        with _lapack_threads(1), ThreadPoolExecutor(workers) as pool:
            return list(pool.map(one_thread, items))
    finally:
        torch.set_num_threads(threads)


def _tol(dtype: torch.dtype) -> float:
    return 8.0 * float(torch.finfo(dtype if dtype.is_floating_point else torch.float32).eps)


def _use_scipy(device: torch.device) -> bool:
    """SciPy's BLAS/LAPACK on CPU; torch (cuSOLVER on a GPU) elsewhere."""
    return device.type == "cpu"


def _gram(x64: torch.Tensor) -> tuple[torch.Tensor | np.ndarray, bool]:
    """(G, tall): G = xᵀx for tall x, x xᵀ for wide x, float64. On CPU a NumPy array holding the
    upper triangle only (BLAS dsyrk, half the flops of a product); elsewhere a full torch tensor."""
    tall = x64.shape[0] >= x64.shape[1]
    if _use_scipy(x64.device):
        from scipy.linalg import blas

        xt = x64.numpy().T  # Fortran-ordered view of xᵀ: no copy
        with _scipy_threads():
            return blas.dsyrk(1.0, xt, trans=0 if tall else 1), tall
    return (x64.T @ x64 if tall else x64 @ x64.T), tall


def _eigh(g, top: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending eigenpairs (λ, Q) of the Gram from ``_gram``; only the ``top`` largest if given."""
    if isinstance(g, np.ndarray):
        from scipy.linalg import eigh

        n = g.shape[0]
        kw = {"subset_by_index": [n - top, n - 1], "driver": "evr"} if top is not None else {"driver": "evd"}
        with _scipy_threads():
            lam, q = eigh(g, lower=False, overwrite_a=True, check_finite=False, **kw)
        return torch.from_numpy(lam), torch.from_numpy(q)
    lam, q = torch.linalg.eigh(g)
    return (lam, q) if top is None else (lam[-top:], q[:, -top:])


def full_top_svd(a: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first r triplets of the thin ``torch.linalg.svd`` (the reference and the fallback).

    A wide ``a`` is decomposed as aᵀ (the same triplets, within float error): LAPACK's float32 SVD
    of [768, 3072] took 0.80–0.92 s against 0.39–0.45 s for its transpose (1 thread, svd_routes.py).
    """
    if a.shape[0] < a.shape[1]:
        v, s, uh = torch.linalg.svd(a.T, full_matrices=False)
        return uh[:r].T, s[:r], v[:, :r].T
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u[:, :r], s[:r], vh[:r]


def gram_top_svd(a: torch.Tensor, r: int):
    """The Gram route of :func:`top_svd` (module docstring), or None when its check fails."""
    x = a.detach().to(torch.float64).contiguous()
    g, tall = _gram(x)
    _, q = _eigh(g, r)
    q = q.flip(1).to(x.device)  # largest first
    w = x @ q if tall else x.T @ q  # x v_i (tall) or xᵀ u_i (wide), [O or I, r]
    s = torch.linalg.vector_norm(w, dim=0)
    s, order = torch.sort(s, descending=True, stable=True)
    q, w = q[:, order], w[:, order]
    if not bool(torch.isfinite(s).all()) or not float(s[-1]) > 0.0:
        return None
    derived = w / s
    err = (derived.T @ derived - torch.eye(r, dtype=torch.float64, device=x.device)).abs().max()
    if not float(err) <= _tol(a.dtype):  # also catches NaN
        return None
    u, vh = (derived, q.T) if tall else (q, derived.T)
    return u.to(a.dtype), s.to(a.dtype), vh.to(a.dtype).contiguous()


def top_svd(a: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The r largest singular triplets (u [O,r], s [r] descending, vh [r,I]) of a 2-D ``a``, in its dtype.

    Equal to ``torch.linalg.svd(a)`` truncated to r (up to the sign of each pair) within that
    SVD's own float error: the float64 Gram route with its check and fallback (module docstring).
    """
    if a.ndim != 2:
        raise ValueError(f"top_svd: expected a 2-D matrix, got shape {tuple(a.shape)}")
    k = min(a.shape)
    if not 0 <= r <= k:
        raise ValueError(f"top_svd: rank {r} outside 0..{k} for shape {tuple(a.shape)}")
    if r == 0:
        return a.new_zeros(a.shape[0], 0), a.new_zeros(0), a.new_zeros(0, a.shape[1])
    if 2 * r <= k:
        out = gram_top_svd(a, r)
        if out is not None:
            return out
    return full_top_svd(a, r)


def gram_polar(x: torch.Tensor) -> torch.Tensor | None:
    """``polar(x)`` through the float64 Gram, or None when x is too ill-conditioned (module docstring)."""
    x64 = x.detach().to(torch.float64).contiguous()
    g, tall = _gram(x64)
    lam, q = _eigh(g)
    lam, q = lam.to(x64.device), q.to(x64.device)
    lo, hi = float(lam[0]), float(lam[-1])
    if not (hi > 0.0 and lo >= hi * EPS64 / _tol(x.dtype)):  # also catches NaN
        return None
    inv_sqrt = (q * lam.rsqrt()) @ q.T
    return (x64 @ inv_sqrt if tall else inv_sqrt @ x64).to(x.dtype)


def svd_polar(x: torch.Tensor) -> torch.Tensor:
    """P Qᵀ from the thin SVD x = P Σ Qᵀ (the official computation; the fallback of :func:`polar`;
    a wide x is decomposed as xᵀ, as in :func:`full_top_svd`)."""
    if x.shape[0] < x.shape[1]:
        return svd_polar(x.T).T
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def polar(x: torch.Tensor) -> torch.Tensor:
    """Nearest matrix with orthonormal columns (tall x) or rows (wide x): P Qᵀ for x = P Σ Qᵀ."""
    if x.ndim != 2:
        raise ValueError(f"polar: expected a 2-D matrix, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        return x.clone()
    out = gram_polar(x)
    return svd_polar(x) if out is None else out
