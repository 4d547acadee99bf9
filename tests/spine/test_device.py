"""One ``device`` for every script: checked as the CLI's --device (merge_files.parse_device), placed on the
model, followed by every loop's batches (train / evaluate / stats), and given to the methods as context.

This machine has no GPU: the loops are checked to move each batch to ``module_device(model)`` by
recording what they hand to ``to_device``; the CUDA refusals are checked for real."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from taskmerge.devices import config_device, module_device, to_device

from tests.spine.helpers import suite_config

REPO = Path(__file__).resolve().parents[2]
TINY = ["model=tiny_bert", "budget.max_train=16", "budget.max_eval=8", "budget.max_test=8", "budget.epochs=1",
        "tasks.names=[sentiment_movies]"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def test_config_device_uses_the_cli_check():
    assert config_device({"device": "cpu"}) == torch.device("cpu")
    assert config_device({}) == torch.device("cpu")  # configs without the key: cpu
    with pytest.raises(ValueError, match=r"^device='tpu9' is not a torch device"):
        config_device({"device": "tpu9"})


@NO_CUDA
@pytest.mark.parametrize("entry", ["suite", "stats", "vision"])
def test_cuda_without_cuda_is_refused_before_anything_is_written(tmp_path, entry):
    from taskmerge.experiments.text_suite import TextSuite, compute_statistics

    with pytest.raises(ValueError) as e:
        if entry == "suite":
            TextSuite(suite_config(tmp_path, *TINY, "device=cuda")).load()
        elif entry == "stats":
            compute_statistics(suite_config(tmp_path, *TINY, "device=cuda"))
        else:
            from hydra import compose, initialize_config_dir

            from taskmerge.experiments.vision import VisionSuite
            from tests.spine.helpers import CONFIGS

            with initialize_config_dir(str(CONFIGS), version_base="1.3"):
                cfg = compose("vision", overrides=[f"paths.checkpoints={tmp_path}/checkpoints", "device=cuda:1"])
            VisionSuite(cfg).load()
    assert str(e.value).startswith("device=cuda") and "CUDA is not available on this machine" in str(e.value)
    assert not (tmp_path / "checkpoints").exists()


@NO_CUDA
def test_finetune_script_with_cuda_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TASKMERGE_DEBUG", None)
    res = subprocess.run([sys.executable, "training_scripts/finetune.py", *TINY, "device=cuda",
                          f"paths.checkpoints={tmp_path}/checkpoints"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == "error: device=cuda: CUDA is not available on this machine"
    assert not (tmp_path / "checkpoints").exists()


class Recorder:
    """Stands in for ``to_device`` in a module and records the device each batch is sent to."""

    def __init__(self):
        self.devices = []

    def __call__(self, obj, device):
        self.devices.append(torch.device(device))
        return to_device(obj, device)


class Split:
    def __init__(self, n=6):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.arange(n) % 2

    def __len__(self):
        return len(self.y)

    def batches(self, batch_size, order=None):
        order = torch.arange(len(self)) if order is None else order
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            yield self.x[idx], self.y[idx]


def test_train_and_evaluate_send_batches_to_the_model(monkeypatch):
    from taskmerge.evaluate import metrics
    from taskmerge.train import finetune as ft

    model = nn.Linear(4, 2)
    for mod in (metrics, ft):
        rec = Recorder()
        monkeypatch.setattr(mod, "to_device", rec)
        if mod is metrics:
            acc = metrics.accuracy(model, Split(), batch_size=4)
            assert 0.0 <= acc <= 1.0
        else:
            ft.finetune(model, Split(), ft.FinetuneConfig(epochs=1, batch_size=4), progress=False)
        assert rec.devices and set(rec.devices) == {module_device(model)}


def test_statistics_send_batches_to_the_model(monkeypatch):
    from taskmerge.stats import ClassificationObjective, collect
    from taskmerge.stats.collect import collect_statistics

    rec = Recorder()
    monkeypatch.setattr(collect, "to_device", rec)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    split = Split(8)
    batches = ({"x": x, "labels": y} for x, y in split.batches(4))
    objective = ClassificationObjective(forward=lambda m, b: m(b["x"]))
    stats, meta = collect_statistics(model, batches, objective, fisher="empirical", max_examples=8, progress=False)
    assert meta["examples"] == 8 and rec.devices == [module_device(model)] * 2
    assert all(t.device.type == "cpu" for t in stats.values())


def test_heads_follow_the_encoder():
    """Classifiers put the frozen head where the encoder is, so a script moves only the encoder."""
    from taskmerge.models.clip import ImageClassifier
    from taskmerge.models.text_encoder import Classifier

    head = nn.Linear(4, 2)
    moved = []
    head.to = lambda device: moved.append(torch.device(device)) or head  # records the move
    Classifier(nn.Linear(3, 4), head)
    ImageClassifier(nn.Linear(3, 4), head)
    assert moved == [torch.device("cpu")] * 2


def test_method_context_carries_the_device(tmp_path):
    """The search hands the config's device to every method (the ``device`` context argument)."""
    from taskmerge.experiments.runner import MethodContext
    from taskmerge.merging import get_method
    from taskmerge.search.engine import Profile

    class Suite:
        cfg = suite_config(tmp_path, *TINY, "device=cpu")
        model = nn.Linear(2, 2)

    ctx = MethodContext(Suite(), {}, [], Profile())
    assert ctx(get_method("task_arithmetic"))["device"] == torch.device("cpu")
    assert "device" in get_method("task_arithmetic").context


def test_to_device_keeps_structure():
    batch = {"a": torch.zeros(1), "b": (torch.ones(1), "text"), "c": [torch.ones(2)]}
    out = to_device(batch, "cpu")
    assert set(out) == {"a", "b", "c"} and isinstance(out["b"], tuple) and out["b"][1] == "text"
    assert module_device(nn.Module()) == torch.device("cpu")
