"""Declared tasks: sources, the pool rule, label names, and every refusal (one line naming the culprit)."""
import csv
import json

import pytest

from taskmerge.data.declared import DeclarationError, load_task, read_declarations, resolve_tasks


def write_csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def pool(n=40, prefix="review"):
    return [(f"{prefix} number {i} {'good' if i % 2 else 'bad'}", "pos" if i % 2 else "neg") for i in range(n)]


def spec(tmp_path, **kw):
    return {"name": "reviews", "_file": str(tmp_path / "tasks.yaml"), "_base": str(tmp_path), **kw}


def test_pool_rule_is_disjoint_seeded_and_order_free(tmp_path):
    write_csv(tmp_path / "a.csv", pool())
    write_csv(tmp_path / "b.csv", list(reversed(pool())) + pool()[:5])  # other order, duplicates
    s = dict(path="a.csv", split={"validation": 8, "test": 0.25})
    a = load_task(spec(tmp_path, **s))
    b = load_task(spec(tmp_path, **{**s, "path": "b.csv"}))
    assert {k: len(v[0]) for k, v in a.splits.items()} == {"train": 22, "validation": 8, "test": 10}
    for split in a.splits:  # the rule does not depend on row order or duplicates
        assert sorted(a.splits[split][0]) == sorted(b.splits[split][0])
    parts = [set(a.splits[s][0]) for s in ("train", "validation", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert a.labels == ["neg", "pos"]  # inferred, sorted
    other = load_task(spec(tmp_path, **{**s, "split": {**s["split"], "seed": 1}}))
    assert set(other.splits["test"][0]) != set(a.splits["test"][0])
    assert a.fingerprint != other.fingerprint


def test_named_files_labels_by_name_or_index_and_numeric_sort(tmp_path):
    rows = [(f"t {i}", str(i % 11)) for i in range(44)]
    write_csv(tmp_path / "train.csv", rows[:30])
    write_csv(tmp_path / "val.csv", rows[30:37])
    write_csv(tmp_path / "test.csv", rows[37:])
    t = load_task(spec(tmp_path, files={"train": "train.csv", "validation": "val.csv", "test": "test.csv"}))
    assert t.labels == [str(i) for i in range(11)]  # numerically, not "0, 1, 10, 2"
    assert t.splits["train"][1][:3] == [0, 1, 2] and t.splits["train"][1][10] == 10
    with open(tmp_path / "x.jsonl", "w") as f:
        for i, (text, _) in enumerate(pool(20)):
            f.write(json.dumps({"sentence": text, "y": i % 2}) + "\n")
    j = load_task(spec(tmp_path, path="x.jsonl", text="sentence", label="y", labels=["neg", "pos"],
                       split={"validation": 4, "test": 4}))
    assert j.splits["test"][1] == [int(x.endswith("good")) for x in j.splits["test"][0]]  # index 1 = pos


def test_image_folder_pool(tmp_path):
    from PIL import Image

    for c, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (8, 8), (color[0], i * 10, color[2])).save(tmp_path / "imgs" / c / f"{i}.png")
    t = load_task(spec(tmp_path, name="pets", path="imgs", split={"validation": 2, "test": 2}))
    assert t.kind == "image" and t.labels == ["cat", "dog"]
    assert sum(len(v[0]) for v in t.splits.values()) == 12


def test_declarations_file_and_folder(tmp_path):
    write_csv(tmp_path / "a.csv", pool())
    (tmp_path / "tasks.yaml").write_text(
        "tasks:\n  - {name: one, path: a.csv, split: {validation: 5, test: 5}}\n"
        "  - {name: two, path: a.csv, split: {validation: 5, test: 5, seed: 3}, metric: macro_f1}\n")
    got = resolve_tasks(None, [tmp_path / "tasks.yaml"], tmp_path)
    assert list(got) == ["one", "two"] and got["two"].metric == "macro_f1"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "three.yaml").write_text("name: three\npath: ../a.csv\nsplit: {validation: 5, test: 5}\n")
    assert list(read_declarations(tmp_path / "d")) == ["three"]
    with pytest.raises(DeclarationError, match="task 'four' is not declared"):
        resolve_tasks(["four"], [tmp_path / "d"], tmp_path)


def test_datasets_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    d = datasets.DatasetDict({s: datasets.Dataset.from_dict(
        {"text": [f"{s} {i}" for i in range(6)], "label": [i % 2 for i in range(6)]}, features=feats)
        for s in ("train", "dev", "test")})
    d.save_to_disk(str(tmp_path / "ds"))
    t = load_task(spec(tmp_path, source="disk", path="ds", splits={"train": "train", "validation": "dev",
                                                                   "test": "test"}))
    assert t.labels == ["neg", "pos"] and t.splits["validation"] == ([f"dev {i}" for i in range(6)], [0, 1] * 3)


def test_parquet_pool_equals_csv_pool(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = pool()
    pq.write_table(pa.table({"text": [r[0] for r in rows], "label": [r[1] for r in rows]}), tmp_path / "a.parquet")
    write_csv(tmp_path / "a.csv", rows)
    s = dict(split={"validation": 8, "test": 8})
    p, c = load_task(spec(tmp_path, path="a.parquet", **s)), load_task(spec(tmp_path, path="a.csv", **s))
    assert p.splits == c.splits and p.labels == c.labels == ["neg", "pos"]


def test_hub_source_reads_a_local_dataset_and_names_a_missing_one(tmp_path):
    pytest.importorskip("datasets")
    repo = tmp_path / "my_reviews"  # a dataset repository as the hub cache holds it: data files per split
    repo.mkdir()
    write_csv(repo / "train.csv", pool(30))
    write_csv(repo / "test.csv", pool(10, prefix="held out"))
    t = load_task(spec(tmp_path, source="hub", dataset=str(repo), cache_dir=str(tmp_path / "cache"),
                       splits={"train": "train", "test": "test"}, split={"validation": 6}))
    assert {k: len(v[0]) for k, v in t.splits.items()} == {"train": 24, "validation": 6, "test": 10}
    assert t.splits["test"][0][0] == "held out number 0 bad" and t.labels == ["neg", "pos"]
    with pytest.raises(DeclarationError, match=r"^task 'reviews': dataset 'nobody/no_such_set' is not in the local hub cache"):
        load_task(spec(tmp_path, source="hub", dataset="nobody/no_such_set", cache_dir=str(tmp_path / "cache"),
                       splits={"train": "train", "test": "test"}))


# ---------------------------------------------------------------- refusals: case -> (spec change, message)
def bad_cases(tmp_path):
    write_csv(tmp_path / "ok.csv", pool())
    write_csv(tmp_path / "cols.csv", [("x", "pos")], header=("sentence", "label"))
    write_csv(tmp_path / "maybe.csv", pool(10) + [("what a film", "maybe")])
    write_csv(tmp_path / "empty.csv", [])
    write_csv(tmp_path / "test.csv", [pool()[3]])
    write_csv(tmp_path / "other.csv", [("an unseen sentence", "pos")])
    return {
        "missing file": (dict(path="nope.csv", split={"validation": 5, "test": 5}),
                         f"task 'reviews': {tmp_path}/nope.csv does not exist"),
        "missing column": (dict(path="cols.csv", split={"validation": 5, "test": 5}),
                           f"task 'reviews': {tmp_path}/cols.csv has no item column 'text' (columns: sentence, label)"),
        "label outside the label names": (
            dict(path="maybe.csv", labels=["neg", "pos"], split={"validation": 2, "test": 2}),
            f"task 'reviews': {tmp_path}/maybe.csv row 12: label 'maybe' is not one of the label names [neg, pos]"),
        "empty split": (dict(files={"train": "ok.csv", "validation": "empty.csv", "test": "other.csv"}),
                        f"task 'reviews': split 'validation' is empty ({tmp_path}/empty.csv)"),
        "example in two splits": (
            dict(files={"train": "ok.csv", "test": "test.csv"}, split={"validation": 4}),
            f"task 'reviews': example 'review number 3 good' ({tmp_path}/test.csv row 2) is in both train "
            f"({tmp_path}/ok.csv row 5) and test"),
    }


@pytest.mark.parametrize("case", ["missing file", "missing column", "label outside the label names", "empty split",
                                  "example in two splits"])
def test_bad_declarations_one_line(tmp_path, case):
    change, message = bad_cases(tmp_path)[case]
    with pytest.raises(DeclarationError) as e:
        load_task(spec(tmp_path, **change))
    assert str(e.value) == message and "\n" not in str(e.value)
