"""benchmarks/merge_8b.py: the fine-tuned models generated on the fly (``--finetuned-on-the-fly``) are the
ones build_model writes to disk, read in any chunking, and merge end to end; the disk check refuses a
run the disk cannot hold before anything is written."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from taskmerge.io.sharded import ShardedReader
from taskmerge.merging.inputs import check_models

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPT = BENCH / "merge_8b.py"
GiB = 2**30


@pytest.fixture
def m8():
    sys.path.insert(0, str(BENCH))
    import merge_8b

    return merge_8b


@pytest.fixture
def tiny(m8, monkeypatch):
    for name, value in {"VOCAB": 512, "HIDDEN": 64, "MLP": 224, "HEAD_DIM": 64 // m8.HEADS}.items():
        monkeypatch.setattr(m8, name, value)  # --tiny's shapes
    return m8


@pytest.fixture
def small_blocks(tiny, monkeypatch):
    # 15 rows per block of the [512, 64] embedding (a partial last block), 4 of the [64, 224] down_proj:
    # every large tensor spans several noise blocks, as at full width
    monkeypatch.setattr(tiny, "BLOCK_NUMEL", 1000)
    return tiny


def _chunks(n, sizes):
    start, i = 0, 0
    while start < n:
        yield start, min(n, start + sizes[i % len(sizes)])
        start, i = min(n, start + sizes[i % len(sizes)]), i + 1


def test_on_the_fly_equals_the_disk_whatever_the_chunking(small_blocks, tmp_path, monkeypatch):
    m8 = small_blocks
    m8.build_model(tmp_path / "base", 1, 0, 0.0)
    m8.build_model(tmp_path / "ft", 1, 2, m8.NOISE)
    base, disk = ShardedReader(tmp_path / "base"), ShardedReader(tmp_path / "ft")
    fly = m8.FinetunedOnTheFly(base, 2)
    assert list(fly) == list(base) and len(fly) == len(base)
    assert "model.norm.weight" in fly and "lm_head.weight" not in fly
    for key in base:
        whole = fly[key]
        assert fly.shape(key) == base.shape(key) and fly.dtype(key) == whole.dtype == torch.bfloat16
        assert torch.equal(whole, disk[key]), key  # the values build_model writes
        for sizes in ([1, 7, 33], [50, 3], [base.shape(key)[0]]):
            got = torch.cat([fly.rows(key, a, b) for a, b in _chunks(base.shape(key)[0], sizes)])
            assert torch.equal(got, whole), (key, sizes)
    # rows a:b generate only the blocks that overlap them
    starts, real = [], m8._noise_block
    monkeypatch.setattr(m8, "_noise_block", lambda seed, idx, start, *rest: starts.append(start)
                        or real(seed, idx, start, *rest))
    fly.rows("model.embed_tokens.weight", 100, 101)
    assert starts == [90]
    starts.clear()
    fly.rows("model.embed_tokens.weight", 29, 31)
    assert starts == [15, 30]


def test_on_the_fly_is_base_plus_noise_and_tasks_differ(small_blocks, tmp_path):
    m8 = small_blocks
    m8.build_model(tmp_path / "base", 1, 0, 0.0)
    base = ShardedReader(tmp_path / "base")
    fts = [m8.FinetunedOnTheFly(base, seed) for seed in (1, 2, 3)]
    check_models(base, fts)  # accepted as fine-tuned models of the base: names, shapes, dtypes, finite
    for key in base:
        assert all(not torch.equal(ft[key], base[key]) for ft in fts), key
    for key in ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"]:
        taus = [ft[key].float() - base[key].float() for ft in fts]
        for tau in taus:  # N(0, 1e-3²), up to bf16 rounding
            assert 0.9e-3 < tau.std() < 1.1e-3 and tau.mean().abs() < 1e-4
        for a, b in [(0, 1), (0, 2), (1, 2)]:  # independent across tasks
            assert torch.corrcoef(torch.stack([taus[a].flatten(), taus[b].flatten()]))[0, 1].abs() < 0.05
    tau = m8.FinetunedOnTheFly(base, 1, noise=1e-2)["model.embed_tokens.weight"].float() - \
        base["model.embed_tokens.weight"].float()
    assert 0.9e-2 < tau.std() < 1.1e-2


def test_task_arithmetic_end_to_end_on_the_fly(tiny, tmp_path):
    m8, root = tiny, tmp_path / "root"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--root", str(root), "--tiny", "--layers", "2",
                           "--finetuned-on-the-fly", "--methods", "task_arithmetic", "--keep-outputs",
                           "--json", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| task_arithmetic | base + 3 fine-tuned generated on the fly (" in proc.stdout
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["finetuned_inputs"].startswith("generated on the fly")
    (row,) = res["rows"]
    assert row["method"] == "task_arithmetic" and row["finetuned_generated_s"] > 0
    assert sorted(p.name for p in root.iterdir()) == ["base", "out-task_arithmetic"]  # no fine-tuned on disk
    # reference: the fine-tuned models written to disk by build_model, independently of the reader
    for i in range(3):
        m8.build_model(tmp_path / f"ft{i}", 2, i + 1, m8.NOISE)
    fts = [ShardedReader(tmp_path / f"ft{i}") for i in range(3)]
    base, merged = ShardedReader(root / "base"), ShardedReader(root / "out-task_arithmetic")
    assert list(merged) == list(base)
    for key in base:  # θ0 + 0.3 Σ_t (θ_t − θ0): float32, in task order, as task_vector_sum and resolve do
        b = base[key].float()
        acc = fts[0][key].float() - b
        for ft in fts[1:]:
            acc += ft[key].float() - b
        expected = (acc * 0.3 + b).to(torch.bfloat16)
        assert torch.equal(merged[key], expected), key
        assert not torch.equal(merged[key], base[key]), key


def test_disk_needs_and_refusal(m8, tmp_path, monkeypatch, capsys):
    full = ["task_arithmetic", "ties", "tsv_m", "opcm"]
    model = 2 * sum(m8.numel(s) for _, s in m8.model_shapes(32))  # bf16 bytes at 32 layers
    assert 13.9 * GiB < model < 14.1 * GiB
    fly = dict(m8.disk_needs(tmp_path / "none", 32, full, True, False))
    assert fly == {"base": model, "3 fine-tuned generated on the fly": 0, "1 merged output": model,
                   "OPCM's τ̄ spill (float32)": 2 * model}
    disk = dict(m8.disk_needs(tmp_path / "none", 32, ["task_arithmetic"], False, True))
    assert disk == {"base": model, "3 fine-tuned": 3 * model, "1 merged output": model}
    (tmp_path / "built" / "base").mkdir(parents=True)  # inputs already built are not written again
    assert dict(m8.disk_needs(tmp_path / "built", 32, ["task_arithmetic"], True, False)) == {
        "3 fine-tuned generated on the fly": 0, "1 merged output": model}

    root = tmp_path / "root"
    monkeypatch.setattr(m8.shutil, "disk_usage", lambda path: SimpleNamespace(free=4 * model))  # < 4 + 5 GiB spare
    monkeypatch.setattr(sys, "argv", ["merge_8b.py", "--root", str(root), "--layers", "32", "--finetuned-on-the-fly",
                                      "--methods", ",".join(full)])
    with pytest.raises(SystemExit) as e:
        m8.main()
    assert str(e.value).startswith("not enough disk: 55.9 GiB needed + 5 GiB kept spare > 55.9 GiB free")
    assert "\n" not in str(e.value)
    assert "OPCM's τ̄ spill (float32) 28.0 GiB = 55.9 GiB" in capsys.readouterr().out  # printed before anything
    assert not root.exists()


def test_an_interrupted_method_resumes(tiny, tmp_path):
    """A partial output left by a stopped merge is finished by ``--resume``: the parts' times are summed and
    the result is the one a single run gives."""
    from taskmerge.io.merge_writer import partial_folder, write_merged
    from taskmerge.merging import get_method

    m8, root = tiny, tmp_path / "root"
    m8.build_model(root / "base", 2, 0, 0.0)
    base = ShardedReader(root / "base")
    fts = [m8.FinetunedOnTheFly(base, i + 1) for i in range(3)]
    method, hp = get_method("tsv_m"), m8.METHODS["tsv_m"][1]
    once = write_merged(method, base, fts, tmp_path / "once", hparams=hp, progress=False)[0]

    class Stop(Exception):
        pass

    def stop_after_3(key, seen=[]):
        seen.append(key)
        if len(seen) == 3:
            raise Stop
    with pytest.raises(Stop):
        write_merged(method, base, fts, root / "out-tsv_m", hparams=hp, progress=False, on_write=stop_after_3,
                     resume=True)
    (root / "resume-tsv_m.log").write_text("".join(  # what the stopped part would have logged
        json.dumps({"key": k, "s": 1.5 * (i + 1), "part_started": "2026-01-01T00:00:00"}) + "\n"
        for i, k in enumerate((partial_folder(root / "out-tsv_m") / "taskmerge-written.txt").read_text().split())))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--root", str(root), "--tiny", "--layers", "2",
                           "--finetuned-on-the-fly", "--methods", "tsv_m", "--keep-outputs", "--resume",
                           "--json", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert row["resumed_tensors"] == 3 and len(row["parts"]) == 2 and row["parts"][0][1:] == [4.5, 3]
    assert row["total_s_all_parts"] == pytest.approx(4.5 + row["wall_s"])
    assert len(row["writes"]) == len(list(base)) - 3 and "(measured, 2 parts summed)" in proc.stdout
    merged, want = ShardedReader(root / "out-tsv_m"), ShardedReader(once)
    assert all(torch.equal(merged[k], want[k]) for k in base)
