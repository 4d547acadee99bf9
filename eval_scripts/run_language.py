"""The papers' language experiments (GPU machine; downloads models and data through the HF hub).

    python eval_scripts/run_language.py --config-name language_mats                       # MaTS, T5 full FT
    python eval_scripts/run_language.py --config-name language_mats finetune.mode=ia3 finetune.lr=3e-3
    python eval_scripts/run_language.py --config-name language_knots                      # KnOTS, Llama-3-8B LoRA

Rows go to results/<experiment>.csv. See docs/language.md for targets and caveats.
"""
import logging

from omegaconf import DictConfig

from taskmerge.cli_support import hydra_script


@hydra_script("../configs", "language_mats")
def main(cfg: DictConfig) -> None:
    from taskmerge.experiments.language import run

    logging.basicConfig(level=logging.INFO)
    out = run(cfg)
    for method, best in out["selected"].items():
        print(f"{method:16s} val {best['val']:.3f} test {best['test']:.3f} {best['hparams']}")
    print(f"rows: {out['csv']}")


if __name__ == "__main__":
    main()
