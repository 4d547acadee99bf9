"""Wall time and peak memory of every data-free merging method on synthetic ViT-shaped checkpoints.

Builds a pretrained model and T fine-tuned models with open_clip vision-tower tensor names and
shapes (ViT-B/32: 12 blocks, width 768; ViT-L/14: 24 blocks, width 1024), writes them as
safetensors into a temporary folder, then runs each method in a fresh subprocess on lazily
loaded inputs (``taskmerge.io.LazyStateDict``: a tensor is read only when a method asks for it).
Each subprocess reports its wall time for the merge and its peak RSS (``ru_maxrss``), next to
the RSS of the same process before merging (Python + torch + the open files).

Run (heavy; serialize with the other helpers' heavy jobs):

    flock /tmp/taskmerge-heavy.lock .venv/bin/python benchmarks/merge_speed.py --models vit-b-32 vit-l-14

``--to-disk`` runs ``taskmerge merge METHOD … --output <tmp>/out/`` (the CLI, streamed to a sharded
folder) instead of the in-memory call, and reports the shards written; its peak anon RSS is the
streaming path's heap (the inputs are memory-mapped, so their pages are not anonymous memory).

Methods that need statistics (fisher, regmean, mats) or LoRA factors (knots, lora_merge) are
skipped. ``--timeout`` (seconds, per method) stops a method that runs too long; it is reported.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

SHAPES = {"vit-b-32": dict(width=768, layers=12, patch=32, grid=7, out=512),
          "vit-l-14": dict(width=1024, layers=24, patch=14, grid=16, out=768)}


def vision_tower_shapes(width: int, layers: int, patch: int, grid: int, out: int) -> dict[str, tuple]:
    """open_clip ``VisionTransformer`` state-dict names and shapes."""
    shapes = {"class_embedding": (width,), "positional_embedding": (grid * grid + 1, width),
              "proj": (width, out), "conv1.weight": (width, 3, patch, patch),
              "ln_pre.weight": (width,), "ln_pre.bias": (width,)}
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        shapes.update({p + "ln_1.weight": (width,), p + "ln_1.bias": (width,),
                       p + "attn.in_proj_weight": (3 * width, width), p + "attn.in_proj_bias": (3 * width,),
                       p + "attn.out_proj.weight": (width, width), p + "attn.out_proj.bias": (width,),
                       p + "ln_2.weight": (width,), p + "ln_2.bias": (width,),
                       p + "mlp.c_fc.weight": (4 * width, width), p + "mlp.c_fc.bias": (4 * width,),
                       p + "mlp.c_proj.weight": (width, 4 * width), p + "mlp.c_proj.bias": (width,)})
    shapes.update({"ln_post.weight": (width,), "ln_post.bias": (width,)})
    return shapes


def write_checkpoints(folder: Path, model: str, tasks: int) -> list[Path]:
    """θ0 ~ N(0, 0.02²) and θ_t = θ0 + N(0, 0.001²) per tensor; returns [pretrained, task files…]."""
    from safetensors.torch import save_file

    shapes = vision_tower_shapes(**SHAPES[model])
    g = torch.Generator().manual_seed(0)
    pre = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    paths = [folder / "pretrained.safetensors"]
    save_file(pre, paths[0])
    for t in range(tasks):
        ft = {k: v + torch.randn(v.shape, generator=g) * 1e-3 for k, v in pre.items()}
        paths.append(folder / f"task_{t}.safetensors")
        save_file(ft, paths[-1])
        del ft
    return paths


def run_one(method: str, files: list[str], to_disk: bool = False) -> dict:
    """In a fresh process: merge with lazily loaded inputs; report time and peak RSS.

    Peak RSS is VmHWM from /proc (per address space, so not inherited from the parent the way
    ``ru_maxrss`` is), reset just before the merge by writing 5 to /proc/self/clear_refs.
    """
    from taskmerge.io import load_model
    from taskmerge.merging import get_method

    m = get_method(method)
    pre = load_model(files[0])
    fts = [load_model(f) for f in files[1:]]
    base_rss = _proc_status_gib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    base_anon = _proc_status_gib("RssAnon")
    anon = [base_anon]
    done = threading.Event()
    sampler = threading.Thread(target=_sample_anon, args=(anon, done), daemon=True)
    sampler.start()
    start = time.perf_counter()
    if to_disk:
        from taskmerge.cli import main as cli

        out = Path(tempfile.mkdtemp(prefix="merge_speed_out_", dir=Path(files[0]).parent)) / "out"
        code = cli(["merge", method, "--pretrained", files[0], "--finetuned", *files[1:], "--output", str(out),
                    "--max-shard-size", "0.25"])
        if code != 0:
            raise RuntimeError(f"taskmerge merge {method} exited with {code}")
        result = sorted(out.rglob("*.safetensors"))
        import shutil

        shutil.rmtree(out.parent)  # the outputs are counted, not kept
    else:
        result = m(pre, fts)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    outputs = len(result) if isinstance(result, list) else 1
    peak = _proc_status_gib("VmHWM")
    return {"method": method, "sink": "disk" if to_disk else "memory", "seconds": seconds, "peak_rss_gib": peak, "peak_anon_gib": max(anon),
            "base_rss_gib": base_rss, "base_anon_gib": base_anon, "outputs": outputs}


def _sample_anon(out: list, done: threading.Event) -> None:
    """Peak anonymous RSS (heap: excludes the memory-mapped input files), sampled every 20 ms."""
    while not done.wait(0.02):
        out[0:1] = [max(out[0], _proc_status_gib("RssAnon"))]


def _proc_status_gib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20  # kB → GiB
    raise RuntimeError(f"/proc/self/status has no {field}")


def data_free_methods() -> list[str]:
    from taskmerge.merging import METHODS

    return [n for n, m in METHODS.items() if m.inputs == "state_dict" and "stats" not in m.context]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vit-b-32"], choices=sorted(SHAPES))
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--methods", nargs="*", help="default: every data-free method")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per method before it is stopped")
    ap.add_argument("--json", type=Path, help="append one JSON line per result here")
    ap.add_argument("--to-disk", action="store_true", help="run `taskmerge merge` to a sharded folder instead")
    ap.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        print(json.dumps(run_one(args._child[0], args._child[1:], args.to_disk)))
        return 0
    methods = args.methods or data_free_methods()
    print("| model | method | wall time (s) | peak RSS (GiB) | peak anon RSS (GiB) | before merge: RSS / anon (GiB) "
          "| outputs (files) | memory declared |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for model in args.models:
        with tempfile.TemporaryDirectory(prefix=f"merge_speed_{model}_") as tmp:
            files = [str(p) for p in write_checkpoints(Path(tmp), model, args.tasks)]
            for method in methods:
                cmd = [sys.executable, __file__, *(["--to-disk"] if args.to_disk else []), "--_child", method, *files]
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                except subprocess.TimeoutExpired:
                    print(f"| {model} | {method} | > {args.timeout:.0f} (stopped) | – | – | – |", flush=True)
                    continue
                if proc.returncode != 0:
                    err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"| {model} | {method} | failed: {err} | – | – | – |", flush=True)
                    continue
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                res.update(model=model, tasks=args.tasks)
                if args.json:
                    with open(args.json, "a") as fh:
                        fh.write(json.dumps(res) + "\n")
                from taskmerge.merging import get_method

                print(f"| {model} | {method} | {res['seconds']:.1f} | {res['peak_rss_gib']:.2f} | "
                      f"{res['peak_anon_gib']:.2f} | {res['base_rss_gib']:.2f} / {res['base_anon_gib']:.2f} | "
                      f"{res['outputs']} | {get_method(method).memory} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
