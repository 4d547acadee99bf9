"""An interrupted streamed merge resumes where it stopped and writes what an uninterrupted run writes.

``write_merged(resume=True)`` builds the output in ``.<name>.partial`` with a journal of the tensors
on disk; the same call again hands a key-local method only the keys not yet written.
"""
import json
from collections.abc import Mapping

import pytest
import torch

from taskmerge.io import sharded
from taskmerge.io.merge_writer import partial_folder, write_merged
from taskmerge.io.sharded import JOURNAL, MANIFEST, ShardedReader, ShardedWriter, specs_of
from taskmerge.merge_files import merge_files
from taskmerge.merging import METHODS, get_method
from tests.merging.test_streamed_equals_memory import method_inputs, write

RESUMABLE = sorted(n for n, m in METHODS.items() if m.key_local and m.output == "model")


class Stop(Exception):
    pass


def stop_after(n):
    seen = []

    def on_write(key):
        seen.append(key)
        if len(seen) == n:
            raise Stop(key)
    return on_write


class Counting(Mapping):
    """A lazily read model (the same files, so the same fingerprint) that records which keys are read."""

    def __init__(self, reader):
        self.reader, self.files, self.read = reader, reader.files, []

    def __getitem__(self, key):
        self.read.append(key)
        return self.reader[key]

    def rows(self, key, start, stop):
        self.read.append(key)
        return self.reader.rows(key, start, stop)

    def shape(self, key):
        return self.reader.shape(key)

    def dtype(self, key):
        return self.reader.dtype(key)

    def __iter__(self):
        return iter(self.reader)

    def __len__(self):
        return len(self.reader)


def files_of(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("name", RESUMABLE)
def test_interrupted_then_resumed_equals_one_run(tmp_path, name):
    method = get_method(name)
    base, fts, context = method_inputs(method, torch.float32)
    lazy_base = write(base, tmp_path / "base")
    lazy_fts = [write(ft, tmp_path / f"ft{i}") for i, ft in enumerate(fts)]
    kw = dict(context=context, chunk_numel=16, max_shard_bytes=400, progress=False)
    once = write_merged(method, lazy_base, lazy_fts, tmp_path / "once", **kw)[0]

    out = tmp_path / "out"
    with pytest.raises(Stop) as stopped:
        write_merged(method, lazy_base, lazy_fts, out, on_write=stop_after(3), resume=True, **kw)
    assert not out.exists() and partial_folder(out).is_dir()
    (tmp_path / ".out.scratch").mkdir()  # as a killed run leaves it (no cleanup ran)
    (tmp_path / ".out.scratch" / "0.f32").write_bytes(b"stale")
    journaled = (partial_folder(out) / JOURNAL).read_text().split()
    assert len(journaled) == 3 and journaled[-1] == str(stopped.value)

    counted = [Counting(ft) for ft in lazy_fts]
    write_merged(method, lazy_base, counted, out, resume=True, **kw)
    assert not set(journaled) & {k for c in counted for k in c.read}  # the finished keys are not recomputed
    assert files_of(out) == files_of(once)  # the same shards and index, byte for byte
    assert not partial_folder(out).exists() and not (tmp_path / ".out.scratch").exists()
    want = method(base, fts, **context)
    got = ShardedReader(out)
    assert all(torch.equal(got[k], want[k]) for k in base)


def test_a_killed_writer_resumes_from_its_journal(tmp_path, monkeypatch):
    """No cleanup ran (SIGKILL): what was fsynced and journaled is kept, the rest is rewritten."""
    monkeypatch.setattr(sharded, "SYNC_SECONDS", 0.0)
    g = torch.Generator().manual_seed(0)
    state = {f"t{i}": torch.randn(5, 3, generator=g) for i in range(6)}
    part = tmp_path / ".out.partial"
    w = ShardedWriter(tmp_path / "out", specs_of(state), max_shard_bytes=100, partial=part)
    for k in ["t0", "t3", "t5"]:
        w.write(k, state[k])
    w.write_rows("t1", 0, state["t1"][:2])  # half a tensor: not journaled
    del w
    with open(part / JOURNAL, "a") as journal:  # a kill while journaling t2 (a prefix of no other key here)
        journal.write("t2")
    again = ShardedWriter(tmp_path / "out", specs_of(state), max_shard_bytes=100, partial=part)
    assert again.resumed == {"t0", "t3", "t5"}
    assert (part / JOURNAL).read_text() == "t0\nt3\nt5\n"
    with pytest.raises(ValueError, match="already written"):
        again.write("t0", state["t0"])
    for k in again.pending():
        again.write(k, state[k])
    again.close()
    with ShardedWriter(tmp_path / "plain", specs_of(state), max_shard_bytes=100) as plain:
        for k, v in state.items():
            plain.write(k, v)
    assert files_of(tmp_path / "out") == files_of(tmp_path / "plain")
    assert not part.exists() and not {MANIFEST, JOURNAL} & set(files_of(tmp_path / "out"))


def test_a_partial_merge_is_resumed_only_with_the_same_settings(tmp_path):
    method = get_method("task_arithmetic")
    base, fts, context = method_inputs(method, torch.float32)
    out = tmp_path / "out"
    with pytest.raises(Stop):
        write_merged(method, base, fts, out, hparams={"scaling": 0.5}, on_write=stop_after(2), resume=True,
                     progress=False)
    with pytest.raises(ValueError, match="partial merge with a different fingerprint"):
        write_merged(method, base, fts, out, hparams={"scaling": 0.4}, resume=True, progress=False)
    assert json.loads((partial_folder(out) / MANIFEST).read_text())["fingerprint"]["method"] == "task_arithmetic"
    write_merged(method, base, fts, out, hparams={"scaling": 0.5}, resume=True, progress=False)
    want = method(base, fts, {"scaling": 0.5})
    assert all(torch.equal(ShardedReader(out)[k], want[k]) for k in base)


@pytest.mark.parametrize("name,hparams,why", [("ties", {}, "cannot resume"), ("opcm", {}, "cannot resume"),
                                              ("tsv_c", {}, "one model per task"),
                                              ("wudi", {"qkv": "stacked"}, "cannot resume .* with qkv=stacked")])
def test_methods_that_cannot_resume_say_so(tmp_path, name, hparams, why):
    method = get_method(name)
    base, fts, context = method_inputs(method, torch.float32)
    with pytest.raises(ValueError, match=why):
        write_merged(method, base, fts, tmp_path / "out", hparams=hparams, context=context, resume=True,
                     progress=False)
    assert not partial_folder(tmp_path / "out").exists()


def test_cli_merge_with_resume_on_a_fresh_output_is_an_ordinary_merge(tmp_path):
    method = get_method("tsv_m")
    base, fts, _ = method_inputs(method, torch.float32)
    write(base, tmp_path / "base")
    for i, ft in enumerate(fts):
        write(ft, tmp_path / f"ft{i}")
    inputs = (tmp_path / "base", [tmp_path / f"ft{i}" for i in range(3)])
    merge_files("tsv_m", *inputs, tmp_path / "a", progress=False, resume=True)
    merge_files("tsv_m", *inputs, tmp_path / "b", progress=False)
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")
    assert not partial_folder(tmp_path / "a").exists()
    with pytest.raises(ValueError, match="cannot resume"):
        merge_files("ties", *inputs, tmp_path / "c", progress=False, resume=True)
