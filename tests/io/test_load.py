"""io: lazy safetensors, atomic save, peft LoRA/IA3 adapters against peft's own merge, pickles."""
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from taskmerge.io import (LazyStateDict, ModelFileError, load_lora_factors, load_model, save_state_dict)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(4, 6)
        self.ff = nn.Linear(6, 4)
        self.cls = nn.Linear(4, 2)


def _adapter(tmp_path, config, name):
    from peft import get_peft_model

    torch.manual_seed(0)
    base = Tiny()
    pre = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, config)
    with torch.no_grad():  # make the adapter non-trivial (LoRA B and IA3 start at identity)
        for n, p in model.named_parameters():
            if "lora_B" in n or "ia3_l" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(tmp_path / name)
    dense = {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}
    return pre, dense


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_dense_matches_peft_merge(tmp_path, rslora):
    from peft import LoraConfig

    pre, dense = _adapter(tmp_path, LoraConfig(r=2, lora_alpha=8, target_modules=["q", "ff"],
                                               modules_to_save=["cls"], use_rslora=rslora), "lora")
    got = load_model(tmp_path / "lora", pretrained=pre)
    assert list(got) == list(pre)
    for k in pre:
        torch.testing.assert_close(got[k], dense[k], atol=1e-6, rtol=1e-6)
    factors = load_lora_factors(tmp_path / "lora", pre)
    assert set(factors) == {"q", "ff"}
    assert factors["q"].scale == pytest.approx(8 / (2 ** 0.5 if rslora else 2))
    torch.testing.assert_close(pre["q.weight"] + factors["q"].delta(), dense["q.weight"])


def test_ia3_dense_matches_peft_merge(tmp_path):
    from peft import IA3Config

    pre, dense = _adapter(tmp_path, IA3Config(target_modules=["q", "ff"], feedforward_modules=["ff"]), "ia3")
    got = load_model(tmp_path / "ia3", pretrained=pre)
    for k in pre:
        torch.testing.assert_close(got[k], dense[k], atol=1e-6, rtol=1e-6)


def test_adapter_needs_pretrained(tmp_path):
    from peft import LoraConfig

    _adapter(tmp_path, LoraConfig(r=2, target_modules=["q"]), "lora")
    with pytest.raises(ModelFileError, match="pretrained"):
        load_model(tmp_path / "lora")


def test_lazy_state_dict_reads_on_access(tmp_path):
    save_file({"a": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16)}, tmp_path / "m.safetensors")
    sd = load_model(tmp_path / "m.safetensors")
    assert isinstance(sd, LazyStateDict) and list(sd) == ["a", "b"] and len(sd) == 2
    assert sd.shape("a") == (2, 3) and sd.dtype("b") == torch.bfloat16
    assert torch.equal(sd["a"], torch.ones(2, 3))


def test_pickle_refused_then_weights_only(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "m.pt")
    with pytest.raises(ModelFileError, match="trust"):
        load_model(tmp_path / "m.pt")
    assert torch.equal(load_model(tmp_path / "m.pt", trust_pickle=True)["w"], torch.ones(2))


def test_errors_name_the_file(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ModelFileError, match="bad.safetensors"):
        load_model(tmp_path / "bad.safetensors")
    with pytest.raises(ModelFileError, match="nope"):
        load_model(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="empty"):
        load_model(tmp_path / "empty")


def test_save_is_atomic_and_handles_shared_tensors(tmp_path, monkeypatch):
    w = torch.randn(3, 3)
    path = save_state_dict({"a": w, "tied": w, "t": w.T}, tmp_path / "o.safetensors", {"k": "v"})
    back = load_model(path)
    assert torch.equal(back["tied"], w) and torch.equal(back["t"], w.T) and back.metadata == {"format": "pt", "k": "v"}
    import taskmerge.io.tensors as tensors

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(tensors, "save_file", boom)
    with pytest.raises(OSError):
        save_state_dict({"a": w}, tmp_path / "o.safetensors")
    assert os.listdir(tmp_path) == ["o.safetensors"]  # old file intact, no temporary left
    assert torch.equal(load_model(path)["a"], w)
