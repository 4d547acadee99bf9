"""Every registered method takes a ``device`` for its arithmetic and hands results back on the inputs' device.

On every machine: ``device="cpu"`` given explicitly equals the default, bit for bit. With a GPU (never in CI;
skipped cleanly without one): ``device="cuda"`` on CPU inputs returns CPU tensors of the input dtype, equal
to the CPU result within float32 reduction-order error (seeded random masks are drawn on the device, so DARE,
DELLA and their compositions are checked for placement, dtype and finiteness only).
"""
import pytest
import torch

from taskmerge.merging import get_method
from test_streamed_equals_memory import CASES, method_inputs

IDS = [f"{n}-{'-'.join(map(str, h.values()))}" for n, h in CASES]
RANDOM = {"dare", "della"}


def _models(out):
    return out if isinstance(out, list) else [out]


def _random(name, hp):
    return name in RANDOM or any(v in RANDOM or "dare" in str(v) for v in hp.values())


@pytest.mark.parametrize("name,hp", CASES, ids=IDS)
def test_explicit_cpu_device_equals_the_default(name, hp):
    method = get_method(name)
    base, fts, context = method_inputs(method, torch.float32)
    default = _models(method(base, fts, hp, **context))
    explicit = _models(method(base, fts, hp, **context, device=torch.device("cpu")))
    for a, b in zip(default, explicit):
        for k in base:
            assert b[k].device.type == "cpu" and b[k].dtype == a[k].dtype and torch.equal(a[k], b[k]), (name, k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("name,hp", CASES, ids=IDS)
def test_cuda_device_returns_cpu_results_equal_to_the_cpu_run(name, hp):
    method = get_method(name)
    base, fts, context = method_inputs(method, torch.float32)
    cpu = _models(method(base, fts, hp, **context))
    gpu = _models(method(base, fts, hp, **context, device="cuda"))
    assert len(gpu) == len(cpu)
    for a, b in zip(cpu, gpu):
        for k in base:
            assert b[k].device.type == "cpu" and b[k].dtype == a[k].dtype, (name, k)
            if _random(name, hp):
                assert torch.isfinite(b[k].float()).all(), (name, k)
            else:
                torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=f"{name} {k}")
