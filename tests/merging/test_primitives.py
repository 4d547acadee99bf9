"""Shared merging primitives: exact streamed top-k, sign election, disjoint merge, DARE RNG order."""
import pytest
import torch

from taskmerge.merging.inputs import task_stream
from taskmerge.merging.primitives import (dare_rng_states, dare_mask, dare_stream, disjoint_merge, elect_sign,
                                          fill_zero_signs, global_topk_thresholds, kth_index, majority_sign,
                                          streamed_kthvalue_abs, trim, trim_tasks)


def _stream(chunks_per_task):
    """Task stream over keys k0, k1, … from per-task lists of tensors."""
    keys = [f"k{i}" for i in range(len(chunks_per_task[0]))]
    return lambda: ((key, [task[i] for task in chunks_per_task]) for i, key in enumerate(keys))


def _official_threshold(flat: torch.Tensor, k: float):
    """tall_masks/TIES topk_values_mask on one row: kthvalue(d − int(d·K)), K = k/100."""
    d = flat.numel()
    kk = d - int(d * (k / 100))
    return None if k == 100 or kk == 0 else flat.abs().kthvalue(kk).values


@pytest.mark.parametrize("k", [0.001, 1, 5, 20, 33.3, 50, 99.99, 100])
@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "tiny"])
def test_streamed_threshold_equals_kthvalue_on_concatenation(k, kind):
    gen = torch.Generator().manual_seed(int(k * 100) + len(kind))
    shapes = [(7, 5), (13,), (3, 4, 2), (1,), (64, 9)]
    tasks = []
    for _ in range(3):
        chunks = [torch.randn(s, generator=gen) for s in shapes]
        if kind == "ties":  # few distinct magnitudes with both signs: many ties at any threshold
            chunks = [torch.randint(-3, 4, s, generator=gen).float() * 0.25 for s in shapes]
        elif kind == "zeros":  # mostly exact zeros and -0.0
            chunks = [c * (torch.rand(c.shape, generator=gen) < 0.1) * -1 for c in chunks]
        elif kind == "tiny":  # subnormals and huge values share buckets rarely
            chunks = [c * 10.0 ** torch.randint(-44, 30, c.shape, generator=gen).float() for c in chunks]
        tasks.append(chunks)
    got = global_topk_thresholds(_stream(tasks), k)
    for t, chunks in enumerate(tasks):
        ref = _official_threshold(torch.cat([c.flatten() for c in chunks]), k)
        if ref is None:
            assert got[t] is None
        else:
            assert got[t].dtype == torch.float32 and got[t].item() == ref.item()
            flat = torch.cat([c.flatten() for c in chunks])
            assert torch.equal(trim(flat, got[t]), flat * (flat.abs() >= ref))


def test_streamed_kthvalue_every_rank():
    x = [torch.tensor([3.0, -1.0, 2.0, 2.0]), torch.tensor([0.0, -2.0, 5.0])]
    flat = torch.cat(x).abs()
    for rank in range(1, 8):
        got = streamed_kthvalue_abs(_stream([x]), [rank])[0]
        assert got.item() == flat.kthvalue(rank).values.item()


def test_kth_index_edges():
    assert kth_index(10, 100) == 0            # short-circuit: no trim
    assert kth_index(10, 20) == 8             # keep the top 2
    assert kth_index(10, 5) == 10             # d·K rounds to 0: only the max survives
    with pytest.raises(ValueError):
        kth_index(10, 0)
    with pytest.raises(ValueError):
        kth_index(10, 101)


def test_only_max_survives_and_ties_kept():
    x = torch.tensor([1.0, -4.0, 4.0, 2.0, 0.5])
    thr = global_topk_thresholds(_stream([[x]]), 10)[0]  # int(5·0.1) = 0 → rank 5 → the max
    assert torch.equal(trim(x, thr), torch.tensor([0.0, -4.0, 4.0, 0.0, 0.0]))  # both ±4 tie


def test_per_tensor_scope_differs_from_global():
    a, b = torch.tensor([10.0, 9.0, 8.0, 7.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])
    thr = global_topk_thresholds(_stream([[a, b]]), 50)
    assert trim_tasks([a], 50, [thr[0]]).tolist() == [[10.0, 9.0, 8.0, 7.0]]
    assert trim_tasks([b], 50, [thr[0]]).tolist() == [[0.0, 0.0, 0.0, 4.0]]  # thr = 4 over a ∪ b
    # per tensor: rank 4 − int(4·0.5) = 2 → thr = 2; kthvalue + ">=" keeps int(d·K) + 1 values
    assert trim_tasks([b], 50).tolist() == [[0.0, 2.0, 3.0, 4.0]]


def test_sign_election_and_majority_by_hand():
    # key0: task sums = [+1, 0, -3]; key1: [+2, +1] → elected signs +1, 0, -1, +1, +1 → majority +1
    k0 = [torch.tensor([2.0, 1.0, -1.0]), torch.tensor([-1.0, -1.0, -2.0])]
    k1 = [torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])]
    trimmed = lambda: iter([("a", torch.stack(k0)), ("b", torch.stack(k1))])  # noqa: E731
    assert majority_sign(trimmed) == 1.0
    sign = fill_zero_signs(elect_sign(torch.stack(k0)), 1.0)
    assert sign.tolist() == [1.0, 1.0, -1.0]
    stack = torch.stack(k0)
    assert disjoint_merge(stack, sign, "mean").tolist() == [2.0, 1.0, -1.5]
    assert disjoint_merge(stack, sign, "sum").tolist() == [2.0, 1.0, -3.0]
    assert disjoint_merge(stack, sign, "max").tolist() == [2.0, 1.0, -2.0]
    assert disjoint_merge(stack, sign, "max", max_keeps_sign=False).tolist() == [2.0, 1.0, 2.0]
    assert disjoint_merge(stack, None, "mean").tolist() == [0.5, 0.0, -1.5]
    with pytest.raises(ValueError):
        disjoint_merge(stack, sign, "median")


def test_zero_majority_keeps_negatives_as_official():
    stack = torch.tensor([[1.0], [-1.0]])
    sign = fill_zero_signs(elect_sign(stack), 0.0)
    assert disjoint_merge(stack, sign, "sum").tolist() == [-1.0]


def test_dare_rng_matches_official_global_call_order():
    shapes = {"b": torch.Size([3, 4]), "a": torch.Size([5]), "c": torch.Size([2, 2])}
    p, seed = 0.3, 424
    torch.manual_seed(seed)  # official: global RNG, task-major, keys sorted
    official = [{key: torch.randint(2, tuple(shapes[key])).bernoulli(1 - p) for key in sorted(shapes)}
                for _ in range(2)]
    before = torch.get_rng_state()
    states = dare_rng_states(shapes, 2, p, seed)
    assert torch.equal(before, torch.get_rng_state())  # private generator: global RNG untouched
    for t in (1, 0):  # any replay order
        for key in ("c", "a", "b"):
            assert torch.equal(dare_mask(shapes[key], p, states[t][key]), official[t][key])


def test_dare_stream_rescales_and_is_deterministic():
    pre = {"w": torch.zeros(50, 40), "v": torch.zeros(30)}
    fts = [{"w": torch.ones(50, 40), "v": torch.ones(30)} for _ in range(2)]
    stream = dare_stream(task_stream(pre, fts), 0.25, 7)
    first, second = list(stream()), list(stream())
    for (key, taus), (_, again) in zip(first, second):
        for tau, tau2 in zip(taus, again):
            assert torch.equal(tau, tau2)
            assert set(tau.unique().tolist()) == {0.0, torch.tensor(1 / 0.75).item()}
    assert not torch.equal(first[0][1][0], first[0][1][1])  # tasks get different masks
    with pytest.raises(ValueError):
        dare_stream(task_stream(pre, fts), 1.0, 0)


def test_global_thresholds_take_two_passes_and_count_values_in_the_first():
    from taskmerge.merging.primitives import global_topk_thresholds, kthvalue_abs

    g = torch.Generator().manual_seed(6)
    keys = {"a": torch.randn(3, 50, 7, generator=g), "b": torch.randn(3, 11, generator=g)}  # 3 tasks
    reads = []

    def stream():
        for key, stack in keys.items():
            reads.append(key)
            yield key, list(stack)
    for k in (20.0, 1.0):
        reads.clear()
        got = global_topk_thresholds(stream, k)
        assert reads == ["a", "b"] * 2  # no pass only to count the values
        flat = torch.cat([s.reshape(3, -1) for s in keys.values()], 1)
        rank = kth_index(flat.shape[1], k)
        assert [float(x) for x in got] == [float(kthvalue_abs(flat[t], rank)) for t in range(3)]
    reads.clear()
    assert global_topk_thresholds(stream, 100.0) == [None] * 3 and reads == ["a"]
