"""tensor_kinds: by module type when a model is given, else by shape."""
import torch
from torch import nn

from taskmerge.merging.selection import is_matrix, name_matches, tensor_kinds


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(8))  # owned by a non-leaf module
        self.tok = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(3, 8, 2)
        self.ln = nn.LayerNorm(8)
        self.bn = nn.BatchNorm1d(8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.fc = nn.Linear(8, 4)
        self.register_buffer("position_ids", torch.arange(5))


def test_kinds_by_module():
    model = Tiny()
    kinds = tensor_kinds(model.state_dict(), model)
    assert kinds["class_embedding"] == "other"
    assert kinds["tok.weight"] == "embedding"
    assert kinds["conv.weight"] == kinds["conv.bias"] == "conv"
    assert kinds["ln.weight"] == kinds["bn.running_mean"] == "norm"
    assert kinds["attn.in_proj_weight"] == kinds["attn.in_proj_bias"] == kinds["attn.out_proj.weight"] == "linear"
    assert kinds["fc.weight"] == kinds["fc.bias"] == "linear"
    assert set(kinds) == set(model.state_dict())


def test_kinds_by_shape():
    sd = {"a.weight": torch.zeros(4, 3), "pos_embed": torch.zeros(5, 3), "conv": torch.zeros(2, 3, 1, 1),
          "b": torch.zeros(3), "scale": torch.zeros(())}
    assert tensor_kinds(sd) == {"a.weight": "linear", "pos_embed": "embedding", "conv": "conv",
                                "b": "other", "scale": "other"}
    assert is_matrix("a.weight", sd["a.weight"], None) and not is_matrix("pos_embed", sd["pos_embed"], None)
    assert not is_matrix("a.weight", sd["a.weight"], {"a.weight": "other"})


def test_name_matches():
    assert name_matches("model.text_projection", "text_projection")
    assert name_matches("x.proj", "foo, proj") and not name_matches("x.proj", "")


def test_module_depths_from_the_block_lists_not_the_names():
    """Blocks are homogeneous ModuleLists; a Sequential's index is not a depth (LiNeS then gives it α)."""
    import transformers
    from torch import nn

    from taskmerge.merging.lines import layer_scales
    from taskmerge.merging.selection import module_depths

    bert = transformers.BertModel(transformers.BertConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                                          intermediate_size=32, vocab_size=50))
    depths = module_depths(bert)
    assert depths["encoder.layer.2.output.dense.weight"] == 2 and depths["encoder.layer.0.attention.self.query.bias"] == 0
    assert not any(k.startswith("embeddings.") or k.startswith("pooler.") for k in depths)
    assert set(depths) == {k for k in bert.state_dict() if k.startswith("encoder.layer.")}

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))  # nested: does not renumber

    toy = nn.Module()
    toy.blocks = nn.ModuleList(Block() for _ in range(3))
    toy.head = nn.Sequential(nn.ReLU(), nn.Dropout(), nn.Linear(4, 2))
    depths = module_depths(toy)
    assert depths["blocks.1.experts.2.weight"] == 1 and "head.2.weight" not in depths
    keys = list(toy.state_dict())
    by_family, by_name = layer_scales(keys, 0.5, 1.0, depths=depths), layer_scales(keys, 0.5, 1.0)
    assert by_family["head.2.weight"] == 0.5 and by_name["head.2.weight"] == 1.5  # the name would call it block 2
    assert by_family["blocks.2.experts.0.bias"] == by_name["blocks.2.experts.0.bias"] == 1.5
