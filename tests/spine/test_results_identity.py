"""Results files cannot be corrupted: each CSV carries its experiment's identity (a config fingerprint in a
``.identity.json`` sidecar); run_suite refuses another experiment's CSV of the same name; ``taskmerge report``
refuses to mix experiments; ``taskmerge results --output`` refuses an output that is (or would become) an input."""
import json

import pandas as pd
import pytest

from taskmerge.cli import main
from taskmerge.search.store import ResultStore, experiment_identity, identity_path

from tests.spine.helpers import suite_config
from tests.spine.test_store import _row

TINY = ["model=tiny_bert", "budget.max_train=16", "budget.max_eval=8", "budget.max_test=8", "budget.epochs=1",
        "method=[average]"]


def _ident(**config):
    return experiment_identity({"tasks": {"names": ["a", "b"]}, "seed": 0, **config})


def _csv(path, identity, tasks=("a", "b")):
    store = ResultStore(path, identity)
    for method in ("finetuned", "average"):
        for stage, split in (("search", "validation"), ("test", "test")):
            store.append([_row(method=method, hparams={}, stage=stage, split=split, task=t) for t in tasks])
    return path


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_identity_excludes_what_varies_inside_an_experiment():
    a = _ident(methods={"ties": {}}, device="cpu", paths={"results": "r"}, search={"grid": [0.3]})
    b = _ident(methods={"tsv_m": {}}, device="cuda", paths={"results": "s"}, search={"grid": None})
    assert a["fingerprint"] == b["fingerprint"]
    assert _ident(seed=1)["fingerprint"] != a["fingerprint"]
    assert experiment_identity({"tasks": {"names": ["a"]}})["fingerprint"] != a["fingerprint"]


def test_store_refuses_another_experiments_csv(tmp_path):
    path = _csv(tmp_path / "r.csv", _ident())
    assert json.loads(identity_path(path).read_text())["fingerprint"] == _ident()["fingerprint"]
    ResultStore(path, _ident())  # the same experiment resumes
    before, side = path.read_bytes(), identity_path(path).read_bytes()
    with pytest.raises(ValueError) as e:
        ResultStore(path, _ident(tasks={"names": ["a", "c"]}))
    msg = str(e.value)
    assert str(path) in msg and "tasks.names" in msg and "\n" not in msg
    assert path.read_bytes() == before and identity_path(path).read_bytes() == side  # nothing written


def test_legacy_csv_is_adopted(tmp_path):
    path = _csv(tmp_path / "old.csv", None)
    assert not identity_path(path).exists()
    ResultStore(path, _ident())
    assert json.loads(identity_path(path).read_text())["fingerprint"] == _ident()["fingerprint"]


def test_run_suite_refuses_to_append_to_another_experiment(tmp_path, suite_dir):
    """The issue's case: two experiments under one ``experiment`` name (other tasks)."""
    from taskmerge.experiments.text_suite import run

    first = run(suite_config(tmp_path, *TINY, "tasks.names=[sentiment_movies]"))
    before = first["csv"].read_bytes()
    with pytest.raises(ValueError) as e:
        run(suite_config(tmp_path, *TINY, "tasks.names=[sentiment_tweets]"))
    assert str(first["csv"]) in str(e.value) and "tasks.names" in str(e.value)
    assert first["csv"].read_bytes() == before
    assert not list((tmp_path / "checkpoints").rglob("sentiment_tweets"))  # refused before fine-tuning it
    again = run(suite_config(tmp_path, *TINY, "tasks.names=[sentiment_movies]", "method=[task_arithmetic]",
                             "search.grid=[0.5]"))  # the same experiment, another method: appended
    assert set(pd.read_csv(again["csv"]).method) == {"pretrained", "finetuned", "average", "task_arithmetic"}


def test_report_refuses_to_mix_experiments(tmp_path, capsys):
    a = _csv(tmp_path / "a.csv", _ident())
    b = _csv(tmp_path / "b.csv", _ident(seed=1))
    code, _, err = cli(capsys, "report", str(a), str(b), "--output", str(tmp_path / "both"))
    assert code == 2 and str(a) in err and str(b) in err and "seed" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not list(tmp_path.glob("both*"))
    c = _csv(tmp_path / "c.csv", _ident())
    code, out, err = cli(capsys, "report", str(a), str(c), "--output", str(tmp_path / "same"))
    assert code == 0, err
    assert (tmp_path / "same.md").exists()


def test_results_output_may_not_be_an_input(tmp_path, capsys):
    folder = tmp_path / "sweep"
    folder.mkdir()
    a = _csv(folder / "a.csv", _ident())
    _csv(folder / "b.csv", _ident(), tasks=("a", "b"))
    before = a.read_bytes()
    for output, why in ((a, "one of the input CSVs"), (folder / "all.csv", "inside the input folder")):
        code, _, err = cli(capsys, "results", str(folder), "--output", str(output))
        assert code == 2 and str(output) in err and why in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert a.read_bytes() == before and not (folder / "all.csv").exists()
    code, _, err = cli(capsys, "results", str(folder), "--output", str(tmp_path / "all.csv"))
    assert code == 0, err
    assert json.loads(identity_path(tmp_path / "all.csv").read_text())["fingerprint"] == _ident()["fingerprint"]
    code, _, err = cli(capsys, "report", str(tmp_path / "all.csv"))
    assert code == 0, err


def test_a_gathered_mix_is_marked_and_not_reported(tmp_path, capsys):
    folder = tmp_path / "sweep"
    folder.mkdir()
    _csv(folder / "a.csv", _ident())
    _csv(folder / "b.csv", _ident(seed=1))
    code, _, err = cli(capsys, "results", str(folder), "--output", str(tmp_path / "mix.csv"))
    assert code == 0, err  # gathering several experiments is what `results` is for
    assert len(json.loads(identity_path(tmp_path / "mix.csv").read_text())["mixed"]) == 2
    code, _, err = cli(capsys, "report", str(tmp_path / "mix.csv"))
    assert code == 2 and "mix.csv" in err and "2 experiments" in err
    assert not (tmp_path / "mix.md").exists()
