"""Papers-style tables: methods as rows; tasks, average absolute and average normalized accuracy as columns."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

BASELINES_FIRST, BASELINES_LAST = ("pretrained",), ("finetuned",)


def load_results(csv: str | Path) -> pd.DataFrame:
    path = Path(csv)
    if not path.exists():
        raise FileNotFoundError(f"no results file {path}: run an eval script first")
    df = pd.read_csv(path)
    df["hparams_dict"] = df["hparams"].map(json.loads)
    return df


def _method_order(methods) -> list[str]:
    middle = [m for m in dict.fromkeys(methods) if m not in BASELINES_FIRST + BASELINES_LAST]
    return [m for m in BASELINES_FIRST if m in set(methods)] + middle + [m for m in BASELINES_LAST if m in set(methods)]


def _final_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Test rows, plus the last step of continual runs averaged over task orders."""
    test = df[df["stage"] == "test"]
    cont = df[df["stage"] == "continual"]
    if len(cont):
        last = cont[cont["step"] == cont.groupby("method")["step"].transform("max")]
        avg = last.groupby(["method", "task"], sort=False).agg(
            accuracy=("accuracy", "mean"), normalized_accuracy=("normalized_accuracy", "mean"),
            hparams=("hparams", "last"), orders=("order", "nunique")).reset_index()
        avg["hparams"] = [json.dumps({**json.loads(h), "orders": int(n)}) for h, n in zip(avg["hparams"], avg["orders"])]
        test = pd.concat([test, avg.drop(columns=["orders"])], ignore_index=True)
    return test


def _selected(hparams: pd.Series, tasks: pd.Series) -> str:
    settings = list(dict.fromkeys(hparams))
    fmt = lambda s: ", ".join(f"{k}={v}" for k, v in json.loads(s).items())  # noqa: E731
    if len(settings) == 1:
        return fmt(settings[0])
    return "per task: " + "; ".join(f"{t}: {fmt(h)}" for t, h in zip(tasks, hparams))


def test_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per method: test accuracy per task (in %), average absolute and average normalized (in %)."""
    test = _final_rows(df)
    # The newest test point per method/task (a re-run with other checkpoints supersedes older rows).
    test = test.groupby(["method", "task"], sort=False).tail(1)
    tasks = list(dict.fromkeys(test["task"]))
    acc = test.pivot(index="method", columns="task", values="accuracy")[tasks] * 100
    norm = test.pivot(index="method", columns="task", values="normalized_accuracy")[tasks] * 100
    acc["Avg. abs."] = acc[tasks].mean(axis=1)
    acc["Avg. norm."] = norm.mean(axis=1)
    sel = {m: _selected(g["hparams"], g["task"]) for m, g in test.groupby("method", sort=False)}
    acc.insert(0, "selected", pd.Series(sel))
    return acc.loc[_method_order(test["method"])]


def paper_table(df: pd.DataFrame, bold_best: bool = True) -> str:
    """Markdown table of :func:`test_summary`; the best merged method per column in bold."""
    summary = test_summary(df)
    numeric = [c for c in summary.columns if c != "selected"]
    merged_rows = [m for m in summary.index if m not in BASELINES_FIRST + BASELINES_LAST]
    best = {c: summary.loc[merged_rows, c].max() for c in numeric} if merged_rows else {}
    header = "| Method | " + " | ".join(numeric) + " | selected |"
    lines = [header, "|" + "---|" * (len(numeric) + 2)]
    for method, row in summary.iterrows():
        cells = []
        for c in numeric:
            text = f"{row[c]:.1f}"
            if bold_best and method in merged_rows and row[c] == best.get(c):
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {row['selected']} |")
    return "\n".join(lines) + "\n"


def continual_table(df: pd.DataFrame) -> str:
    """Markdown: per continual method, the final average test accuracy and BWT, mean ± std over task orders."""
    from taskmerge.search.continual import summarize

    cont = df[df["stage"] == "continual"]
    if cont.empty:
        return ""
    lines = ["| Method | orders | final avg. acc. (%) | BWT (%) |", "|---|---|---|---|"]
    for method, rows in cont.groupby("method", sort=False):
        n_tasks = max(len(str(o).split(">")) for o in rows["order"])  # an order label names every task
        out = summarize(rows.to_dict("records"), n_tasks)
        if not out["orders"]:
            lines.append(f"| {method} | 0 (interrupted before an order finished) | – | – |")
            continue
        (m, s), (bm, bs) = out["final_accuracy"], out.get("bwt", (float("nan"), float("nan")))
        lines.append(f"| {method} | {out['orders']} | {100 * m:.1f} ± {100 * s:.1f} | {100 * bm:.1f} ± {100 * bs:.1f} |")
    return "\n".join(lines) + "\n"
