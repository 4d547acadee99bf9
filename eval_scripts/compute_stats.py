"""Compute and cache Fisher / Gram statistics of the embedded default's fine-tuned models.

    python eval_scripts/compute_stats.py                         # every task, empirical Fisher, validation split
    python eval_scripts/compute_stats.py task=bbc_news stats.fisher=true stats.max_examples=500

Writes checkpoints/<suite>/<model>/<mode>/<task>/statistics-<split>_<fisher>_<N>.safetensors (keys
`<module>.gram_in`, `<module>.gram_out`, `<param>.fisher`); the search reuses them.
Same as `taskmerge stats [overrides]`. Config: configs/suite.yaml (`stats:` block).
"""
from taskmerge.experiments.runner import script
from taskmerge.experiments.text_suite import compute_statistics


def main(cfg) -> None:
    for task, path in compute_statistics(cfg).items():
        print(f"{task:20s} {path}")


main = script("suite", main)

if __name__ == "__main__":
    main()
