"""The real pipeline (real MiniLM, real data) end to end on a tiny budget."""
import pandas as pd

from taskmerge.experiments.text_suite import run
from taskmerge.search.store import COLUMNS

from .helpers import suite_config


def test_real_pipeline_tiny_budget(tmp_path, suite_dir):
    cfg = suite_config(tmp_path, "search.grid=[0.5,1.0]")  # the demo's methods, two grid points each
    out = run(cfg)
    df = pd.read_csv(out["csv"])
    assert list(df.columns) == COLUMNS
    merged = df[~df.method.isin(["pretrained", "finetuned"])]
    assert set(merged.method) == {"average", "task_arithmetic", "ties", "tsv_m"}
    ta = merged[merged.method == "task_arithmetic"]
    assert len(ta[ta.stage == "search"]) == 2 * 2 and len(ta[ta.stage == "test"]) == 2
    assert out["table"].read_text().count("| task_arithmetic |") == 1
    assert out["search_plot"].stat().st_size > 0 and out["tasks_plot"].stat().st_size > 0
    # second run: everything is reused, nothing appended
    run(cfg)
    assert len(pd.read_csv(out["csv"])) == len(df)
