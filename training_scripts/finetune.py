"""Fine-tune one task (or every task) of the embedded default, in full, LoRA or IA3 mode.

    python training_scripts/finetune.py task=bbc_news                 # full fine-tuning, demo budget
    python training_scripts/finetune.py task=bbc_news finetune=lora   # LoRA through peft
    python training_scripts/finetune.py finetune=ia3 budget=full      # every task, IA3, full budget
    python training_scripts/finetune.py task=bbc_news force=true      # retrain an existing checkpoint

Writes checkpoints/<suite>/<model>/<mode>/<task>/ (weights or adapter/, head.safetensors, metadata.json).
An existing checkpoint is reused unless force=true. Config: configs/suite.yaml.
"""
from omegaconf import DictConfig

from taskmerge.cli_support import hydra_script


@hydra_script("../configs", "suite")
def main(cfg: DictConfig) -> None:
    from taskmerge.experiments.text_suite import TextSuite

    suite = TextSuite(cfg).load()
    tasks = [cfg.task] if cfg.task else suite.tasks
    for task in tasks:
        if task not in suite.tasks:
            raise ValueError(f"task {task!r} is not in tasks={cfg.tasks.name} ({', '.join(suite.tasks)})")
        meta = suite.finetune_task(task, force=cfg.force)
        print(f"{task}: val {meta['validation_accuracy']:.3f}  test {meta['test_accuracy']:.3f}  "
              f"-> {suite.checkpoint(task)}")


if __name__ == "__main__":
    main()
