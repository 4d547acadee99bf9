"""Streamed merging at Llama-3-8B width on a small CPU machine: wall time and peak RSS per method.

Builds synthetic inputs on disk with Llama-3-8B's tensor shapes (LlamaForSequenceClassification:
vocab 128256, hidden 4096, MLP 14336, 32 query / 8 key-value heads, 3 labels; bf16):

- the base model and 3 fully fine-tuned task models (base + small noise), sharded safetensors;
- 6 peft LoRA adapters, r=16, alpha 16, on q/k/v/o of every decoder layer built.

``--layers N`` builds N of the 32 decoder layers at full width (embeddings, norm and head always
included). Each method runs in a fresh subprocess (``--child``) under ``io.merge_writer.write_merged`` (what ``taskmerge merge`` runs) and reports
its own wall time and peak RSS (``ru_maxrss``: the reader uses ``pread``, not mmap, so RSS is what
the process holds). Per-tensor write times give the per-layer cost, from which a 32-layer
figure is extrapolated (labelled as such in the output).

    flock /tmp/taskmerge-heavy.lock .venv/bin/python benchmarks/merge_8b.py --root /work/tmp-merge8b --layers 2
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

VOCAB, HIDDEN, MLP, HEADS, KV_HEADS, LABELS, FULL_LAYERS = 128256, 4096, 14336, 32, 8, 3, 32
HEAD_DIM = HIDDEN // HEADS
METHODS = {  # name -> (inputs, hyperparameters)
    "task_arithmetic": ("full", {"scaling": 0.3}),
    "ties": ("full", {"k": 20, "scaling": 1.0, "trim_scope": "global"}),
    "tsv_m": ("full", {"scaling": 1.0, "svd_scope": "linear"}),
    "knots": ("lora", {"inner": "ties", "k": 100, "scaling": 0.5}),
    "opcm": ("full", {"alpha": 0.5}),
}


def layer_shapes(i: int) -> list[tuple[str, tuple]]:
    p = f"model.layers.{i}."
    return [(p + "input_layernorm.weight", (HIDDEN,)),
            (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
            (p + "self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
            (p + "mlp.gate_proj.weight", (MLP, HIDDEN)),
            (p + "mlp.up_proj.weight", (MLP, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, MLP))]


def model_shapes(layers: int) -> list[tuple[str, tuple]]:
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        out += layer_shapes(i)
    return out + [("model.norm.weight", (HIDDEN,)), ("score.weight", (LABELS, HIDDEN))]


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _tensor(seed: int, shape, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(torch.bfloat16)


def build_model(folder: Path, layers: int, seed: int, noise: float) -> None:
    """Base (noise=0) or fine-tuned (base + noise·N(0,1)) model; one tensor in memory at a time."""
    from taskmerge.io.sharded import ShardedWriter

    shapes = model_shapes(layers)
    with ShardedWriter(folder, [(k, s, torch.bfloat16) for k, s in shapes], max_shard_bytes=5 * 2**30) as w:
        for idx, (key, shape) in enumerate(shapes):
            step = max(1, 2**25 // numel(shape[1:]) if len(shape) > 1 else shape[0])
            for start in range(0, shape[0], step):
                rows = (min(step, shape[0] - start), *shape[1:])
                t = _tensor(1000 * idx + start, rows, 0.02).float()
                if noise:
                    t += _tensor(10**7 * seed + 1000 * idx + start, rows, noise).float()
                w.write_rows(key, start, t.to(torch.bfloat16))


def build_adapter(folder: Path, layers: int, seed: int, r: int = 16) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    g = torch.Generator().manual_seed(seed)
    for i in range(layers):
        for key, (out, inp) in [(k, s) for k, s in layer_shapes(i) if "self_attn" in k]:
            module = "base_model.model." + key[: -len(".weight")]
            tensors[module + ".lora_A.weight"] = (torch.randn(r, inp, generator=g) / inp ** 0.5).to(torch.bfloat16)
            tensors[module + ".lora_B.weight"] = (torch.randn(out, r, generator=g) * 1e-3).to(torch.bfloat16)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 16, "lora_dropout": 0.1, "task_type": "SEQ_CLS",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}))


def child(args) -> None:
    """Run one method; print one JSON line with wall time, peak RSS and per-tensor write times."""
    from taskmerge.io.peft import load_lora_factors
    from taskmerge.io.sharded import ShardedReader
    from taskmerge.io.merge_writer import write_merged
    from taskmerge.merging import get_method

    torch.set_num_threads(os.cpu_count() or 1)
    root, method = Path(args.root), args.child
    kind, hp = METHODS[method]
    out = root / f"out-{method}"
    shutil.rmtree(out, ignore_errors=True)
    base = ShardedReader(root / "base")
    times, t0 = [], time.perf_counter()
    on_write = lambda key: times.append((key, time.perf_counter() - t0))  # noqa: E731
    if kind == "lora":
        lora = [load_lora_factors(root / f"lora{i}", base) for i in range(6)]
        write_merged(get_method(method), base, lora, out, hparams=hp, context={"lora": lora}, progress=False,
                     on_write=on_write)
    else:  # the scratch (OPCM's τ̄) lives beside the output, under root
        write_merged(get_method(method), base, [ShardedReader(root / f"ft{i}") for i in range(3)], out, hparams=hp,
                     progress=False, on_write=on_write)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"method": method, "wall_s": wall, "peak_rss_bytes": rss, "writes": times}))


def extrapolate(result: dict, layers: int) -> float:
    """32-layer wall time: layer tensors' write-phase time ×32/N, the time before the first write
    (global passes) × (32-layer params / run params) — ×32/N for KnOTS, whose pre-pass is its SVDs."""
    writes = result["writes"]
    first = writes[0][1] if writes else result["wall_s"]
    prev, layer_t, other_t = first, 0.0, 0.0
    for key, t in writes[1:]:
        if re.search(r"\.layers\.\d+\.", key):
            layer_t += t - prev
        else:
            other_t += t - prev
        prev = t
    tail = result["wall_s"] - prev
    run_params = sum(numel(s) for _, s in model_shapes(layers))
    full_params = sum(numel(s) for _, s in model_shapes(FULL_LAYERS))
    pre_scale = FULL_LAYERS / layers if result["method"] == "knots" else full_params / run_params
    return first * pre_scale + layer_t * FULL_LAYERS / layers + other_t + tail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="scratch folder on a disk with room (removed afterwards)")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers built at full width (of 32)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--keep", action="store_true", help="keep the synthetic inputs")
    ap.add_argument("--json", help="results file (default: benchmarks/merge_8b_results.json)")
    ap.add_argument("--tiny", action="store_true", help="smoke test: shrink every dimension")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tiny:
        global VOCAB, HIDDEN, MLP, HEAD_DIM
        VOCAB, HIDDEN, MLP = 512, 64, 224
        HEAD_DIM = HIDDEN // HEADS
    if args.child:
        return child(args)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        kinds = {METHODS[m][0] for m in args.methods.split(",")}  # build only what the methods read
        if not (root / "base").exists():
            build_model(root / "base", args.layers, 0, 0.0)
        for i in range(3 if "full" in kinds else 0):
            if not (root / f"ft{i}").exists():
                build_model(root / f"ft{i}", args.layers, i + 1, 1e-3)
        for i in range(6 if "lora" in kinds else 0):
            if not (root / f"lora{i}").exists():
                build_adapter(root / f"lora{i}", args.layers, 100 + i)
        build_s = time.perf_counter() - t0
        disk = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        params = sum(numel(s) for _, s in model_shapes(args.layers))
        print(f"inputs: {params / 1e9:.2f}B parameters per model ({args.layers} of {FULL_LAYERS} decoder layers at "
              f"full width), {disk / 2**30:.1f} GiB on disk, built in {build_s:.0f}s", flush=True)
        rows = []
        for method in args.methods.split(","):
            proc = subprocess.run([sys.executable, __file__, "--root", str(root), "--layers", str(args.layers),
                                   "--child", method] + (["--tiny"] if args.tiny else []), capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{method}: FAILED\n{proc.stderr[-3000:]}", flush=True)
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            full = args.layers == FULL_LAYERS
            if not full:
                res["extrapolated_32_s"] = extrapolate(res, args.layers)
            rows.append(res)
            print(f"{method}: {res['wall_s']:.1f}s, peak RSS {res['peak_rss_bytes'] / 2**30:.2f} GiB"
                  + ("" if full else f" (extrapolated to 32 layers: {res['extrapolated_32_s'] / 60:.1f} min)"),
                  flush=True)
        print(f"\n| method | inputs | measured wall ({args.layers} layers) | peak RSS | "
              f"extrapolated wall, 32 layers |\n|---|---|---|---|---|")
        for r in rows:
            kind = "6 LoRA r=16" if METHODS[r["method"]][0] == "lora" else "3 full bf16 + base"
            est = (f"≈ {r['extrapolated_32_s'] / 60:.0f} min (extrapolated)" if "extrapolated_32_s" in r
                   else f"{r['wall_s'] / 60:.1f} min (measured)")
            print(f"| {r['method']} | {kind} | {r['wall_s']:.0f} s | {r['peak_rss_bytes'] / 2**30:.2f} GiB | {est} |")
        out = Path(args.json) if args.json else Path(__file__).parent / "merge_8b_results.json"
        out.write_text(json.dumps({"layers": args.layers, "params_per_model": params, "rows": rows}, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
