"""The configs of iso_c, iso_cts, cart, model_stock, breadcrumbs and della run through the search as written."""
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from taskmerge.merging import get_method
from taskmerge.search.engine import SearchContext, search_method
from taskmerge.search.spaces import spaces_from_config
from taskmerge.search.store import ResultStore

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "method"
NAMES = ["iso_c", "iso_cts", "cart", "model_stock", "breadcrumbs", "della"]


class Evaluator:
    """A task's accuracy falls with the distance of the merged weight from that task's fine-tuned one."""

    tasks = ("a", "b", "c")

    def __init__(self, fts):
        self.fts = fts

    def evaluate(self, state, task, split):
        return 1.0 / (1.0 + float((state["w"] - self.fts[self.tasks.index(task)]["w"]).norm()))


@pytest.mark.parametrize("name", NAMES)
def test_config_grid_is_valid_and_searches(tmp_path, name):
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    assert cfg.name == name
    method = get_method(name)
    grid = {k: list(v) for k, v in (cfg.grid or {}).items()}
    for param, values in grid.items():  # every grid value parses and passes the hyperparameter's range
        for value in values:
            method.resolve({**cfg.params, param: value})
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(24, 16, generator=g), "b": torch.randn(24, generator=g)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(3)]
    spaces = spaces_from_config(OmegaConf.create({name: cfg}), OmegaConf.create({}))
    refs = {(t, s): (1.0, 0.5) for t in Evaluator.tasks for s in ("validation", "test")}
    store = ResultStore(tmp_path / "r.csv")
    best = search_method(spaces[0], SearchContext("toy", pre, fts, Evaluator(fts), refs, "ck"), store)
    points = 1
    for values in grid.values():
        points *= len(values)
    rows = pd.read_csv(store.path)
    assert len(rows[rows.stage == "search"]) == points * len(Evaluator.tasks)
    assert set(grid) <= set(best["hparams"]) and all(best["hparams"][k] == v for k, v in cfg.params.items())
