"""Turn failures of the scripts (missing data, checkpoints or packages; bad input; unreadable files) into one clear line."""
from __future__ import annotations

import functools
import os
import sys

from taskmerge.data.sources import MissingDataError

EXPECTED = (MissingDataError, FileNotFoundError, ValueError, KeyError, RuntimeError)


def error_line(e: BaseException) -> str:
    """One line for an error: its message for expected ones, ``Type: message`` otherwise (as ``taskmerge``)."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    text = str(msg).strip().splitlines()[0] if str(msg).strip() else ""
    return text if isinstance(e, EXPECTED) else f"{type(e).__name__}: {text}"


def friendly_errors(fn):
    """Decorator for the Hydra scripts: any error is one ``error: …`` line on stderr and exit code 2,
    never a traceback (``TASKMERGE_DEBUG=1`` re-raises) — what the ``taskmerge`` CLI does.

    Files are named by the loaders (``taskmerge.io``: a truncated checkpoint is a ``ModelFileError``
    naming it), so the line says which file is bad.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 — every failure is one clear line, never a traceback
            if os.environ.get("TASKMERGE_DEBUG"):
                raise
            print(f"error: {error_line(e)}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def check_overrides(argv) -> None:
    """Hydra's grammar over the command line's ``key=value`` overrides, as one clear line.

    Hydra stops an unquoted ``{task}`` pattern with ``mismatched input '{'``; the line here names the
    override and shows the quoting that works in a shell: ``"finetuned.pattern='/ckpt/{task}'"``.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            parser.parse_overrides([arg])
        except Exception as e:  # noqa: BLE001 — Hydra's OverrideParseException and its lexer errors
            key, _, value = arg.partition("=")
            hint = (f"; quote the value for Hydra, e.g. \"{key}='{value}'\"" if any(c in value for c in "{}[],:*?")
                    else "")
            lines = [x.strip() for x in str(e).splitlines() if x.strip() and not x.strip().startswith(("See ", "Error parsing"))]
            reason = lines[0] if lines else type(e).__name__
            raise ValueError(f"override {arg!r} is not valid Hydra syntax ({reason}){hint}") from None


def hydra_script(config_path: str, config_name: str):
    """The one wrapper of every Hydra script: ``@hydra_script("../configs", "suite") def main(cfg): …``.

    The overrides are checked first (``check_overrides``), then ``hydra.main`` runs ``main`` under
    ``friendly_errors``: any failure is one ``error: …`` line, exit code 2, no traceback.
    """
    import hydra

    def deco(fn):
        task = hydra.main(config_path=config_path, config_name=config_name, version_base="1.3")(friendly_errors(fn))

        @functools.wraps(fn)
        def main():
            try:
                check_overrides(sys.argv[1:])
            except ValueError as e:
                if os.environ.get("TASKMERGE_DEBUG"):
                    raise
                print(f"error: {e}", file=sys.stderr)
                sys.exit(2)
            return task()

        return main

    return deco


def print_outcome(out: dict) -> None:
    """What an eval script prints at the end: profile, each method's selection, output paths."""
    print(out["profile"].summary())
    for method, best in out["selected"].items():
        extra = ""
        if "final_accuracy" in best:  # continual methods: mean ± std over task orders
            (m, s), (bm, bs) = best["final_accuracy"], best.get("bwt", (float("nan"), float("nan")))
            extra = f"  final acc {m:.3f}±{s:.3f}  BWT {bm:.3f}±{bs:.3f} ({best['orders']} orders)"
        print(f"  {method:20s} selected {best['hparams']}  val {best['val']:.3f}  test {best['test']:.3f}{extra}")
        if "joint_test" in best:  # KnOTS joint setting: every pooled top-k at the selected point
            print("    joint test " + "  ".join(f"top{k} {best['joint_test'][f'joint_top{k}']:.3f}" for k in (1, 3, 5, 10)))
    print(f"\nresults CSV : {out['csv']}")
    for key in ("table", "search_plot", "tasks_plot", "continual_plot"):
        if key in out:
            print(f"{key.replace('_', ' '):12s}: {out[key]}")
    print(f"total time  : {out['total_seconds']:.0f}s")
