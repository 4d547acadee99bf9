"""Fine-tune CLIP image encoders per task (full: task-vectors protocol; LoRA r16: KnOTS), one GPU or many.

    python training_scripts/finetune_vision.py experiment=tiny_synthetic                 # CPU smoke
    python training_scripts/finetune_vision.py experiment=tall_tsv model=vitb32_open_clip tasks=tall8 \
        model.path=/ckpt/openai-ViT-B-32.safetensors task=Cars
    accelerate launch --multi_gpu --num_processes 8 training_scripts/finetune_vision.py \
        experiment=knots model=vitb32_hf model.path=/hf/clip-vit-base-patch32           # DDP (or torchrun --nproc_per_node 8)

Checkpoints: checkpoints/<suite>/<model>/<mode>/<task>/ (model.safetensors or adapter/, metadata.json last).
Config: configs/vision.yaml (configs/finetune/ holds the per-task epochs with their sources).
"""
from accelerate import Accelerator

from taskmerge.experiments.runner import prepare, prepared, script
from taskmerge.experiments.vision import VisionSuite


def main(cfg) -> None:
    accelerator = Accelerator()
    suite = VisionSuite(cfg, accelerator if accelerator.num_processes > 1 else None)
    prepared(prepare(suite, [cfg.task] if cfg.task else None), suite)


main = script("vision", main)

if __name__ == "__main__":
    main()
