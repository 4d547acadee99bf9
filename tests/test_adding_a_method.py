"""Adding a method touches two files: a module and a config. A toy method defined outside the package
(a file in a temporary folder, loaded through ``TASKMERGE_METHODS``) runs through ``taskmerge merge``,
streaming to disk and the search, with no other change."""
import os
import subprocess
import sys
import textwrap

import pandas as pd
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from taskmerge.io.merge_writer import write_merged
from taskmerge.io.sharded import ShardedReader
from taskmerge.merging import METHODS, get_method, load_plugins
from taskmerge.search.engine import SearchContext, search_method
from taskmerge.search.spaces import spaces_from_config
from taskmerge.search.store import ResultStore

MODULE = '''
"""Toy: θ = θ0 + λ · max_t τ_t (element-wise), for the "adding a method" test."""
import torch

from taskmerge.merging.inputs import task_stream
from taskmerge.merging.outputs import Update
from taskmerge.merging.registry import register


@register("toy_max", linear_in="scaling")
def toy_max(pretrained, finetuned, *, scaling: float = 1.0, device=None, chunk_numel=None):
    """θ0 + λ·max_t τ_t. scaling (λ, 1.0)."""
    for item, taus in task_stream(pretrained, finetuned, device, chunk_numel)():
        yield item, Update(torch.stack(taus).amax(0), scaling)
'''
CONFIG = """
toy_max:
  name: toy_max
  grid:
    scaling: [0.2, 0.4, 0.6]
"""


class Evaluator:
    """Task i's accuracy peaks when coordinate i of ``w`` is 0.4 (validation) or 0.8 (test)."""

    tasks = ("a", "b")

    def evaluate(self, state, task, split):
        peak = 0.4 if split == "validation" else 0.8
        return 1.0 - abs(float(state["w"][self.tasks.index(task)]) - peak)


def test_toy_method_runs_through_merge_streaming_and_search(tmp_path):
    module = tmp_path / "toy_max.py"
    module.write_text(textwrap.dedent(MODULE))
    (tmp_path / "toy_max.yaml").write_text(CONFIG)
    pre = {"w": torch.zeros(2), "big": torch.zeros(40, 3), "ids": torch.arange(3)}
    fts = [{"w": torch.tensor([1.0, -2.0]), "big": torch.full((40, 3), 0.5), "ids": torch.arange(3)},
           {"w": torch.tensor([0.5, 1.0]), "big": torch.full((40, 3), -1.0), "ids": torch.arange(3)}]
    for name, sd in [("pre", pre), ("a", fts[0]), ("b", fts[1])]:
        save_file(sd, tmp_path / f"{name}.safetensors")

    # 1. the CLI, in a fresh process that knows the method only through TASKMERGE_METHODS
    out = tmp_path / "merged"
    env = dict(os.environ, TASKMERGE_METHODS=str(module))
    proc = subprocess.run([sys.executable, "-m", "taskmerge.cli", "merge", "toy_max", "--pretrained",
                           tmp_path / "pre.safetensors", "--finetuned", tmp_path / "a.safetensors",
                           tmp_path / "b.safetensors", "-p", "scaling=0.5", "--output", out],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    got = load_file(out / "model.safetensors")
    assert torch.equal(got["w"], torch.tensor([0.5, 0.5]))  # 0.5 · max(1, 0.5), 0.5 · max(-2, 1)
    assert torch.equal(got["big"], torch.full((40, 3), 0.25)) and torch.equal(got["ids"], pre["ids"])
    methods = subprocess.run([sys.executable, "-m", "taskmerge.cli", "methods", "toy_max"], capture_output=True,
                             text=True, env=env)
    assert "defined at: taskmerge_plugin_toy_max:" in methods.stdout and "scaling: float = 1.0" in methods.stdout

    # 2. streaming (row chunks) equals the in-memory merge
    load_plugins(str(module))
    try:
        method = get_method("toy_max")
        in_memory = method(pre, fts, {"scaling": 0.5})
        streamed = write_merged(method, ShardedReader(tmp_path / "pre.safetensors"),
                                [ShardedReader(tmp_path / f"{n}.safetensors") for n in "ab"], tmp_path / "s",
                                hparams={"scaling": 0.5}, chunk_numel=9, progress=False)[0]
        reader = ShardedReader(streamed)
        assert all(torch.equal(reader[k], in_memory[k]) for k in pre)

        # 3. the search, from the method's config file
        spaces = spaces_from_config(OmegaConf.load(tmp_path / "toy_max.yaml"), OmegaConf.create({}))
        refs = {(t, s): (1.0, 0.5) for t in "ab" for s in ("validation", "test")}
        ctx = SearchContext("toy", {"w": torch.zeros(2)}, [{"w": torch.tensor([1.0, 0.0])},
                                                           {"w": torch.tensor([0.0, 1.0])}], Evaluator(), refs, "ck")
        store = ResultStore(tmp_path / "toy.csv")
        best = search_method(spaces[0], ctx, store)
        assert best["hparams"] == {"scaling": 0.4}
        rows = pd.read_csv(store.path)
        assert set(rows.method) == {"toy_max"} and len(rows[rows.stage == "search"]) == 6
    finally:
        METHODS.pop("toy_max", None)
