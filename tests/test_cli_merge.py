"""`taskmerge merge` / `taskmerge methods` on tiny safetensors files: outputs and every bad input."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from taskmerge.cli import main
from taskmerge.merging import METHODS, merge


def tiny(seed, nan=False):
    g = torch.Generator().manual_seed(seed)
    sd = {"enc.fc.weight": torch.randn(4, 3, generator=g), "enc.fc.bias": torch.randn(4, generator=g),
          "enc.ln.weight": torch.randn(3, generator=g), "position_ids": torch.arange(3)}
    if nan:
        sd["enc.fc.bias"][1] = float("nan")
    return sd


@pytest.fixture
def files(tmp_path):
    paths = {}
    for name, seed in (("pre", 0), ("a", 1), ("b", 2), ("c", 3)):
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file(tiny(seed), paths[name])
    return paths


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_merge_task_arithmetic_matches_library(files, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    code, _, err = run(capsys, "merge", "task_arithmetic", "--pretrained", files["pre"],
                       "--finetuned", files["a"], files["b"], "-p", "scaling=0.5", "--output", out)
    assert code == 0, err
    got = load_file(out)
    expect = merge("task_arithmetic", load_file(files["pre"]), [load_file(files["a"]), load_file(files["b"])],
                   {"scaling": 0.5})
    assert set(got) == set(load_file(files["pre"]))  # same names (the layout order is the reader's)
    for k in expect:
        torch.testing.assert_close(got[k], expect[k])


def test_opcm_takes_finetuned_order(files, tmp_path, capsys):
    o1, o2 = tmp_path / "o1.safetensors", tmp_path / "o2.safetensors"
    assert run(capsys, "merge", "opcm", "--pretrained", files["pre"], "--finetuned", files["a"], files["b"],
               files["c"], "--output", o1)[0] == 0
    assert run(capsys, "merge", "opcm", "--pretrained", files["pre"], "--finetuned", files["c"], files["b"],
               files["a"], "--output", o2)[0] == 0
    assert not torch.allclose(load_file(o1)["enc.fc.weight"], load_file(o2)["enc.fc.weight"])


def test_per_task_outputs_and_tall_masks(files, tmp_path, capsys):
    out = tmp_path / "tsvc"
    assert run(capsys, "merge", "tsv_c", "--pretrained", files["pre"], "--finetuned", files["a"], files["b"],
               "--output", out)[0] == 0
    assert listing(out) == ["task_0.safetensors", "task_1.safetensors"]
    assert torch.equal(load_file(out / "task_1.safetensors")["enc.fc.bias"], tiny(2)["enc.fc.bias"])
    if "tall_mask" in METHODS:
        from taskmerge.merging.masks import load_masks

        out = tmp_path / "tall"
        code, _, err = run(capsys, "merge", "tall_mask", "--pretrained", files["pre"], "--finetuned", files["a"],
                           files["b"], "-p", "mask_lambda=0.4", "--output", out)
        assert code == 0, err
        assert listing(out) == ["masks.safetensors", "task_0.safetensors", "task_1.safetensors"]
        masks = load_masks(out / "masks.safetensors")
        pre, a = load_file(files["pre"]), load_file(out / "task_0.safetensors")
        changed = a["enc.fc.weight"] != pre["enc.fc.weight"]
        assert torch.equal(changed, masks[0]["enc.fc.weight"] & changed)


def test_hf_folder_sharded_and_pickle(files, tmp_path, capsys):
    pre = load_file(files["pre"])
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    save_file({k: v for k, v in tiny(1).items() if k.startswith("enc.fc")}, hf / "model-00001-of-00002.safetensors")
    save_file({k: v for k, v in tiny(1).items() if not k.startswith("enc.fc")}, hf / "model-00002-of-00002.safetensors")
    weight_map = {k: ("model-00001-of-00002.safetensors" if k.startswith("enc.fc") else
                      "model-00002-of-00002.safetensors") for k in pre}
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    pkl = tmp_path / "b.pt"
    torch.save(tiny(2), pkl)
    out = tmp_path / "m.safetensors"
    code, _, err = run(capsys, "merge", "average", "--pretrained", files["pre"], "--finetuned", hf, pkl,
                       "--trust-pickle", "--output", out)
    assert code == 0, err
    torch.testing.assert_close(load_file(out)["enc.fc.weight"], (tiny(1)["enc.fc.weight"] + tiny(2)["enc.fc.weight"]) / 2)


def test_methods_lists_everything(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0
    for name, m in METHODS.items():
        assert name in out
        for p in m.params.values():
            assert f"{p.name}: " in out
    assert "alpha: float = 0.5 in [0.0, 1.0]" in out
    assert "variant: {polar,eigen} = 'polar'" in out
    code, out, _ = run(capsys, "methods", "opcm")
    assert code == 0 and "zero_diagonal" in out and "Tang et al." in out


@pytest.mark.parametrize("sub", ["merge", "methods"])
def test_help_has_example(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([sub, "--help"])
    assert e.value.code == 0
    assert "example:" in capsys.readouterr().out


def _bad(case, files, tmp_path):
    """Returns (argv extras replacing the defaults, substring the error must contain)."""
    pre, a, b = files["pre"], files["a"], files["b"]
    bad = tmp_path / "bad.safetensors"
    if case == "keys":
        sd = tiny(1)
        sd["extra.weight"] = torch.zeros(2)
        save_file(sd, bad)
        return [pre, [a, bad], []], "extra.weight"
    if case == "shapes":
        sd = tiny(1)
        sd["enc.fc.weight"] = torch.zeros(4, 4)
        save_file(sd, bad)
        return [pre, [a, bad], []], "enc.fc.weight"
    if case == "dtypes":
        sd = tiny(1)
        sd["enc.ln.weight"] = sd["enc.ln.weight"].half()
        save_file(sd, bad)
        return [pre, [a, bad], []], "enc.ln.weight"
    if case == "nan":
        save_file(tiny(1, nan=True), bad)
        return [pre, [a, bad], []], "enc.fc.bias"
    if case == "empty":
        return [pre, [], []], "empty"
    if case == "range":  # task negation (scaling < 0) is allowed: a range that the methods still bound
        return [pre, [a, b], ["-p", "min_tasks=-1"]], "min_tasks"
    if case == "unknown_param":
        return [pre, [a, b], ["-p", "lambda=1"]], "lambda"
    if case == "bad_value":
        return [pre, [a, b], ["-p", "scaling=abc"]], "scaling"
    if case == "no_equals":
        return [pre, [a, b], ["-p", "scaling"]], "name=value"
    if case == "corrupt":
        bad.write_bytes(b"not a safetensors file at all")
        return [pre, [a, bad], []], str(bad)
    if case == "missing":
        return [pre, [a, tmp_path / "nope.safetensors"], []], "nope.safetensors"
    if case == "pickle":
        pkl = tmp_path / "x.pt"
        torch.save(tiny(1), pkl)
        return [pre, [a, pkl], []], "--trust-pickle"
    if case == "unknown_method":
        return [pre, [a, b], []], "available"
    raise AssertionError(case)


CASES = ["keys", "shapes", "dtypes", "nan", "empty", "range", "unknown_param", "bad_value", "no_equals",
         "corrupt", "missing", "pickle", "unknown_method"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("per_task", [False, True])
def test_bad_input_clear_error_no_output(case, per_task, files, tmp_path, capsys):
    (pre, fts, extra), needle = _bad(case, files, tmp_path)
    method = "nonexistent" if case == "unknown_method" else ("tsv_c" if per_task else "task_arithmetic")
    if per_task and case in ("range", "bad_value", "no_equals"):
        method = "tsv_m"  # tsv_c has no scaling; the hyperparameter is checked before the output path
    out = tmp_path / ("outdir" if per_task else "out.safetensors")
    before = listing(tmp_path)
    code, _, err = run(capsys, "merge", method, "--pretrained", pre, "--finetuned", *fts, *extra, "--output", out)
    assert code == 2
    assert needle in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert listing(tmp_path) == before  # no output, no temporary leftovers


def test_per_task_output_must_be_empty_folder(files, tmp_path, capsys):
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = run(capsys, "merge", "tsv_c", "--pretrained", files["pre"], "--finetuned", files["a"],
                       "--output", out)
    assert code == 2 and "empty" in err and listing(out) == ["keep.txt"]


def test_model_output_must_be_safetensors(files, tmp_path, capsys):
    code, _, err = run(capsys, "merge", "average", "--pretrained", files["pre"], "--finetuned", files["a"],
                       "--output", tmp_path / "m.pt")
    assert code == 2 and ".safetensors" in err


def test_console_script_subprocess(files, tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", "import sys; from taskmerge.cli import main; sys.exit(main())",
                          "merge", "ties", "--pretrained", str(files["pre"]), "--finetuned", str(files["a"]),
                          "-p", "k=500", "--output", str(tmp_path / "x.safetensors")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "k=" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_peft_lora_adapters_as_finetuned(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from torch import nn

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    pre = {k: v.clone() for k, v in base.state_dict().items()}
    save_file(pre, tmp_path / "pre.safetensors")
    dense = []
    for i in range(2):
        fresh = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        fresh.load_state_dict(pre)
        model = get_peft_model(fresh, LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_()
        model.save_pretrained(tmp_path / f"ad{i}")
        dense.append({k: v.clone() for k, v in model.merge_and_unload().state_dict().items()})
    out = tmp_path / "m.safetensors"
    code, _, err = run(capsys, "merge", "task_arithmetic", "--pretrained", tmp_path / "pre.safetensors",
                       "--finetuned", tmp_path / "ad0", tmp_path / "ad1", "-p", "scaling=1", "--output", out)
    assert code == 0, err
    got = load_file(out)
    for k in pre:
        torch.testing.assert_close(got[k], pre[k] + (dense[0][k] - pre[k]) + (dense[1][k] - pre[k]))
