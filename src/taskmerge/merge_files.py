"""Merge checkpoints on disk into checkpoints on disk (the library behind ``taskmerge merge``).

Order of work, so that bad input fails before anything heavy runs and nothing is written on
error: resolve the method and its hyperparameters → check the output path (never an input) →
load every input lazily (integer buffers a fine-tune lacks taken from θ0; optionally cast, ``dtype``) → check the models agree (names, shapes,
dtypes, finiteness) → stream the method's output to disk (``io.merge_writer``: every method
streams, any input size) → for a folder output, copy θ0's config and tokenizer files so the
folder loads with ``AutoModel.from_pretrained``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import torch

from taskmerge.io import ModelFileError, load_lora_factors, load_model, reconcile_buffers
from taskmerge.io.peft import peft_module_names, save_lora_adapter
from taskmerge.io.merge_writer import write_merged
from taskmerge.merging import get_method
from taskmerge.merging.inputs import Cast, check_models
from taskmerge.merging.outputs import LowRank
from taskmerge.stats import load_statistics

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# files of a Hugging Face model folder that are not weights: copied from θ0 into a folder output
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack")
_SKIP = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "adapter_config.json"}


def parse_hparams(pairs: Sequence[str]) -> dict[str, str]:
    """``["name=value", …]`` → ``{name: value}`` (values are parsed later by the method's types)."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"hyperparameter {pair!r} is not of the form name=value")
        out[name.strip()] = value.strip()
    return out


def parse_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:0, …)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return dev


def _check_output(output: Path, per_task: bool, inputs: Sequence) -> None:
    resolved = output.resolve()
    for p in inputs:
        p = Path(p).resolve()
        if resolved == p or p in resolved.parents or resolved in p.parents:
            raise ValueError(f"{output}: the output overlaps the input {p}; choose another output path")
    if output.is_dir() and any(output.iterdir()):
        raise ValueError(f"{output}: the output folder already exists and is not empty")
    if output.exists() and not output.is_dir() and output.suffix != ".safetensors":
        raise ValueError(f"{output}: exists and is not a folder")
    if output.suffix in _WEIGHT_SUFFIXES and output.suffix != ".safetensors":
        raise ValueError(f"{output}: the output must be a .safetensors file or a folder (pickles are not written)")
    if per_task and output.suffix == ".safetensors":
        raise ValueError(f"{output}: a per-task method writes one model per task: give a folder, not a file")
    if not output.parent.exists():
        raise ValueError(f"{output.parent}: the output's folder does not exist")


def copy_model_files(source, folder: Path) -> list[Path]:
    """Copy the non-weight files of θ0's folder (config, tokenizer, preprocessor, generation config)."""
    source = Path(source)
    if not source.is_dir():
        return []
    copied = []
    for f in sorted(source.iterdir()):
        if f.is_file() and f.name not in _SKIP and not f.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(f, folder / f.name)
            copied.append(folder / f.name)
    return copied


def write_adapter(method, pretrained, finetuned, output: Path, hparams, context, template) -> Path:
    """The method's exactly low-rank result as a peft adapter folder (``LowRank`` values only)."""
    factors = {}
    for key, value in method.stream(pretrained, finetuned, hparams, **context):
        if not isinstance(value, LowRank):
            raise ValueError(f"method {method.name!r} with {hparams}: the merged {key} is not exactly low-rank "
                             f"(only lora_merge inner=task_arithmetic and knots are); write a model folder instead")
        factors[key[: -len(".weight")]] = (value.B * value.scale, value.A)
    return save_lora_adapter(output, factors, template, peft_module_names(template, pretrained))


def merge_files(method_name: str, pretrained_path, finetuned_paths: Sequence, output, *,
                hparams: Mapping[str, str] | None = None, device: str = "cpu", dtype: str | None = None,
                trust_pickle: bool = False, stats_paths: Sequence | None = None, progress: bool = True,
                max_shard_bytes: int | None = None, output_format: str = "model", resume: bool = False) -> list[Path]:
    """Merge the checkpoints and write ``output``; returns the written model files or folders.

    ``output``: a ``.safetensors`` file, or a folder (an HF model folder: shards + index above
    ``max_shard_bytes``, θ0's config and tokenizer files); per-task methods need a folder.
    ``dtype``: cast every floating input (and so the output) to float32, bfloat16 or float16.
    ``output_format="adapter"``: a peft LoRA adapter folder instead, for LoRA methods whose result is
    exactly low-rank (``lora_merge`` with inner=task_arithmetic, ``knots``).
    ``stats_paths``: one statistics file (``taskmerge.stats``) per fine-tuned model, same order,
    for the methods that need them (fisher, regmean, mats).
    ``resume``: finish an interrupted run of the same merge (``io.merge_writer``, key-local methods).
    """
    method = get_method(method_name)
    resolved = method.resolve(hparams)  # unknown names, bad types, out-of-range values fail here
    dev = parse_device(device)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    stats_paths = list(stats_paths or [])
    if "stats" in method.context and len(stats_paths) != len(finetuned_paths):
        raise ValueError(f"method {method.name!r} needs one statistics file per fine-tuned model, in the same "
                         f"order: got {len(stats_paths)} --stats for {len(finetuned_paths)} --finetuned")
    if "stats" not in method.context and stats_paths:
        raise ValueError(f"method {method.name!r} uses no statistics; drop --stats")
    if not finetuned_paths:
        raise ValueError("the list of fine-tuned models is empty (give --finetuned A B …)")
    if output_format not in ("model", "adapter"):
        raise ValueError(f"--output-format {output_format!r}: choose model or adapter")
    if output_format == "adapter" and method.inputs != "lora":
        raise ValueError(f"--output-format adapter: method {method.name!r} merges full weights; only LoRA-factor "
                         f"methods (lora_merge, knots) produce an adapter")
    output = Path(output)
    if resume and output_format == "adapter":
        raise ValueError("--resume: adapter outputs are written at once; resume applies to model outputs")
    if output_format == "adapter" and output.suffix == ".safetensors":
        raise ValueError(f"{output}: an adapter output is a folder, not a .safetensors file")
    _check_output(output, method.output == "per_task", [pretrained_path, *finetuned_paths, *stats_paths])

    pretrained = load_model(pretrained_path, trust_pickle=trust_pickle)
    if (Path(pretrained_path) / "adapter_config.json").is_file():
        raise ModelFileError(f"{pretrained_path}: the pretrained model cannot be a peft adapter")
    finetuned = [load_model(p, trust_pickle=trust_pickle, pretrained=pretrained) for p in finetuned_paths]
    # integer buffers transformers does not save (position_ids) are taken from θ0, extra ones ignored
    finetuned = reconcile_buffers(pretrained, finetuned, names=[str(p) for p in finetuned_paths])
    if dtype is not None:
        pretrained, finetuned = Cast(pretrained, DTYPES[dtype]), [Cast(f, DTYPES[dtype]) for f in finetuned]
    check_models(pretrained, finetuned, names=[str(p) for p in finetuned_paths])
    context = {"device": dev, "kinds": None}  # no model here: tensor kinds by the shape rule
    if stats_paths:
        context["stats"] = [load_statistics(p, reference=pretrained)[0] for p in stats_paths]
    if method.inputs == "lora":
        context["lora"] = [load_lora_factors(p, pretrained) for p in finetuned_paths]
    meta = {"taskmerge_method": method.name, "taskmerge_hparams": json.dumps(resolved, default=str),
            "taskmerge_inputs": json.dumps([str(p) for p in finetuned_paths])}
    if output_format == "adapter":
        return [write_adapter(method, pretrained, finetuned, output, resolved, context, finetuned_paths[0])]
    kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    written = write_merged(method, pretrained, finetuned, output, hparams=resolved, context=context, metadata=meta,
                           progress=progress, resume=resume, **kwargs)
    if method.output == "model" and output.suffix != ".safetensors":
        copy_model_files(pretrained_path, output)
    return written
