"""The CLIP family: image encoders (open_clip or transformers) with frozen zero-shot heads.

Two back ends, one interface (``ClipFamily``):

- ``open_clip`` (the task-vectors / TALL / TSV checkpoints). The merged state dict is the one of the
  official ``ImageEncoder``: the open_clip ``CLIP`` model without its text ``transformer``, i.e.
  ``visual.*`` plus the text leftovers ``token_embedding.weight``, ``positional_embedding``,
  ``ln_final.*``, ``text_projection``, ``logit_scale`` (their τ is 0, but they count in the global
  top-k of TIES/TALL, so they are kept by default; ``text_leftovers=False`` drops them).
- ``hf`` (FusionBench, KnOTS): ``transformers.CLIPVisionModel`` (``vision_model.*``); the CLIP
  ``visual_projection`` is frozen inside the head, so it is never merged (as in FusionBench/KnOTS).

The OpenAI CLIP weights use QuickGELU: open_clip builds it for ``pretrained='openai'``, and so do we
(``quick_gelu=True``), so that converted checkpoints compute exactly what they computed before.

A zero-shot head is built as in task-vectors ``build_classification_head``: for each class, the
normalised text embeddings of every template are averaged and re-normalised; the [C, D] matrix is
scaled by ``exp(logit_scale)``; at use, image features are (projected, then) L2-normalised first.
Heads are cached per (model, task) as safetensors and never trained.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

from taskmerge.io.tensors import load_safetensors

# open_clip-style architecture dicts. ViT-B-32/B-16/L-14: open_clip's own configs (OpenAI CLIP).
ARCHS: dict[str, dict] = {
    "ViT-B-32": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}},
    "ViT-B-16": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}},
    "ViT-L-14": {"embed_dim": 768, "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12}},
    # tests and tiny runs: 32x32 images, 2 layers, width 32 (a few seconds on a CPU)
    "tiny": {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                                             "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}},
}
# Hugging Face names of the same OpenAI models (FusionBench / KnOTS load these folders).
HF_NAMES = {"ViT-B-32": "openai/clip-vit-base-patch32", "ViT-B-16": "openai/clip-vit-base-patch16",
            "ViT-L-14": "openai/clip-vit-large-patch14"}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEXT_KEYS = ("transformer.",)  # what the official ImageEncoder deletes


def hf_config(arch: str | dict):
    """A ``transformers.CLIPConfig`` equivalent to an open_clip architecture dict (QuickGELU)."""
    from transformers import CLIPConfig

    a = ARCHS[arch] if isinstance(arch, str) else arch
    v, t = a["vision_cfg"], a["text_cfg"]
    head_width = v.get("head_width", 64)
    return CLIPConfig(
        projection_dim=a["embed_dim"],
        vision_config=dict(hidden_size=v["width"], intermediate_size=4 * v["width"], num_hidden_layers=v["layers"],
                           num_attention_heads=v["width"] // head_width, image_size=v["image_size"],
                           patch_size=v["patch_size"], hidden_act="quick_gelu"),
        text_config=dict(hidden_size=t["width"], intermediate_size=4 * t["width"], num_hidden_layers=t["layers"],
                         num_attention_heads=t["heads"], max_position_embeddings=t["context_length"],
                         vocab_size=t["vocab_size"], hidden_act="quick_gelu", eos_token_id=49407,
                         bos_token_id=49406, pad_token_id=1),
    )


class OpenClipImageEncoder(nn.Module):
    """The official ``ImageEncoder``'s weights without its ``model.`` prefix; ``forward`` = ``encode_image``
    (un-normalised: the head normalises)."""

    def __init__(self, clip: nn.Module, text_leftovers: bool = True):
        super().__init__()
        for name, child in clip.named_children():
            if name == "visual" or (text_leftovers and not any(name + "." == k for k in TEXT_KEYS)):
                self.add_module(name, child)
        if text_leftovers:
            for name, p in clip.named_parameters(recurse=False):
                self.register_parameter(name, p)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)


class HFClipImageEncoder(nn.Module):
    """``CLIPVisionModel`` whose forward returns the pooled feature (before ``visual_projection``)."""

    def __init__(self, vision_model: nn.Module):
        super().__init__()
        self.vision_model = vision_model  # CLIPVisionTransformer: keys vision_model.* as in CLIPVisionModel

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values=images).pooler_output


class ZeroShotHead(nn.Module):
    """logits = normalize(x @ projectionᵀ) @ weightᵀ; ``weight`` already carries exp(logit_scale)."""

    def __init__(self, weight: torch.Tensor, projection: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("projection", None if projection is None else projection.detach().clone())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.projection is not None:
            features = features @ self.projection.T
        features = features / features.norm(dim=-1, keepdim=True)
        return features @ self.weight.T


class ImageClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, head: nn.Module):
        from taskmerge.devices import module_device

        super().__init__()
        self.encoder, self.head = encoder, head.to(module_device(encoder))  # the head follows the encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images))


def build_open_clip(arch: str | dict, seed: int = 0, device: str | torch.device = "cpu",
                    quick_gelu: bool = True) -> nn.Module:
    """A random-init open_clip ``CLIP`` (no download) with the architecture of ``arch``."""
    import open_clip
    from open_clip.model import CLIP

    cfg = copy.deepcopy(ARCHS[arch] if isinstance(arch, str) else arch)
    torch.manual_seed(seed)
    if isinstance(arch, str) and arch in open_clip.list_models():
        return open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu, device=device).eval()
    return CLIP(**cfg, quick_gelu=quick_gelu).to(device).eval()


def build_hf_clip(arch: str | dict, seed: int = 0, device: str | torch.device = "cpu") -> nn.Module:
    """A random-init ``transformers.CLIPModel`` (no download)."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    return CLIPModel(hf_config(arch)).to(device).eval()


def load_hf_clip(path: str | Path) -> nn.Module:
    """A Hugging Face CLIP folder (``openai/clip-vit-*`` layout), offline."""
    from transformers import CLIPModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return CLIPModel.from_pretrained(str(path)).eval()


def tokenizer(context_length: int = 77) -> Callable[[Sequence[str]], torch.Tensor]:
    """OpenAI CLIP's BPE (bundled with open_clip, offline). Used for both back ends: HF CLIP pools at
    the first end-of-text token, which open_clip's zero padding leaves in the same place."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer(context_length=context_length)
    return lambda texts: tok(list(texts))


class ClipFamily:
    """One CLIP model: the mergeable image encoder, text encoding for heads, preprocessing facts."""

    def __init__(self, backend: str, clip: nn.Module, name: str, text_leftovers: bool = True):
        if backend not in ("open_clip", "hf"):
            raise ValueError(f"unknown CLIP backend {backend!r}: choose open_clip or hf")
        self.backend, self.clip, self.name = backend, clip, name
        if backend == "open_clip":
            self.context_length = clip.context_length
            self.image_size = clip.visual.image_size[0]
            self.encoder = OpenClipImageEncoder(clip, text_leftovers)
        else:
            self.context_length = clip.config.text_config.max_position_embeddings
            self.image_size = clip.config.vision_config.image_size
            self.encoder = HFClipImageEncoder(copy.deepcopy(clip.vision_model))
        self.encoder.requires_grad_(False).eval()

    @classmethod
    def build(cls, backend: str, arch: str | dict, name: str, seed: int = 0, path: str | None = None,
              text_leftovers: bool = True) -> "ClipFamily":
        """From ``path`` (an HF folder or an open_clip safetensors of the full CLIP) or random from ``arch``."""
        if backend == "hf":
            clip = load_hf_clip(path) if path else build_hf_clip(arch, seed)
        else:
            clip = build_open_clip(arch, seed)
            if path:
                state = load_safetensors(path)
                missing, unexpected = clip.load_state_dict(state, strict=False)
                if unexpected or [k for k in missing if not k.startswith("transformer.")]:
                    raise ValueError(f"{path}: not an open_clip {name} state dict (missing {missing[:3]}, "
                                     f"unexpected {unexpected[:3]})")
                fam = cls(backend, clip, name, text_leftovers)
                fam.text_tower = not missing  # a converted ImageEncoder has no text transformer
                return fam
        return cls(backend, clip, name, text_leftovers)

    def to(self, device) -> "ClipFamily":
        """Put the CLIP model and the mergeable encoder on ``device`` (the script's ``device``)."""
        self.clip.to(device)
        self.encoder.to(device)
        return self

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        from taskmerge.devices import module_device

        tokens = tokens.to(module_device(self.clip))
        if self.backend == "open_clip":
            return self.clip.encode_text(tokens)
        return self.clip.text_projection(self.clip.text_model(input_ids=tokens).pooler_output)

    def projection(self) -> torch.Tensor | None:
        return self.clip.visual_projection.weight.detach() if self.backend == "hf" else None

    def logit_scale(self) -> float:
        return float(self.clip.logit_scale.detach().exp())

    text_tower = True

    @torch.no_grad()
    def zeroshot_head(self, classnames: Sequence[str], templates: Sequence[str], batch: int = 256) -> ZeroShotHead:
        if not self.text_tower:
            raise ValueError(f"{self.name}: the loaded weights have no text transformer, so zero-shot heads cannot "
                             "be built: pass the converted heads (finetuned.heads=…/head_{task}.safetensors) or "
                             "the full CLIP weights as model.path")
        tokenize = tokenizer(self.context_length)
        rows = []
        for c in classnames:
            texts = [t.format(c=c) for t in templates]
            emb = torch.cat([self.encode_text(tokenize(texts[i:i + batch])) for i in range(0, len(texts), batch)])
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(0)
            rows.append(mean / mean.norm())
        return ZeroShotHead(torch.stack(rows) * self.logit_scale(), self.projection())

    def head(self, cache: Path, classnames: Sequence[str], templates: Sequence[str]) -> ZeroShotHead:
        """The cached head at ``cache`` (built and saved on first use; refused if the classes differ)."""
        cache = Path(cache)
        if cache.exists():
            head = load_head(cache)
            if head.classnames != list(classnames):
                raise ValueError(f"{cache}: cached head has other class names; delete it to rebuild")
            return head
        head = self.zeroshot_head(classnames, templates)
        save_head(head, cache, classnames, templates, self.name)
        head.classnames = list(classnames)
        return head

    def classifier(self, encoder: nn.Module, head: nn.Module) -> ImageClassifier:
        return ImageClassifier(encoder, head)

    def encoder_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.encoder.state_dict().items()}  # CPU copies


VISION_PREFIX = "vision_model."


def align_vision_keys(sd, reference):
    """``sd`` with ``reference``'s tensor names, for both ``CLIPVisionModel`` layouts.

    transformers 4 (and FusionBench's folders) save ``CLIPVisionModel`` with the ``vision_model.``
    prefix, as ``CLIPModel`` does; transformers 5 saves it without (``embeddings.*``, ``encoder.*``,
    ``post_layernorm.*``). When ``reference`` (the ``hf`` encoder's state dict) is prefixed and
    ``sd`` is not, the prefix is added; any other state dict comes back as it is (tensors unread).
    """
    if any(k.startswith(VISION_PREFIX) for k in sd) or not any(k.startswith(VISION_PREFIX) for k in reference):
        return sd
    renamed = {VISION_PREFIX + k: k for k in sd if VISION_PREFIX + k in reference}
    if not renamed:
        return sd
    return {new: sd[old] for new, old in renamed.items()}


def save_head(head: ZeroShotHead, path: Path, classnames: Sequence[str], templates: Sequence[str], model: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"weight": head.weight.cpu().contiguous()}
    if head.projection is not None:
        tensors["projection"] = head.projection.cpu().contiguous()
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"classnames": json.dumps(list(classnames)),
                                           "templates": json.dumps(list(templates)), "model": model})
    os.replace(tmp, path)


def load_head(path: Path) -> ZeroShotHead:
    from taskmerge.io.tensors import LazyStateDict

    lazy = LazyStateDict([path])
    meta = lazy.metadata
    sd = {k: lazy[k] for k in lazy}
    head = ZeroShotHead(sd["weight"], sd.get("projection"))
    head.classnames = json.loads(meta.get("classnames", "[]"))
    return head


def count_parameters(module: nn.Module, prefix: str = "") -> int:
    return sum(p.numel() for n, p in module.named_parameters() if n.startswith(prefix))
