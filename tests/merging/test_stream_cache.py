"""cached_stream: small task streams are replayed from memory, large ones recomputed; same results."""
import pytest
import torch

from taskmerge.merging import merge
from taskmerge.merging.inputs import task_stream
from taskmerge.merging.primitives import cached_stream


def counting_stream(n_keys=3):
    calls = []

    def stream():
        calls.append(1)
        for i in range(n_keys):
            yield f"k{i}", [torch.full((2,), float(i)), torch.full((2,), -float(i))]
    return stream, calls


def test_small_stream_is_computed_once_then_replayed():
    stream, calls = counting_stream()
    cached = cached_stream(stream, nbytes=48)
    first, second = list(cached()), list(cached())
    assert len(calls) == 1
    assert [k for k, _ in first] == [k for k, _ in second] == ["k0", "k1", "k2"]
    for (_, a), (_, b) in zip(first, second):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_stream_over_budget_is_recomputed(monkeypatch):
    monkeypatch.setenv("TASKMERGE_STREAM_CACHE_BYTES", "47")
    stream, calls = counting_stream()
    cached = cached_stream(stream, nbytes=48)
    list(cached()), list(cached())
    assert len(calls) == 2


def test_interrupted_first_pass_starts_over():
    stream, calls = counting_stream()
    cached = cached_stream(stream, nbytes=48)
    it = iter(cached())
    next(it)  # a consumer that stops after one key
    assert [k for k, _ in cached()] == ["k0", "k1", "k2"]
    assert [k for k, _ in cached()] == ["k0", "k1", "k2"] and len(calls) == 2


def test_task_stream_budget_counts_every_task_in_float32(monkeypatch):
    pre = {"w": torch.zeros(10, dtype=torch.float16), "ids": torch.arange(4)}
    fts = [{"w": torch.ones(10, dtype=torch.float16), "ids": torch.arange(4)} for _ in range(3)]
    monkeypatch.setenv("TASKMERGE_STREAM_CACHE_BYTES", str(4 * 3 * 10))
    s = task_stream(pre, fts)
    assert [k for k, _ in s()] == ["w"]  # integer buffers are not in the stream
    assert next(iter(s()))[1][0] is next(iter(s()))[1][0]  # replayed: the same tensor object
    monkeypatch.setenv("TASKMERGE_STREAM_CACHE_BYTES", str(4 * 3 * 10 - 1))
    s = task_stream(pre, fts)
    list(s())
    assert next(iter(s()))[1][0] is not next(iter(s()))[1][0]


@pytest.mark.parametrize("method,hp", [
    ("ties", {"k": 20, "scaling": 1.0}),
    ("dare", {"drop_rate": 0.3, "seed": 5, "base": "ties", "k": 50}),
    ("dare", {"drop_rate": 0.3, "seed": 5, "base": "task_arithmetic"}),
    ("tall_mask", {"mask_lambda": 0.4, "use_ties": True}),
    ("continual_ties", {"k": 20, "scaling": 0.3}),
])
def test_cache_changes_no_bit(monkeypatch, method, hp):
    g = torch.Generator().manual_seed(0)
    pre = {"a": torch.randn(30, 20, generator=g), "b": torch.randn(40, generator=g), "n": torch.tensor(3)}
    fts = [{k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in pre.items()}
           for _ in range(4)]
    cached = merge(method, pre, fts, hp)
    monkeypatch.setenv("TASKMERGE_STREAM_CACHE_BYTES", "0")
    fresh = merge(method, pre, fts, hp)
    if isinstance(cached, dict):
        cached, fresh = [cached], [fresh]
    for c, f in zip(cached, fresh):
        assert all(torch.equal(c[k], f[k]) for k in pre)
