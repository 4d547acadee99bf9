"""taskmerge against FusionBench 0.2.33, side by side: one table of merge time, extra memory and ratio.

Each row (one method, one peer, one model shape) runs in a fresh worker process, which builds the
seeded in-RAM inputs of ``peers_inputs.py`` (an HF ``CLIPVisionModel`` of random weights, 8
low-rank-plus-noise task vectors, synthetic Fishers / SPD Grams, or LoRA r=16 factors), so both
peers merge identical inputs (the worker reports a checksum; the table flags a mismatch). Peers
alternate: taskmerge first for even rows, FusionBench first for odd rows.

- **Time**: the merge call alone (taskmerge: ``taskmerge.merging.merge(name, pretrained, finetuned,
  hparams, **context)``; FusionBench: the algorithm's ``run(modelpool)``, see
  ``peers_fusionbench.py``). One warm-up run; when it took under ``--long`` (30 s), the median of 3
  more runs, else the warm-up itself (marked "1 run").
- **Extra memory**: peak RSS during the call (``VmHWM``, reset through ``/proc/self/clear_refs``
  just before it) minus the RSS right before it, after ``gc`` and ``malloc_trim``: everything the
  merge allocated, output included, beyond the loaded inputs. The largest over the runs.
- **Ratio**: FusionBench time ÷ taskmerge time (taskmerge speed ÷ FusionBench speed).

Inputs that a peer's merge overwrites (FusionBench writes the result into the pretrained module, and
OPCM into the first task's) are rebuilt from the seed between runs, untimed (found by checksum).

Peers: FusionBench is imported only in its worker, from a ``pip install --target`` folder (default
``.peers/`` at the repository root; see benchmarks/README.md for the exact commands), put first on
``sys.path`` there; the taskmerge worker imports this checkout's ``src/``. A peer that is not
installed gives "not installed" cells, nothing else. A row for a method taskmerge does not have
(absent from ``taskmerge.merging.METHODS``) says so; its FusionBench side runs only with
``--peer-only-rows``. The mergekit rows are ``peers_mergekit.py`` (on-disk merges at Llama-3-8B width).

    flock /tmp/taskmerge-heavy.lock .venv/bin/python benchmarks/peers.py --models vit-b-32 vit-l-14

A row is stopped (and reported) after ``--timeout`` seconds or when the machine's available memory
falls below ``--min-free-gib``, so a peer that needs more RAM than there is cannot take the machine down.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEERS = ("taskmerge", "fusionbench")


@dataclasses.dataclass(frozen=True)
class Row:
    label: str  # hyperparameters, as printed
    tm: dict  # taskmerge hyperparameters
    fb: dict  # FusionBench adapter keyword arguments
    needs: str = ""  # "fisher" | "grams" | "lora"


ROWS = {
    "task_arithmetic": Row("λ=0.3", {"scaling": 0.3}, {"scaling": 0.3}),
    "ties": Row("k=20, sum, λ=0.3", {"k": 20.0, "merge": "sum", "scaling": 0.3}, {"k": 20, "merge": "sum", "scaling": 0.3}),
    "tall_mask": Row("λ=0.6", {"mask_lambda": 0.6}, {"mask_lambda": 0.6}),
    "consensus": Row("k=2, λ=0.6, scaling 0.3", {"min_tasks": 2, "mask_lambda": 0.6, "scaling": 0.3},
                     {"min_tasks": 2, "mask_lambda": 0.6, "scaling": 0.3}),
    "fisher": Row("diagonal", {}, {}, "fisher"),
    "regmean": Row("off-diagonal 0.95", {"off_diagonal_scale": 0.95}, {"off_diagonal_scale": 0.95}, "grams"),
    "tsv_m": Row("α=1", {"scaling": 1.0}, {"scaling": 1.0}),
    "opcm": Row("α=0.5", {"alpha": 0.5}, {"alpha": 0.5}),
    "knots": Row("TIES, k=20, mean, λ=0.6", {"inner": "ties", "k": 20.0, "merge": "mean", "scaling": 0.6},
                 {"k": 20, "merge": "mean", "scaling": 0.6}, "lora"),
    "iso_c": Row("α=1", {"scaling": 1.0}, {"scaling": 1.0}),
    "iso_cts": Row("α=1, common 0.8", {"scaling": 1.0, "common_space_fraction": 0.8},
                   {"scaling": 1.0, "common_space_fraction": 0.8}),
    # FusionBench averages the pairwise angles (taskmerge's average="angle"; its default is mergekit's cosines)
    "model_stock": Row("angle average", {"average": "angle"}, {}),
    # both: Adam lr 1e-5; FusionBench averages the non-2-D tensors (taskmerge's others="average"). 3 of the
    # official 300 steps: FusionBench's autograd step costs ≈ 0.5 TFLOP per ViT-B/32 layer, hours on 2 cores
    "wudi": Row("3 Adam steps (official 300)", {"iterations": 3, "others": "average"}, {"iter_num": 3}),
}


# ---------------------------------------------------------------- worker (one fresh process per row)

def _status_gib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release_free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def _tensor_bytes(obj) -> int:
    """Bytes of the distinct tensor storages reachable in a result (state dict, list, module, dict)."""
    import torch

    seen, total, stack = set(), 0, [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.nn.Module):
            stack.extend(x.state_dict().values())
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, torch.Tensor):
            key = x.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += x.untyped_storage().nbytes()
    return total


@dataclasses.dataclass
class Inputs:
    pre: object
    fts: list
    fishers: list | None = None
    grams: list | None = None
    lora: list | None = None


def build_inputs(model: str, tasks: int, seed: int, needs: str, stat_sets: int) -> Inputs:
    import peers_inputs as pi

    pre, fts = pi.build_models(model, tasks, seed)
    inp = Inputs(pre, fts)
    if needs == "fisher":
        inp.fishers = pi.fishers(pre, tasks, seed, stat_sets)
    elif needs == "grams":
        inp.grams = pi.grams(pre, tasks, seed)
    elif needs == "lora":
        inp.lora = pi.lora_factors(pre, tasks, seed)
    return inp


def _model_prints(inp: Inputs) -> list[float]:
    import peers_inputs as pi

    return [pi.fingerprint(m.state_dict().values()) for m in [inp.pre, *inp.fts]]


def input_checksum(inp: Inputs) -> float:
    import peers_inputs as pi

    total = sum(_model_prints(inp))
    for stats in (inp.fishers or []) + (inp.grams or []):
        total += pi.fingerprint(stats.values())
    for adapter in inp.lora or []:
        total += pi.fingerprint([t for ab in adapter.values() for t in ab])
    return total


def _taskmerge_call(method: str, row: Row, inp: Inputs):
    from taskmerge.merging import get_method, merge
    from taskmerge.merging.lora import LoraFactors
    from taskmerge.merging.selection import tensor_kinds
    from taskmerge.stats.keys import fisher_key, gram_in_key

    m = get_method(method)
    hparams = {k: v for k, v in row.tm.items() if k in m.params}
    pre = inp.pre.state_dict()
    context = {"kinds": tensor_kinds(pre, inp.pre)}
    if inp.lora is not None:
        fts = [{mod: LoraFactors(a, b, 1.0) for mod, (a, b) in adapter.items()} for adapter in inp.lora]
    else:
        fts = [ft.state_dict() for ft in inp.fts]
    if inp.fishers is not None:
        context["stats"] = [{fisher_key(k): v for k, v in f.items()} for f in inp.fishers]
    if inp.grams is not None:
        context["stats"] = [{gram_in_key(mod + ".weight"): g for mod, g in gr.items()} for gr in inp.grams]
    return lambda: merge(method, pre, fts, hparams, **context)


def worker(spec: dict) -> dict:
    """Build the inputs, time the merge call (warm-up, then median of 3 if short), report JSON."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    sys.path.insert(0, str(HERE))
    import peers_inputs as pi

    if spec.get("layers"):
        pi.SHAPES[spec["model"]] = {**pi.SHAPES[spec["model"]], "num_hidden_layers": spec["layers"]}
    row, method, peer = ROWS[spec["method"]], spec["method"], spec["peer"]
    out = {k: spec.get(k) for k in ("peer", "method", "model", "tasks", "layers")}
    if peer == "fusionbench":
        sys.path.insert(0, spec["peer_dir"])
        import peers_fusionbench as fbm

        out["shims"], out["version"] = fbm.apply_shims(), fbm.version()
        prepare = lambda inp: getattr(fbm, method)(inp, **row.fb)  # noqa: E731
    else:
        sys.path.insert(0, str(REPO / "src"))
        from taskmerge.merging import METHODS

        if method not in METHODS:
            return {**out, "status": "not in taskmerge yet"}
        prepare = lambda inp: _taskmerge_call(method, row, inp)  # noqa: E731
    t0 = time.perf_counter()
    inp = build_inputs(spec["model"], spec["tasks"], spec["seed"], row.needs, spec["stat_sets"])
    out["build_s"], out["checksum"] = time.perf_counter() - t0, input_checksum(inp)
    largest = max(v.numel() * v.element_size() for v in inp.pre.state_dict().values())
    out["stack_bytes"] = spec["tasks"] * largest  # one key's task stack (the largest tensor, all tasks)
    prints, runs, extras, out_bytes, rebuilt = _model_prints(inp), [], [], 0, 0
    for i in range(1 + spec["repeats"]):
        call = prepare(inp)
        _release_free_memory()
        base = _status_gib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        start = time.perf_counter()
        result = call()
        runs.append(time.perf_counter() - start)
        extras.append(_status_gib("VmHWM") - base)
        out_bytes = _tensor_bytes(result) if peer == "taskmerge" else 0
        del result, call
        if i == 0 and runs[0] >= spec["long"]:
            break
        for j, (a, b) in enumerate(zip(prints, _model_prints(inp))):
            if a != b:  # the peer overwrote this input: rebuild it from the seed
                rebuilt += 1
                model = pi.build_model(spec["model"], spec["seed"], None if j == 0 else j - 1)
                if j == 0:
                    inp.pre = model
                else:
                    inp.fts[j - 1] = model
        _release_free_memory()
    out.update(status="ok", runs=runs, seconds=statistics.median(runs[1:]) if len(runs) > 1 else runs[0],
               extra_gib=max(extras), base_rss_gib=base, output_bytes=out_bytes, rebuilt_inputs=rebuilt,
               threads=torch.get_num_threads(), torch=torch.__version__)
    return out


# ---------------------------------------------------------------- driver

def _run_row(spec: dict, timeout: float, min_free_gib: float) -> dict:
    """Run one worker; stop it on timeout or when free RAM runs low. Returns its JSON or a status."""
    import psutil

    with tempfile.TemporaryFile("w+") as so, tempfile.TemporaryFile("w+") as se:
        proc = subprocess.Popen([sys.executable, __file__, "--_worker", json.dumps(spec)], stdout=so, stderr=se)
        start, peak, status = time.time(), 0.0, None
        try:
            while proc.poll() is None:
                time.sleep(0.25)
                try:
                    peak = max(peak, psutil.Process(proc.pid).memory_info().rss / 2**30)
                except psutil.Error:
                    pass
                if time.time() - start > timeout:
                    status = f"stopped after {timeout:.0f} s"
                elif psutil.virtual_memory().available / 2**30 < min_free_gib:
                    status = f"stopped: free RAM < {min_free_gib:g} GiB (worker RSS {peak:.1f} GiB)"
                if status:
                    return {**spec, "status": status}
        finally:
            if proc.poll() is None:  # stopped, or the driver itself is interrupted: never leave a worker behind
                proc.kill()
                proc.wait()
        so.seek(0)
        se.seek(0)
        lines = so.read().strip().splitlines()
        if proc.returncode != 0 or not lines:
            return {**spec, "status": f"failed: {_error_line(se.read(), proc.returncode)}"}
        return json.loads(lines[-1])


def _error_line(stderr: str, returncode: int) -> str:
    """The exception a failed worker raised, from its last ``SomethingError:`` line to the end of stderr
    (a message wrapped over lines, as rich tracebacks print it, joined into one), else the last line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()] or [f"exit {returncode}"]
    starts = [i for i, ln in enumerate(lines) if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", ln)]
    return " ".join(lines[starts[-1] if starts else -1:])[:240]


def _cell(res: dict | None) -> str:
    if res is None:
        return "–"
    if res.get("status") != "ok":
        return res.get("status", "?")
    n = len(res["runs"])
    runs = "median of 3" if n > 1 else "1 run"
    return f"{res['seconds']:.2f} s ({runs}), +{res['extra_gib']:.2f} GiB"


def table(results: list[dict], methods: list[str], models: list[str]) -> str:
    lines = []
    for model in models:
        layers = f", {results[0]['layers']} encoder layers" if results and results[0].get("layers") else ""
        lines += [f"\n{model}{layers}, {results[0]['tasks'] if results else '?'} tasks\n",
                  "| method | FusionBench | taskmerge | taskmerge speed ÷ FusionBench | taskmerge output; + one key's task stack |",
                  "|---|---|---|---:|---|"]
        for method in methods:
            got = {r["peer"]: r for r in results if r["model"] == model and r["method"] == method}
            tm, fb = got.get("taskmerge"), got.get("fusionbench")
            ok = tm and fb and tm.get("status") == fb.get("status") == "ok"
            ratio = f"{fb['seconds'] / tm['seconds']:.2f}×" if ok else "–"
            if ok and abs(tm["checksum"] - fb["checksum"]) > 1e-6 * max(1.0, abs(tm["checksum"])):
                ratio += " (inputs differ!)"
            mem = "–"
            if tm and tm.get("status") == "ok":
                mem = f"{tm['output_bytes'] / 2**30:.2f} GiB; {(tm['output_bytes'] + tm['stack_bytes']) / 2**30:.2f} GiB"
            lines.append(f"| {method} ({ROWS[method].label}) | {_cell(fb)} | {_cell(tm)} | {ratio} | {mem} |")
    return "\n".join(lines)


def _header() -> str:
    import torch

    load = os.getloadavg()
    return (f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {platform.machine()}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads by default), "
            f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vit-b-32"], help="vit-b-32, vit-l-14 (tiny: tests)")
    ap.add_argument("--methods", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    ap.add_argument("--peer-dir", default=str(REPO / ".peers"), help="the pip --target folder holding FusionBench")
    ap.add_argument("--peer-only-rows", action="store_true", help="run FusionBench for methods taskmerge lacks")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--layers", type=int, default=0,
                    help="build only this many encoder layers (every tensor keeps its shape; 0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch's default)")
    ap.add_argument("--stat-sets", type=int, help="distinct Fisher sets (default: 8 for B/32, 2 for L/14)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up when it is short")
    ap.add_argument("--long", type=float, default=30.0, help="a warm-up this long (s) is the only run")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per row before it is stopped")
    ap.add_argument("--min-free-gib", type=float, default=1.5, help="stop a row when free RAM falls below this")
    ap.add_argument("--json", type=Path, help="append one JSON line per row here")
    ap.add_argument("--table-from", nargs="+", type=Path, metavar="JSONL",
                    help="print the table of rows saved with --json (runs nothing)")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        print(json.dumps(worker(json.loads(args._worker))))
        return 0
    if args.table_from:
        rows = [json.loads(ln) for f in args.table_from for ln in f.read_text().splitlines() if ln.strip()]
        models = list(dict.fromkeys(r["model"] for r in rows))
        print(table(rows, [m for m in ROWS if any(r["method"] == m for r in rows)], models))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that _run_row's finally stops the worker
    sys.path.insert(0, str(HERE))
    from peers_inputs import DEFAULT_STAT_SETS

    fb_there = (Path(args.peer_dir) / "fusion_bench").is_dir()
    sys.path.insert(0, str(REPO / "src"))
    from taskmerge.merging import METHODS

    print(_header(), flush=True)
    results = []
    for model in args.models:
        for i, method in enumerate(args.methods):
            order = args.peers if i % 2 == 0 else args.peers[::-1]
            for peer in order:
                spec = dict(peer=peer, method=method, model=model, tasks=args.tasks, seed=args.seed, layers=args.layers,
                            threads=args.threads, repeats=args.repeats, long=args.long, peer_dir=args.peer_dir,
                            stat_sets=args.stat_sets or DEFAULT_STAT_SETS.get(model, 8))
                if peer == "fusionbench" and not fb_there:
                    res = {**spec, "status": f"not installed ({args.peer_dir})"}
                elif peer == "fusionbench" and method not in METHODS and not args.peer_only_rows:
                    res = {**spec, "status": "not run (taskmerge has no such method yet; --peer-only-rows)"}
                elif peer == "taskmerge" and method not in METHODS:
                    res = {**spec, "status": "not in taskmerge yet"}
                else:
                    res = _run_row(spec, args.timeout, args.min_free_gib)
                results.append(res)
                print(f"  {model} {method} {peer}: {_cell(res)}", flush=True)
                if args.json:
                    with open(args.json, "a") as fh:
                        fh.write(json.dumps(res) + "\n")
    print(table(results, args.methods, args.models))
    print(_header(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
