"""search.spaces.validate_spaces: the whole search (methods, grids, hyperparameter values and ranges,
strategies, device, paths) is checked before any fine-tuning, baseline row or file."""
import pytest
import torch
from hydra import compose, initialize_config_dir

from taskmerge.search.spaces import validate_spaces

from tests.spine.helpers import CONFIGS, suite_config

TINY = ["model=tiny_bert", "budget.max_train=16", "budget.max_eval=8", "budget.max_test=8", "budget.epochs=1"]
CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def _nothing_written(tmp_path):
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "results").exists()


BAD_TEXT = [
    (["method=[ties]", "methods.ties.params.k=150"], ["methods.ties", "k=150"]),
    (["method=[ties]", "+methods.ties.grid.k=[20,0]"], ["methods.ties", "k=0"]),
    (["method=[task_arithmetic]", "search.grid=[0.3,abc]"], ["methods.task_arithmetic", "'abc'"]),
    (["method=[task_arithmetic]", "search.grid=0.3"], ["search.grid=0.3"]),
    (["method=[ties]", "methods.ties.params.merge=median"], ["methods.ties", "merge='median'"]),
    (["method=[ties]", "+methods.ties.params.typo=1"], ["methods.ties", "typo"]),
    (["method=[task_arithmetic]", "+methods.mine.name=no_such_method"], ["methods.mine", "no_such_method"]),
    (["method=[task_arithmetic]", "+methods.task_arithmetic.strategy=random"], ["methods.task_arithmetic.strategy",
                                                                               "random"]),
    (["method=[task_arithmetic]", "+methods.task_arithmetic.strategy=per_task"], ["per_task", "task_arithmetic"]),
    (["method=[task_arithmetic]", "search.selection=best"], ["search.selection", "best"]),
    (["method=[opcm]", "methods.opcm.orders=0"], ["methods.opcm.orders"]),
    (["method=[task_arithmetic]", "model.path=/no/such/model"], ["model.path=/no/such/model"]),
    (["method=[task_arithmetic]", "device=tpu9"], ["device", "tpu9"]),
]


@pytest.mark.parametrize("overrides,culprits", BAD_TEXT, ids=[c[0] for _, c in BAD_TEXT])
def test_text_runner_refuses_before_any_work(tmp_path, overrides, culprits):
    from taskmerge.experiments.text_suite import run

    with pytest.raises(ValueError) as e:
        run(suite_config(tmp_path, *TINY, *overrides))
    msg = str(e.value)
    assert "\n" not in msg
    for c in culprits:
        assert c in msg, (c, msg)
    _nothing_written(tmp_path)


@CUDA
def test_cuda_on_a_cpu_machine_is_the_cli_error(tmp_path):
    from taskmerge.experiments.text_suite import run

    with pytest.raises(ValueError, match=r"^device=cuda: CUDA is not available on this machine$"):
        run(suite_config(tmp_path, *TINY, "device=cuda"))
    _nothing_written(tmp_path)


def test_the_issue_grid_fails_before_fine_tuning(tmp_path, monkeypatch):
    """``search.grid=[-0.5,0.3]`` with a method whose scaling must be >= 0: refused before any fine-tune."""
    from taskmerge.experiments import runner, text_suite
    from taskmerge.merging import get_method

    method = next(m for m in ("ties", "task_arithmetic", "knots") if get_method(m).params["scaling"].range
                  is not None and get_method(m).params["scaling"].range.lo == 0.0)
    monkeypatch.setattr(runner, "prepare", lambda *a, **k: pytest.fail("fine-tuning started"))
    with pytest.raises(ValueError, match=rf"methods\.{method}: .*scaling.*-0\.5"):
        text_suite.run(suite_config(tmp_path, *TINY, f"method=[{method}]", "search.grid=[-0.5,0.3]"))
    _nothing_written(tmp_path)


def _vision(tmp_path, *overrides):
    base = [f"paths.checkpoints={tmp_path}/checkpoints", f"paths.results={tmp_path}/results", "report=false"]
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("vision", overrides=base + list(overrides))


BAD_VISION = [
    (["method=[knots_ties]"], ["methods.knots_ties", "finetune=lora"]),
    (["finetuned.pattern='/no/such/{task}.safetensors'"], ["finetuned.pattern", "nothing at /no/such/"]),
    (["finetuned.pattern=/tmp/one_file.safetensors"], ["finetuned.pattern", "{task}"]),
    (["method=[tall_mask]", "methods.tall_mask.grid.mask_lambda=[-1.0]"], ["methods.tall_mask", "mask_lambda"]),
]


@pytest.mark.parametrize("overrides,culprits", BAD_VISION, ids=[c[0] for _, c in BAD_VISION])
def test_vision_runner_refuses_before_any_work(tmp_path, overrides, culprits):
    from taskmerge.experiments.vision import run

    with pytest.raises(ValueError) as e:
        run(_vision(tmp_path, *overrides))
    msg = str(e.value)
    assert "\n" not in msg and all(c in msg for c in culprits), msg
    _nothing_written(tmp_path)


def test_every_shipped_config_validates(tmp_path):
    """The configs as shipped (and every method config at once) pass: the checks refuse only bad input."""
    spaces = validate_spaces(suite_config(tmp_path, "+experiment=all_methods"))
    assert len(spaces) >= 15
    for exp in ("tall_tsv", "opcm", "tiny_synthetic"):
        assert validate_spaces(_vision(tmp_path, f"experiment={exp}"), lora_available=False)
    assert validate_spaces(_vision(tmp_path, "experiment=knots"), lora_available=True)
    for name in ("language_mats", "language_knots"):
        with initialize_config_dir(str(CONFIGS), version_base="1.3"):
            assert validate_spaces(compose(name))


def test_run_suite_script_refuses_a_bad_grid_in_one_line(tmp_path):
    from tests.spine.test_script_errors import assert_one_line_error, script

    res = script("eval_scripts/run_suite.py", *TINY, f"paths.checkpoints={tmp_path}/checkpoints",
                 f"paths.results={tmp_path}/results", "method=[ties]", "+methods.ties.grid.k=[20,150]")
    assert_one_line_error(res, "methods.ties", "k=150")
    _nothing_written(tmp_path)
