"""The embedded default end to end: fine-tune (or reuse) every task, search each method, write CSV/table/plots.

    python eval_scripts/run_suite.py                                  # what `make demo` runs
    python eval_scripts/run_suite.py method=task_arithmetic search.grid=[0.2,0.4]
    python eval_scripts/run_suite.py budget=full tasks=text6          # the larger budget, all six tasks
    python eval_scripts/run_suite.py finetune=lora                    # merge LoRA fine-tunes (densified)

Rows are appended to results/<experiment>.csv; re-running skips points already there.
Config: configs/suite.yaml (method grids in configs/method/).
"""
import logging
from omegaconf import DictConfig

from taskmerge.cli_support import hydra_script, print_outcome


@hydra_script("../configs", "suite")
def main(cfg: DictConfig) -> None:
    from taskmerge.experiments.runner import run

    logging.getLogger("taskmerge").setLevel(logging.INFO)
    print_outcome(run(cfg))


if __name__ == "__main__":
    main()
