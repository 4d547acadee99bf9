"""RegMean++: a one-layer model is RegMean; on two blocks, block 1's Grams come from the merged block 0
(hand-computed reference); the statistics callback forwards through the merged model."""
import pytest
import torch
from torch import nn

from taskmerge.merging import merge
from taskmerge.stats.layerwise import LayerwiseGrams


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return torch.tanh(self.fc(x))


class Net(nn.Module):
    def __init__(self, d=4, blocks=2, embed=True):
        super().__init__()
        self.embed = nn.Linear(3, d) if embed else None
        self.layers = nn.ModuleList(Block(d) if embed else nn.Linear(d, d) for _ in range(blocks))
        self.head = nn.Linear(d, 2) if embed else None


def nets(num_tasks, seed=0, **kw):
    torch.manual_seed(seed)
    pre = Net(**kw)
    fts = []
    for _ in range(num_tasks):
        ft = Net(**kw)
        ft.load_state_dict({k: v + 0.3 * torch.randn_like(v) for k, v in pre.state_dict().items()})
        fts.append(ft)
    return pre, fts


def data(num_tasks, dim, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(6, 5, dim, generator=g), torch.randn(4, 5, dim, generator=g)] for _ in range(num_tasks)]


def sd(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def gram(xs):
    rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
    return rows.T @ rows / rows.shape[0]


def solve(grams, weights):
    return torch.linalg.solve(sum(grams), sum(g @ w.T for g, w in zip(grams, weights))).T


def test_one_layer_model_is_regmean():
    pre, fts = nets(3, embed=False, blocks=1)
    batches = data(3, 4)
    callback = LayerwiseGrams(Net(embed=False, blocks=1), fts, batches, blocks=lambda m: m.layers, prefix="layers",
                              embed=lambda m, x: x)
    got = merge("regmean_plusplus", sd(pre), [sd(f) for f in fts], {"off_diagonal_scale": 0.8}, layer_stats=callback)
    # the same Grams from the fine-tuned models' own inputs (a one-layer model has nothing merged below it),
    # accumulated batch by batch as taskmerge.stats does
    rows = lambda b: [x.reshape(-1, 4) for x in b]  # noqa: E731
    stats = [{"layers.0.gram_in": sum(r.T @ r for r in rows(b)) / sum(r.shape[0] for r in rows(b))} for b in batches]
    want = merge("regmean", sd(pre), [sd(f) for f in fts], {"off_diagonal_scale": 0.8}, stats=stats)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_two_blocks_by_hand():
    pre, fts = nets(2)
    batches = data(2, 3)
    thetas = [sd(f) for f in fts]
    callback = LayerwiseGrams(Net(), fts, batches, blocks=lambda m: m.layers, prefix="layers",
                              embed=lambda m, x: m.embed(x))
    got = merge("regmean_plusplus", sd(pre), thetas, {"off_diagonal_scale": 1.0}, layer_stats=callback)

    mean = lambda k: sum(t[k] for t in thetas) / 2  # noqa: E731
    embed = lambda x: x @ mean("embed.weight").T + mean("embed.bias")  # noqa: E731  merged embedding
    xs0 = [[embed(x) for x in b] for b in batches]
    w0 = solve([gram(x) for x in xs0], [t["layers.0.fc.weight"] for t in thetas])
    xs1 = [[torch.tanh(x @ w0.T + mean("layers.0.fc.bias")) for x in task] for task in xs0]  # through merged block 0
    w1 = solve([gram(x) for x in xs1], [t["layers.1.fc.weight"] for t in thetas])
    torch.testing.assert_close(got["layers.0.fc.weight"], w0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["layers.1.fc.weight"], w1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["embed.weight"], mean("embed.weight"))
    torch.testing.assert_close(got["layers.1.fc.bias"], mean("layers.1.fc.bias"))
    assert torch.equal(got["head.weight"], pre.state_dict()["head.weight"])  # after the blocks: θ0 (official)
    avg = merge("regmean_plusplus", sd(pre), thetas, {"after_blocks": "average"}, layer_stats=callback)
    torch.testing.assert_close(avg["head.weight"], mean("head.weight"))

    # plain RegMean: block 1's Grams from each task's own fine-tuned layers, not the merged ones
    own = [[torch.tanh(x @ t["embed.weight"].T @ t["layers.0.fc.weight"].T + t["embed.bias"] @ t["layers.0.fc.weight"].T
                       + t["layers.0.fc.bias"]) for x in b] for b, t in zip(batches, thetas)]
    plain = solve([gram(x) for x in own], [t["layers.1.fc.weight"] for t in thetas])
    assert not torch.allclose(plain, w1, atol=1e-3)


def test_needs_the_callback_and_blocks_in_order():
    pre, fts = nets(2)
    with pytest.raises(ValueError, match="needs the layer_stats callback"):
        merge("regmean_plusplus", sd(pre), [sd(f) for f in fts])
    callback = LayerwiseGrams(Net(), fts, data(2, 3), blocks=lambda m: m.layers, prefix="layers",
                              embed=lambda m, x: m.embed(x))
    with pytest.raises(ValueError, match="blocks come in order"):
        callback(1, {})
