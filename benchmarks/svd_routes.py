"""Top-r SVD routes on ViT-B/32 task-matrix shapes: time and accuracy (why ``lowrank_svd`` uses the Gram route).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/svd_routes.py

For each shape ([768,768] q/k/v/out, [3072,768] fc1, [768,3072] fc2) and r = 96 (= floor(768/8),
TSV-M with 8 tasks), on two spectra:

- ``lrn``: the ``benchmarks/peers.py`` task vectors (rank 8, a = 1e-3/√8, plus N(0, 1e-4²) noise),
  so triplets 9…96 lie in the noise floor (near-flat spectrum, tiny gaps at r);
- ``decay``: σ_i = 1e-2 / i (random singular vectors): a smoothly decaying spectrum, no gap at r.

Routes: ``full`` (torch.linalg.svd, float32, truncated); ``gram`` (``lowrank_svd.gram_top_svd``:
float64 Gram, top-r eigenpairs, checked); ``rand-q<q>`` (randomized range finder with l = r + r/2
columns, q power iterations with QR re-orthonormalisation, then the SVD of QᵀA; check: every
residual ‖A v_i − s_i u_i‖ ≤ 1e-5·s_1, i.e. ≈ 84 float32 ulps of ‖A‖, else the full SVD would be
needed). Error: ‖rec − rec64‖_F / ‖rec64‖_F of the rank-r reconstruction against the float64 SVD.
Batching (768×768): torch.linalg.svd over a stacked [8, O, I] batch against a loop of 8, and likewise eigh.
Time: the minimum of 2 calls (about 2 minutes in all on 2 idle cores).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from taskmerge.merging.lowrank_svd import full_top_svd, gram_top_svd  # noqa: E402

R = 96


def best(f, n=2):
    """(minimum time of n calls, the last call's result)."""
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        out = f()
        ts.append(time.perf_counter() - t)
    return min(ts), out


def matrix(kind, o, i, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "lrn":
        return 1e-3 / 8 ** 0.5 * torch.randn(o, 8, generator=g) @ torch.randn(8, i, generator=g) \
            + 1e-4 * torch.randn(o, i, generator=g)
    k = min(o, i)
    p, _ = torch.linalg.qr(torch.randn(o, k, generator=g))
    q, _ = torch.linalg.qr(torch.randn(i, k, generator=g))
    return (p * (1e-2 / torch.arange(1, k + 1))) @ q.T


def randomized(a, r, q, oversample=None):
    """Randomized SVD (Halko et al. 2011, Alg. 4.4) and whether its residual check passes."""
    l = min(min(a.shape), r + (oversample if oversample is not None else r // 2))
    g = torch.Generator().manual_seed(1)
    y = a @ torch.randn(a.shape[1], l, generator=g)
    basis, _ = torch.linalg.qr(y)
    for _ in range(q):
        z, _ = torch.linalg.qr(a.T @ basis)
        basis, _ = torch.linalg.qr(a @ z)
    ub, s, vh = torch.linalg.svd(basis.T @ a, full_matrices=False)
    u, s, vh = basis @ ub[:, :r], s[:r], vh[:r]
    res = torch.linalg.vector_norm(a @ vh.T - u * s, dim=0)
    return (u, s, vh), bool(res.max() <= 1e-5 * s[0])


def rec_error(trip, ref64):
    u, s, vh = trip
    rec = (u.double() * s.double()) @ vh.double()
    return float((rec - ref64).norm() / ref64.norm())


def main() -> int:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, r = {R}")
    print("| shape | spectrum | route | time (s) | rel. error of the rank-r reconstruction | check |")
    print("|---|---|---|---:|---:|---|")
    for o, i in [(768, 768), (3072, 768), (768, 3072)]:
        for kind in ("lrn", "decay"):
            a = matrix(kind, o, i)
            u64, s64, vh64 = torch.linalg.svd(a.double(), full_matrices=False)
            ref = (u64[:, :R] * s64[:R]) @ vh64[:R]
            rows = [("full (float32 SVD)", lambda: full_top_svd(a, R), lambda t: "—"),
                    ("gram", lambda: gram_top_svd(a, R), lambda t: "pass" if t is not None else "FAIL → full SVD")]
            for q in (2, 8):
                rows.append((f"rand-q{q}", lambda q=q: randomized(a, R, q),
                             lambda t: "pass" if t[1] else "FAIL → full SVD"))
            for name, call, check in rows:
                sec, out = best(call)
                trip = out[0] if name.startswith("rand") else out
                err = rec_error(trip, ref) if trip is not None else float("nan")
                print(f"| {o}×{i} | {kind} | {name} | {sec:.3f} | {err:.1e} | {check(out)} |", flush=True)
    print("\nBatching, 8 same-shape matrices:")
    for o, i in [(768, 768)]:
        stack = torch.stack([matrix("lrn", o, i, seed=s) for s in range(8)])
        loop = best(lambda: [torch.linalg.svd(x, full_matrices=False) for x in stack], 1)[0]
        batch = best(lambda: torch.linalg.svd(stack, full_matrices=False), 1)[0]
        grams = torch.stack([x.double().T @ x.double() for x in stack])
        eloop = best(lambda: [torch.linalg.eigh(g) for g in grams], 1)[0]
        ebatch = best(lambda: torch.linalg.eigh(grams), 1)[0]
        groute = best(lambda: [gram_top_svd(x, R) for x in stack], 1)[0]
        print(f"- {o}×{i}: svd loop {loop:.2f} s, svd batched {batch:.2f} s; float64 eigh loop {eloop:.2f} s, "
              f"batched {ebatch:.2f} s; gram route ×8 {groute:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
