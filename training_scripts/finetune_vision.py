"""Fine-tune CLIP image encoders per task (full: task-vectors protocol; LoRA r16: KnOTS), one GPU or many.

    python training_scripts/finetune_vision.py experiment=tiny_synthetic                 # CPU smoke
    python training_scripts/finetune_vision.py experiment=tall_tsv model=vitb32_open_clip tasks=tall8 \
        model.path=/ckpt/openai-ViT-B-32.safetensors task=Cars
    accelerate launch --multi_gpu --num_processes 8 training_scripts/finetune_vision.py \
        experiment=knots model=vitb32_hf model.path=/hf/clip-vit-base-patch32           # DDP (or torchrun --nproc_per_node 8)

Checkpoints: checkpoints/<suite>/<model>/<mode>/<task>/ (model.safetensors or adapter/, metadata.json last).
Config: configs/vision/ (finetune/ holds the per-task epochs with their sources).
"""
import logging

from omegaconf import DictConfig

from taskmerge.cli_support import hydra_script


@hydra_script("../configs/vision", "vision")
def main(cfg: DictConfig) -> None:
    from accelerate import Accelerator

    from taskmerge.experiments.vision import VisionSuite

    logging.getLogger("taskmerge").setLevel(logging.INFO)
    accelerator = Accelerator()
    suite = VisionSuite(cfg).load()
    for task in [cfg.task] if cfg.task else suite.names:
        meta = suite.finetune_task(task, accelerator if accelerator.num_processes > 1 else None, force=cfg.force)
        if meta and accelerator.is_main_process:
            print(f"{task:14s} val {meta['validation_accuracy']:.3f}  test {meta['test_accuracy']:.3f}  -> {suite.checkpoint(task)}")


if __name__ == "__main__":
    main()
