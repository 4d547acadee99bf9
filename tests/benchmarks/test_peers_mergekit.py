"""benchmarks/peers_mergekit.py on the tiny shape: the taskmerge child runs every row for real, the
table reads its results, and a missing mergekit is one clear line (CI has no peers installed)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPT = BENCH / "peers_mergekit.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_missing_mergekit_is_one_line(tmp_path):
    proc = _run("--root", str(tmp_path / "root"), "--tiny", "--peer-dir", str(tmp_path / "none"))
    assert proc.returncode != 0
    assert proc.stderr.strip() == f"mergekit is not installed in {tmp_path / 'none'} (see benchmarks/README.md, 'mergekit rows')"
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "model_stock"])
def test_taskmerge_child_merges_the_inputs_on_disk(tmp_path, method, monkeypatch):
    sys.path.insert(0, str(BENCH))
    import peers_mergekit as pm

    for name, value in {"VOCAB": 512, "HIDDEN": 64, "MLP": 224, "HEAD_DIM": 64 // pm.m8.HEADS}.items():
        monkeypatch.setattr(pm.m8, name, value)  # --tiny's shapes
    root = tmp_path / "root"
    pm.build(root, 1)
    assert json.loads((root / "ft0" / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    out = tmp_path / "out"
    proc = _run("--root", str(root), "--layers", "1", "--tiny", "--child", json.dumps([method, "taskmerge", str(out)]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["peer"] == "taskmerge" and res["wall_s"] > 0 and res["extra_bytes"] >= 0
    from taskmerge.io.sharded import ShardedReader

    merged, base = ShardedReader(out), ShardedReader(root / "base")
    assert set(merged) == set(base)
    if method == "task_arithmetic":  # θ0 + 0.3 Σ τ_t, in bf16
        fts = [ShardedReader(root / f"ft{i}") for i in range(3)]
        key = "model.layers.0.mlp.up_proj.weight"
        expected = base[key].float() + 0.3 * sum(ft[key].float() - base[key].float() for ft in fts)
        assert (merged[key].float() - expected).abs().max() <= 2 ** -8 * expected.abs().max()
    # the same folder compared with itself agrees exactly
    assert pm.agreement(out, out) == {"max_abs_diff": 0.0, "differ_share": 0.0}
    row = {"method": method, "taskmerge": res, "mergekit": {**res, "wall_s": 2 * res["wall_s"]}}
    assert "| 2.00× |" in pm.table([row])
