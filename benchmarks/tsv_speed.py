"""TSV-M (or Iso-CTS, TSV-C) before/after: one ViT-B/32 encoder layer, old code against new, in one run.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/tsv_speed.py [--before-rev REV] [--layers 1] [--rounds 2]
        [--keys q_proj,fc1,fc2] [--reference]

Inputs: the six 2-D weights of one HF ``CLIPVisionModel`` ViT-B/32 layer (q/k/v/out_proj
[768,768], fc1 [3072,768], fc2 [768,3072]), 8 tasks, the low-rank-plus-noise task vectors of
``benchmarks/peers_inputs.py`` (rank 8, a = 1e-3/√8, noise N(0, 1e-4²)), seeded, in RAM.
``--layers N`` repeats the layer's keys N times (ViT-B/32 has 12 layers).

"before" is ``tsv_merge_matrix`` (``--method``: ``iso_cts_matrix`` at f = 0.8, or TSV-C's
``low_rank`` of every task) of the source tree at ``--before-rev`` (default: the merge base
with ``main``, extracted with ``git archive`` into a temporary folder), "after" is this tree's.
Each timing is a fresh subprocess (inputs built, then the merge of every key timed; inputs and
import not counted); before and after alternate for ``--rounds`` rounds. The subprocesses save
their ΔW, and the table reports max |ΔW_after − ΔW_before| / max |ΔW_before| per shape; with
``--reference``, also each one's error against the old (official) code run in float64.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"q_proj": (768, 768), "k_proj": (768, 768), "v_proj": (768, 768), "out_proj": (768, 768),
          "fc1": (3072, 768), "fc2": (768, 3072)}

WORKER = r"""
import math, sys, time, torch
sys.path.insert(0, sys.argv[1])
from taskmerge.merging.tsv import tsv_merge_matrix, low_rank
from taskmerge.merging.iso_cts import iso_cts_matrix
shapes, layers, tasks, out, method = eval(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
reference = len(sys.argv) > 7  # the official code in float64, on the first key of each shape
merge = {"tsv_m": tsv_merge_matrix, "iso_cts": lambda ts: iso_cts_matrix(ts, 0.8),
         "tsv_c": lambda ts: torch.stack([low_rank(t, len(ts)) for t in ts])}[method]
def tau(shape, task, salt):
    g = torch.Generator().manual_seed(1_000_003 * salt + 7919 * task)
    a = 1e-3 / math.sqrt(8)
    return a * torch.randn(shape[0], 8, generator=g) @ torch.randn(8, shape[1], generator=g) \
        + 1e-4 * torch.randn(shape, generator=g)
keys = [(f"{l}.{n}", s) for l in range(layers) for n, s in shapes.items()]
inputs = {k: [tau(s, t, j) for t in range(tasks)] for j, (k, s) in enumerate(keys)}
if reference:
    firsts = {}
    for k, s in keys:
        firsts.setdefault(s, k)
    keys = [(k, s) for s, k in firsts.items()]
    inputs = {k: [t.double() for t in inputs[k]] for k, _ in keys}
t0 = time.perf_counter()
result = {k: merge(inputs[k]) for k, _ in keys}
sec = time.perf_counter() - t0
torch.save(result, out)
print(f"{sec:.3f}")
"""


def run(src: Path, shapes: dict, layers: int, tasks: int, out: Path, method: str, reference: bool = False) -> float:
    cmd = [sys.executable, "-c", WORKER, str(src), repr(shapes), str(layers), str(tasks), str(out), method]
    res = subprocess.run(cmd + (["reference"] if reference else []), capture_output=True, text=True, check=False)
    if res.returncode:
        raise SystemExit(f"worker failed ({src}):\n{res.stderr[-2000:]}")
    return float(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before-rev", help="git revision of the old code (default: merge-base HEAD main)")
    ap.add_argument("--method", default="tsv_m", choices=["tsv_m", "iso_cts", "tsv_c"],
                    help="tsv_m: tsv_merge_matrix; iso_cts: iso_cts_matrix(f=0.8); tsv_c: low_rank per task")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--keys", default=",".join(SHAPES), help="comma-separated subset of the layer's keys")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reference", action="store_true",
                    help="also run the old code in float64 on one key per shape: the error of before and after")
    args = ap.parse_args(argv)
    import torch

    shapes = {k: SHAPES[k] for k in args.keys.split(",")}
    git = ["git", "-C", str(ROOT)]
    rev = args.before_rev or subprocess.check_output(git + ["merge-base", "HEAD", "main"], text=True).strip()
    head = subprocess.check_output(git + ["rev-parse", "--short", "HEAD"], text=True).strip()
    dirty = bool(subprocess.check_output(git + ["status", "--porcelain", "src"], text=True).strip())
    print(f"{args.method}: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"{args.layers} layer(s) × {len(shapes)} keys, {args.tasks} tasks; before = {rev[:7]}, after = {head}{' (+ uncommitted)' if dirty else ''}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        before_src = tmp / "before"
        before_src.mkdir()
        archive = subprocess.run(git + ["archive", rev, "src"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(before_src)], input=archive, check=True)
        srcs = {"before": before_src / "src", "after": ROOT / "src"}
        times = {"before": [], "after": []}
        for rnd in range(args.rounds):
            for name in (("before", "after") if rnd % 2 == 0 else ("after", "before")):
                t = run(srcs[name], shapes, args.layers, args.tasks, tmp / f"{name}.pt", args.method)
                times[name].append(t)
                print(f"round {rnd + 1}: {name} {t:.2f} s", flush=True)
        old, new = torch.load(tmp / "before.pt"), torch.load(tmp / "after.pt")
        ref = {}
        if args.reference:
            run(srcs["before"], shapes, args.layers, args.tasks, tmp / "ref.pt", args.method, reference=True)
            ref = torch.load(tmp / "ref.pt")
    diffs = {}
    for key in old:
        shape = tuple(old[key].shape)
        d = float((new[key] - old[key]).abs().max() / old[key].abs().max())
        diffs[shape] = max(diffs.get(shape, 0.0), d)
    for key, r64 in ref.items():
        rel = lambda x: float((x.double() - r64).abs().max() / r64.abs().max())  # noqa: E731
        print(f"  {key} {tuple(r64.shape)} against the official code in float64: before {rel(old[key]):.1e}, "
              f"after {rel(new[key]):.1e}")
    b, a = min(times["before"]), min(times["after"])
    print(f"\nbefore: {', '.join(f'{t:.2f}' for t in times['before'])} s; after: "
          f"{', '.join(f'{t:.2f}' for t in times['after'])} s; best before / best after = {b / a:.2f}×")
    for shape, d in diffs.items():
        print(f"  {'×'.join(map(str, shape))}: max |ΔW_after − ΔW_before| / max |ΔW_before| = {d:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
