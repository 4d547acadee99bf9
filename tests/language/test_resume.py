"""Re-running the language experiments: fine-tuned checkpoints and T5 statistics are saved per task and
reused (fingerprint-checked), CSV rows carry a hash of the checkpoint files. End to end through
``run_mats`` / ``run_knots`` on tiny random models with the data loaders replaced (no network)."""
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from taskmerge.data import nli, p3
from taskmerge.experiments import language
from taskmerge.experiments import language_checkpoints as lc
from taskmerge.models import llama, t5

from tests.language.helpers import LLAMA_TINY, T5_TINY, CharTokenizer, qa_examples

pytest.importorskip("peft")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TASKS = ["cosmos_qa", "paws"]


class Calls(dict):
    trained: list


@pytest.fixture
def offline(monkeypatch):
    """Tiny models, a character tokenizer and fake data; counts fine-tuning and statistics calls."""
    import transformers

    calls = Calls(finetune=0, statistics=0)
    trained = []
    real_finetune, real_stats, real_t5, real_llama = language.finetune, t5.statistics, t5.load_t5, llama.load_llama

    def finetune(*a, **k):
        calls["finetune"] += 1
        trained.append(a[0].model)  # T5TargetLM / MaskedClassifier around the trained model
        return real_finetune(*a, **{**k, "progress": False})

    def statistics(*a, **k):
        calls["statistics"] += 1
        return real_stats(*a, **k)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: CharTokenizer())
    monkeypatch.setattr(t5, "load_t5", lambda *a, **k: real_t5(config=T5_TINY, seed=0))
    monkeypatch.setattr(llama, "load_llama", lambda *a, **k: real_llama(config=LLAMA_TINY, dtype=torch.float32))
    monkeypatch.setattr(p3, "load_task", lambda task, split, limit=None, **k: qa_examples(6, TASKS.index(task)))
    monkeypatch.setattr(nli, "split_examples", lambda task, split, seed=0, limit=None, **k: [
        (f"premise {task} {i}" + "!" * i, f"hyp {split} {i}", i % 2) for i in range(6)])
    monkeypatch.setattr(language, "finetune", finetune)
    monkeypatch.setattr(t5, "statistics", statistics)
    calls.trained = trained
    return calls


def compose_setting(name, methods):
    """configs/<name>.yaml as the script composes it (methods from configs/method/), editable."""
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose(name, overrides=[f"method=[{','.join(methods)}]"])
    OmegaConf.set_struct(cfg, False)
    return cfg


def mats_cfg(tmp_path, mode="full", **over):
    cfg = compose_setting("language_mats", ["task_arithmetic", "fisher"])
    cfg.merge_with({
        "finetune": {"mode": mode, "batch_size": 3, "lr": 1e-2}, "tasks": {"names": TASKS},
        "model": {"max_source": 24, "max_target": 8}, "budget": {"max_eval": 6}, "stats": {"max_examples": 3},
        "paths": {"results": str(tmp_path / "results"), "checkpoints": str(tmp_path / "ckpt")},
        "report": False, "methods": {"task_arithmetic": {"grid": {"scaling": [0.3, 0.6]}}}})
    cfg.merge_with(over)
    return cfg


def knots_cfg(tmp_path, **over):
    cfg = compose_setting("language_knots", ["lora_ta", "knots_ties"])
    cfg.merge_with({
        "finetune": {"batch_size": 3, "lr": 1e-2, "lora": {"r": 4, "lora_alpha": 4}},
        "tasks": {"names": ["rte", "snli"]}, "model": {"max_length": 32}, "report": False,
        "paths": {"results": str(tmp_path / "results"), "checkpoints": str(tmp_path / "ckpt")},
        "methods": {"lora_ta": {"grid": {"scaling": [0.5, 1.0]}},
                             "knots_ties": {"params": {"k": 50}, "grid": {"scaling": [0.5]}}}})
    cfg.merge_with(over)
    return cfg


def rows(path):
    with open(path) as f:
        return [{k: v for k, v in r.items() if k not in ("wall_time_s", "timestamp")} for r in csv.DictReader(f)]


def results(path):
    return [(r["method"], r["hparams"], r["task"], r["split"], r["accuracy"]) for r in rows(path)]


def no_more(monkeypatch, *names):
    def boom(*a, **k):
        raise AssertionError("called on a re-run")

    for owner, name in names:
        monkeypatch.setattr(owner, name, boom)


@pytest.mark.parametrize("mode", ["full", "ia3"])
def test_mats_rerun_reuses_checkpoints_and_statistics(tmp_path, offline, monkeypatch, mode):
    cfg = mats_cfg(tmp_path, mode)
    first = language.run(cfg)
    assert offline == {"finetune": 2, "statistics": 2}
    folder = tmp_path / "ckpt" / f"mats_t5_{mode}" / "paws"
    assert (folder / ("model.safetensors" if mode == "full" else "adapter/adapter_config.json")).is_file()
    assert (folder / "statistics-train_3.safetensors").is_file()
    meta = json.loads((folder / "metadata.json").read_text())
    assert len(meta["fingerprint"]) == 16 and meta["train_seconds"] >= 0 and 0 <= meta["validation_accuracy"] <= 1
    trained = t5.trainable_state(offline.trained[1])  # paws, as it was in memory after training
    trained = t5.drop_aliases(trained, t5.tied_aliases(offline.trained[1])) if mode == "full" else trained
    loaded = lc.load_state(folder, trained)
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)
    assert any(not torch.equal(v, torch.ones_like(v)) for v in loaded.values())
    val = [r for r in rows(first["csv"]) if r["task"] == "paws" and r["split"] == "validation"]
    assert val and {float(r["finetuned_accuracy"]) for r in val} == {meta["validation_accuracy"]}
    csv_before = Path(first["csv"]).read_text()
    assert {r["checkpoints"] for r in rows(first["csv"])} == {first["checkpoints"]}
    assert len(first["checkpoints"]) == 16 and int(first["checkpoints"], 16) >= 0  # a hash, not the name

    no_more(monkeypatch, (language, "finetune"), (t5, "statistics"))
    again = language.run(cfg)  # same CSV: every row is found, none is added
    assert again["checkpoints"] == first["checkpoints"] and again["selected"] == first["selected"]
    assert Path(again["csv"]).read_text() == csv_before
    fresh = language.run(mats_cfg(tmp_path, mode, paths={"results": str(tmp_path / "fresh")}))
    assert fresh["selected"] == first["selected"]  # recomputed from the saved checkpoints and statistics
    assert rows(fresh["csv"]) == rows(first["csv"])


def test_changed_config_raises_force_retrains_incomplete_retrains(tmp_path, offline):
    language.run(mats_cfg(tmp_path))
    assert offline["finetune"] == 2
    with pytest.raises(ValueError, match=r"mats_t5_full\.csv holds the results of another experiment.*finetune\.lr"):
        language.run(mats_cfg(tmp_path, finetune={"lr": 5e-3}, force=True))  # refused before any retraining
    other = {"results": str(tmp_path / "results_lr")}  # the new fine-tunes are another experiment: another CSV
    with pytest.raises(RuntimeError, match=r"ckpt/mats_t5_full/cosmos_qa.*force=true.*experiment"):
        language.run(mats_cfg(tmp_path, finetune={"lr": 5e-3}, paths=other))
    assert offline["finetune"] == 2
    out = language.run(mats_cfg(tmp_path, finetune={"lr": 5e-3}, force=True, paths=other))
    assert offline["finetune"] == 4
    meta = json.loads((tmp_path / "ckpt/mats_t5_full/paws/metadata.json").read_text())
    assert meta["config"]["finetune"]["lr"] == 5e-3
    # a crash before metadata.json: that task alone is retrained, its stale statistics recomputed
    (tmp_path / "ckpt/mats_t5_full/paws/metadata.json").unlink()
    stats_before = offline["statistics"]
    again = language.run(mats_cfg(tmp_path, finetune={"lr": 5e-3}, paths=other))
    assert offline["finetune"] == 5 and offline["statistics"] == stats_before + 1
    assert again["selected"] == out["selected"]  # the retrained task is bit-identical (seeded)


def test_checkpoints_id_follows_the_files(tmp_path, offline):
    cfg = mats_cfg(tmp_path, "ia3")
    first = language.run(cfg)["checkpoints"]

    def ident(c):
        a = language.T5Mats(c)
        return a.checkpoints.checkpoints_id(TASKS, a.identity_extra())

    assert ident(cfg) == first
    adapter = tmp_path / "ckpt/mats_t5_ia3/paws/adapter/adapter_model.safetensors"
    (tmp_path / "ckpt/mats_t5_ia3/paws/statistics-train_3.safetensors").unlink()  # not part of the identity
    assert ident(cfg) == first
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 1
    adapter.write_bytes(bytes(data))
    assert ident(cfg) != first
    assert ident(mats_cfg(tmp_path, "ia3", stats={"max_examples": 4})) != first


def test_knots_rerun_reuses_adapters_and_heads(tmp_path, offline, monkeypatch):
    cfg = knots_cfg(tmp_path)
    first = language.run(cfg)
    assert offline["finetune"] == 2
    folder = tmp_path / "ckpt" / "knots_llama3_8b_nli" / "rte"
    assert (folder / "adapter" / "adapter_model.safetensors").is_file() and (folder / "head.safetensors").is_file()
    no_more(monkeypatch, (language, "finetune"))
    again = language.run(cfg)
    assert again["selected"] == first["selected"] and again["checkpoints"] == first["checkpoints"]
    fresh = language.run(knots_cfg(tmp_path, paths={"results": str(tmp_path / "fresh")}))
    assert rows(fresh["csv"]) == rows(first["csv"])
    # finetuned.pattern: the same adapter folders imported (head from head.safetensors, then from peft's score)
    imported = tmp_path / "imported"
    shutil.copytree(tmp_path / "ckpt" / "knots_llama3_8b_nli", imported)
    for task in ("rte", "snli"):
        (imported / task / "metadata.json").unlink()
    pattern = {"finetuned": {"pattern": str(imported / "{task}")}, "paths": {"results": str(tmp_path / "imp")},
               "experiment": "imported"}
    assert results(language.run(knots_cfg(tmp_path, **pattern))["csv"]) == results(first["csv"])
    for task in ("rte", "snli"):
        (imported / task / "head.safetensors").unlink()
    out = language.run(knots_cfg(tmp_path, **{**pattern, "paths": {"results": str(tmp_path / "imp2")}}))
    assert out["selected"] == first["selected"]
