"""Your own tasks end to end, declared in YAML only: fine-tune -> search -> report through the scripts."""
import pandas as pd

from tests.declared.helpers import outputs, run_script, write_image_task, write_text_tasks


def test_csv_tasks_finetune_search_report_tiny_bert(tmp_path):
    decl = write_text_tasks(tmp_path / "mine")
    common = ["tasks=own", f"tasks.declared={decl}", "model=tiny_bert", "budget.epochs=1", f"paths.data={tmp_path}/data",
              *outputs(tmp_path)]
    ft = run_script("training_scripts/finetune.py", *common)
    assert "mood" in ft.stdout and "topic" in ft.stdout
    ck = tmp_path / "ck" / "text-demo" / "tiny_bert" / "full"
    assert (ck / "mood" / "metadata.json").exists() and (ck / "topic" / "metadata.json").exists()
    stamps = {t: (ck / t / "metadata.json").stat().st_mtime_ns for t in ("mood", "topic")}
    out = run_script("eval_scripts/run_suite.py", *common, "method=[task_arithmetic,ties]", "search.grid=[0.5,1.0]")
    assert stamps == {t: (ck / t / "metadata.json").stat().st_mtime_ns for t in stamps}  # reused, not retrained
    csv = tmp_path / "res" / "text-demo_own_full.csv"
    assert f"results CSV : {csv}" in out.stdout
    df = pd.read_csv(csv)
    assert set(df.method) == {"pretrained", "finetuned", "task_arithmetic", "ties"}
    test = df[(df.stage == "test") & (df.method == "task_arithmetic")]
    assert sorted(test.task) == ["mood", "topic"] and test.accuracy.between(0, 1).all()
    # the search protocol: 2 grid points x 2 tasks on validation, one test point per method
    assert len(df[(df.method == "ties") & (df.stage == "search")]) == 4
    assert len(df[(df.method == "finetuned") & (df.split == "test")]) == 2
    (tmp_path / "res" / "text-demo_own_full.md").unlink()
    report = run_script("src/taskmerge/cli.py", "report", str(csv))
    table = (tmp_path / "res" / "text-demo_own_full.md").read_text()
    assert "| Method | mood | topic | Avg. abs. | Avg. norm. |" in table and "| task_arithmetic |" in table, table
    assert "text-demo_own_full.md" in report.stdout


def test_image_folder_task_tiny_clip(tmp_path):
    decl = write_image_task(tmp_path / "mine")
    out = run_script("eval_scripts/run_vision.py", "tasks=own_images", f"tasks.declared={decl}",
                     "finetune=tiny_full", "finetune.steps=4", "method=[task_arithmetic]", "search.grid=[0.5,1.0]",
                     *outputs(tmp_path))
    csv = next((tmp_path / "res").glob("vision-own_images_*.csv"))
    df = pd.read_csv(csv)
    assert set(df.method) == {"pretrained", "finetuned", "task_arithmetic"} and set(df.task) == {"shapes"}
    assert len(df[(df.stage == "search") & (df.method == "task_arithmetic")]) == 2 and df.accuracy.between(0, 1).all()
    assert csv.with_suffix(".md").exists() and "results CSV" in out.stdout
