"""Readers of declared tasks' sources: local CSV / JSON lines / parquet files, image folders, `datasets`.

Each reader returns ``Rows``: ``(item, raw label, where)`` triples, ``where`` naming the file and the
row (or the image path) for error messages. Items are strings (text tasks), image file paths or
in-memory images (image tasks). A missing file or column raises :class:`DeclarationError` with the
task, the file and the column; nothing is read lazily, so every check runs before any training.

- ``csv``: :mod:`csv` with a header line; every value is a string.
- ``jsonl``: one JSON object per line; labels keep their JSON type (an integer is a label index
  when no label name matches it, see ``declared.label_indices``).
- ``parquet``: ``pyarrow.parquet`` (``pip install pyarrow``).
- ``image_folder``: ``<folder>/<class name>/<image>`` (``.png .jpg .jpeg .bmp .gif .webp .tif``),
  classes and files in sorted order; the class folder is the raw label.
- ``disk``: ``datasets.load_from_disk`` (a ``Dataset`` or ``DatasetDict`` folder); ``hub``:
  ``datasets.load_dataset(name, config)`` from the local hub cache only (offline, nothing is
  downloaded). A ``ClassLabel`` label column gives the label names.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

Row = tuple[Any, Any, str]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DeclarationError(ValueError):
    """A declared task is unusable; the message names the task, the file and the offending item."""


def _need_file(task: str, path: Path, folder: bool = False) -> None:
    if not path.exists():
        raise DeclarationError(f"task {task!r}: {path} does not exist")
    if folder and not path.is_dir():
        raise DeclarationError(f"task {task!r}: {path} is not a folder")


def _columns(task: str, path: Path, have, want: dict[str, str]) -> None:
    for role, col in want.items():
        if col not in have:
            raise DeclarationError(f"task {task!r}: {path} has no {role} column {col!r} "
                                   f"(columns: {', '.join(map(str, have))})")


def read_csv(task: str, path: Path, item_col: str, label_col: str) -> list[Row]:
    _need_file(task, path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        _columns(task, path, reader.fieldnames or [], {"item": item_col, "label": label_col})
        return [(r[item_col], r[label_col], f"{path} row {i}") for i, r in enumerate(reader, start=2)]


def read_jsonl(task: str, path: Path, item_col: str, label_col: str) -> list[Row]:
    _need_file(task, path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise DeclarationError(f"task {task!r}: {path} line {i} is not JSON ({e.msg})") from None
            _columns(task, Path(f"{path} line {i}"), list(r), {"item": item_col, "label": label_col})
            rows.append((r[item_col], r[label_col], f"{path} line {i}"))
    return rows


def read_parquet(task: str, path: Path, item_col: str, label_col: str) -> list[Row]:
    _need_file(task, path)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DeclarationError(f"task {task!r}: reading {path} needs pyarrow (pip install pyarrow)") from None
    table = pq.read_table(path)
    _columns(task, path, table.column_names, {"item": item_col, "label": label_col})
    items, labels = table.column(item_col).to_pylist(), table.column(label_col).to_pylist()
    return [(x, y, f"{path} row {i}") for i, (x, y) in enumerate(zip(items, labels))]


def read_image_folder(task: str, path: Path) -> list[Row]:
    _need_file(task, path, folder=True)
    rows = []
    for cls in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(cls.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                rows.append((f, cls.name, str(f)))
    if not rows:
        raise DeclarationError(f"task {task!r}: {path} holds no images in class folders (<folder>/<class>/<image>)")
    return rows


def _datasets(task: str):
    try:
        import datasets
    except ImportError:
        raise DeclarationError(f"task {task!r}: this source needs the `datasets` package "
                               "(pip install datasets)") from None
    return datasets


def open_dataset(task: str, spec: dict, base: Path):
    """The ``datasets`` object of a ``disk`` or ``hub`` source (a Dataset or a DatasetDict)."""
    ds_lib = _datasets(task)
    if spec["source"] == "disk":
        path = resolve(base, spec.get("path"), task, "path")
        _need_file(task, path, folder=True)
        return ds_lib.load_from_disk(str(path)), str(path)
    name = spec.get("dataset")
    if not name:
        raise DeclarationError(f"task {task!r}: a hub source needs `dataset: <name>` (read from the local cache)")
    ds_lib.config.HF_HUB_OFFLINE = True  # never download: the hub cache only
    try:
        ds = ds_lib.load_dataset(name, spec.get("config"), cache_dir=spec.get("cache_dir"),
                                 revision=spec.get("revision"))
    except Exception as e:  # noqa: BLE001 -- datasets raises many kinds; one line naming the dataset
        raise DeclarationError(f"task {task!r}: dataset {name!r} is not in the local hub cache "
                               f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return ds, f"hub:{name}"


def read_dataset_split(task: str, ds, where: str, split: str | None, item_col: str,
                       label_col: str) -> tuple[list[Row], list[str] | None]:
    """Rows of one split of a ``datasets`` object (``split=None``: ``ds`` is one Dataset); the
    ``ClassLabel`` names of the label column, if it has them."""
    if split is not None:
        if split not in ds:
            raise DeclarationError(f"task {task!r}: {where} has no split {split!r} (splits: {', '.join(ds)})")
        ds, where = ds[split], f"{where}[{split}]"
    elif hasattr(ds, "keys") and not hasattr(ds, "column_names"):
        raise DeclarationError(f"task {task!r}: {where} has splits ({', '.join(ds)}): "
                               "declare `splits:` to map train/validation/test to them")
    _columns(task, Path(where), ds.column_names, {"item": item_col, "label": label_col})
    feature = ds.features[label_col]
    names = list(feature.names) if hasattr(feature, "names") else None
    items, labels = ds[item_col], ds[label_col]
    return [(x, y, f"{where} row {i}") for i, (x, y) in enumerate(zip(items, labels))], names


def resolve(base: Path, value, task: str, key: str) -> Path:
    if value in (None, ""):
        raise DeclarationError(f"task {task!r}: `{key}` is not set")
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else base / p


FILE_READERS = {"csv": read_csv, "jsonl": read_jsonl, "parquet": read_parquet}
SUFFIX_SOURCE = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
