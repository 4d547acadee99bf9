"""One method, old code against this tree, on the inputs of ``benchmarks/peers.py``: merge time per run.

    .venv/bin/python benchmarks/ab_merge.py iso_c --before-rev 5ddb8db --layers 2 --runs 3 --rounds 1

"before" is ``src/`` of ``--before-rev`` (extracted with ``git archive`` into a temporary folder),
"after" this checkout's ``src/``. Each (round, side) is a fresh subprocess that builds the seeded
inputs (ViT-B/32 or L/14 width, ``--layers`` encoder layers, 8 tasks, statistics or LoRA factors as the
method's peers row needs), then times ``--runs`` calls of taskmerge's merge (the first one is a
warm-up as much as a measurement: all are printed). Sides alternate between rounds. For a change that
should not move the result, compare outputs with the tests, not here: this times only.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

WORKER = r"""
import json, sys, time
src, method, model, layers, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
sys.path[:0] = [src, sys.argv[6]]
import peers, peers_inputs as pi
shape = f"{model}-{layers}l"
pi.SHAPES[shape] = {**pi.SHAPES[model], "num_hidden_layers": layers}
row = peers.ROWS[method]
inp = peers.build_inputs(shape, 8, 0, row.needs, pi.DEFAULT_STAT_SETS.get(model, 8))
call = peers._taskmerge_call(method, row, inp)
import taskmerge
assert taskmerge.__file__.startswith(src), taskmerge.__file__  # the side we mean to time
times = []
for _ in range(runs):
    t = time.perf_counter()
    call()
    times.append(time.perf_counter() - t)
print(json.dumps(times))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method")
    ap.add_argument("--before-rev", required=True, help="git revision of the old code")
    ap.add_argument("--model", default="vit-b-32", choices=["vit-b-32", "vit-l-14", "tiny"])
    ap.add_argument("--layers", type=int, default=2, help="encoder layers built (every tensor keeps its width)")
    ap.add_argument("--runs", type=int, default=3, help="timed calls per process")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before_rev, "src"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        sides = {"before": str(Path(tmp) / "src"), "after": str(ROOT / "src")}
        print(f"{args.method} on {args.model} ({args.layers} layers), 8 tasks; before = {args.before_rev}, "
              f"after = this tree; {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
        for r in range(args.rounds):
            for side in (("before", "after") if r % 2 == 0 else ("after", "before")):
                out = subprocess.run([sys.executable, "-c", WORKER, sides[side], args.method, args.model,
                                      str(args.layers), str(args.runs), str(HERE)], capture_output=True, text=True)
                if out.returncode != 0:
                    print(f"round {r + 1} {side}: failed\n{out.stderr[-2000:]}")
                    return 1
                times = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"round {r + 1} {side}: " + ", ".join(f"{t:.2f}" for t in times) + " s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
