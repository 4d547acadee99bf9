"""`taskmerge merge` options: --dtype, task negation, TIES' trim count, outputs that are inputs, `methods NAME`."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from taskmerge.cli import main
from taskmerge.merging import merge
from taskmerge.merging.primitives import kth_index


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def models(tmp_path, ft_dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(8, 4, generator=g), "ids": torch.arange(3)}
    paths = {"pre": tmp_path / "pre.safetensors"}
    save_file(pre, paths["pre"])
    for name in "ab":
        ft = {"w": (pre["w"] + torch.randn(8, 4, generator=g)).to(ft_dtype), "ids": torch.arange(3)}
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file(ft, paths[name])
    return paths


def test_mixed_dtypes_name_dtype_flag_and_dtype_casts(tmp_path, capsys):
    p = models(tmp_path, torch.bfloat16)
    out = tmp_path / "m.safetensors"
    code, _, err = run(capsys, "merge", "task_arithmetic", "--pretrained", p["pre"], "--finetuned", p["a"], p["b"],
                       "--output", out)
    assert code == 2 and "--dtype" in err and "Traceback" not in err and not out.exists()
    code, _, err = run(capsys, "merge", "task_arithmetic", "--pretrained", p["pre"], "--finetuned", p["a"], p["b"],
                       "--dtype", "bfloat16", "-p", "scaling=0.5", "--output", out)
    assert code == 0, err
    got = load_file(out)
    pre = load_file(p["pre"])["w"].to(torch.bfloat16)
    a, b = load_file(p["a"])["w"], load_file(p["b"])["w"]
    expect = (pre.float() + 0.5 * ((a.float() - pre.float()) + (b.float() - pre.float()))).to(torch.bfloat16)
    assert got["w"].dtype == torch.bfloat16 and torch.equal(got["w"], expect)
    assert got["ids"].dtype == torch.int64


def test_task_negation(tmp_path, capsys):
    p = models(tmp_path)
    out = tmp_path / "neg.safetensors"
    assert run(capsys, "merge", "task_arithmetic", "--pretrained", p["pre"], "--finetuned", p["a"],
               "-p", "scaling=-1", "--output", out)[0] == 0
    pre, a = load_file(p["pre"])["w"], load_file(p["a"])["w"]
    torch.testing.assert_close(load_file(out)["w"], pre - (a - pre))


@pytest.mark.parametrize("method", ["ties", "tsv_m", "consensus", "dare"])
def test_negative_scaling_negates_the_merged_vector(method):
    g = torch.Generator().manual_seed(1)
    pre = {"w": torch.randn(6, 5, generator=g)}
    fts = [{"w": pre["w"] + torch.randn(6, 5, generator=g)} for _ in range(3)]
    pos, neg = merge(method, pre, fts, {"scaling": 0.5}), merge(method, pre, fts, {"scaling": -0.5})
    torch.testing.assert_close(neg["w"] - pre["w"], -(pos["w"] - pre["w"]))


def test_knots_refuses_negative_scaling():
    with pytest.raises(ValueError, match="scaling"):
        merge("knots", {"l.weight": torch.zeros(2, 2)}, [{}], {"scaling": -1.0})


def test_trim_count_exact_keeps_int_dk():
    d, k = 50, 20.0
    assert d - kth_index(d, k) + 1 == int(d * k / 100) + 1  # official: one more than d·k/100
    assert d - kth_index(d, k, exact=True) + 1 == int(d * k / 100)  # mergekit / peft
    g = torch.Generator().manual_seed(2)
    pre = {"w": torch.zeros(d)}
    fts = [{"w": torch.randn(d, generator=g)}]
    for count, kept in (("official", 11), ("exact", 10)):
        out = merge("ties", pre, fts, {"k": k, "trim_scope": "per_tensor", "trim_count": count})
        assert int((out["w"] != 0).sum()) == kept, count


def test_output_that_is_an_input_is_refused(tmp_path, capsys):
    p = models(tmp_path)
    before = p["pre"].read_bytes()
    code, _, err = run(capsys, "merge", "average", "--pretrained", p["pre"], "--finetuned", p["a"], "--output",
                       p["pre"])
    assert code == 2 and "overlaps the input" in err and p["pre"].read_bytes() == before


def test_methods_name_shows_where_configs_and_memory(capsys):
    code, out, _ = run(capsys, "methods", "ties")
    assert code == 0
    assert "defined at: taskmerge.merging.ties:" in out
    assert "configs/method/ties.yaml" in out
    assert "memory:     global trim" in out


@pytest.mark.parametrize("preset", [None, "0"])
def test_the_command_line_opts_in_to_huge_pages_unless_the_environment_decides(monkeypatch, capsys, preset):
    # THP_MEM_ALLOC_ENABLE is read once by torch when it first allocates: the CLI sets its default before
    # any subcommand imports torch, and leaves a value the user exported
    if preset is None:
        monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    else:
        monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", preset)
    assert run(capsys, "methods")[0] == 0
    assert __import__("os").environ["THP_MEM_ALLOC_ENABLE"] == (preset or "1")
