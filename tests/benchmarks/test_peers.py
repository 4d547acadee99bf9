"""benchmarks/peers.py: the side-by-side harness runs end to end on a tiny shape, taskmerge only.

FusionBench is pointed at a folder that does not exist, so its cells must say "not installed"
(the CI machine has no peers); the taskmerge rows run in fresh worker processes for real.
"""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


def test_inputs_are_seeded_and_low_rank_plus_noise():
    pi = _load("peers_inputs")
    pre, fts = pi.build_models("tiny", 2, seed=0)
    pre2, fts2 = pi.build_models("tiny", 2, seed=0)
    key = "encoder.layers.0.mlp.fc1.weight"
    for a, b in zip([pre, *fts], [pre2, *fts2]):
        assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert torch.equal(pi.build_model("tiny", 0, 1).state_dict()[key], fts[1].state_dict()[key])
    tau0 = fts[0].state_dict()[key] - pre.state_dict()[key]
    tau1 = fts[1].state_dict()[key] - pre.state_dict()[key]
    assert not torch.allclose(tau0, tau1)
    s = torch.linalg.svdvals(tau0)
    assert s[pi.RANK - 1] > 5 * s[pi.RANK]  # rank-8 signal well above the noise floor
    gram = pi.grams(pre, 1, 0)[0]["encoder.layers.0.mlp.fc2"]
    assert gram.shape == (64, 64) and torch.linalg.eigvalsh(gram).min() > 0  # SPD
    assert all((f > 0).all() for f in pi.fishers(pre, 1, 0, 1)[0].values())


def test_harness_runs_taskmerge_rows_and_skips_missing_peer(tmp_path, capsys):
    peers = _load("peers")
    out = tmp_path / "rows.jsonl"
    rc = peers.main(["--models", "tiny", "--tasks", "3", "--methods", "task_arithmetic", "ties",
                     "--peer-dir", str(tmp_path / "no-peers"), "--repeats", "3", "--json", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["method"], r["peer"]) for r in rows] == [("task_arithmetic", "taskmerge"), ("task_arithmetic", "fusionbench"),
                                                        ("ties", "fusionbench"), ("ties", "taskmerge")]  # alternating
    for r in rows:
        if r["peer"] == "fusionbench":
            assert r["status"].startswith("not installed")
            continue
        assert r["status"] == "ok", r
        assert len(r["runs"]) == 4 and r["seconds"] == sorted(r["runs"][1:])[1]  # warm-up, then median of 3
        assert r["output_bytes"] > 0 and r["extra_gib"] >= 0 and r["rebuilt_inputs"] == 0
    assert rows[0]["checksum"] == rows[3]["checksum"]  # both workers built the same inputs
    text = capsys.readouterr().out
    assert "| task_arithmetic (λ=0.3) | not installed" in text and "| ties (k=20, sum, λ=0.3) | not installed" in text
    assert peers.main(["--table-from", str(out)]) == 0  # the table again, from the saved rows
    again = capsys.readouterr().out
    assert again.strip() and again.strip() in text


def test_new_methods_rows_run_with_their_hyperparameters(tmp_path):
    """The rows of methods that landed after the harness (iso_c, iso_cts, wudi, model_stock) run in taskmerge as configured."""
    peers = _load("peers")
    out = tmp_path / "rows.jsonl"
    rc = peers.main(["--models", "tiny", "--tasks", "2", "--methods", "iso_c", "iso_cts", "wudi", "model_stock",
                     "--peers", "taskmerge", "--repeats", "1", "--json", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["iso_c", "iso_cts", "wudi", "model_stock"]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["output_bytes"] > 0 and r["seconds"] > 0


def test_failed_worker_reports_its_exception_not_the_last_wrapped_line():
    peers = _load("peers")
    stderr = ("Traceback (most recent call last):\n│ ❱ 144 │ u, s, v = torch.linalg.svd(x) │\n"
              "_LinAlgError: linalg.svd: The algorithm failed to converge because the input \n"
              "matrix is ill-conditioned (error code: \n1).\n")
    assert peers._error_line(stderr, 1) == ("_LinAlgError: linalg.svd: The algorithm failed to converge because the "
                                            "input matrix is ill-conditioned (error code: 1).")
    assert peers._error_line("Killed\n", -9) == "Killed"
    assert peers._error_line("", -9) == "exit -9"
