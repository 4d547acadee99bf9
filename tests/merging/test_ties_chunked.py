"""TIES per-tensor trim over row chunks (chunk_numel) equals the whole-tensor trim bit for bit."""
import pytest
import torch

from taskmerge.io.merge_writer import write_merged
from taskmerge.io.sharded import ShardedReader
from taskmerge.merging import get_method
from taskmerge.merging.inputs import task_stream
from taskmerge.merging.primitives import kth_index, kthvalue_abs
from taskmerge.merging.ties import chunked_thresholds, ties_stream

CHUNK = 20
# with CHUNK = 20: "emb" 7 chunks of 2 rows and a last one of 1; "ties.w" 5 + 4 rows, with ties at every
# threshold; "conv" one row (15 entries) per chunk; "wide" has one row and "b" fits: both stay whole
SHAPES = {"emb": (13, 7), "ties.w": (9, 4), "conv": (4, 3, 5), "wide": (1, 50), "b": (6,)}


def make_models(dtype, num_tasks=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=gen).to(dtype) for k, s in SHAPES.items()}
    pre["ties.w"] = torch.zeros(SHAPES["ties.w"], dtype=dtype)  # τ = the quarters below, exact in bf16
    pre["position_ids"] = torch.arange(4)
    fts = []
    for _ in range(num_tasks):
        delta = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
        delta["ties.w"] = torch.randint(-4, 5, SHAPES["ties.w"], generator=gen) / 4  # few magnitudes: ties
        fts.append({**{k: (pre[k].float() + delta[k]).to(dtype) for k in SHAPES}, "position_ids": torch.arange(4)})
    return pre, fts


def assert_equal(got, want):
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key


def test_the_tie_tensor_has_ties_at_its_thresholds():
    pre, fts = make_models(torch.float32)
    for ft in fts:
        tau = (ft["ties.w"] - pre["ties.w"]).abs().flatten()
        for exact in (False, True):
            thr = kthvalue_abs(tau, kth_index(tau.numel(), 20, exact))
            assert int((tau == thr).sum()) > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("trim_count", ["official", "exact"])
@pytest.mark.parametrize("k", [1.0, 20.0, 100.0])
def test_chunked_thresholds_are_the_whole_tensor_kthvalue(dtype, trim_count, k):
    pre, fts = make_models(dtype)
    exact = trim_count == "exact"
    got = chunked_thresholds(pre, fts, k, exact, chunk_numel=CHUNK)
    assert set(got) == {"emb", "ties.w", "conv"}
    for key, thresholds in got.items():
        for ft, thr in zip(fts, thresholds):
            tau = ft[key].float() - pre[key].float()
            want = kthvalue_abs(tau, kth_index(tau.numel(), k, exact))
            assert (thr is None) == (want is None)
            if want is not None:  # same float32 bits (k=1, exact: +inf, nothing kept)
                assert thr.dtype == torch.float32 and torch.equal(thr, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("merge", ["mean", "sum", "max"])
@pytest.mark.parametrize("trim_count", ["official", "exact"])
@pytest.mark.parametrize("k", [1.0, 20.0, 100.0])
def test_per_tensor_in_row_chunks_equals_whole_tensors(dtype, merge, trim_count, k):
    pre, fts = make_models(dtype)
    ties = get_method("ties")
    hp = {"trim_scope": "per_tensor", "k": k, "merge": merge, "trim_count": trim_count, "scaling": 0.7}
    assert_equal(ties(pre, fts, hp, chunk_numel=CHUNK), ties(pre, fts, hp))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("trim_count", ["official", "exact"])
def test_streamed_writer_with_small_chunks_equals_in_memory(tmp_path, dtype, trim_count):
    pre, fts = make_models(dtype)
    ties = get_method("ties")
    hp = {"trim_scope": "per_tensor", "k": 20.0, "trim_count": trim_count}
    written = write_merged(ties, pre, fts, tmp_path / "out", hparams=hp, chunk_numel=CHUNK, progress=False)
    assert len(written) == 1
    got = ShardedReader(written[0])
    assert_equal({k: got[k] for k in got}, ties(pre, fts, hp))


def test_row_chunks_without_their_thresholds_raise():
    pre, fts = make_models(torch.float32)
    stream = task_stream(pre, fts, chunk_numel=CHUNK)
    with pytest.raises(ValueError, match="emb"):
        list(ties_stream(stream, k=20, merge="mean", trim_scope="per_tensor"))
