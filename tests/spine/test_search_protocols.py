"""Greedy (KnOTS), per-task (TALL masks) and continual (OPCM) protocols on a fake evaluator."""
import pandas as pd
import pytest
import torch

from taskmerge.search.continual import summarize, task_orders
from taskmerge.search.engine import SearchContext, Space, search_method
from taskmerge.search.store import ResultStore


class PeakEvaluator:
    """Accuracy of task i = 1 − |w_i − peak|; validation peaks at 0.5, test at 0.75 (exact in binary)."""

    tasks = ("a", "b", "c")

    def __init__(self):
        self.calls = []

    def evaluate(self, state, task, split):
        i = self.tasks.index(task)
        x = float(state["w"][i])
        self.calls.append((task, split, round(x, 6)))
        return 1.0 - abs(x - (0.5 if split == "validation" else 0.75))


def _ctx():
    pretrained = {"w": torch.zeros(3)}
    finetuned = [{"w": torch.eye(3)[i]} for i in range(3)]
    refs = {(t, s): (1.0, 0.5) for t in "abc" for s in ("validation", "test")}
    return SearchContext("exp", pretrained, finetuned, PeakEvaluator(), refs, "ck", 0)


def test_greedy_stops_at_first_drop(tmp_path):
    ctx = _ctx()
    space = Space("task_arithmetic", {"scaling": [0.125, 0.25, 0.5, 0.375, 0.625]}, strategy="greedy")
    best = search_method(space, ctx, ResultStore(tmp_path / "r.csv"))
    assert best["hparams"]["scaling"] == 0.5
    visited = sorted({c[2] for c in ctx.evaluator.calls if c[1] == "validation"})
    assert visited == [0.125, 0.25, 0.375, 0.5]  # 0.375 drops, so 0.625 is never visited


def test_greedy_ge_versus_gt(tmp_path):
    # 0.25 and 0.75 tie (both 0.25 from the peak): ">=" moves on to 0.75, ">" stops at 0.25
    for accept, expected in (("ge", 0.75), ("gt", 0.25)):
        space = Space("task_arithmetic", {"scaling": [0.25, 0.75]}, strategy="greedy", accept=accept)
        assert search_method(space, _ctx(), ResultStore(tmp_path / f"{accept}.csv"))["hparams"]["scaling"] == expected


def test_per_task_selection_tall_masks(tmp_path):
    ctx = _ctx()
    # task vectors that make each task's best λ different: mask keeps w_i only when |τ_i| > λ|τ_MTL − τ_i|
    ctx.finetuned = [{"w": torch.tensor([0.4, 0.0, 0.0])}, {"w": torch.tensor([0.0, 0.4, 0.0])},
                     {"w": torch.tensor([0.0, 0.0, 0.4])}]
    space = Space("tall_mask", {"mask_lambda": [0.2, 0.6]}, strategy="per_task")
    best = search_method(space, ctx, ResultStore(tmp_path / "r.csv"))
    assert set(best["hparams"]) == {"a", "b", "c"}
    df = pd.read_csv(tmp_path / "r.csv")
    test = df[df.stage == "test"]
    assert sorted(test.task) == ["a", "b", "c"]
    for task, hp in best["hparams"].items():
        assert test[test.task == task].hparams.iloc[0] == f'{{"mask_lambda": {hp["mask_lambda"]}, "use_ties": false}}'


def test_per_task_needs_per_task_method(tmp_path):
    with pytest.raises(ValueError, match="per-task method"):
        search_method(Space("task_arithmetic", {"scaling": [0.1]}, strategy="per_task"), _ctx(),
                      ResultStore(tmp_path / "r.csv"))


def test_continual_protocol_three_orders(tmp_path):
    ctx = _ctx()
    store = ResultStore(tmp_path / "r.csv")
    out = search_method(Space("continual_task_arithmetic", {}, {"scaling": 0.5}, orders=3), ctx, store)
    df = pd.read_csv(store.path)
    cont = df[df.stage == "continual"]
    assert cont.order.nunique() == 3 and len(cont) == 3 * (1 + 2 + 3)
    for _, grp in cont.groupby("order"):
        for step, rows in grp.groupby("step"):
            assert len(rows) == step  # the tasks seen so far
            first = grp.order.iloc[0].split(">")
            assert sorted(rows.task) == sorted(first[:step])
    # continual TA at 0.5: after every step each seen coordinate is 0.5, test peak 0.75 -> accuracy 0.75
    assert out["final_accuracy"] == (pytest.approx(0.75), pytest.approx(0.0))
    assert out["bwt"][0] == pytest.approx(0.0)
    n_calls = len(ctx.evaluator.calls)
    search_method(Space("continual_task_arithmetic", {}, {"scaling": 0.5}, orders=3), ctx, ResultStore(store.path))
    assert len(ctx.evaluator.calls) == n_calls  # resumed: nothing re-evaluated


def test_bwt_and_orders_are_seeded():
    assert task_orders(4, 3, 0) == task_orders(4, 3, 0) and task_orders(4, 3, 0) != task_orders(4, 3, 1)
    rows = [dict(order="a>b", step=1, task="a", accuracy=0.9), dict(order="a>b", step=2, task="a", accuracy=0.7),
            dict(order="a>b", step=2, task="b", accuracy=0.8)]
    out = summarize(rows, 2)
    assert out["final_accuracy"][0] == pytest.approx(0.75) and out["bwt"][0] == pytest.approx(-0.2)


def test_an_interrupted_order_is_left_out_of_the_summary_and_the_table():
    import pandas as pd

    from taskmerge.report.tables import continual_table

    done = [dict(order="a>b", step=1, task="a", accuracy=0.9), dict(order="a>b", step=2, task="a", accuracy=0.7),
            dict(order="a>b", step=2, task="b", accuracy=0.8)]
    cut = [dict(order="b>a", step=1, task="b", accuracy=0.5)]  # killed before its last step
    assert summarize(done + cut, 2) == {**summarize(done, 2), "orders": 1}
    assert summarize(cut, 2) == {"orders": 0}
    table = continual_table(pd.DataFrame([{**r, "method": "opcm", "stage": "continual"} for r in cut]))
    assert "| opcm | 0 (interrupted before an order finished) | – | – |" in table


def test_report_has_continual_table_and_plot(tmp_path):
    from taskmerge.report import write_report

    store = ResultStore(tmp_path / "r.csv")
    search_method(Space("opcm", {}, orders=3), _ctx(), store)
    out = write_report(store.path)
    text = out["table"].read_text()
    assert "## Continual merging" in text and "| opcm | 3 |" in text
    assert out["continual_plot"].stat().st_size > 0
