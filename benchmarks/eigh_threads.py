"""Two float64 eighs of n×n Grams: side by side on one thread each, or one after the other on 2 threads.

    .venv/bin/python benchmarks/eigh_threads.py 768 2048 4096            # quiet machine
    (.venv/bin/python -c "while True: pass" &) ; .venv/bin/python benchmarks/eigh_threads.py 768 2048 4096

Why ``lowrank_svd.parallel_map`` runs a key's decompositions one after the other on all threads when the
machine is quiet and side by side only when it is busy (its module docstring gives the figures). The
eigensolver is SciPy's ``eigh(driver="evd")`` on the upper triangle of a ``dsyrk`` Gram, as in
``lowrank_svd``; threads through ``threadpoolctl``. Two repetitions per size (about 2 minutes in all).
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy.linalg import blas, eigh
from threadpoolctl import threadpool_limits


def one(g):
    return eigh(g, lower=False, driver="evd", check_finite=False)


def main(sizes):
    for n in sizes:
        grams = [blas.dsyrk(1.0, np.random.default_rng(i).standard_normal((n, n)).T, trans=0) for i in range(2)]
        for _ in range(2):
            with threadpool_limits(1):
                start = time.perf_counter()
                with ThreadPoolExecutor(2) as pool:
                    list(pool.map(one, grams))
                side = time.perf_counter() - start
            with threadpool_limits(2):
                start = time.perf_counter()
                for g in grams:
                    one(g)
                seq = time.perf_counter() - start
            print(f"n={n}: two 1-thread side by side {side:.2f}s, one after the other on 2 threads {seq:.2f}s",
                  flush=True)


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [768, 2048, 4096])
