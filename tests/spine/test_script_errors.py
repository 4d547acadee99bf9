"""The Hydra scripts fail as the CLI does: one ``error:`` line naming the bad file, exit code 2, no
traceback, nothing written (``cli_support.friendly_errors`` + the loaders of ``taskmerge.io``)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.spine.helpers import suite_config

REPO = Path(__file__).resolve().parents[2]
TINY = ["model=tiny_bert", "budget.max_train=32", "budget.max_eval=16", "budget.max_test=16", "budget.epochs=1",
        "tasks.names=[sentiment_movies]"]


def script(path, *overrides):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("TASKMERGE_DEBUG", None)
    return subprocess.run([sys.executable, path, *overrides], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def assert_one_line_error(res, *culprits):
    err = res.stderr.strip()
    assert res.returncode == 2, (res.returncode, err[-2000:])
    assert "Traceback" not in res.stderr and "Error executing job" not in res.stderr, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-2000:]
    for c in culprits:
        assert str(c) in lines[0], (c, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, suite_dir):
    """One tiny fine-tuned checkpoint; each test copies the tree and breaks one file."""
    from taskmerge.experiments.text_suite import TextSuite

    root = tmp_path_factory.mktemp("ck")
    cfg = suite_config(root, *TINY)
    suite = TextSuite(cfg).load()
    suite.finetune_task("sentiment_movies")
    return root, suite.checkpoint("sentiment_movies").relative_to(root)


def _broken(tmp_path, checkpoint, name):
    import shutil

    root, rel = checkpoint
    shutil.copytree(root / "checkpoints", tmp_path / "checkpoints")
    target = Path(os.path.normpath(tmp_path / rel / name))  # the frozen probe head lives in <suite>/<model>/heads/<task>.safetensors
    if name == "metadata.json":
        target.write_text('{"mode": "full", ')  # cut mid-write
    else:
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])  # truncated copy
    return target, [f"paths.checkpoints={tmp_path}/checkpoints", f"paths.results={tmp_path}/results", *TINY]


def test_run_suite_script_names_the_truncated_checkpoint(tmp_path, checkpoint):
    """The issue's case, through the real script (Hydra + friendly_errors) in a subprocess."""
    target, overrides = _broken(tmp_path, checkpoint, "model.safetensors")
    res = script("eval_scripts/run_suite.py", *overrides, "method=[task_arithmetic]", "search.grid=[0.5]")
    line = assert_one_line_error(res, target)
    assert "not a readable safetensors file" in line
    assert not (tmp_path / "results").exists()


def _in_process(capsys, fn, cfg, *culprits):
    """What a script does with ``fn(cfg)``: friendly_errors around the experiment function."""
    from taskmerge.cli_support import friendly_errors

    with pytest.raises(SystemExit) as e:
        friendly_errors(fn)(cfg)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    for c in culprits:
        assert str(c) in err, (c, err)
    return err


@pytest.mark.parametrize("name", ["../../heads/sentiment_movies.safetensors", "metadata.json"])
def test_run_suite_names_a_broken_head_or_metadata(tmp_path, checkpoint, capsys, monkeypatch, name):
    from taskmerge.experiments.text_suite import run

    monkeypatch.delenv("TASKMERGE_DEBUG", raising=False)
    target, overrides = _broken(tmp_path, checkpoint, name)
    _in_process(capsys, run, suite_config(tmp_path, *overrides, "method=[task_arithmetic]", "search.grid=[0.5]"),
                target)
    assert not (tmp_path / "results").exists()


def test_compute_stats_names_the_truncated_checkpoint(tmp_path, checkpoint, capsys, monkeypatch):
    from taskmerge.experiments.text_suite import compute_statistics

    monkeypatch.delenv("TASKMERGE_DEBUG", raising=False)
    target, overrides = _broken(tmp_path, checkpoint, "model.safetensors")
    _in_process(capsys, compute_statistics, suite_config(tmp_path, *overrides, "stats.max_examples=8"), target)
    assert not list((tmp_path / "checkpoints").rglob("stats/**/*.safetensors"))


def test_vision_script_names_the_truncated_import(tmp_path):
    src = tmp_path / "ft.safetensors"
    save_file({"visual.proj": torch.zeros(64, 64)}, str(src))
    src.write_bytes(src.read_bytes()[:100])
    res = script("eval_scripts/run_vision.py", "experiment=tiny_synthetic", f"finetuned.pattern={src}",
                 f"paths.checkpoints={tmp_path}/ck", f"paths.results={tmp_path}/res", "report=false",
                 "tasks.train=8", "tasks.validation=8", "tasks.test=8")
    assert_one_line_error(res, src)
    assert not (tmp_path / "res").exists()


def test_unexpected_errors_are_one_line_too(capsys, monkeypatch):
    from taskmerge.cli_support import friendly_errors

    monkeypatch.delenv("TASKMERGE_DEBUG", raising=False)

    @friendly_errors
    def boom():
        raise TypeError("bad thing\nsecond line")

    with pytest.raises(SystemExit) as e:
        boom()
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: TypeError: bad thing\n"
    monkeypatch.setenv("TASKMERGE_DEBUG", "1")
    with pytest.raises(TypeError):
        boom()


def test_unquoted_pattern_is_one_line_with_the_quoting(tmp_path):
    """The docs' old ``finetuned.pattern=/…/clip_{task}``: one line naming the override and the fix."""
    res = script("eval_scripts/run_vision.py", "experiment=tiny_synthetic", f"paths.results={tmp_path}/res",
                 f"finetuned.pattern={tmp_path}/clip_{{task}}")
    line = assert_one_line_error(res, f"finetuned.pattern={tmp_path}/clip_{{task}}")
    assert f"\"finetuned.pattern='{tmp_path}/clip_{{task}}'\"" in line and "mismatched input '{'" in line
    assert not (tmp_path / "res").exists()


def test_check_overrides_accepts_what_hydra_accepts():
    from taskmerge.cli_support import check_overrides

    check_overrides(["-m", "method=ties,tsv_m", "search.grid=[0.2,0.4]", "finetuned.pattern='/c/{task}'",
                     "+experiment=all_methods", "hydra/launcher=joblib", "--config-name", "language_mats"])
    with pytest.raises(ValueError, match=r"search\.grid=\[0\.2,"):
        check_overrides(["search.grid=[0.2,"])
