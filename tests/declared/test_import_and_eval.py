"""Checkpoints you already have (finetuned.pattern, no training) and `taskmerge eval` of a merged file."""
import hashlib
import json
import logging

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from taskmerge.cli import main as cli
from taskmerge.experiments import runner
from taskmerge.experiments.text_suite import TextSuite
from tests.declared.helpers import write_text_tasks
from tests.spine.helpers import CONFIGS

TASKS = ("mood", "topic")


def compose(tmp_path, *overrides):
    from hydra import compose as hydra_compose, initialize_config_dir

    base = ["tasks=own", f"tasks.declared={tmp_path}/mine/tasks.yaml", "model=tiny_bert", f"paths.data={tmp_path}/data",
            f"paths.checkpoints={tmp_path}/ck", f"paths.results={tmp_path}/res", "method=[task_arithmetic]",
            "search.grid=[0.5,1.0]", "+report=false"]
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return hydra_compose("suite", overrides=base + list(overrides))


@pytest.fixture
def have(tmp_path):
    """θ0 (a tiny BERT saved as an HF folder with its tokenizer) and one fine-tuned .safetensors per task."""
    from taskmerge.models import text_encoder as family

    write_text_tasks(tmp_path / "mine")
    cfg = compose(tmp_path)
    enc = family.load_encoder(None, dict(cfg.model.config), seed=0)
    enc.save_pretrained(str(tmp_path / "theta0"))
    family.load_tokenizer(None).save_pretrained(str(tmp_path / "theta0"))
    g = torch.Generator().manual_seed(1)
    (tmp_path / "imp").mkdir()
    for task in TASKS:
        sd = {k: (v + 0.02 * torch.randn(v.shape, generator=g)).contiguous() for k, v in enc.state_dict().items()}
        save_file(sd, str(tmp_path / "imp" / f"{task}.safetensors"))
    return [f"model.path={tmp_path}/theta0", f"finetuned.pattern='{tmp_path}/imp/{{task}}.safetensors'"]


def sha256_of(path):
    h = hashlib.sha256(path.name.encode())  # provenance.file_hash: the file's name, then its bytes
    h.update(path.read_bytes())
    return h.hexdigest()


def test_import_by_pattern_no_training_rows_name_the_files(tmp_path, have, caplog):
    with caplog.at_level(logging.INFO, logger="taskmerge"):
        out = runner.run(TextSuite(compose(tmp_path, *have)))
    assert not (tmp_path / "ck" / "text-demo" / "tiny_bert" / "full").exists()  # nothing was fine-tuned
    df = pd.read_csv(out["csv"])
    ft = df[df.method == "finetuned"]
    assert sorted(zip(ft.task, ft.split)) == sorted((t, s) for t in TASKS for s in ("test", "validation"))
    assert ft.accuracy.between(0, 1).all()
    side = json.loads(out["csv"].with_name(out["csv"].stem + ".checkpoints.json").read_text())
    assert set(df.checkpoints) == {out["checkpoints"]}
    for task in TASKS:
        f = tmp_path / "imp" / f"{task}.safetensors"
        entry = side[out["checkpoints"]][task]
        assert entry == {"source": str(f), "weights": sha256_of(f), "fingerprint": f"import:{sha256_of(f)[:16]}"}
        assert f"{task}: imported {f} (weights {sha256_of(f)[:16]}" in caplog.text
    # another file for one task: other checkpoints id, new baseline rows, the same CSV
    sd = {k: v * 1.001 for k, v in __import__("safetensors.torch").torch.load_file(
        str(tmp_path / "imp" / "mood.safetensors")).items()}
    save_file(sd, str(tmp_path / "imp" / "mood.safetensors"))
    again = runner.run(TextSuite(compose(tmp_path, *have)))
    assert again["checkpoints"] != out["checkpoints"] and len(set(pd.read_csv(again["csv"]).checkpoints)) == 2


def test_pattern_needs_explicit_theta0_and_matching_tensors(tmp_path, have, caplog):
    with pytest.raises(ValueError, match=r"finetuned.pattern=.* is set but model.path is not"):
        runner.run(TextSuite(compose(tmp_path, have[1])))
    assert not (tmp_path / "res").exists() and not (tmp_path / "ck").exists()  # nothing written
    f = tmp_path / "imp" / "topic.safetensors"
    from safetensors.torch import load_file

    sd = load_file(str(f))
    key = "encoder.layer.0.attention.self.query.weight"
    save_file({**sd, key: sd[key][:16].contiguous()}, str(f))
    with pytest.raises(ValueError, match=rf"task 'topic': {f}: tensor {key} has shape \(16, 32\), θ0's is \(32, 32\)"):
        runner.run(TextSuite(compose(tmp_path, *have)))
    save_file({**sd, key: sd[key].half()}, str(f))
    with pytest.raises(ValueError, match=rf"tensor {key} is float16, θ0's is float32"):
        runner.run(TextSuite(compose(tmp_path, *have)))
    theta0 = load_file(str(tmp_path / "theta0" / "model.safetensors"))
    save_file(theta0, str(f))  # the "fine-tuned" file is θ0 itself: warned, still evaluated
    save_file({k: v * 3 for k, v in theta0.items()}, str(tmp_path / "imp" / "mood.safetensors"))
    with caplog.at_level(logging.WARNING):
        runner.run(TextSuite(compose(tmp_path, *have)))
    assert f"task topic: {f} equals θ0 (its task vector is all zeros)" in caplog.text
    assert "task mood:" in caplog.text and "is farther from θ0 than θ0 is from zero" in caplog.text


def test_taskmerge_eval_scores_a_merged_file_like_the_search(tmp_path, have, capsys):
    out = runner.run(TextSuite(compose(tmp_path, *have)))
    merged = tmp_path / "merged.safetensors"
    assert cli(["merge", "task_arithmetic", "--pretrained", str(tmp_path / "theta0"), "--finetuned",
                *(str(tmp_path / "imp" / f"{t}.safetensors") for t in TASKS), "-p", "scaling=0.5",
                "--output", str(merged)]) == 0
    args = ["tasks=own", f"tasks.declared={tmp_path}/mine/tasks.yaml", "model=tiny_bert", f"paths.data={tmp_path}/data",
            f"paths.checkpoints={tmp_path}/ck", f"paths.results={tmp_path}/res", *have]
    assert cli(["eval", str(merged), "--name", "ta_by_cli", "-p", "scaling=0.5", *args]) == 0
    df = pd.read_csv(out["csv"])
    mine = df[df.method == "ta_by_cli"]
    assert sorted(zip(mine.stage, mine.split)) == [("search", "validation")] * 2 + [("test", "test")] * 2
    assert set(mine.checkpoints) == {out["checkpoints"]} and set(mine.hparams) == {'{"scaling": 0.5}'}
    search = df[(df.method == "task_arithmetic") & (df.stage == "search") & (df.hparams == '{"scaling": 0.5}')]
    assert dict(zip(mine[mine.split == "validation"].task, mine[mine.split == "validation"].accuracy)) == \
        dict(zip(search.task, search.accuracy))  # the same merge scored the same way
    assert "2 rows" not in capsys.readouterr().out  # 4 rows: 2 tasks x (validation, test)
    assert cli(["eval", str(merged), "--name", "ta_by_cli", "-p", "scaling=0.5", *args]) == 0  # a re-run adds none
    assert len(pd.read_csv(out["csv"])) == len(df)
    assert "| ta_by_cli |" in (tmp_path / "res" / "text-demo_own_full.md").read_text()
