"""RegMean++ through the runner on the tiny text setting: it runs end to end (CSV rows, report row); on a
one-block encoder whose models share what lies below the block it is RegMean, Grams and merge; on two
blocks, block 1's Grams are those of task t's own block 1 behind the *merged* embeddings and block 0
(the statistics pipeline run on that hybrid model), and differ from RegMean's."""
from dataclasses import dataclass, field

import pandas as pd
import torch

from taskmerge.experiments import runner
from taskmerge.experiments.text_suite import TextSuite
from taskmerge.merging import get_method

from .helpers import suite_config

TINY = ["model=tiny_bert", "budget.max_train=16", "budget.max_eval=24", "budget.max_test=8", "budget.epochs=1",
        "finetune.lr=1e-3", "stats.max_examples=20",  # 16 + a cut batch of 4, as collect_statistics cuts it
        "method=[regmean,regmean_plusplus]", "search.grid=[0.9]"]


@dataclass(eq=False)
class Recorded(TextSuite):
    """The text adapter, recording each selected merge and every layer_stats answer."""

    shared_below: bool = False  # the fine-tuned models keep the pretrained embeddings
    merged: dict = field(default_factory=dict)
    calls: list = field(default_factory=list)

    def finetuned_state(self, task, source):
        state = super().finetuned_state(task, source)
        if not self.shared_below:
            return state
        pre = self.encoder.state_dict()
        return {k: pre[k].detach().clone() if k.startswith("embeddings.") else v for k, v in state.items()}

    def layer_stats(self, pretrained, finetuned):
        inner = super().layer_stats(pretrained, finetuned)

        def record(block, merged):
            grams = inner(block, merged)
            self.calls.append((block, grams))
            return grams
        return record

    def selected(self, name, best, merge):
        self.merged[name] = merge(best["hparams"])


def _run(tmp_path, *overrides, shared_below=False):
    suite = Recorded(suite_config(tmp_path, *TINY, *overrides), shared_below=shared_below)
    return suite, runner.run(suite)


def _own_grams(suite, state, task):
    """The statistics pipeline's (regmean's) Grams of ``state`` on ``task``'s statistics examples."""
    return {k: v for k, v in suite.statistics(task, state)[0].items() if k.endswith(".gram_in")}


def test_runs_end_to_end_with_csv_rows_and_a_report_row(tmp_path, suite_dir):
    suite, out = _run(tmp_path)
    rows = pd.read_csv(out["csv"])
    mine = rows[rows["method"] == "regmean_plusplus"]
    assert set(zip(mine["stage"], mine["task"])) == {(s, t) for s in ("search", "test") for t in suite.tasks}
    assert "regmean_plusplus" not in out["skipped"] and "regmean_plusplus" in out["selected"]
    assert "regmean_plusplus" in out["table"].read_text()
    assert [b for b, _ in suite.calls[-2:]] == [0, 1]  # the selected merge asked for blocks 0 and 1, in order


def test_second_block_grams_come_from_the_merged_block_below(tmp_path, suite_dir):
    suite, _ = _run(tmp_path, "method=[regmean_plusplus]")
    merged = suite.merged["regmean_plusplus"]
    (b0, _), (b1, grams) = suite.calls[-2:]  # the selected merge's two calls
    assert (b0, b1) == (0, 1)
    finetuned = [suite.finetuned_state(t, suite.checkpoints.source(t)) for t in suite.tasks]
    below = ("embeddings.", "encoder.layer.0.")
    for task, state, got in zip(suite.tasks, finetuned, grams):
        assert sorted(got) == sorted(k for k in _own_grams(suite, state, task) if k.startswith("encoder.layer.1."))
        # task t's own block 1 behind the merged embeddings and merged block 0, through regmean's pipeline
        hybrid = {k: merged[k].to(v.dtype) if k.startswith(below) else v for k, v in state.items()}
        want = _own_grams(suite, hybrid, task)
        plain = _own_grams(suite, state, task)  # regmean's: the fine-tuned model's own block 0
        for key, gram in got.items():
            torch.testing.assert_close(gram, want[key], rtol=1e-5, atol=1e-6)
            assert (gram - plain[key]).abs().max() > 1e-3 * plain[key].abs().max(), key


def test_one_block_model_is_regmean_through_the_runner(tmp_path, suite_dir):
    suite, out = _run(tmp_path, "model.config.num_hidden_layers=1", shared_below=True)
    assert set(out["selected"]) == {"regmean", "regmean_plusplus"}
    assert [b for b, _ in suite.calls] == [0] * len(suite.calls) and suite.calls
    finetuned = [suite.finetuned_state(t, suite.checkpoints.source(t)) for t in suite.tasks]
    for task, state, got in zip(suite.tasks, finetuned, suite.calls[-1][1]):
        own = _own_grams(suite, state, task)
        assert sorted(got) == sorted(own)
        for key in got:
            assert torch.equal(got[key], own[key]), key
    a, b = suite.merged["regmean"], suite.merged["regmean_plusplus"]
    assert sorted(a) == sorted(b)
    changed = [k for k in a if not torch.equal(a[k], suite.pretrained_state()[k])]
    assert any(k.endswith("query.weight") for k in changed)  # a real merge, not θ0
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_settings_without_layer_stats_say_why(tmp_path):
    from taskmerge.experiments.vision import VisionSuite
    from tests.spine.test_runner import Toy, cfg
    from tests.spine.test_validate_search import _vision

    method = get_method("regmean_plusplus")
    why = runner.missing_inputs(Toy(cfg(tmp_path, [])), method)
    assert "block by block" in why and "does not compute" in why
    why = runner.missing_inputs(VisionSuite(_vision(tmp_path)), method)
    assert "vision setting computes no statistics" in why and "\n" not in why
    assert runner.missing_inputs(Recorded(suite_config(tmp_path, *TINY)), method) is None


def test_its_config_holds_the_papers_sweep_and_all_methods_a_short_one(tmp_path):
    from taskmerge.search.spaces import validate_spaces

    def space(*overrides):
        return next(s for s in validate_spaces(suite_config(tmp_path, *overrides)) if s.name == "regmean_plusplus")

    grid = space("method=[regmean_plusplus]").grid["off_diagonal_scale"]  # official experiments/hyperparam.sh
    assert grid == sorted(grid) and len(grid) == 19 and grid[0] == 0.1 and grid[-1] == 1.0 and 0.95 in grid
    demo = space("+experiment=all_methods")  # each point re-forwards the examples: regmean's four points
    assert demo.grid["off_diagonal_scale"] == [0.5, 0.7, 0.9, 1.0] and demo.fixed == {"after_blocks": "pretrained"}


def test_block_forward_takes_a_tensor_or_a_tuple():
    """transformers 5 encoder layers return a tensor, transformers 4 a tuple (FusionBench indexes [0])."""
    from taskmerge.models.text_encoder import block_forward

    class Block(torch.nn.Module):
        def __init__(self, as_tuple):
            super().__init__()
            self.as_tuple = as_tuple

        def forward(self, hidden, mask):
            out = hidden * 2 + mask.sum()
            return (out, None) if self.as_tuple else out

    hidden, mask, tokens = torch.randn(3, 4, 5), torch.zeros(3, 1, 1, 4), torch.ones(3, 4, dtype=torch.bool)
    for as_tuple in (False, True):
        out, m, t = block_forward(Block(as_tuple), (hidden, mask, tokens))
        assert torch.equal(out, hidden * 2) and m is mask and t is tokens
