"""DELLA (Deep et al., 2024; mergekit della / della_linear): MagPrune, elect, fuse."""
import pytest
import torch

from taskmerge.merging import merge
from taskmerge.merging.della import della_fuse, magprune_probs


def make_models(num_tasks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = {"w": torch.randn(12, 10, generator=g), "b": torch.randn(12, generator=g), "a.w": torch.randn(3, 4, 2, generator=g),
           "position_ids": torch.arange(4)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in pre.items()} for _ in range(num_tasks)]
    return pre, fts


@pytest.mark.parametrize("density,seed", [(0.7, 42), (0.35, 7)])
def test_epsilon_zero_without_election_is_dare_bit_for_bit(density, seed):
    # ε = 0: every p_i = p; the base masks are DARE's (same private generator, same official call order), the extra
    # draws have probability 0, the rescale is DARE's 1/(1 − d) with d = 1 − p, and the fuse is the plain sum.
    pre, fts = make_models(3)
    got = merge("della", pre, fts, {"density": density, "epsilon": 0.0, "elect": False, "normalize": False,
                                    "seed": seed, "scaling": 0.8})
    want = merge("dare", pre, fts, {"drop_rate": 1 - density, "base": "task_arithmetic", "seed": seed, "scaling": 0.8})
    for key in pre:
        assert torch.equal(got[key], want[key]), key
    # normalize without election divides by T (mergekit's weight sum): DARE at λ/T
    mean = merge("della", pre, fts, {"density": density, "epsilon": 0.0, "elect": False, "seed": seed, "scaling": 0.8})
    torch.testing.assert_close(mean["w"] - pre["w"], (want["w"] - pre["w"]) / 3)


def test_keep_probabilities_by_hand():
    # row (0.1, −0.4, 0.3): ascending |τ| ranks 0, 2, 1 of n − 1 = 2 → (0, 1, 0.5); p = 0.5, ε = 0.1:
    # p_i = 0.4 + 0.2·(0, 1, 0.5) = (0.4, 0.6, 0.5). A 2-D tensor is ranked per row; a single entry gets p.
    probs = magprune_probs(torch.tensor([0.1, -0.4, 0.3]), 0.5, 0.1)
    torch.testing.assert_close(probs, torch.tensor([0.4, 0.6, 0.5], dtype=torch.float64))
    rows = magprune_probs(torch.tensor([[1.0, 2.0], [5.0, -3.0]]), 0.5, 0.1)
    torch.testing.assert_close(rows, torch.tensor([[0.4, 0.6], [0.6, 0.4]], dtype=torch.float64))
    torch.testing.assert_close(magprune_probs(torch.tensor([[7.0]]), 0.5, 0.1), torch.tensor([[0.5]], dtype=torch.float64))


def test_survivors_are_rescaled_by_their_own_probability():
    tau = torch.tensor([[0.1, -0.4, 0.3, 0.2, -0.05]])
    probs = magprune_probs(tau[0], 0.6, 0.2)  # ranks 1, 4, 3, 2, 0 of 4 → p = 0.4 + 0.4·(0.25, 1, 0.75, 0.5, 0)
    torch.testing.assert_close(probs, torch.tensor([0.5, 0.8, 0.7, 0.6, 0.4], dtype=torch.float64))
    pre = {"w": torch.zeros(1, 5)}
    for seed in range(5):
        out = merge("della", pre, [{"w": tau}], {"density": 0.6, "epsilon": 0.2, "elect": False, "normalize": False,
                                                 "scaling": 1.0, "seed": seed})["w"][0]
        kept = out != 0
        torch.testing.assert_close(out[kept], (tau[0] / probs.float())[kept])  # τ_i / p_i where kept, 0 elsewhere


def test_keep_rates_follow_the_magnitude_ranks():
    # One row of 100 000 distinct magnitudes, p = 0.5, ε = 0.2: the empirical keep rate of each rank decile matches
    # the mean of its p_i (from 0.32 to 0.68); binomial s.d. per decile ≈ 0.005, tolerance 0.02. Seeded: deterministic.
    n = 100_000
    tau = torch.linspace(0.001, 1.0, n)[torch.randperm(n, generator=torch.Generator().manual_seed(0))].reshape(1, n)
    out = merge("della", {"w": torch.zeros(1, n)}, [{"w": tau}],
                {"density": 0.5, "epsilon": 0.2, "elect": False, "normalize": False, "scaling": 1.0, "seed": 3})["w"]
    probs = magprune_probs(tau, 0.5, 0.2)[0]
    order = torch.argsort(tau[0])
    kept = (out[0] != 0)[order].float().reshape(10, -1).mean(1)
    expected = probs[order].reshape(10, -1).mean(1).float()
    torch.testing.assert_close(kept, expected, atol=0.02, rtol=0)
    assert kept[-1] - kept[0] > 0.3  # large magnitudes are kept far more often


def test_elect_and_fuse_by_hand():
    # columns: sums (−2, −1, 1, 0) → γ = (−, −, +, +) (a zero sum elects +, mergekit's ≥ 0);
    # agreeing: (−3), (−2), (0.5, 0.5), (1) → mean (−3, −2, 0.5, 1), sum (−3, −2, 1, 1).
    stack = torch.tensor([[1.0, -2.0, 0.5, 1.0], [-3.0, 1.0, 0.5, -1.0]])
    torch.testing.assert_close(della_fuse(stack, elect=True, normalize=True), torch.tensor([-3.0, -2.0, 0.5, 1.0]))
    torch.testing.assert_close(della_fuse(stack, elect=True, normalize=False), torch.tensor([-3.0, -2.0, 1.0, 1.0]))
    torch.testing.assert_close(della_fuse(stack, elect=False, normalize=True), torch.tensor([-1.0, -0.5, 0.5, 0.0]))
    torch.testing.assert_close(della_fuse(stack, elect=False, normalize=False), torch.tensor([-2.0, -1.0, 1.0, 0.0]))


def test_seeded_private_generator_and_reproducible():
    pre, fts = make_models(3)
    state = torch.get_rng_state()
    a = merge("della", pre, fts, {"seed": 1})
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never touched
    b = merge("della", pre, fts, {"seed": 1})
    c = merge("della", pre, fts, {"seed": 2})
    assert all(torch.equal(a[k], b[k]) for k in pre)
    assert not torch.equal(a["w"], c["w"])


def test_density_one_keeps_everything_and_l1_rescale():
    pre, fts = make_models(3)
    whole = merge("della", pre, fts, {"density": 1.0, "elect": False, "normalize": False, "scaling": 0.5})
    ta = merge("task_arithmetic", pre, fts, {"scaling": 0.5})
    for key in pre:
        assert torch.equal(whole[key], ta[key])
    # rescale="l1" (current mergekit): each pruned task tensor has the L1 norm of the unpruned one
    one = [{"w": fts[0]["w"]}]
    out = merge("della", {"w": pre["w"]}, one, {"rescale": "l1", "elect": False, "normalize": False, "scaling": 1.0})
    torch.testing.assert_close((out["w"] - pre["w"]).abs().sum(), (fts[0]["w"] - pre["w"]).abs().sum(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("hp", [{"density": 0.9, "epsilon": 0.2}, {"density": 0.1, "epsilon": 0.1}, {"rescale": "l2"}])
def test_bad_hyperparameters_raise(hp):
    pre, fts = make_models(2)
    with pytest.raises(ValueError):
        merge("della", pre, fts, hp)
