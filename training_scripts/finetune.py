"""Fine-tune one task (or every task) of the embedded default, in full, LoRA or IA3 mode.

    python training_scripts/finetune.py task=bbc_news                 # full fine-tuning, demo budget
    python training_scripts/finetune.py task=bbc_news finetune=lora   # LoRA through peft
    python training_scripts/finetune.py finetune=ia3 budget=full      # every task, IA3, full budget
    python training_scripts/finetune.py task=bbc_news force=true      # retrain an existing checkpoint

Writes checkpoints/<suite>/<model>/<mode>/<task>/ (weights or adapter/, head.safetensors, metadata.json).
An existing checkpoint is reused unless force=true. Config: configs/suite.yaml.
"""
from taskmerge.experiments.runner import prepare, prepared, script
from taskmerge.experiments.text_suite import TextSuite


def main(cfg) -> None:
    suite = TextSuite(cfg)
    prepared(prepare(suite, [cfg.task] if cfg.task else None), suite)


main = script("suite", main)

if __name__ == "__main__":
    main()
