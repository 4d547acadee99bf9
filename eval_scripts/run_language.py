"""The papers' language experiments (GPU machine; downloads models and data through the HF hub).

    python eval_scripts/run_language.py --config-name language_mats                       # MaTS, T5 full FT
    python eval_scripts/run_language.py --config-name language_mats finetune.mode=ia3 finetune.lr=3e-3
    python eval_scripts/run_language.py --config-name language_knots                      # KnOTS, Llama-3-8B LoRA

Rows go to results/<experiment>.csv, with the table and plots beside it. See docs/language.md for
targets and caveats. Config: configs/language_{mats,knots}.yaml (method grids in configs/method/).
"""
from taskmerge.experiments.language import run
from taskmerge.experiments.runner import search_script

main = search_script("language_mats", run)

if __name__ == "__main__":
    main()
