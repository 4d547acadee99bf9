"""The embedded default end to end: fine-tune (or reuse) every task, search each method, write CSV/table/plots.

    python eval_scripts/run_suite.py                                  # what `make demo` runs
    python eval_scripts/run_suite.py method=task_arithmetic search.grid=[0.2,0.4]
    python eval_scripts/run_suite.py budget=full tasks=text6          # the larger budget, all six tasks
    python eval_scripts/run_suite.py finetune=lora                    # merge LoRA fine-tunes (densified)

Rows are appended to results/<experiment>.csv; re-running skips points already there.
Config: configs/suite.yaml (method grids in configs/method/).
"""
from taskmerge.experiments.runner import search_script
from taskmerge.experiments.text_suite import run

main = search_script("suite", run)

if __name__ == "__main__":
    main()
