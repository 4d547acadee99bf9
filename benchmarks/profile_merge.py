"""cProfile of one taskmerge merge call on the inputs of ``benchmarks/peers.py``.

    .venv/bin/python benchmarks/profile_merge.py tsv_m --model vit-b-32 --layers 2 --top 20

``--layers N`` keeps the model's width (so every tensor has its ViT-B/32 or L/14 shape) but builds
only N encoder layers: per-key costs, and so which calls dominate, are those of the full model,
at N/12 (B/32) of the time. One warm-up call first (not profiled; ``--no-warmup`` skips it), then
one profiled call; prints the top entries by own time and by cumulative time. With few layers the
task vectors may fit the stream cache (``TASKMERGE_STREAM_CACHE_BYTES``, 1 GiB) where the full model's
do not: set ``TASKMERGE_STREAM_CACHE_BYTES=0`` to profile what the full model does.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src")]


def main(argv=None) -> int:
    import peers
    import peers_inputs as pi
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", choices=list(peers.ROWS))
    ap.add_argument("--model", default="vit-b-32", choices=[s for s in pi.SHAPES])
    ap.add_argument("--layers", type=int, help="encoder layers to build (default: the model's)")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--no-warmup", action="store_true", help="profile the first call (slow methods)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = args.model
    if args.layers:
        shape = f"{args.model}-{args.layers}l"
        pi.SHAPES[shape] = {**pi.SHAPES[args.model], "num_hidden_layers": args.layers}
    row = peers.ROWS[args.method]
    inp = peers.build_inputs(shape, args.tasks, 0, row.needs, pi.DEFAULT_STAT_SETS.get(args.model, 8))
    call = peers._taskmerge_call(args.method, row, inp)
    print(f"{args.method} on {shape}, {args.tasks} tasks, {torch.get_num_threads()} threads", flush=True)
    if not args.no_warmup:
        t = time.perf_counter()
        call()
        print(f"warm-up {time.perf_counter() - t:.2f} s", flush=True)
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.runcall(call)
    print(f"profiled call {time.perf_counter() - t:.2f} s")
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(args.top)
        print(f"--- by {key} ---")
        print("\n".join(ln for ln in buf.getvalue().splitlines() if ln.strip() and not ln.startswith("   Ordered")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
