"""EMR-Merging: one task is the fine-tuned model; a hand-computed example of the equations."""
import pytest
import torch

from taskmerge.merging import merge
from taskmerge.merging.emr import elect_and_mask


def models(num_tasks, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = {"a.weight": torch.randn(5, 4, generator=g), "a.bias": torch.randn(5, generator=g),
           "steps": torch.arange(3)}
    fts = [{k: v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone() for k, v in pre.items()}
           for _ in range(num_tasks)]
    return pre, fts


@pytest.mark.parametrize("rescale", ["sum_of_means", "flat_mean", "none"])
def test_one_task_returns_the_finetuned_model(rescale):
    pre, fts = models(1)
    fts[0]["a.bias"][1] = pre["a.bias"][1]  # a zero entry of τ: γ = −1 there, the mask drops it, θ0 stays
    (out,) = merge("emr", pre, fts, {"rescale": rescale})
    for k in pre:
        torch.testing.assert_close(out[k], fts[0][k], rtol=0, atol=1e-6)
    assert torch.equal(out["steps"], pre["steps"])


def test_hand_computed_example():
    # τ1 = [1, −2, 3, 0], τ2 = [3, 1, −1, 0]: mean = [2, −.5, 1, 0] → γ = [1, −1, 1, −1] (0 → −1)
    # m1 = [1, 1, 1, 0], m2 = [1, 0, 0, 0]; τ_uni = γ·max(|m1 τ1|, |m2 τ2|) = [3, −2, 3, 0]
    # r1 = mean|τ1| / mean|m1 τ_uni| = 1.5 / 2 = 0.75, r2 = 1.25 / 0.75 = 5/3
    pre = {"w": torch.zeros(4)}
    fts = [{"w": torch.tensor([1.0, -2.0, 3.0, 0.0])}, {"w": torch.tensor([3.0, 1.0, -1.0, 0.0])}]
    unified, masks = elect_and_mask([f["w"] for f in fts])
    assert torch.equal(unified, torch.tensor([3.0, -2.0, 3.0, 0.0]))
    assert [m.tolist() for m in masks] == [[True, True, True, False], [True, False, False, False]]
    out1, out2 = merge("emr", pre, fts)
    torch.testing.assert_close(out1["w"], 0.75 * torch.tensor([3.0, -2.0, 3.0, 0.0]))
    torch.testing.assert_close(out2["w"], torch.tensor([5.0, 0.0, 0.0, 0.0]))
    plain = merge("emr", pre, fts, {"rescale": "none"})
    torch.testing.assert_close(plain[1]["w"], torch.tensor([3.0, 0.0, 0.0, 0.0]))


def test_rescalers_sum_per_tensor_means_or_flatten():
    # two tensors of different sizes: the official loop sums per-tensor means, the 30-ViT script flattens
    pre = {"x": torch.zeros(1), "y": torch.zeros(3)}
    fts = [{"x": torch.tensor([4.0]), "y": torch.tensor([1.0, 1.0, 1.0])},
           {"x": torch.tensor([-2.0]), "y": torch.tensor([1.0, 1.0, -1.0])}]
    # mean τ: x 1 → γ 1; y [1, 1, 0] → γ [1, 1, −1]. m2: x no, y [1, 1, 1]; τ_uni = x 4, y [1, 1, −1]
    # task 2: Σ means = 2 + 1 = 3 over 0 + 1 → r = 3; flattened: Σ|τ2| = 5 over Σ|m2 τ_uni| = 3 → r = 5/3
    outs = {r: merge("emr", pre, fts, {"rescale": r})[1] for r in ("sum_of_means", "flat_mean")}
    torch.testing.assert_close(outs["sum_of_means"]["y"], 3.0 * torch.tensor([1.0, 1.0, -1.0]))
    torch.testing.assert_close(outs["flat_mean"]["y"], 5 / 3 * torch.tensor([1.0, 1.0, -1.0]))
    assert float(outs["flat_mean"]["x"]) == 0.0
