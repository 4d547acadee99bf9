"""Sharded safetensors streaming: bit-identical round trip, and streamed merges equal the in-memory methods."""
import json

import pytest
import torch
from safetensors.torch import load_file

from taskmerge.io.sharded import ShardedReader, ShardedWriter, copy_checkpoint, specs_of
from taskmerge.io.merge_writer import write_merged
from taskmerge.merging import get_method, merge
from taskmerge.merging.lora import LoraFactors

transformers = pytest.importorskip("transformers")


def tiny_llama_state(seed):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    torch.manual_seed(seed)
    model = transformers.LlamaForSequenceClassification(cfg).to(torch.bfloat16)
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def finetuned_like(base, seed, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    return {k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}


def write(state, folder, shard_bytes=6000):
    with ShardedWriter(folder, specs_of(state), max_shard_bytes=shard_bytes) as w:
        for k in reversed(list(state)):  # any order
            w.write(k, state[k])
    return folder


def test_sharded_round_trip_is_bit_identical(tmp_path):
    model, state = tiny_llama_state(0)
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    reader = ShardedReader(tmp_path / "hf")
    assert set(reader) == set(state)
    copy_checkpoint(tmp_path / "hf", tmp_path / "a", max_shard_bytes=9000)
    copy_checkpoint(tmp_path / "a", tmp_path / "b", max_shard_bytes=9000)
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    for key, t in state.items():  # same bytes for every tensor, read by safetensors itself
        got = load_file(tmp_path / "a" / index["weight_map"][key])[key]
        assert got.dtype == t.dtype and torch.equal(got.view(torch.uint8), t.contiguous().view(torch.uint8)), key
    for name in shards:  # a second round trip reproduces the files byte for byte
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    (tmp_path / "a" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    reloaded = transformers.LlamaForSequenceClassification.from_pretrained(tmp_path / "a", dtype=torch.bfloat16)
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, state[k])


def test_writer_refuses_incomplete_or_wrong_tensors(tmp_path):
    state = {"a": torch.ones(4, 3), "b": torch.zeros(2, dtype=torch.bfloat16)}
    w = ShardedWriter(tmp_path / "out", specs_of(state))
    with pytest.raises(ValueError, match="planned"):
        w.write("a", torch.ones(3, 4))
    w.write_rows("a", 0, torch.ones(2, 3))
    with pytest.raises(ValueError, match="never written"):
        w.close()
    assert not (tmp_path / "out").exists()


def _dense(folder):
    r = ShardedReader(folder)
    return {k: r[k] for k in r}


@pytest.mark.parametrize("method,hp", [
    ("task_arithmetic", {"scaling": 0.4}),
    ("average", {}),
    ("ties", {"k": 20, "scaling": 0.9}),
    ("dare", {"drop_rate": 0.3}),
    ("tsv_m", {"scaling": 0.7}),
    ("opcm", {"alpha": 0.5}),
])
def test_streamed_merge_equals_in_memory(tmp_path, method, hp):
    _, base = tiny_llama_state(0)
    fts = [finetuned_like(base, s) for s in (1, 2, 3)]
    write(base, tmp_path / "base")
    for i, ft in enumerate(fts):
        write(ft, tmp_path / f"ft{i}")
    # chunk_numel=100 splits the embedding and the MLP weights into row chunks
    write_merged(get_method(method), ShardedReader(tmp_path / "base"),
                 [ShardedReader(tmp_path / f"ft{i}") for i in range(3)], tmp_path / "out",
                 hparams=hp, chunk_numel=100, max_shard_bytes=5000, progress=False)
    got = _dense(tmp_path / "out")
    want = merge(method, base, fts, hp)
    assert list(got) == list(base)
    for k in base:
        assert got[k].dtype == want[k].dtype
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("method,hp", [("knots", {"k": 30, "scaling": 0.6}), ("lora_merge", {"inner": "ties"})])
def test_streamed_lora_merge_equals_in_memory(tmp_path, method, hp):
    _, base = tiny_llama_state(0)
    write(base, tmp_path / "base")
    g = torch.Generator().manual_seed(5)
    adapters = []
    for _ in range(3):
        ad = {}
        for k, v in base.items():
            if k.endswith(("q_proj.weight", "v_proj.weight")):
                ad[k[:-7]] = LoraFactors(torch.randn(4, v.shape[1], generator=g), torch.randn(v.shape[0], 4, generator=g),
                                         1.0)
        adapters.append(ad)
    write_merged(get_method(method), ShardedReader(tmp_path / "base"), adapters, tmp_path / "out", hparams=hp,
                 context={"lora": adapters}, progress=False)
    got = _dense(tmp_path / "out")
    want = merge(method, base, adapters, hp)
    for k in base:
        assert torch.equal(got[k], want[k]), k
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
