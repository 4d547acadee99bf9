"""Streamed merging at Llama-3-8B width on a small CPU machine: wall time and peak RSS per method.

Builds synthetic inputs on disk with Llama-3-8B's tensor shapes (LlamaForSequenceClassification:
vocab 128256, hidden 4096, MLP 14336, 32 query / 8 key-value heads, 3 labels; bf16):

- the base model and 3 fully fine-tuned task models (base + small noise), sharded safetensors;
- 6 peft LoRA adapters, r=16, alpha 16, on q/k/v/o of every decoder layer built.

``--layers N`` builds N of the 32 decoder layers at full width (embeddings, norm and head always
included). Each method runs in a fresh subprocess (``--child``) under ``io.merge_writer.write_merged`` (what ``taskmerge merge`` runs) and reports
its own wall time and peak RSS (``ru_maxrss``: the reader uses ``pread``, not mmap, so RSS is what
the process holds). Per-tensor write times give the per-layer cost, from which a 32-layer
figure is extrapolated (labelled as such in the output); ``--layers 32`` is measured, not extrapolated.

The disk must hold base, 3 fine-tuned models and the output (plus OPCM's float32 τ̄ spill): the run
prints what it will write and refuses when the disk lacks it. ``--finetuned-on-the-fly`` writes only the
base: the fine-tuned tensors are generated from it at every read (``FinetunedOnTheFly``, the same values
as on disk), the output and results say so, and their generation time is part of each wall time.

    flock /tmp/taskmerge-heavy.lock .venv/bin/python benchmarks/merge_8b.py --root /work/tmp-merge8b --layers 2
    flock /tmp/taskmerge-heavy.lock .venv/bin/python benchmarks/merge_8b.py --root /work/tmp-merge8b --layers 32 \
        --finetuned-on-the-fly --methods task_arithmetic,ties,tsv_m,opcm
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
from collections.abc import Mapping
from pathlib import Path

import torch

VOCAB, HIDDEN, MLP, HEADS, KV_HEADS, LABELS, FULL_LAYERS = 128256, 4096, 14336, 32, 8, 3, 32
HEAD_DIM = HIDDEN // HEADS
NOISE = 1e-3  # fine-tuned = base + NOISE·N(0,1)
BLOCK_NUMEL = 2**25  # elements per generated block of a tensor (each block has its own seed)
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


def block_rows(shape) -> int:
    """Rows per generated block (BLOCK_NUMEL elements; a 1-D tensor is one block). Every block has its
    own seed, so any rows of a tensor can be generated without the rest."""
    return max(1, BLOCK_NUMEL // numel(shape[1:]) if len(shape) > 1 else shape[0])


NOISE_BANK = 2 * BLOCK_NUMEL  # standard normals every noise block is a slice of
_BANKS: dict[float, torch.Tensor] = {}


def _bank(noise: float) -> torch.Tensor:
    """noise · N(0, 1) in bf16, NOISE_BANK values drawn once per process (256 MB as float32 while drawn).

    Drawing fresh normals for every block cost ≈ 400 s of each pass over 3 × 7.5B fine-tuned values at 32
    layers (``torch.randn`` at ≈ 190 M/s, 1 thread); a seeded slice of one bank costs a view.
    """
    if noise not in _BANKS:
        _BANKS[noise] = _tensor(2**31 - 1, (NOISE_BANK,), noise)
    return _BANKS[noise]


def _noise_block(seed: int, idx: int, start: int, shape, noise: float) -> torch.Tensor:
    """The fine-tuning noise of model ``seed`` for the block of tensor ``idx`` starting at row ``start``: a
    slice of the bank at an offset drawn from the block's own seed (a view, bf16)."""
    rows = (min(block_rows(shape), shape[0] - start), *shape[1:])
    n = numel(rows)
    g = torch.Generator().manual_seed(10**7 * seed + 1000 * idx + start)
    offset = int(torch.randint(0, NOISE_BANK - n + 1, (1,), generator=g))
    return _bank(noise)[offset:offset + n].view(rows)


def build_model(folder: Path, layers: int, seed: int, noise: float) -> None:
    """Base (noise=0) or fine-tuned (base + noise·N(0,1)) model; one tensor in memory at a time."""
    from taskmerge.io.sharded import ShardedWriter

    shapes = model_shapes(layers)
    with ShardedWriter(folder, [(k, s, torch.bfloat16) for k, s in shapes], max_shard_bytes=5 * 2**30) as w:
        for idx, (key, shape) in enumerate(shapes):
            step = block_rows(shape)
            for start in range(0, shape[0], step):
                rows = (min(step, shape[0] - start), *shape[1:])
                t = _tensor(1000 * idx + start, rows, 0.02).float()
                if noise:
                    t += _noise_block(seed, idx, start, shape, noise).float()
                w.write_rows(key, start, t.to(torch.bfloat16))


class FinetunedOnTheFly(Mapping):
    """Fine-tuned model ``seed`` generated from the base at every read, never stored: base + noise·N(0,1)
    in bf16, bit-identical to what ``build_model(folder, layers, seed, noise)`` writes to disk.

    ``rows(key, a, b)`` reads rows a:b of the base and generates only the noise blocks that overlap
    them (each block from its own seed), so its cost grows with b − a and the values do not depend on
    how a caller splits its reads. Offers what ``write_merged`` and the methods use of a
    ``ShardedReader``: the mapping in the base's (= build_model's) key order, ``shape``, ``dtype``, ``rows``.
    """

    def __init__(self, base, seed: int, noise: float = NOISE):
        self.base, self.seed, self.noise = base, seed, noise
        self.index = {key: i for i, key in enumerate(base)}  # the seed's tensor index, as in build_model
        self.generate_s = 0.0  # seconds spent making noise and adding it (the child reports it)

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        shape, idx = self.base.shape(key), self.index[key]
        out = self.base.rows(key, start, stop)
        t0, step = time.perf_counter(), block_rows(shape)
        for s in range(start - start % step, stop, step):
            lo, hi = max(start, s), min(stop, s + step)
            noise = _noise_block(self.seed, idx, s, shape, self.noise)[lo - s:hi - s]
            # the same float32 sum and bf16 rounding as build_model
            out[lo - start:hi - start] = (out[lo - start:hi - start].float() + noise.float()).to(torch.bfloat16)
        self.generate_s += time.perf_counter() - t0
        return out

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.rows(key, 0, self.base.shape(key)[0])

    def shape(self, key: str) -> tuple[int, ...]:
        return self.base.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.base.dtype(key)

    def __iter__(self):
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    def __contains__(self, key) -> bool:
        return key in self.base


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
    from taskmerge.io.merge_writer import partial_folder, write_merged
    from taskmerge.io.sharded import ShardedReader, journaled
    from taskmerge.merging import get_method

    torch.set_num_threads(os.cpu_count() or 1)
    root, method = Path(args.root), args.child
    kind, hp = METHODS[method]
    out = root / f"out-{method}"
    shutil.rmtree(out, ignore_errors=True)
    base = ShardedReader(root / "base")
    fts = [FinetunedOnTheFly(base, i + 1) if args.finetuned_on_the_fly else ShardedReader(root / f"ft{i}")
           for i in range(3)] if kind == "full" else []
    resumed = len(journaled(partial_folder(out))) if args.resume else 0
    times, t0 = [], time.perf_counter()
    log = open(root / f"resume-{method}.log", "a") if args.resume else None  # a killed part's times survive

    def on_write(key):
        times.append((key, time.perf_counter() - t0))
        if log is not None:
            print(json.dumps({"key": key, "s": round(times[-1][1], 2), "part_started": started}), file=log, flush=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    if kind == "lora":
        lora = [load_lora_factors(root / f"lora{i}", base) for i in range(6)]
        write_merged(get_method(method), base, lora, out, hparams=hp, context={"lora": lora}, progress=False,
                     on_write=on_write)
    else:  # the scratch (OPCM's τ̄) lives beside the output, under root
        write_merged(get_method(method), base, fts, out, hparams=hp, progress=False, on_write=on_write,
                     resume=args.resume)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if not args.keep_outputs:
        shutil.rmtree(out, ignore_errors=True)
    row = {"method": method, "wall_s": wall, "peak_rss_bytes": rss, "writes": times}
    if args.resume:  # wall_s is this part only; earlier parts are counted to their last logged write
        log.close()
        row["resumed_tensors"] = resumed
        row["parts"] = earlier_parts(root / f"resume-{method}.log", started) + [[started, wall, len(times)]]
        row["total_s_all_parts"] = sum(p[1] for p in row["parts"])
    if kind == "full" and args.finetuned_on_the_fly:  # included in wall_s: generation, not a disk read
        row["finetuned_generated_s"] = sum(ft.generate_s for ft in fts)
    print(json.dumps(row))


def earlier_parts(log: Path, current: str) -> list:
    """[[started, seconds to its last logged write, tensors written]] of the earlier parts in a resume log."""
    parts: dict[str, list] = {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        if entry["part_started"] != current:
            part = parts.setdefault(entry["part_started"], [entry["part_started"], 0.0, 0])
            part[1], part[2] = max(part[1], entry["s"]), part[2] + 1
    return sorted(parts.values())


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


GiB = 2**30
DISK_SPARE = 5 * GiB  # left free: a disk filled mid-write kills this run and whatever else writes there


def disk_needs(root: Path, layers: int, methods: list[str], on_the_fly: bool, keep_outputs: bool
               ) -> list[tuple[str, int]]:
    """(what, bytes) this run still writes under ``root``: the inputs not built yet, then the merged
    output (one at a time: each is removed after its method unless kept) with OPCM's τ̄ spill beside it."""
    model = 2 * sum(numel(s) for _, s in model_shapes(layers))  # bf16
    kinds = {METHODS[m][0] for m in methods}
    needs = [] if (root / "base").exists() else [("base", model)]
    if "full" in kinds and on_the_fly:
        needs.append(("3 fine-tuned generated on the fly", 0))
    elif "full" in kinds:
        todo = sum(not (root / f"ft{i}").exists() for i in range(3))
        needs += [(f"{todo} fine-tuned", todo * model)] if todo else []
    if "lora" in kinds:
        todo = sum(not (root / f"lora{i}").exists() for i in range(6))
        per_layer = sum(2 * 16 * sum(s) for k, s in layer_shapes(0) if "self_attn" in k)  # r=16, bf16
        needs += [(f"{todo} LoRA adapters", todo * layers * per_layer)] if todo else []
    outputs = len(methods) if keep_outputs else 1
    needs.append((f"{outputs} merged output{'s' if outputs > 1 else ''}", outputs * model))
    if "opcm" in methods:
        needs.append(("OPCM's τ̄ spill (float32)", 2 * model))
    return needs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="scratch folder on a disk with room (removed afterwards)")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers built at full width (of 32)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--finetuned-on-the-fly", action="store_true",
                    help="do not write the 3 fine-tuned models: generate them from the base at every read "
                         "(FinetunedOnTheFly, the same values as on disk); the disk holds base + output only")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic inputs")
    ap.add_argument("--keep-outputs", action="store_true",
                    help="keep each merged model as ROOT/out-METHOD (and the inputs): for checking results")
    ap.add_argument("--json", help="results file (default: benchmarks/merge_8b_results.json)")
    ap.add_argument("--resume", action="store_true",
                    help="resumable methods (tsv_m, task_arithmetic, …): build each output in ROOT/.out-METHOD.partial "
                         "and finish an interrupted one found there; each row's wall_s is then this part only, "
                         "with resumed_tensors = the tensors an earlier part wrote, parts = [started, seconds to "
                         "the last logged write, tensors] from ROOT/resume-METHOD.log and total_s_all_parts")
    ap.add_argument("--tiny", action="store_true", help="smoke test: shrink every dimension")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tiny:
        global VOCAB, HIDDEN, MLP, HEAD_DIM
        VOCAB, HIDDEN, MLP = 512, 64, 224
        HEAD_DIM = HIDDEN // HEADS
    if args.child:
        return child(args)
    root, methods, on_the_fly = Path(args.root), args.methods.split(","), args.finetuned_on_the_fly
    needs = disk_needs(root, args.layers, methods, on_the_fly, args.keep_outputs)
    need = sum(n for _, n in needs)
    existing = next(p for p in [root, *root.parents] if p.exists())
    free = shutil.disk_usage(existing).free
    print(f"disk: {' + '.join(f'{what} {n / GiB:.1f} GiB' for what, n in needs)} = {need / GiB:.1f} GiB "
          f"to write under {root}; {free / GiB:.1f} GiB free", flush=True)
    if need + DISK_SPARE > free:
        sys.exit(f"not enough disk: {need / GiB:.1f} GiB needed + {DISK_SPARE / GiB:.0f} GiB kept spare > "
                 f"{free / GiB:.1f} GiB free under {existing} (try --finetuned-on-the-fly, fewer methods or layers)")
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        kinds = {METHODS[m][0] for m in methods}  # build only what the methods read
        if not (root / "base").exists():
            build_model(root / "base", args.layers, 0, 0.0)
        for i in range(3 if "full" in kinds and not on_the_fly else 0):
            if not (root / f"ft{i}").exists():
                build_model(root / f"ft{i}", args.layers, i + 1, NOISE)
        for i in range(6 if "lora" in kinds else 0):
            if not (root / f"lora{i}").exists():
                build_adapter(root / f"lora{i}", args.layers, 100 + i)
        build_s = time.perf_counter() - t0
        inputs = [root / "base", *root.glob("ft[0-9]"), *root.glob("lora[0-9]")]  # not outputs or leftovers
        disk = sum(f.stat().st_size for d in inputs for f in d.rglob("*") if f.is_file())
        params = sum(numel(s) for _, s in model_shapes(args.layers))
        print(f"inputs: {params / 1e9:.2f}B parameters per model ({args.layers} of {FULL_LAYERS} decoder layers at "
              f"full width), {disk / GiB:.1f} GiB on disk, built in {build_s:.0f}s"
              + ("; the 3 fine-tuned models are generated on the fly, not read from disk" if on_the_fly else ""),
              flush=True)
        rows, full = [], args.layers == FULL_LAYERS
        for method in methods:
            proc = subprocess.run([sys.executable, __file__, "--root", str(root), "--layers", str(args.layers),
                                   "--child", method] + (["--tiny"] if args.tiny else [])
                                  + (["--finetuned-on-the-fly"] if on_the_fly else [])
                                  + (["--keep-outputs"] if args.keep_outputs else [])
                                  + (["--resume"] if args.resume else []), capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{method}: FAILED\n{proc.stderr[-3000:]}", flush=True)
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            if not full and not res.get("resumed_tensors"):  # a resumed part's writes cover part of the model
                res["extrapolated_32_s"] = extrapolate(res, args.layers)
            rows.append(res)
            gen = res.get("finetuned_generated_s")
            print(f"{method}: {res['wall_s']:.1f}s, peak RSS {res['peak_rss_bytes'] / GiB:.2f} GiB"
                  + ("" if gen is None else f" (of which {gen:.1f}s generating the fine-tuned inputs)")
                  + (f" (extrapolated to 32 layers: {res['extrapolated_32_s'] / 60:.1f} min)"
                     if "extrapolated_32_s" in res else "")
                  + (f"; {len(res['parts'])} parts: {res['total_s_all_parts']:.1f}s in all"
                     if len(res.get("parts", [])) > 1 else ""),
                  flush=True)
        print(f"\n| method | inputs | measured wall ({args.layers} layers) | peak RSS | "
              f"wall, 32 layers |\n|---|---|---|---|---|")
        for r in rows:
            if METHODS[r["method"]][0] == "lora":
                kind = "6 LoRA r=16"
            elif "finetuned_generated_s" in r:
                kind = f"base + 3 fine-tuned generated on the fly ({r['finetuned_generated_s']:.0f} s of the wall)"
            else:
                kind = "3 full bf16 + base"
            est = (f"≈ {r['extrapolated_32_s'] / 60:.0f} min (extrapolated)" if "extrapolated_32_s" in r
                   else f"{r['wall_s'] / 60:.1f} min (measured)")
            if len(r.get("parts", [])) > 1:
                est = f"{r['total_s_all_parts'] / 60:.1f} min (measured, {len(r['parts'])} parts summed)"
            print(f"| {r['method']} | {kind} | {r['wall_s']:.0f} s | {r['peak_rss_bytes'] / GiB:.2f} GiB | {est} |")
        finetuned = ("generated on the fly from the base (FinetunedOnTheFly: seeded noise, not read from disk)"
                     if on_the_fly else "on disk")
        if on_the_fly:
            print(f"\nFine-tuned inputs: {finetuned}; their generation is part of each wall time.")
        out = Path(args.json) if args.json else Path(__file__).parent / "merge_8b_results.json"
        out.write_text(json.dumps({"layers": args.layers, "params_per_model": params, "finetuned_inputs": finetuned,
                                   "rows": rows}, indent=1))
    finally:
        if not (args.keep or args.keep_outputs):
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
