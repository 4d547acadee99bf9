"""The one experiment runner on a toy adapter: reuse of checkpoints and rows, kinds from the adapter's
model, the one LoRA policy, and the strategy table without an import cycle."""
import functools
import subprocess
import sys

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from taskmerge.experiments import runner
from taskmerge.merging import get_method
from taskmerge.merging.selection import tensor_kinds
from taskmerge.search.common import Profile, Space
from taskmerge.search.engine import STRATEGIES, strategy_of


class Toy(runner.Adapter):
    """Two tasks; the 'model' is one Linear named ``embed`` (a shape rule would call it an embedding)."""

    tasks = ["a", "b"]
    trained: list

    def load(self):
        torch.manual_seed(0)
        self.net = nn.Sequential()
        self.net.add_module("embed", nn.Linear(2, 2, bias=False))
        self.trained = getattr(self, "trained", [])
        return self

    @functools.cached_property
    def checkpoints(self):
        return self.make_checkpoints(runner.repo_path(self.cfg.paths.checkpoints), lambda t: {"lr": self.cfg.lr})

    def train(self, task, folder):
        self.trained.append(task)
        w = self.net.embed.weight.detach().clone()
        w[self.tasks.index(task)] += 1.0
        save_file({"embed.weight": w.contiguous()}, str(folder / "model.safetensors"))
        return {"validation_accuracy": 1.0}

    @property
    def model(self):
        return self.net

    def pretrained_state(self):
        return {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    def finetuned_state(self, task, source):
        return load_file(str(source / "model.safetensors"))

    def evaluator(self):
        base = self.net.embed.weight.detach()

        class Ev:
            tasks = self.tasks

            def evaluate(_, state, task, split):  # peaks at half the task vector on validation, at all of it on test
                x = float((state["embed.weight"] - base)[self.tasks.index(task)].sum())
                return 1.0 / (1.0 + abs(x - (1.0 if split == "validation" else 2.0)))

        return Ev()


def cfg(tmp_path, methods, **over):
    entries = {m: {"name": m, "params": {}, "grid": {}} for m in methods}
    entries.get("task_arithmetic", {})["grid"] = {"scaling": [0.25, 0.5, 1.0]}
    return OmegaConf.create({"experiment": "toy", "seed": 0, "lr": 1.0, "report": False, "force": False,
                             "finetune": {"mode": "full"}, "search": {}, "methods": entries,
                             "paths": {"results": str(tmp_path / "res"), "checkpoints": str(tmp_path / "ck")},
                             **over})


def test_runner_reuses_checkpoints_and_rows_and_skips_lora_methods(tmp_path, caplog):
    toy = Toy(cfg(tmp_path, ["task_arithmetic", "knots"]))
    out = runner.run(toy)
    assert toy.trained == ["a", "b"] and (tmp_path / "ck" / "a" / "metadata.json").is_file()
    assert out["selected"]["task_arithmetic"]["hparams"] == {"scaling": 0.5}
    assert set(out["skipped"]) == {"knots"} and "LoRA" in out["skipped"]["knots"]
    df = pd.read_csv(out["csv"])
    assert set(df.method) == {"pretrained", "finetuned", "task_arithmetic"}
    again = Toy(cfg(tmp_path, ["task_arithmetic", "knots"]))
    runner.run(again)
    assert again.trained == [] and len(pd.read_csv(out["csv"])) == len(df)  # nothing retrained or re-added
    with pytest.raises(ValueError, match="another experiment .*differ in lr"):  # its rows: refused first
        runner.run(Toy(cfg(tmp_path, ["task_arithmetic"], lr=2.0)))
    other = cfg(tmp_path, ["task_arithmetic"], lr=2.0)
    other.paths.results = str(tmp_path / "res2")
    with pytest.raises(RuntimeError, match="force=true"):  # its checkpoints: trained with another config
        runner.run(Toy(other))
    (tmp_path / "ck" / "b" / "metadata.json").unlink()  # a crash before metadata.json: b alone retrains
    third = Toy(cfg(tmp_path, ["task_arithmetic"]))
    runner.run(third)
    assert third.trained == ["b"]
    with pytest.raises(ValueError, match="every configured method was skipped"):
        runner.run(Toy(cfg(tmp_path, ["knots", "fisher"])))


def test_kinds_come_from_the_adapters_model(tmp_path):
    toy = Toy(cfg(tmp_path, [])).load()
    pre = toy.pretrained_state()
    context = runner.MethodContext(toy, pre, [pre, pre], Profile())
    kinds = context(get_method("tsv_m"))["kinds"]
    assert kinds == tensor_kinds(pre, toy.net) == {"embed.weight": "linear"}  # module type, not the name
    assert context(get_method("average"))["kinds"] is kinds  # built once
    assert runner.missing_inputs(toy, get_method("regmean")) and runner.missing_inputs(toy, get_method("knots"))
    assert runner.missing_inputs(toy, get_method("tsv_m")) is None


def test_depths_come_from_the_adapters_model_when_it_has_blocks(tmp_path):
    toy = Toy(cfg(tmp_path, [])).load()
    pre = toy.pretrained_state()
    assert "depths" not in runner.MethodContext(toy, pre, [pre], Profile())(get_method("lines"))  # no blocks: names
    toy.net = nn.Module()
    toy.net.blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))
    toy.net.out = nn.Sequential(nn.ReLU(), nn.Linear(2, 2))
    pre = toy.pretrained_state()
    context = runner.MethodContext(toy, pre, [pre], Profile())
    assert context(get_method("lines"))["depths"] == {"blocks.0.weight": 0, "blocks.0.bias": 0,
                                                      "blocks.1.weight": 1, "blocks.1.bias": 1}
    assert "depths" not in context(get_method("task_arithmetic"))  # only for methods that declare it


def test_strategies_are_one_table_and_import_without_a_cycle():
    assert set(STRATEGIES) == {"grid", "greedy", "per_task", "continual"}
    assert strategy_of(Space("opcm"), get_method("opcm")) == "continual"
    assert strategy_of(Space("tall_mask", strategy="per_task"), get_method("tall_mask")) == "per_task"
    code = ("import sys, taskmerge.search.continual; "
            "assert 'taskmerge.search.engine' not in sys.modules, 'continual imports the engine'")
    subprocess.run([sys.executable, "-c", code], check=True)
