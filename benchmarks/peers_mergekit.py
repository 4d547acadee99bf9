"""taskmerge against mergekit 0.1.5 on disk, side by side: merge time, peak memory, ratio, agreement.

Inputs: ``merge_8b.py``'s synthetic Llama-3-8B-width ``LlamaForSequenceClassification`` (bf16; base and 3
fine-tuned models = base + 1e-3·N(0,1); ``--layers`` decoder layers at full width, default 2, embeddings,
norm and head always), each folder with a ``config.json`` so that mergekit knows the architecture
(its ``llama-sequence-classification`` definition). Built once under ``--root`` and reused.

Each row runs each peer in a fresh process (``--child``), alternating which goes first by row, and
times the whole on-disk merge: read, merge, write a sharded bf16 folder.

- taskmerge: ``io.merge_writer.write_merged`` (what ``taskmerge merge`` runs) over lazy ``ShardedReader`` s.
- mergekit: ``mergekit.merge.run_merge`` with the same hyperparameters, ``dtype: float32`` (the maths in
  float32, as taskmerge's) and ``out_dtype: bfloat16``; no CUDA, no tokenizer copy, no model card.

Memory: peak RSS of the child (``ru_maxrss``) minus its RSS just before the call. Agreement: the largest
|taskmerge − mergekit| over every tensor and the share of entries that differ, for the deterministic rows
(DELLA draws its masks from each library's own RNG). TIES and Breadcrumbs differ where |τ| ties at the
trim threshold (bf16 inputs give many equal magnitudes): taskmerge's TIES keeps every tie (the official
rule), its Breadcrumbs breaks ties by position (a stable sort); mergekit keeps exactly int(d·density)
entries, in the order of an unstable sort. mergekit is imported from a ``pip install --target`` folder
(``--peer-dir``, default ``.peers-mergekit/``; benchmarks/README.md has the commands).

    flock /tmp/taskmerge-heavy.lock .venv/bin/python benchmarks/peers_mergekit.py --root /work/tmp-mk
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import merge_8b as m8  # noqa: E402  (the input builder)

# method -> (taskmerge hyperparameters, mergekit method, mergekit per-model parameters, shared parameters)
ROWS = {
    "task_arithmetic": ({"scaling": 0.3}, "task_arithmetic", {"weight": 0.3}, {}),
    # mergekit's TIES: per-tensor trim keeping int(d·density) entries, sum election, disjoint mean
    "ties": ({"k": 20.0, "merge": "mean", "scaling": 1.0, "trim_scope": "per_tensor", "trim_count": "exact"},
             "ties", {"weight": 1.0, "density": 0.2}, {}),
    "breadcrumbs": ({"density": 0.9, "gamma": 0.01, "scaling": 1.0}, "breadcrumbs",
                    {"weight": 1.0, "density": 0.9, "gamma": 0.01}, {}),
    "della": ({"density": 0.5, "epsilon": 0.1, "scaling": 1.0, "rescale": "l1"}, "della",
              {"weight": 1.0, "density": 0.5, "epsilon": 0.1}, {"lambda": 1.0}),
    "model_stock": ({}, "model_stock", {}, {}),
}
RANDOM = {"della"}
PEERS = ("taskmerge", "mergekit")


def config_json(layers: int) -> dict:
    return {"architectures": ["LlamaForSequenceClassification"], "model_type": "llama",
            "hidden_size": m8.HIDDEN, "intermediate_size": m8.MLP, "num_hidden_layers": layers,
            "num_attention_heads": m8.HEADS, "num_key_value_heads": m8.KV_HEADS, "head_dim": m8.HEAD_DIM,
            "vocab_size": m8.VOCAB, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
            "id2label": {str(i): f"label_{i}" for i in range(m8.LABELS)}}


def build(root: Path, layers: int) -> None:
    for name, seed, noise in [("base", 0, 0.0)] + [(f"ft{i}", i + 1, 1e-3) for i in range(3)]:
        if not (root / name / "config.json").exists():
            shutil.rmtree(root / name, ignore_errors=True)
            m8.build_model(root / name, layers, seed, noise)
            (root / name / "config.json").write_text(json.dumps(config_json(layers), indent=1))


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child(root: Path, method: str, peer: str, out: Path, peer_dir: str) -> dict:
    import torch

    torch.set_num_threads(2 if (torch.get_num_threads() or 1) >= 2 else 1)
    tm_hp, mk_method, per_model, shared = ROWS[method]
    shutil.rmtree(out, ignore_errors=True)
    if peer == "taskmerge":
        from taskmerge.io.merge_writer import write_merged
        from taskmerge.io.sharded import ShardedReader
        from taskmerge.merging import get_method

        base, fts = ShardedReader(root / "base"), [ShardedReader(root / f"ft{i}") for i in range(3)]
        call = lambda: write_merged(get_method(method), base, fts, out, hparams=tm_hp, progress=False)  # noqa: E731
        version = "this checkout"
    else:
        sys.path.insert(0, peer_dir)
        import importlib.metadata

        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        config = MergeConfiguration.model_validate({
            "merge_method": mk_method, "base_model": str(root / "base"),
            "models": [{"model": str(root / f"ft{i}"), "parameters": per_model} for i in range(3)],
            "parameters": shared, "dtype": "float32", "out_dtype": "bfloat16"})
        options = MergeOptions(cuda=False, copy_tokenizer=False, write_model_card=False, quiet=True,
                               random_seed=0)
        call = lambda: run_merge(config, str(out), options)  # noqa: E731
        version = importlib.metadata.version("mergekit")
    before = _rss_bytes()
    t0 = time.perf_counter()
    call()
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peer": peer, "method": method, "version": version, "wall_s": wall, "extra_bytes": peak - before}


def agreement(a: Path, b: Path) -> dict:
    """max |a − b| over every tensor of two merged folders (same names), and the share of entries that differ."""
    from taskmerge.io.sharded import ShardedReader

    ra, rb = ShardedReader(a), ShardedReader(b)
    if set(ra) != set(rb):
        raise ValueError(f"{a} and {b} hold different tensor names: {sorted(set(ra) ^ set(rb))[:5]}")
    worst, differ, total = 0.0, 0, 0
    for k in ra:
        d = (ra[k].float() - rb[k].float()).abs()
        worst, differ, total = max(worst, float(d.max())), differ + int((d > 0).sum()), total + d.numel()
    return {"max_abs_diff": worst, "differ_share": differ / max(total, 1)}


def run_row(args, index: int, method: str) -> dict:
    order = PEERS if index % 2 == 0 else PEERS[::-1]
    res = {}
    for peer in order:
        out = Path(args.root) / f"out-{peer}"
        proc = subprocess.run([sys.executable, __file__, "--root", args.root, "--layers", str(args.layers),
                               "--peer-dir", args.peer_dir, "--child", json.dumps([method, peer, str(out)])]
                              + (["--tiny"] if args.tiny else []), capture_output=True, text=True)
        if proc.returncode != 0:  # a negative code is the signal (-9: killed, e.g. out of memory)
            lines = [ln for ln in proc.stderr.strip().splitlines() if "Error" in ln or "error" in ln]
            res[peer] = {"error": f"exit {proc.returncode}" + (f": {lines[-1]}" if lines else "")}
            continue
        res[peer] = json.loads(proc.stdout.strip().splitlines()[-1])
    outs = [Path(args.root) / f"out-{p}" for p in PEERS]
    if method not in RANDOM and all("wall_s" in res.get(p, {}) for p in PEERS):
        res.update(agreement(*outs))
    for o in outs:
        shutil.rmtree(o, ignore_errors=True)
    return {"method": method, "layers": args.layers, **res}


def cell(r: dict) -> str:
    if "error" in r:
        return f"error: {r['error'][:80]}"
    return f"{r['wall_s']:.1f} s, +{r['extra_bytes'] / 2**30:.2f} GiB"


def table(rows: list[dict]) -> str:
    lines = ["| method | mergekit | taskmerge | taskmerge speed ÷ mergekit | outputs: max abs difference |",
             "|---|---|---|---:|---|"]
    for r in rows:
        mk, tm = r.get("mergekit", {}), r.get("taskmerge", {})
        ratio = f"{mk['wall_s'] / tm['wall_s']:.2f}×" if "wall_s" in mk and "wall_s" in tm else "–"
        diff = (f"{r['max_abs_diff']:.1e} ({100 * r['differ_share']:.2f} % of entries)" if "max_abs_diff" in r
                else "random masks" if r["method"] in RANDOM else "–")
        lines.append(f"| {r['method']} | {cell(mk)} | {cell(tm)} | {ratio} | {diff} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="folder for the synthetic inputs (kept for reuse) and outputs")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers at full width (of 32)")
    ap.add_argument("--methods", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--peer-dir", default=str(HERE.parent / ".peers-mergekit"),
                    help="the pip --target folder holding mergekit")
    ap.add_argument("--json", type=Path, help="append one JSON line per row here")
    ap.add_argument("--tiny", action="store_true", help="smoke test: shrink every dimension")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tiny:
        m8.VOCAB, m8.HIDDEN, m8.MLP = 512, 64, 224
        m8.HEAD_DIM = m8.HIDDEN // m8.HEADS
    root = Path(args.root)
    if args.child:
        method, peer, out = json.loads(args.child)
        print(json.dumps(child(root, method, peer, Path(out), args.peer_dir)))
        return
    if not (Path(args.peer_dir) / "mergekit").is_dir():
        sys.exit(f"mergekit is not installed in {args.peer_dir} (see benchmarks/README.md, 'mergekit rows')")
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    build(root, args.layers)
    params = sum(m8.numel(s) for _, s in m8.model_shapes(args.layers))
    print(f"inputs: {params / 1e9:.2f}B parameters per model, bf16, base + 3 fine-tuned "
          f"({time.perf_counter() - t0:.0f} s to build or find)", flush=True)
    rows = []
    for i, method in enumerate(args.methods):
        rows.append(run_row(args, i, method))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    print("\n" + table(rows))


if __name__ == "__main__":
    main()
