"""DELLA over row chunks (chunk_numel, as ``taskmerge merge`` streams it) equals whole keys; its masks are the
whole-key draws, so the chunked merge keeps DARE's official RNG order."""
import pytest
import torch

from taskmerge.io.merge_writer import write_merged
from taskmerge.io.sharded import ShardedReader
from taskmerge.merging import get_method
from test_ties_chunked import CHUNK, make_models

HPARAMS = [{"rescale": "inverse_prob"}, {"rescale": "none", "elect": False},
           {"rescale": "l1", "density": 0.5, "epsilon": 0.1}, {"density": 0.4, "epsilon": 0.0, "normalize": False},
           {"density": 1.0}]


@pytest.mark.parametrize("cache_bytes", [None, "0"])  # masks drawn once and kept, or regenerated per key
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hp", HPARAMS)
def test_row_chunks_equal_whole_keys(monkeypatch, hp, dtype, cache_bytes):
    if cache_bytes is not None:
        monkeypatch.setenv("TASKMERGE_STREAM_CACHE_BYTES", cache_bytes)
    pre, fts = make_models(dtype)
    della = get_method("della")
    got, want = della(pre, fts, {**hp, "seed": 3}, chunk_numel=CHUNK), della(pre, fts, {**hp, "seed": 3})
    assert list(got) == list(want)
    for key in want:
        if hp.get("rescale") == "l1":  # the norms are summed chunk by chunk
            torch.testing.assert_close(got[key], want[key], rtol=2e-7, atol=0)
        else:
            assert torch.equal(got[key], want[key]), key
    assert not torch.equal(want["emb"], pre["emb"])


def test_streamed_writer_with_small_chunks_equals_in_memory(tmp_path):
    pre, fts = make_models(torch.bfloat16)
    della = get_method("della")
    hp = {"density": 0.6, "epsilon": 0.2, "seed": 9}
    written = write_merged(della, pre, fts, tmp_path / "out", hparams=hp, chunk_numel=CHUNK, progress=False)
    got, want = ShardedReader(written[0]), della(pre, fts, hp)
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hp", HPARAMS)
def test_blocks_of_rows_equal_whole_tensors(monkeypatch, hp, dtype):
    # MagPrune walks a block of whole rows at a time and the fuse a block of entries: with blocks of 7
    # entries (one row at a time for the 2-D keys, several blocks for the 1-D ones) nothing changes
    from taskmerge.merging import della as della_module
    pre, fts = make_models(dtype)
    della = get_method("della")
    want = della(pre, fts, {**hp, "seed": 4})
    monkeypatch.setattr(della_module, "BLOCK", 7)
    for chunk in (None, CHUNK):
        got = della(pre, fts, {**hp, "seed": 4}, chunk_numel=chunk)
        for key in want:
            if hp.get("rescale") == "l1":  # the norms are summed block by block
                torch.testing.assert_close(got[key], want[key], rtol=2e-7, atol=0)
            else:
                assert torch.equal(got[key], want[key]), key
