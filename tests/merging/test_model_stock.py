"""Model Stock (Jang et al., ECCV 2024; mergekit's model_stock.py): invariants and hand-computed examples."""
import math

import pytest
import torch

from taskmerge.merging import merge
from taskmerge.merging.model_stock import stock_ratio


def test_identical_models_are_returned():
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(6, generator=g), "frozen": torch.randn(3, generator=g),
           "position_ids": torch.arange(4)}
    ft = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone() for k, v in pre.items()}
    ft["frozen"] = pre["frozen"].clone()  # a tensor no task changed: τ = 0 → t = 0 → θ0
    for average in ("cosine", "angle"):
        for filter_wise in (False, True):
            out = merge("model_stock", pre, [ft, {k: v.clone() for k, v in ft.items()}, ft],
                        {"average": average, "filter_wise": filter_wise})
            for k in pre:  # cos θ = 1 → t = K/K = 1 (up to the rounding of ⟨τ, τ⟩ / ‖τ‖²)
                torch.testing.assert_close(out[k], ft[k], atol=1e-6, rtol=1e-6)
            assert torch.equal(out["frozen"], pre["frozen"])


def test_hand_computed_two_tasks():
    # τ1 = (1, 0), τ2 = (1, 1): cos θ = 1/√2, t = 2c/(c + 1) = 2/(1 + √2) = 2(√2 − 1) ≈ 0.828427;
    # τ̄ = (1, 0.5) → θ = θ0 + t·(1, 0.5).
    pre = {"w": torch.tensor([10.0, -10.0])}
    fts = [{"w": torch.tensor([11.0, -10.0])}, {"w": torch.tensor([11.0, -9.0])}]
    t = 2 * (math.sqrt(2) - 1)
    out = merge("model_stock", pre, fts)
    torch.testing.assert_close(out["w"], torch.tensor([10.0 + t, -10.0 + 0.5 * t]))


def test_hand_computed_cosine_versus_angle_average():
    # τ1 = (1, 0), τ2 = (0, 1), τ3 = (1, 1): pairwise cosines 0, 1/√2, 1/√2 (angles 90°, 45°, 45°).
    # mergekit: cos θ = √2/3 ≈ 0.471405, t = 3c/(2c + 1) ≈ 0.727922;
    # FusionBench: mean angle 60°, cos θ = 0.5, t = 1.5/2 = 0.75.  τ̄ = (2/3, 2/3).
    pre = {"w": torch.zeros(2)}
    fts = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}, {"w": torch.tensor([1.0, 1.0])}]
    c = math.sqrt(2) / 3
    t_cos = 3 * c / (2 * c + 1)
    torch.testing.assert_close(merge("model_stock", pre, fts)["w"], torch.full((2,), t_cos * 2 / 3))
    torch.testing.assert_close(merge("model_stock", pre, fts, {"average": "angle"})["w"], torch.full((2,), 0.75 * 2 / 3))


def test_sign_conflict_gives_negative_t():
    # τ1 = (1, 0.1), τ2 = (−1, 0.1): cos θ = (−1 + 0.01)/1.01 = −0.99/1.01, t = 2c/(c + 1) = −99 (not clipped);
    # τ̄ = (0, 0.1) → θ = θ0 + (0, −9.9).
    pre = {"w": torch.zeros(2)}
    fts = [{"w": torch.tensor([1.0, 0.1])}, {"w": torch.tensor([-1.0, 0.1])}]
    t = stock_ratio([f["w"] for f in fts])
    assert t < 0
    torch.testing.assert_close(t, torch.tensor(-99.0), rtol=1e-4, atol=0)
    torch.testing.assert_close(merge("model_stock", pre, fts)["w"], torch.tensor([0.0, -9.9]), rtol=1e-4, atol=1e-5)


def test_singular_denominator_keeps_the_base():
    # τ2 = −τ1: cos θ = −1, (K − 1) cos θ + 1 = 0 → no finite t; mergekit 0.1.5 keeps θ0 (t = 0) there.
    pre = {"w": torch.ones(2)}
    fts = [{"w": torch.tensor([2.0, 1.5])}, {"w": torch.tensor([0.0, 0.5])}]
    assert torch.equal(stock_ratio([f["w"] - pre["w"] for f in fts]), torch.tensor(0.0))
    assert torch.equal(merge("model_stock", pre, fts)["w"], pre["w"])


def test_filter_wise_gives_one_ratio_per_row():
    # row 0: τ1 = (1, 0), τ2 = (0, 1) → cos 0 → t = 0;  row 1: τ1 = τ2 = (2, 2) → cos 1 → t = 1.
    pre = {"w": torch.zeros(2, 2)}
    fts = [{"w": torch.tensor([[1.0, 0.0], [2.0, 2.0]])}, {"w": torch.tensor([[0.0, 1.0], [2.0, 2.0]])}]
    out = merge("model_stock", pre, fts, {"filter_wise": True})
    torch.testing.assert_close(out["w"], torch.tensor([[0.0, 0.0], [2.0, 2.0]]))
    whole = merge("model_stock", pre, fts)  # one t for the tensor: cos = 8/(√9·√9) = 8/9, t = 16/17
    torch.testing.assert_close(whole["w"], (16 / 17) * torch.tensor([[0.5, 0.5], [2.0, 2.0]]))


def test_needs_two_models():
    with pytest.raises(ValueError, match="at least 2"):
        merge("model_stock", {"w": torch.zeros(2)}, [{"w": torch.ones(2)}])


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(700, 1000), (600_001,), (40, 30, 300), ()])
def test_row_chunks_equal_the_whole_key_stack(shape, filter_wise):
    # tensors over inputs.BLOCK elements are read in row chunks: Σ τ_t per chunk, Grams summed (or per row)
    g = torch.Generator().manual_seed(4)
    pre = {"w": torch.randn(shape, generator=g)}
    fts = [{"w": pre["w"] + 0.01 * torch.randn(shape, generator=g) + 0.01 * i} for i in range(3)]
    stack = torch.stack([f["w"] - pre["w"] for f in fts])
    for average in ("cosine", "angle"):
        want = pre["w"] + stack.mean(0) * stock_ratio(stack, average, filter_wise)
        got = merge("model_stock", pre, fts, {"average": average, "filter_wise": filter_wise})["w"]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
