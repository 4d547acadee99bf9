"""Both ``CLIPVisionModel`` layouts import into the hf vision pipeline: transformers 5's
``save_pretrained`` (no ``vision_model.`` prefix) and the transformers-4 / FusionBench one (prefixed)."""
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import save_file

from taskmerge.models.clip import ClipFamily, align_vision_keys

from tests.spine.helpers import CONFIGS

TASKS = ["EuroSAT", "MNIST", "SVHN"]  # configs/tasks/synthetic3.yaml


def _cfg(tmp_path, *overrides):
    base = [f"paths.checkpoints={tmp_path}/ck", f"paths.results={tmp_path}/res", "report=false", "model=tiny_hf",
            "tasks.train=16", "tasks.validation=16", "tasks.test=16", "method=[task_arithmetic]", "search.grid=[0.5]"]
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("vision", overrides=base + list(overrides))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Per-task fine-tunes of the tiny hf CLIP saved in both layouts, and their expected states."""
    from transformers import CLIPVisionModel

    root = tmp_path_factory.mktemp("layouts")
    fam = ClipFamily.build("hf", "tiny", "tiny_hf", seed=0)  # what model=tiny_hf builds
    pre = fam.encoder_state()
    fam.clip.save_pretrained(root / "theta0")  # θ0, given explicitly with the imported checkpoints (model.path)
    expected = {}
    for i, task in enumerate(TASKS):
        g = torch.Generator().manual_seed(i)
        state = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                 for k, v in pre.items()}
        expected[task] = state
        vision = CLIPVisionModel(fam.clip.config.vision_config)
        bare = {k[len("vision_model."):]: v for k, v in state.items()}
        missing, unexpected = vision.load_state_dict(bare, strict=False)
        assert not unexpected and all("position_ids" in k for k in missing)
        vision.save_pretrained(root / "t5" / task)  # transformers 5.x: keys without vision_model.
        (root / "t4" / task).mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(root / "t4" / task / "model.safetensors"))
    return root, pre, expected


def test_transformers5_folder_has_no_prefix(folders):
    from safetensors import safe_open

    root, _, _ = folders
    with safe_open(str(root / "t5" / "MNIST" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.startswith("vision_model.") for k in keys)


@pytest.mark.parametrize("layout", ["t4", "t5"])
def test_finetuned_states_in_either_layout(folders, tmp_path, layout):
    from taskmerge.experiments.vision import VisionSuite

    root, pre, expected = folders
    suite = VisionSuite(_cfg(tmp_path, f"finetuned.pattern='{root}/{layout}/{{task}}'", f"model.path={root}/theta0")).load()
    states = [suite.finetuned_state(t, suite.checkpoints.source(t)) for t in suite.tasks]
    for task, sd in zip(suite.tasks, states):
        assert list(sd) == list(pre)
        for k, v in expected[task].items():
            assert torch.equal(sd[k], v), (layout, task, k)


def test_search_rows_identical_across_layouts(folders, tmp_path):
    from taskmerge.experiments.vision import run

    root, _, _ = folders
    rows = {}
    for layout in ("t4", "t5"):
        out = run(_cfg(tmp_path / layout, f"finetuned.pattern='{root}/{layout}/{{task}}'", f"model.path={root}/theta0"))
        df = pd.read_csv(out["csv"])
        rows[layout] = df[df.method != "pretrained"].sort_values(["method", "split", "task"])[
            ["method", "split", "task", "accuracy"]].reset_index(drop=True)
    pd.testing.assert_frame_equal(rows["t4"], rows["t5"])
    assert set(rows["t5"].method) == {"finetuned", "task_arithmetic"}


def test_unrelated_folder_is_refused_by_name(folders, tmp_path):
    from taskmerge.experiments.vision import run

    theta0 = folders[0] / "theta0"

    for task in TASKS:
        (tmp_path / "bad" / task).mkdir(parents=True)
        save_file({"foo.weight": torch.zeros(2, 2)}, str(tmp_path / "bad" / task / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        run(_cfg(tmp_path, f"finetuned.pattern='{tmp_path}/bad/{{task}}'", f"model.path={theta0}"))
    assert str(tmp_path / "bad") in str(e.value) and "lacks encoder tensors" in str(e.value)
    assert not (tmp_path / "res").exists() or not list((tmp_path / "res").rglob("*.csv"))


def test_align_leaves_other_layouts_alone():
    ref = {"vision_model.a": torch.zeros(1), "vision_model.b": torch.zeros(1)}
    assert align_vision_keys({"vision_model.a": 1}, ref) == {"vision_model.a": 1}
    assert list(align_vision_keys({"a": torch.ones(1), "b": torch.ones(1), "text": 0}, ref)) == list(ref)
    open_clip = {"visual.proj": torch.zeros(1)}
    assert align_vision_keys({"proj": 1}, open_clip) == {"proj": 1}
