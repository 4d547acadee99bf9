"""``key_local`` methods: run over a model with keys removed, they give the other keys the same values.

That is what lets an interrupted streamed merge resume (``write_merged(resume=True)``) by handing
the method only the keys not yet written. A method flagged wrongly (a global threshold, a norm over
the model, an RNG stream across keys) gives different values here.
"""
import pytest
import torch

from taskmerge.merging import METHODS
from taskmerge.merging.inputs import Without
from tests.merging.test_streamed_equals_memory import method_inputs

KEY_LOCAL = sorted(name for name, m in METHODS.items() if m.key_local)
NOT_KEY_LOCAL = ["ties", "dare", "opcm", "regmean_plusplus"]


def test_the_flag_is_set_where_it_should_be():
    assert {"task_arithmetic", "tsv_m", "iso_c", "iso_cts", "model_stock"} <= set(KEY_LOCAL)
    assert not set(NOT_KEY_LOCAL) & set(KEY_LOCAL)


@pytest.mark.parametrize("name", KEY_LOCAL)
@pytest.mark.parametrize("skip", [("l.1.weight", "embed_tokens.weight"), ("l.10.weight", "l.10.bias", "l.2.weight")])
def test_a_key_local_method_gives_the_other_keys_the_same_values(name, skip):
    method = METHODS[name]
    base, fts, context = method_inputs(method, torch.float32)
    whole = method(base, fts, **context)
    part = method(Without(base, skip), [Without(f, skip) for f in fts], **context)
    outputs = whole if isinstance(whole, list) else [whole]
    parts = part if isinstance(part, list) else [part]
    for full, some in zip(outputs, parts):
        assert set(some) == set(full) - set(skip)
        for key, value in some.items():
            torch.testing.assert_close(value, full[key], rtol=0, atol=0, msg=f"{name}: {key}")


@pytest.mark.parametrize("name", ["ties", "opcm", "dare"])
def test_the_check_sees_a_method_that_is_not_key_local(name):
    """The same comparison fails for methods that read across keys (so the test above can fail)."""
    method = METHODS[name]
    base, fts, context = method_inputs(method, torch.float32)
    skip = ("l.1.weight", "embed_tokens.weight")
    whole = method(base, fts, **context)
    part = method(Without(base, skip), [Without(f, skip) for f in fts], **context)
    assert any(not torch.equal(value, whole[key]) for key, value in part.items())


def test_a_setting_that_joins_keys_is_declared():
    """WUDI's qkv=stacked optimises q, k, v as one matrix: without q, k and v come out differently."""
    g = torch.Generator().manual_seed(0)
    names = [f"attn.{p}_proj.weight" for p in "qkv"]
    base = {k: torch.randn(4, 6, generator=g) for k in names}
    fts = [{k: v + 0.1 * torch.randn(4, 6, generator=g) for k, v in base.items()} for _ in range(3)]
    method, hp = METHODS["wudi"], {"qkv": "stacked", "iterations": 20, "lr": 1e-2}
    whole = method(base, fts, hp)
    part = method(Without(base, names[:1]), [Without(f, names[:1]) for f in fts], hp)
    assert not torch.allclose(part[names[1]], whole[names[1]])
    assert not method.is_key_local(hp) and method.is_key_local({"qkv": "as_stored"})
