"""The stream values' consumer arithmetic: ``resolve`` and ``Update.owned``."""
import torch

from taskmerge.merging import merge
from taskmerge.merging.inputs import task_stack, task_vector_sum, task_vectors
from taskmerge.merging.outputs import Update, resolve


def test_owned_update_is_resolved_in_its_own_storage_and_others_are_left_alone():
    base = torch.randn(6, 5)
    for owned in (False, True):
        delta = torch.randn(6, 5)
        kept = delta.clone()
        out = resolve(base, Update(delta, 0.3, owned=owned))
        want = torch.mul(kept, 0.3)
        want.add_(base)
        assert torch.equal(out, want)  # the same bits either way
        assert (out.data_ptr() == delta.data_ptr()) is owned
        if not owned:
            assert torch.equal(delta, kept)  # a cached or carried Δ must survive its resolution


def test_owned_bf16_result_is_rounded_once():
    base = torch.randn(40).to(torch.bfloat16)
    delta = torch.randn(40)
    want = resolve(base, Update(delta.clone(), -0.7))
    assert torch.equal(resolve(base, Update(delta, -0.7, owned=True)), want)
    assert want.dtype == torch.bfloat16


def test_sums_and_stacks_equal_the_plain_stack_in_every_dtype():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        pre = {"w": torch.randn(700, 530, generator=g).to(dtype)}  # > one block of task_vector_sum
        fts = [{"w": (pre["w"].double() + 0.01 * torch.randn(700, 530, generator=g, dtype=torch.float64)).to(dtype)}
               for _ in range(4)]
        taus = task_vectors("w", pre, fts)
        assert torch.equal(task_vector_sum("w", pre, fts), torch.stack(taus).sum(0))
        assert torch.equal(task_stack("w", pre, fts), torch.stack(taus))


def test_in_memory_merges_leave_their_inputs_untouched():
    pre = {"w": torch.randn(8, 3), "b": torch.randn(3)}
    fts = [{k: v + 0.1 * torch.randn_like(v) for k, v in pre.items()} for _ in range(3)]
    copies = [{k: v.clone() for k, v in sd.items()} for sd in (pre, *fts)]
    for name in ("task_arithmetic", "average", "model_stock"):
        merge(name, pre, fts)
        for sd, copy in zip((pre, *fts), copies):
            assert all(torch.equal(sd[k], copy[k]) for k in sd)


def test_task_stack_writes_into_a_large_enough_buffer_only():
    g = torch.Generator().manual_seed(5)
    pre = {"w": torch.randn(4, 6, generator=g)}
    fts = [{"w": pre["w"] + torch.randn(4, 6, generator=g)} for _ in range(3)]
    want = torch.stack(task_vectors("w", pre, fts))
    big = torch.full((100,), float("nan"))
    got = task_stack("w", pre, fts, buffer=[big])
    assert torch.equal(got, want) and got.data_ptr() == big.data_ptr()
    small = torch.empty(71)  # 3 × 24 = 72 needed: a new tensor, the buffer untouched
    got = task_stack("w", pre, fts, buffer=[small])
    assert torch.equal(got, want) and got.untyped_storage().data_ptr() != small.untyped_storage().data_ptr()
