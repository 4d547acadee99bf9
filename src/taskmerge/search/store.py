"""Append-only, crash-safe CSV of results.

Each grid point's rows (one per task) are written with a single ``write`` of whole lines on a file
opened in append mode, then ``fsync``-ed; a run killed mid-write can leave at most a partial last
line, which the next open truncates. A re-run reads the file and skips points already present, so
``kill -9`` followed by a re-run loses no row and duplicates none.

Each CSV has an experiment identity in a sidecar ``<name>.identity.json``: the fingerprint of the
config that defines what its rows mean (model, tasks, fine-tuning, budget, seeds, imported
checkpoints, statistics; not the methods, grids, device or output paths, which vary inside one
experiment). ``ResultStore(path, identity)`` refuses to append to a CSV of another identity, so two
experiments that share a name never end up in one file; ``taskmerge report`` refuses to mix them.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

COLUMNS = [
    "experiment", "method", "hparams", "stage", "task", "split", "accuracy", "normalized_accuracy",
    "finetuned_accuracy", "pretrained_accuracy", "seed", "order", "step", "wall_time_s", "checkpoints", "git_commit",
    "timestamp",
]


def hparams_key(hparams: dict) -> str:
    """Canonical JSON of a hyperparameter setting (sorted keys, floats rounded to 10 digits)."""
    clean = {k: round(v, 10) if isinstance(v, float) else v for k, v in sorted(hparams.items())}
    return json.dumps(clean, sort_keys=True)


# config keys that vary inside one experiment (what is searched, where it runs, where files go)
NOT_IDENTITY = frozenset({"methods", "method", "search", "force", "task", "paths", "report", "device", "hydra",
                          "experiment"})


def experiment_identity(cfg) -> dict[str, Any]:
    """``{"fingerprint", "config"}`` of a script config: every key but :data:`NOT_IDENTITY`, resolved."""
    from omegaconf import DictConfig, OmegaConf

    config = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    config = {k: v for k, v in sorted(config.items()) if k not in NOT_IDENTITY}
    text = json.dumps(config, sort_keys=True, default=str)
    return {"fingerprint": hashlib.sha256(text.encode()).hexdigest()[:16], "config": config}


def identity_path(csv_path: str | Path) -> Path:
    return Path(csv_path).with_suffix(".identity.json")


def read_identity(csv_path: str | Path) -> dict | None:
    """The sidecar identity of a results CSV (None for a CSV written before identities existed)."""
    side = identity_path(csv_path)
    if not side.exists():
        return None
    try:
        return json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{side}: unreadable experiment identity ({e}); restore or delete it") from None


def config_difference(a: Mapping, b: Mapping, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two (nested) configs."""
    out = []
    for k in sorted(set(a) | set(b), key=str):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += config_difference(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


def describe_mismatch(a: dict, b: dict) -> str:
    keys = config_difference(a.get("config") or {}, b.get("config") or {})
    return f"they differ in {', '.join(keys[:5])}{', …' if len(keys) > 5 else ''}" if keys else \
        f"fingerprints {a.get('fingerprint')} and {b.get('fingerprint')}"


def _write_identity(csv_path: Path, identity: dict) -> None:
    from taskmerge.provenance import write_json_atomic

    write_json_atomic(identity_path(csv_path), identity)


def check_identity(csv_path: str | Path, identity: dict) -> None:
    """Refuse ``csv_path`` when it holds the rows of an experiment other than ``identity``'s."""
    csv_path = Path(csv_path)
    have = read_identity(csv_path) if csv_path.exists() else None
    if have is not None and have.get("fingerprint") != identity["fingerprint"]:
        raise ValueError(f"{csv_path} holds the results of another experiment ({describe_mismatch(have, identity)}); "
                         f"write it elsewhere (suite=… or paths.results=…) or move the file away")


class ResultStore:
    def __init__(self, path: str | Path, identity: dict | None = None):
        """``identity`` (:func:`experiment_identity`): refuse a CSV of another experiment, record it in a new one."""
        self.path = Path(path)
        if identity is not None:
            self._check_identity(identity)  # before anything is created or written
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()
        if identity is not None and read_identity(self.path) is None:
            if self.rows():
                log.warning("%s has no experiment identity (written before identities); adopting this run's", self.path)
            _write_identity(self.path, identity)
        self._done = {self._key(r) for r in self.rows()}

    def _check_identity(self, identity: dict) -> None:
        check_identity(self.path, identity)

    @staticmethod
    def _key(row: dict) -> tuple:
        return (row["method"], row["hparams"], row["stage"], row["split"], row["checkpoints"], str(row["seed"]),
                str(row.get("order", "")), str(row.get("step", "")))

    def _repair(self) -> None:
        """Drop a partial trailing line left by a killed writer; write the header to a new file."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(COLUMNS)
                f.flush()
                os.fsync(f.fileno())
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
        with open(self.path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != COLUMNS:
            self._upgrade(header)

    def _upgrade(self, header: list[str]) -> None:
        """Rewrite a CSV written with an older column set (a subset of COLUMNS) atomically; refuse others."""
        if not set(header) <= set(COLUMNS) or "method" not in header:
            raise ValueError(f"{self.path} is not a taskmerge results CSV (columns {header}); "
                             "move it away or choose another experiment name")
        rows = self.rows()
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows({k: row.get(k, "") for k in COLUMNS} for row in rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def rows(self) -> list[dict]:
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def has(self, method: str, hparams: dict, stage: str, split: str, checkpoints: str, seed, order="", step="") -> bool:
        return (method, hparams_key(hparams), stage, split, checkpoints, str(seed), str(order), str(step)) in self._done

    def append(self, rows: list[dict]) -> None:
        """Append rows (dicts with COLUMNS) in one write; ``hparams`` may be a dict."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        for row in rows:
            row = {"order": "", "step": "", **row}  # only continual rows have an order and a step
            if isinstance(row["hparams"], dict):
                row["hparams"] = hparams_key(row["hparams"])
            missing = set(COLUMNS) - set(row)
            if missing:
                raise ValueError(f"result row lacks columns {sorted(missing)}")
            writer.writerow({k: row[k] for k in COLUMNS})
            self._done.add(self._key({k: str(v) if k in ("seed", "order", "step") else v for k, v in row.items()}))
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            data = buf.getvalue().encode()
            while data:  # a regular-file write is whole in practice; loop for the pathological case
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
