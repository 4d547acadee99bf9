"""The ``taskmerge`` command line: thin argument parsing over the library.

Subcommands: ``merge`` (taskmerge.merge_files), ``eval`` (score merged models on declared tasks,
taskmerge.experiments.evaluate_merged), ``methods`` (taskmerge.merging registry),
``stats`` (embedded-default statistics), ``results`` (gather CSVs), ``report`` (tables and plots).
Errors are one line on stderr and exit code 2; ``TASKMERGE_DEBUG=1`` shows the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

MERGE_EXAMPLE = """example:
  taskmerge merge ties --pretrained base/ --finetuned cars/ dtd/ eurosat/ \\
      -p k=20 -p merge=mean -p scaling=1.0 --output merged/       # an HF folder: from_pretrained(merged/)
  taskmerge merge tall_mask --pretrained base.safetensors --finetuned a.safetensors b.safetensors \\
      -p mask_lambda=0.4 --output tall_out/      # writes tall_out/task_0.safetensors, task_1…, masks.safetensors
  taskmerge merge mats --pretrained base.safetensors --finetuned a.safetensors b.safetensors \\
      --stats a_stats.safetensors b_stats.safetensors -p objective=regmean --output merged.safetensors

P and each A: a .safetensors file, a Hugging Face model folder, or a peft adapter folder
(LoRA/IA3, applied on top of P). Pickles (.pt/.bin/.pth) need --trust-pickle.
List methods and their hyperparameters with `taskmerge methods`."""

METHODS_EXAMPLE = """example:
  taskmerge methods            # every method, hyperparameters, types and defaults
  taskmerge methods opcm       # one method with its full documentation"""


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="merge fine-tuned checkpoints into one model (or one per task)",
                       description="Merge fine-tuned checkpoints with a registered method.",
                       epilog=MERGE_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", help="method name (see `taskmerge methods`)")
    p.add_argument("--pretrained", required=True, metavar="P", help="the pretrained (base) model")
    p.add_argument("--finetuned", nargs="*", default=[], metavar="A",
                   help="fine-tuned models, in task order (the order matters for sequential methods, e.g. opcm)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="hyperparameter (repeatable); unset ones take the method's default")
    p.add_argument("--stats", nargs="*", default=[], metavar="S",
                   help="statistics files (fisher, regmean, mats): one per fine-tuned model, same order")
    p.add_argument("--device", default="cpu", help="where the arithmetic runs (cpu, cuda, cuda:0; default cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="cast every input (and so the output) to this dtype, e.g. an fp32 base with bf16 fine-tunes")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow pickled checkpoints (.pt/.bin/.pth): only for files you trust")
    p.add_argument("--output", "-o", required=True, metavar="OUT",
                   help="a .safetensors file, or a folder: a Hugging Face model folder (θ0's config and tokenizer "
                        "copied; shards + index when large); per-task methods (tall_mask, tsv_c) need a folder")
    p.add_argument("--output-format", choices=["model", "adapter"], default="model",
                   help="adapter: a peft LoRA adapter folder (LoRA methods whose result is exactly low-rank: "
                        "lora_merge with inner=task_arithmetic, knots); loads with PeftModel.from_pretrained")
    p.add_argument("--max-shard-size", type=float, default=5.0, metavar="GB",
                   help="largest shard of a folder output, in GB (default 5, as save_pretrained)")
    p.add_argument("--resume", action="store_true",
                   help="build the output in .OUT.partial beside it, journaling the tensors written; if that folder "
                        "exists (an interrupted run of the same command), finish it instead of starting again. "
                        "Methods whose tensors are merged independently (`taskmerge methods` says 'resumable')")
    p.set_defaults(run=_run_merge)


def _run_merge(args) -> int:
    from taskmerge.merge_files import merge_files, parse_hparams

    written = merge_files(args.method, args.pretrained, args.finetuned, args.output,
                          hparams=parse_hparams(args.param), device=args.device, dtype=args.dtype,
                          trust_pickle=args.trust_pickle, stats_paths=args.stats,
                          max_shard_bytes=int(args.max_shard_size * 2**30), output_format=args.output_format,
                          resume=args.resume)
    for path in written:
        print(path)
    return 0


def _add_methods(sub) -> None:
    p = sub.add_parser("methods", help="list merging methods with their hyperparameters and defaults",
                       description="List every registered merging method.",
                       epilog=METHODS_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help="show one method's full documentation")
    p.set_defaults(run=_run_methods)


def describe_param(param) -> str:
    if param.choices is not None:
        typ = "{" + ",".join(map(str, param.choices)) + "}"
    else:
        typ = getattr(param.type, "__name__", str(param.type))
    rng = ""
    if param.range is not None:
        r = param.range
        rng = f" in {'(' if r.lo_open else '['}{'-inf' if r.lo is None else r.lo}, " \
              f"{'inf' if r.hi is None else r.hi}{')' if r.hi_open else ']'}"
    return f"{param.name}: {typ} = {param.default!r}{rng}"


def configs_using(name: str) -> list[str]:
    """Config files (under the repo's configs/) that run method ``name``: its own file, or ``name: <name>``."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    pattern = re.compile(rf"^\s*name:\s*{re.escape(name)}\s*$", re.M)
    hits = [p for p in sorted(root.rglob("*.yaml"))
            if (p.stem == name and "method" in p.parts) or pattern.search(p.read_text())]
    return [str(p.relative_to(root.parent)) for p in hits]


def _resumable(method) -> str:
    unless = [f"{k}={'|'.join(map(str, v))}" for k, v in method.cross_key.items()]
    return "resumable" + (f" (not with {', '.join(unless)})" if unless else "")


def _run_methods(args) -> int:
    from taskmerge.merging import METHODS, get_method

    names = [get_method(args.name).name] if args.name else sorted(METHODS)
    for name in names:
        m = METHODS[name]
        flags = [f"output={m.output}"] + (["sequential"] if m.sequential else []) + \
                ([f"linear_in={m.linear_in}"] if m.linear_in else []) + \
                ([f"inputs={m.inputs}"] if m.inputs != "state_dict" else []) + \
                ([_resumable(m)] if m.key_local and m.output == "model" else []) + \
                ([f"needs {', '.join(sorted(m.context - {'device', 'kinds'}))}"]
                 if m.context - {"device", "kinds"} else [])
        print(f"{name}  ({'; '.join(flags)})")
        for param in m.params.values():
            print(f"    {describe_param(param)}")
        if not m.params:
            print("    (no hyperparameters)")
        if args.name:
            print(f"\ndefined at: {m.where}")
            print(f"configs:    {', '.join(configs_using(name)) or '(none)'}")
            print(f"memory:     {m.memory} (streamed by `taskmerge merge`; plus one key of every input)")
            print("\n" + m.doc)
    return 0


REPORT_EXAMPLE = """example:
  taskmerge report results/text-demo_text4_full.csv            # writes .md table and .png plots beside it
  taskmerge report results/sweep/ --output results/sweep_report  # every CSV under a folder"""

RESULTS_EXAMPLE = """example:
  taskmerge results results/sweep/ --output results/sweep.csv    # one tidy table from every job's CSV"""

STATS_EXAMPLE = """example (Hydra overrides of configs/suite.yaml, as the scripts take):
  taskmerge stats task=bbc_news                          # empirical Fisher + Grams on validation
  taskmerge stats task=bbc_news stats.fisher=true seed=1 # true Fisher, labels sampled with seed 1"""


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="markdown table and PNG plots from results CSVs",
                       description="Write the papers-style table (.md) and plots (.png) of a results CSV.",
                       epilog=REPORT_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="+", help="results CSV files or folders of them")
    p.add_argument("--output", "-o", help="output prefix (default: the CSV path without .csv)")
    p.set_defaults(run=_run_report)


def _run_report(args) -> int:
    import tempfile
    from pathlib import Path

    from taskmerge.report import write_report
    from taskmerge.report.gather import gather, one_experiment, result_files

    sources = [Path(c) for c in args.csv]
    one_experiment(result_files(sources))  # never one table over two experiments
    if len(sources) == 1 and sources[0].is_file():
        csv, prefix = sources[0], args.output
    else:
        if not args.output:
            raise ValueError("several CSVs or a folder need --output PREFIX")
        csv = Path(tempfile.mkdtemp()) / "gathered.csv"
        gather(sources).drop(columns=["source"]).to_csv(csv, index=False)
        prefix = args.output
    for kind, path in write_report(csv, prefix).items():
        print(f"{kind:15s} {path}")
    return 0


def _add_results(sub) -> None:
    p = sub.add_parser("results", help="gather many results CSVs into one tidy table",
                       description="Concatenate results CSVs (e.g. one per multirun job), dropping duplicates.",
                       epilog=RESULTS_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="CSV files or folders (searched recursively)")
    p.add_argument("--output", "-o", help="write the table here (default: print a summary)")
    p.set_defaults(run=_run_results)


def _run_results(args) -> int:
    from taskmerge.report.gather import gather, write_gathered
    from taskmerge.report.tables import test_summary

    if args.output:  # refused when the output is an input (or would become one)
        df, out = write_gathered(args.paths, args.output)
        print(f"{len(df)} rows from {df['source'].nunique()} files -> {out}")
    else:
        df = gather(args.paths)
    for experiment, rows in df.groupby("experiment", sort=False):
        print(f"\n{experiment}  (test accuracy %, at the selected hyperparameters)")
        print(test_summary(rows)[["Avg. abs.", "Avg. norm."]].round(2).to_string())
    return 0


def _add_stats(sub) -> None:
    p = sub.add_parser("stats", help="Fisher and Gram statistics of fine-tuned models (embedded default)",
                       description="Compute (or load cached) statistics for the configured tasks.",
                       epilog=STATS_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides of configs/suite.yaml")
    p.set_defaults(run=_run_stats)


def _run_stats(args) -> int:
    from taskmerge.experiments.text_suite import compose_config, compute_statistics

    for task, path in compute_statistics(compose_config(args.overrides)).items():
        print(f"{task:20s} {path}")
    return 0


EVAL_EXAMPLE = """example (Hydra overrides of configs/suite.yaml, or of configs/vision.yaml with --setting vision):
  taskmerge merge ties --pretrained base/ --finetuned a/ b/ -p k=20 --output merged/
  taskmerge eval merged/ --name ties_k20 -p k=20 tasks=own tasks.declared=my_tasks.yaml model.path=base/ \\
      finetuned.pattern=ckpt/{task}      # the references: the same fine-tuned checkpoints (imported here)
  taskmerge eval merged.safetensors      # the demo's tasks and checkpoints (configs/suite.yaml)
Rows are appended to results/<experiment>.csv (or --csv) beside the search's, then the report is rewritten."""


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate merged models on the configured (declared) tasks, rows into a results CSV",
                       description="Evaluate merged models with the search's protocol (validation and test rows, "
                                   "normalized by the same fine-tuned checkpoints).",
                       epilog=EVAL_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="+", metavar="OUTPUT|KEY=VALUE",
                   help="merged models (a .safetensors file, an HF folder, a folder of task_<i>.safetensors) "
                        "followed by Hydra overrides")
    p.add_argument("--setting", choices=["suite", "vision"], default="suite",
                   help="suite: text tasks (configs/suite.yaml); vision: image tasks (configs/vision.yaml)")
    p.add_argument("--name", help="the CSV's method column (default eval:<file name>)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="hyperparameters to record in the rows (e.g. those given to taskmerge merge)")
    p.add_argument("--csv", help="results CSV (default results/<experiment>.csv, the search's)")
    p.set_defaults(run=_run_eval)


def _run_eval(args) -> int:
    import logging
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from taskmerge.experiments.evaluate_merged import evaluate_outputs
    from taskmerge.experiments.runner import REPO
    from taskmerge.merge_files import parse_hparams

    outputs = [a for a in args.args if "=" not in a or Path(a).exists()]
    overrides = [a for a in args.args if a not in outputs]
    if not outputs:
        raise ValueError("give at least one merged model (file or folder) before the overrides")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose(args.setting if args.setting == "vision" else "suite", overrides=overrides)
    if args.setting == "vision":
        from taskmerge.experiments.vision import VisionSuite as Family
    else:
        from taskmerge.experiments.text_suite import TextSuite as Family
    import yaml

    hparams = {k: yaml.safe_load(v) for k, v in parse_hparams(args.param).items()}
    out = evaluate_outputs(Family(cfg), outputs, name=args.name, hparams=hparams,
                           csv=Path(args.csv) if args.csv else None)
    for (method, split), accs in out["scores"].items():
        print(f"{method:24s} {split:10s} " + "  ".join(f"{t} {a:.3f}" for t, a in accs.items()))
    print(f"{out['rows']} rows -> {out['csv']}" + (f"\ntable: {out['table']}" if "table" in out else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskmerge", description="Model merging with task vectors.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_merge(sub)
    _add_methods(sub)
    _add_stats(sub)
    _add_results(sub)
    _add_report(sub)
    _add_eval(sub)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line as ``main`` reads it (argparse exits 2 on a bad one)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "eval":  # outputs and overrides may come after the options
        args.args += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    # PyTorch's opt-in transparent huge pages for CPU buffers >= 2 MB (PyTorch >= 2.2; read once, when torch
    # first allocates, so before any subcommand imports it): one page fault per 2 MB instead of per 4 KB.
    # An on-disk merge faults in every tensor it reads and writes: TA 1.3-2.3x faster here (benchmarks/README.md,
    # mergekit rows, "TA, then and now"). THP_MEM_ALLOC_ENABLE=0 in the environment keeps 4 KB pages.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    args = parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("taskmerge: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 — every failure is one clear line, never a traceback
        if os.environ.get("TASKMERGE_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"taskmerge {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
