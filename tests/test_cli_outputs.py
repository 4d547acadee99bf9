"""What `taskmerge merge` writes loads where users load models: an HF folder (AutoModel.from_pretrained) and,
for exactly low-rank LoRA merges, a peft adapter (PeftModel.from_pretrained) with the dense merge's forward."""
import json
import struct

import pytest
import torch

from taskmerge.cli import main

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny_bert(seed):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16)
    return transformers.BertModel(cfg).eval()


def perturbed(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def header(path):
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n))


def forward(model):
    ids = torch.tensor([[1, 5, 7, 9, 2], [3, 4, 8, 1, 0]])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=(ids > 0).long()).last_hidden_state


def cli(*argv):
    assert main([str(a) for a in argv]) == 0


def test_folder_output_loads_with_automodel_and_equals_hand_computed_merge(tmp_path):
    base = tiny_bert(0)
    base.save_pretrained(tmp_path / "base")
    fts = []
    for i in (1, 2):
        fts.append(perturbed(tiny_bert(0), i))
        fts[-1].save_pretrained(tmp_path / f"ft{i}")
    cli("merge", "task_arithmetic", "--pretrained", tmp_path / "base", "--finetuned", tmp_path / "ft1",
        tmp_path / "ft2", "-p", "scaling=0.3", "--output", tmp_path / "out", "--max-shard-size", "0.000005")
    out = tmp_path / "out"
    assert (out / "config.json").is_file() and (out / "model.safetensors.index.json").is_file()
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and all(header(s)["__metadata__"]["format"] == "pt" for s in shards)
    merged = transformers.AutoModel.from_pretrained(out).eval()
    expect = tiny_bert(0)
    theta0 = base.state_dict()
    by_hand = {k: v + 0.3 * sum(ft.state_dict()[k] - v for ft in fts) if v.is_floating_point() else v
               for k, v in theta0.items()}
    expect.load_state_dict(by_hand)
    torch.testing.assert_close(forward(merged), forward(expect), rtol=1e-5, atol=1e-6)


def lora_adapter(base_dir, folder, seed):
    torch.manual_seed(seed)
    model = transformers.BertModel.from_pretrained(base_dir)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False)
    peft.get_peft_model(model, cfg).save_pretrained(folder)


@pytest.mark.parametrize("method,params", [("lora_merge", ["inner=task_arithmetic", "merge=sum", "scaling=0.5"]),
                                           ("knots", ["k=100", "scaling=0.7"])])
def test_adapter_output_loads_with_peft_and_equals_dense_merge(tmp_path, method, params):
    tiny_bert(0).save_pretrained(tmp_path / "base")
    for i in (1, 2):
        lora_adapter(tmp_path / "base", tmp_path / f"ad{i}", i)
    args = ["merge", method, "--pretrained", tmp_path / "base", "--finetuned", tmp_path / "ad1", tmp_path / "ad2",
            *[x for p in params for x in ("-p", p)]]
    cli(*args, "--output", tmp_path / "dense")
    cli(*args, "--output-format", "adapter", "--output", tmp_path / "adapter")
    dense = transformers.AutoModel.from_pretrained(tmp_path / "dense").eval()
    base = transformers.BertModel.from_pretrained(tmp_path / "base")
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(forward(adapted), forward(dense), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(forward(dense), forward(transformers.BertModel.from_pretrained(tmp_path / "base").eval()))


def test_adapter_output_refused_when_not_low_rank(tmp_path, capsys):
    tiny_bert(0).save_pretrained(tmp_path / "base")
    for i in (1, 2):
        lora_adapter(tmp_path / "base", tmp_path / f"ad{i}", i)
    code = main([str(a) for a in ["merge", "lora_merge", "--pretrained", tmp_path / "base", "--finetuned",
                                  tmp_path / "ad1", tmp_path / "ad2", "--output-format", "adapter", "--output",
                                  tmp_path / "adapter"]])
    err = capsys.readouterr().err
    assert code == 2 and "not exactly low-rank" in err and "Traceback" not in err
    assert not (tmp_path / "adapter").exists()
