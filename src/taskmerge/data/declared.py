"""Tasks declared in YAML: any text or image classification data, no library code to edit.

A declaration (one YAML file per task, or a file with a ``tasks:`` list; relative paths are relative
to the YAML file)::

    name: reviews                # the task's name (checkpoint folders, CSV rows)
    source: csv                  # csv | jsonl | parquet | image_folder | disk | hub | builtin
                                 #   (default: from the file suffix; a folder: image_folder)
    path: reviews.csv            # ONE pool, split by the rule below ...
    files: {train: tr.csv, test: te.csv}   # ... or named files (a split not named is carved from train)
    text: text                   # text column (default ``text``), or ``image: <column>`` for images
    label: label                 # label column (default ``label``; image_folder: the class folder)
    labels: [negative, positive] # optional; absent: the distinct labels, sorted (numerically if all integers)
    split: {validation: 20, test: 20, seed: 0}   # sizes (an int, or a fraction < 1 of the pool)
    metric: accuracy             # or macro_f1
    templates: ["a photo of a {c}."]             # image tasks: zero-shot head prompts

``disk`` (``datasets.load_from_disk``) and ``hub`` (``dataset: <name>``, ``config:``, ``cache_dir:``;
the local hub cache only) map our splits to theirs with ``splits: {train: train, validation: dev,
test: test}`` (a split not mapped is carved from train). ``builtin`` (``task: bbc_news``) is a task of
the offline text suite (``data.text_suite``): its JSON-lines splits under ``<data>/text_suite/`` are
built once by that module's rule and read as they are (configs/tasks/declared/ declares all six).

**The pool rule** (``split:``): examples are de-duplicated by content (text: whitespace-collapsed,
lower-cased, as the built-in suite; images: the bytes), ordered by ``sha256(f"{seed}:{content}")``,
and the first ``test`` go to test, the next ``validation`` to validation, the rest to train. So no
example is in two splits and the split does not depend on the file's row order.

**Checks, before any training** (one :class:`DeclarationError` line naming the task, the file and the
item): a missing file, folder or column; a label outside the label names; an empty split; an example
(by the content key above) in two splits.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from taskmerge.data import declared_sources as src
from taskmerge.data.declared_sources import DeclarationError

SPLITS = ("train", "validation", "test")
SOURCES = ("csv", "jsonl", "parquet", "image_folder", "disk", "hub", "builtin")
METRICS = ("accuracy", "macro_f1")
KEYS = {"name", "source", "path", "files", "text", "image", "label", "labels", "split", "splits", "metric",
        "templates", "dataset", "config", "cache_dir", "revision", "task"}
__all__ = ["DeclarationError", "TaskData", "load_task", "read_declarations", "resolve_tasks"]


@dataclass
class TaskData:
    """A loaded, checked task: ``splits[split] = (items, label indices)``; ``items`` are texts, image
    paths or images. ``fingerprint`` hashes the declaration and every example (checkpoint identity)."""

    name: str
    kind: str  # "text" | "image"
    labels: list[str]
    splits: dict[str, tuple[list, list[int]]]
    metric: str = "accuracy"
    templates: list[str] = field(default_factory=lambda: ["a photo of a {c}."])
    files: dict[str, str] = field(default_factory=dict)
    fingerprint: str = ""
    builtin: bool = False

    def split(self, split: str, limit: int | None = None) -> tuple[list, list[int]]:
        """(items, labels) of one split; ``limit`` keeps the first N."""
        items, labels = self.splits[split]
        return (items, labels) if limit is None else (items[:limit], labels[:limit])


# ---------------------------------------------------------------- declarations
def read_declarations(path: str | Path) -> dict[str, dict]:
    """``{name: spec}`` of a YAML file (one task, or a ``tasks:`` list) or of every ``*.yaml`` in a folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DeclarationError(f"task declarations {path} do not exist")
    files = sorted(path.glob("*.yaml")) + sorted(path.glob("*.yml")) if path.is_dir() else [path]
    out: dict[str, dict] = {}
    for f in files:
        try:
            doc = yaml.safe_load(f.read_text())
        except yaml.YAMLError as e:
            raise DeclarationError(f"task declarations {f}: not valid YAML ({str(e).splitlines()[0]})") from None
        entries = doc.get("tasks") if isinstance(doc, dict) and "tasks" in doc else [doc]
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise DeclarationError(f"task declarations {f}: expected a task mapping or a `tasks:` list of them")
        for spec in entries:
            name = spec.get("name")
            if not name or not isinstance(name, str):
                raise DeclarationError(f"task declarations {f}: a task has no `name`")
            if name in out:
                raise DeclarationError(f"task {name!r} is declared twice ({out[name]['_file']} and {f})")
            unknown = sorted(set(spec) - KEYS)
            if unknown:
                raise DeclarationError(f"task {name!r} ({f}): unknown key {unknown[0]!r} (known: {', '.join(sorted(KEYS))})")
            out[name] = {**spec, "_file": str(f), "_base": str(f.parent)}
    return out


def resolve_tasks(names: Iterable[str] | None, declared: Iterable[str | Path], data_root: str | Path,
                  seed: int = 0) -> dict[str, TaskData]:
    """Load and check every task in ``names`` (None: every declared task, in declaration order) from the
    declaration files or folders ``declared``. Every task is checked before this returns."""
    specs: dict[str, dict] = {}
    for d in declared:
        for name, spec in read_declarations(d).items():
            if name in specs:
                raise DeclarationError(f"task {name!r} is declared twice ({specs[name]['_file']} and {spec['_file']})")
            specs[name] = spec
    names = list(specs) if names is None else list(names)
    missing = [n for n in names if n not in specs]
    if missing:
        raise DeclarationError(f"task {missing[0]!r} is not declared in {', '.join(map(str, declared))} "
                               f"(declared: {', '.join(specs) or 'none'})")
    return {n: load_task(specs[n], data_root, seed) for n in names}


# ---------------------------------------------------------------- loading
def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip().lower()


def content_key(item) -> str:
    """What makes two examples the same: normalized text, or the image's bytes (a sha256)."""
    if isinstance(item, str):
        return _norm(item)
    if isinstance(item, Path):
        return "img:" + hashlib.sha256(item.read_bytes()).hexdigest()
    if isinstance(item, dict) and item.get("bytes") is not None:  # a datasets Image feature, undecoded
        return "img:" + hashlib.sha256(item["bytes"]).hexdigest()
    if hasattr(item, "tobytes"):  # a PIL image
        return "img:" + hashlib.sha256(item.tobytes() + str(getattr(item, "size", "")).encode()).hexdigest()
    return _norm(json.dumps(item, default=str))


def _kind(spec: dict, source: str) -> str:
    return "image" if source == "image_folder" or spec.get("image") else "text"


def _source(spec: dict, name: str) -> str:
    s = spec.get("source")
    if s is None:
        p = spec.get("path") or next(iter((spec.get("files") or {}).values()), None)
        if p is None:
            raise DeclarationError(f"task {name!r} ({spec['_file']}): give `source:` and `path:` or `files:`")
        s = "image_folder" if Path(spec["_base"], str(p)).is_dir() else src.SUFFIX_SOURCE.get(Path(str(p)).suffix)
        if s is None:
            raise DeclarationError(f"task {name!r}: cannot tell the source of {p}: set `source:` ({', '.join(SOURCES)})")
    if s not in SOURCES:
        raise DeclarationError(f"task {name!r} ({spec['_file']}): unknown source {s!r} (one of {', '.join(SOURCES)})")
    return s


def _builtin(spec: dict, data_root, seed: int) -> dict:
    """The built-in suite's task as a JSON-lines declaration of its built split files."""
    from taskmerge.data import text_suite

    task = spec.get("task", spec["name"])
    if task not in text_suite.TASKS:
        raise DeclarationError(f"task {spec['name']!r} ({spec['_file']}): no built-in task {task!r} "
                               f"(built-in: {', '.join(text_suite.TASKS)})")
    suite = text_suite.build_suite(Path(data_root).resolve(), seed=seed)
    return {**spec, "source": "jsonl", "text": "text", "label": "label",
            "labels": spec.get("labels") or text_suite.label_names(suite, task), "split": None,
            "files": {s: str(suite / task / f"{s}.jsonl") for s in SPLITS}, "path": None}


def _read(spec: dict, name: str, source: str, base: Path) -> tuple[dict[str, list], dict[str, str], list | None]:
    """``({split: rows}, {split: where}, ClassLabel names or None)``; a split absent here is carved."""
    item_col = spec.get("image") or spec.get("text") or "text"
    label_col = spec.get("label") or "label"
    if source in ("disk", "hub"):
        ds, where = src.open_dataset(name, {**spec, "source": source}, base)
        mapping = spec.get("splits") or ({s: s for s in SPLITS if s in ds} if hasattr(ds, "keys") else None)
        if mapping is None:
            rows, names = src.read_dataset_split(name, ds, where, None, item_col, label_col)
            return {"train": rows}, {"train": where}, names
        out, wheres, names = {}, {}, None
        for ours, theirs in mapping.items():
            if ours not in SPLITS:
                raise DeclarationError(f"task {name!r}: `splits:` maps {ours!r}; our splits are {', '.join(SPLITS)}")
            out[ours], names = src.read_dataset_split(name, ds, where, str(theirs), item_col, label_col)
            wheres[ours] = f"{where}[{theirs}]"
        return out, wheres, names
    files = spec.get("files") or {}
    if spec.get("path") is not None and files:
        raise DeclarationError(f"task {name!r} ({spec['_file']}): give `path:` (one pool) or `files:`, not both")
    if not files:
        files = {"train": spec.get("path")}
    out, wheres = {}, {}
    for split, value in files.items():
        if split not in SPLITS:
            raise DeclarationError(f"task {name!r}: `files:` names split {split!r}; our splits are {', '.join(SPLITS)}")
        path = src.resolve(base, value, name, f"files.{split}" if spec.get("files") else "path")
        if source == "image_folder":
            out[split] = src.read_image_folder(name, path)
        else:
            out[split] = src.FILE_READERS[source](name, path, item_col, label_col)
        wheres[split] = str(path)
    return out, wheres, None


def _label_names(spec: dict, rows: dict[str, list], class_names: list | None) -> list[str]:
    if spec.get("labels"):
        return [str(x) for x in spec["labels"]]
    if class_names:
        return list(class_names)
    seen = {str(y) for part in rows.values() for _, y, _ in part}
    as_int = all(re.fullmatch(r"-?\d+", s) for s in seen)
    return sorted(seen, key=int) if as_int else sorted(seen)


def label_indices(name: str, rows: list, names: list[str]) -> list[int]:
    """Each raw label's index in ``names``: by name; an integer that matches no name is an index
    when no label name is itself an integer. Anything else is refused, naming the row."""
    index = {n: i for i, n in enumerate(names)}
    int_names = any(re.fullmatch(r"-?\d+", n) for n in names)
    out = []
    for _, y, where in rows:
        key = str(y)
        if key in index:
            out.append(index[key])
        elif not int_names and re.fullmatch(r"\d+", key) and int(key) < len(names) and not isinstance(y, float):
            out.append(int(key))
        else:
            raise DeclarationError(f"task {name!r}: {where}: label {y!r} is not one of the label names "
                                   f"[{', '.join(names)}]")
    return out


def _size(value, n: int, what: str, name: str) -> int:
    if isinstance(value, float) and 0 < value < 1:
        return int(round(value * n))
    if isinstance(value, (int, float)) and value >= 0 and float(value).is_integer():
        return int(value)
    raise DeclarationError(f"task {name!r}: split.{what} = {value!r}: an integer size or a fraction in (0, 1)")


def _carve(name: str, rows: list, keys: list[str], want: dict[str, Any], seed: int, where: str) -> dict[str, list]:
    """The pool rule (module docstring) over ``rows``: returns ``{split: rows}`` for the carved splits."""
    seen, unique = set(), []
    for row, key in zip(rows, keys):
        if key not in seen:
            seen.add(key)
            unique.append((hashlib.sha256(f"{seed}:{key}".encode()).hexdigest(), row))
    unique.sort(key=lambda t: t[0])
    sizes = {s: _size(want[s], len(unique), s, name) for s in ("test", "validation") if s in want}
    if sum(sizes.values()) >= len(unique):
        raise DeclarationError(f"task {name!r}: {where} has {len(unique)} distinct examples, too few for "
                               + " + ".join(f"{s} {n}" for s, n in sizes.items()) + " + train")
    out, start = {}, 0
    for s in ("test", "validation"):
        if s in sizes:
            out[s] = [r for _, r in unique[start:start + sizes[s]]]
            start += sizes[s]
    out["train"] = [r for _, r in unique[start:]]
    return out


def _leaks(name: str, rows: dict[str, list], keys: dict[str, list[str]]) -> None:
    first: dict[str, tuple[str, str]] = {}
    for split in SPLITS:
        for (item, _, where), key in zip(rows.get(split, []), keys.get(split, [])):
            if key in first and first[key][0] != split:
                other_split, other_where = first[key]
                shown = item if isinstance(item, str) else Path(str(where)).name
                raise DeclarationError(f"task {name!r}: example {str(shown)[:60]!r} ({where}) is in both "
                                       f"{other_split} ({other_where}) and {split}")
            first.setdefault(key, (split, where))


def load_task(spec: dict, data_root: str | Path = ".data", seed: int = 0) -> TaskData:
    """Read, split and check one declaration (see the module docstring)."""
    spec = {"_file": "<inline>", "_base": ".", **spec}
    name = spec.get("name") or "<unnamed>"
    source = _source(spec, name)
    builtin = source == "builtin"
    if builtin:
        spec = _builtin(spec, data_root, seed)
        source = "jsonl"
    metric = spec.get("metric") or "accuracy"
    if metric not in METRICS:
        raise DeclarationError(f"task {name!r} ({spec['_file']}): unknown metric {metric!r} (one of {', '.join(METRICS)})")
    rows, wheres, class_names = _read(spec, name, source, Path(spec["_base"]))
    keys = {s: [content_key(item) for item, _, _ in part] for s, part in rows.items()}
    _leaks(name, rows, keys)
    carve = [s for s in SPLITS if s not in rows]
    if carve:
        rule = dict(spec.get("split") or {})
        absent = [s for s in carve if s != "train" and s not in rule]
        if absent:
            raise DeclarationError(f"task {name!r} ({spec['_file']}): no {absent[0]} split: name its file or "
                                   f"give `split: {{{absent[0]}: <size>}}` to carve it from train")
        carved = _carve(name, rows["train"], keys["train"], rule, int(rule.get("seed", seed)), wheres["train"])
        rows.update(carved)
        for s in carved:
            wheres[s] = f"{wheres['train']} ({'pool' if s == 'train' else 'carved ' + s})"
    names = _label_names(spec, rows, class_names)
    splits = {}
    for s in SPLITS:
        if not rows[s]:
            raise DeclarationError(f"task {name!r}: split {s!r} is empty ({wheres[s]})")
        splits[s] = ([item for item, _, _ in rows[s]], label_indices(name, rows[s], names))
    h = hashlib.sha256(json.dumps({k: v for k, v in spec.items() if not k.startswith("_")}, sort_keys=True,
                                  default=str).encode())
    for s in SPLITS:
        for item, y in zip(*splits[s]):
            h.update(f"{s}\0{content_key(item)}\0{y}\n".encode())
    return TaskData(name, _kind(spec, source), names, splits, metric,
                    list(spec.get("templates") or ["a photo of a {c}."]), wheres, h.hexdigest()[:16], builtin)
