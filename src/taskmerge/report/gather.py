"""Gather the CSVs of many jobs (Hydra multirun, SLURM arrays) into one tidy table."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from taskmerge.search.store import COLUMNS


def result_files(paths) -> list[Path]:
    """Every ``*.csv`` under the given files or folders (recursively), sorted."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.rglob("*.csv"))
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"no results file or folder {p}")
    return sorted(dict.fromkeys(files))


def gather(paths) -> pd.DataFrame:
    """Concatenate results CSVs, dropping duplicate rows (the same point written by two jobs)."""
    frames = []
    for f in result_files(paths):
        df = pd.read_csv(f)
        missing = [c for c in COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"{f} is not a taskmerge results CSV (missing columns {missing})")
        frames.append(df.assign(source=str(f)))
    if not frames:
        raise FileNotFoundError(f"no results CSV under {', '.join(map(str, paths))}")
    out = pd.concat(frames, ignore_index=True)
    key = [c for c in COLUMNS if c not in ("wall_time_s", "timestamp", "git_commit")]
    return out.drop_duplicates(subset=key, keep="first").reset_index(drop=True)


def one_experiment(files) -> dict | None:
    """The experiment identity shared by results ``files`` (sidecars, ``search.store``); refuse a mix.

    A file written by ``taskmerge results`` from several experiments is marked ``mixed`` and refused;
    files without an identity (written before identities existed) are not checked.
    """
    from taskmerge.search.store import describe_mismatch, read_identity

    first = None
    for f in files:
        ident = read_identity(f)
        if ident is None:
            continue
        if "mixed" in ident:
            raise ValueError(f"{f} gathers the rows of {len(ident['mixed'])} experiments; report each experiment's "
                             "CSVs separately")
        if first is None:
            first = (f, ident)
        elif ident["fingerprint"] != first[1]["fingerprint"]:
            raise ValueError(f"refusing to mix experiments: {first[0]} and {f} are different experiments "
                             f"({describe_mismatch(first[1], ident)}); report them separately")
    return first[1] if first else None


def write_gathered(paths, output) -> tuple[pd.DataFrame, Path]:
    """``gather(paths)`` written to ``output`` (atomically) with its identity sidecar; refuses an output
    that is one of the inputs or lies in an input folder (the next gather would read it back)."""
    import os

    from taskmerge.search.store import identity_path, read_identity

    files = result_files(paths)
    out = Path(output)
    target = out.resolve()
    if target in {f.resolve() for f in files}:
        raise ValueError(f"--output {out} is one of the input CSVs; writing it would destroy that input: "
                         "choose a path outside the inputs")
    for p in map(Path, paths):
        if p.is_dir() and target.is_relative_to(p.resolve()):
            raise ValueError(f"--output {out} is inside the input folder {p}: the next gather would read it back "
                             "as an input; choose a path outside it")
    if out.suffix != ".csv":
        raise ValueError(f"--output {out}: the gathered table is a .csv file")
    if not out.parent.is_dir():
        raise ValueError(f"--output {out}: the folder {out.parent} does not exist")
    df = gather(files)
    idents = {i["fingerprint"]: i for i in (read_identity(f) for f in files) if i and "fingerprint" in i}
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    df.to_csv(tmp, index=False)
    os.replace(tmp, out)
    side = identity_path(out)
    if len(idents) == 1:
        from taskmerge.provenance import write_json_atomic

        write_json_atomic(side, next(iter(idents.values())))
    elif len(idents) > 1:
        from taskmerge.provenance import write_json_atomic

        write_json_atomic(side, {"mixed": sorted(idents)})
    else:
        side.unlink(missing_ok=True)
    return df, out
