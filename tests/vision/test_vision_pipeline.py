"""Fine-tuning steps (full, LoRA), then merge -> evaluate -> CSV rows through the shared engine."""
import json
import math

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from taskmerge.data.vision import synthetic_task
from taskmerge.models.clip import ClipFamily
from taskmerge.train.clip_finetune import ClipFinetuneConfig, cosine_lr, finetune_clip
from taskmerge.train.finetune import wrap_encoder

from tests.spine.helpers import CONFIGS


def test_cosine_schedule_matches_task_vectors():
    assert cosine_lr(0, 1.0, 4, 10) == 0.25 and cosine_lr(3, 1.0, 4, 10) == 1.0
    assert cosine_lr(4, 1.0, 4, 10) == 1.0 and cosine_lr(7, 1.0, 4, 10) == pytest.approx(0.5)
    assert cosine_lr(9, 1.0, 4, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 6)))


@pytest.mark.parametrize("backend,mode", [("open_clip", "full"), ("hf", "full"), ("hf", "lora")])
def test_one_finetuning_step_changes_only_trainable_weights(backend, mode, tmp_path):
    import copy

    fam = ClipFamily.build(backend, "tiny", "tiny", seed=0)
    task = synthetic_task("MNIST", 3, fam.image_size, {"train": 8})
    head = fam.head(tmp_path / "h.safetensors", task.classnames, task.templates)
    cfg = ClipFinetuneConfig(mode=mode, steps=1, batch_size=8, lr=1e-2, warmup_steps=1)
    encoder = wrap_encoder(copy.deepcopy(fam.encoder), cfg)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    head_before = head.weight.clone()
    losses = finetune_clip(fam.classifier(encoder, head), task.splits["train"], cfg, progress=False)
    assert len(losses) == 1 and math.isfinite(losses[0])
    changed = [k for k, v in encoder.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and torch.equal(head.weight, head_before)
    if mode == "lora":
        assert all("lora_" in k for k in changed) and any("q_proj.lora_A" in k for k in before)
        adapted = {k.split(".lora_A")[0].rsplit(".", 1)[-1] for k in before if "lora_A" in k}
        assert adapted == {"q_proj", "k_proj", "v_proj", "out_proj"}


def _cfg(tmp_path, *overrides):
    base = [f"paths.checkpoints={tmp_path}/ck", f"paths.results={tmp_path}/res", "report=false",
            "tasks.train=64", "tasks.validation=32", "tasks.test=32", "finetune.steps=3"]
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("vision", overrides=base + list(overrides))


def test_per_task_merge_evaluate_csv_open_clip(tmp_path):
    from taskmerge.experiments.vision import run

    out = run(_cfg(tmp_path, "method=[task_arithmetic,tsv_m]", "search.grid=[0.3,1.0]"))
    df = pd.read_csv(out["csv"])
    assert set(df.method) == {"pretrained", "finetuned", "task_arithmetic", "tsv_m"}
    test = df[(df.method == "tsv_m") & (df.stage == "test")]
    assert sorted(test.task) == ["EuroSAT", "MNIST", "SVHN"] and test.accuracy.between(0, 1).all()
    ft = df[(df.method == "finetuned") & (df.split == "test")]
    assert (ft.normalized_accuracy == 1.0).all()
    again = run(_cfg(tmp_path, "method=[task_arithmetic,tsv_m]", "search.grid=[0.3,1.0]"))
    assert len(pd.read_csv(again["csv"])) == len(df)  # resumed: nothing recomputed


def test_joint_knots_on_hf_lora(tmp_path):
    from taskmerge.experiments.vision import run

    out = run(_cfg(tmp_path, "model=tiny_hf", "finetune=tiny_lora", "finetune.steps=2", "setting=joint",
                   "method=[knots_ties,lora_ties]"))
    df = pd.read_csv(out["csv"])
    rows = df[(df.method == "knots_ties") & (df.stage == "test")]  # rows carry the config's label
    assert list(rows.task) == ["joint_top3"] and rows.finetuned_accuracy.tolist() == [1.0]
    joint = json.loads(out["csv"].with_suffix(".joint.json").read_text())
    k = joint["knots_ties"]
    assert k["joint_top1"] <= k["joint_top3"] <= k["joint_top5"] <= k["joint_top10"]
    assert k["joint_top3"] == pytest.approx(rows.accuracy.item())
    assert set(joint) == {"knots_ties", "lora_ties"} and 0 <= k["MNIST_top1"] <= k["MNIST_top10"] <= 1
