"""``inputs.all_finite``: one aminmax instead of an isfinite mask, for the input check and the writer."""
import pytest
import torch

from taskmerge.io.merge_writer import write_merged
from taskmerge.merging import get_method
from taskmerge.merging.inputs import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_non_finite_entry_anywhere_is_found(dtype, bad):
    x = torch.randn(600_000, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert all_finite(x) and all_finite(x.view(600, 1000).t())
    for pos in (0, 1, 299_999, 599_999):  # the ends of the parallel reduction's ranges included
        y = x.clone()
        y[pos] = bad
        assert not all_finite(y) and not all_finite(y.view(600, 1000).t()), pos


def test_empty_and_integer_tensors_are_finite():
    assert all_finite(torch.empty(0, 3)) and all_finite(torch.tensor(2.0)) and all_finite(torch.arange(5))
    assert not all_finite(torch.tensor(float("nan")))


def test_the_writer_refuses_a_non_finite_merge(tmp_path):
    pre = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}
    fts = [{"w": torch.full((4, 3), 3e38), "b": torch.ones(3)} for _ in range(2)]  # λ·Σ τ overflows to inf
    with pytest.raises(ValueError, match="merged tensor w contains NaN or Inf"):
        write_merged(get_method("task_arithmetic"), pre, fts, tmp_path / "out", hparams={"scaling": 1.0},
                     progress=False)
