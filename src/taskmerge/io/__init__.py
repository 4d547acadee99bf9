"""Loading and saving weights: safetensors files and shards (lazy), Hugging Face folders, peft
adapters (LoRA / IA3), and pickles behind an explicit trust flag. Writing is atomic."""
from taskmerge.io.load import load_model  # noqa: F401
from taskmerge.io.peft import LoraFactors, load_adapter_dense, load_ia3_vectors, load_lora_factors  # noqa: F401
from taskmerge.io.tensors import LazyStateDict, ModelFileError, load_safetensors, save_state_dict  # noqa: F401
from taskmerge.io.buffers import reconcile_buffers  # noqa: F401
