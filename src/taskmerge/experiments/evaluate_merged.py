"""``taskmerge eval``: score any merged model on the configured (declared) tasks, with the search's protocol.

A merged output (a ``.safetensors`` file or a Hugging Face folder from ``taskmerge merge`` or any other
tool; a folder of ``task_<i>.safetensors`` for per-task methods such as ``tall_mask``) is loaded with θ0's
tensor names, checked against θ0 (names, shapes, dtypes), and evaluated on every task's validation and
test split with that task's own head. Rows go to the same results CSV as the search
(``results/<experiment>.csv`` unless ``csv`` is given), with the same columns and references: the
``pretrained`` and ``finetuned`` baselines of the same checkpoints (evaluated, or read back from the
CSV), validation rows as stage ``search`` and test rows as stage ``test``, so ``taskmerge report``
tables a model merged elsewhere beside the searched methods. Re-running skips rows already present.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import torch

from taskmerge.experiments import runner
from taskmerge.io.load import load_model
from taskmerge.report import write_report
from taskmerge.search.common import evaluate_point, make_rows
from taskmerge.train.imported import check_against_theta0

log = logging.getLogger(__name__)


def load_merged(path: Path, pretrained: dict, n_tasks: int) -> dict | list[dict]:
    """The merged state (θ0's names, checked), or one per task for a folder of ``task_<i>.safetensors``."""
    path = Path(path)
    per_task = sorted(path.glob("task_*.safetensors")) if path.is_dir() else []
    if per_task:
        if len(per_task) != n_tasks:
            raise ValueError(f"{path} holds {len(per_task)} per-task models (task_<i>.safetensors) for {n_tasks} tasks")
        return [load_merged(path / f"task_{i}.safetensors", pretrained, 1) for i in range(n_tasks)]
    state = {k: torch.as_tensor(v).detach().clone() for k, v in load_model(path, pretrained=pretrained).items()}
    check_against_theta0("merged", path, pretrained, state)
    return state


def evaluate_outputs(adapter: runner.Adapter, outputs: Sequence[str | Path], *, name: str | None = None,
                     hparams: dict | None = None, csv: Path | None = None) -> dict:
    """Evaluate each output in ``outputs`` and append its rows; returns ``{"csv", "rows", "scores"}``.

    ``name``: the CSV's ``method`` column (default ``eval:<file name>``); ``hparams``: recorded as the
    row's hyperparameters (e.g. those given to ``taskmerge merge``)."""
    if name and len(outputs) > 1:
        raise ValueError("--name names one output; give one output per call, or no --name")
    ses = runner.session(adapter, csv)
    hp = dict(hparams or {})
    scores, written = {}, 0
    for out in outputs:
        out = Path(out)
        if not out.exists():
            raise FileNotFoundError(f"{out}: no such merged model (file or folder)")
        method = name or f"eval:{out.name}"
        merged = None
        for split, stage in (("validation", "search"), ("test", "test")):
            if ses.store.has(method, hp, stage, split, ses.ctx.checkpoints, ses.ctx.seed):
                log.info("%s %s: already in %s", method, split, ses.store.path)
                continue
            merged = load_merged(out, ses.pretrained, len(adapter.tasks)) if merged is None else merged
            t0 = time.perf_counter()
            accs = evaluate_point(ses.ctx, merged, split)
            rows = make_rows(ses.ctx, method, hp, stage, split, accs, time.perf_counter() - t0)
            ses.store.append(rows)
            written += len(rows)
            scores[(method, split)] = accs
    report = write_report(ses.store.path) if adapter.cfg.get("report", True) else {}
    return {"csv": ses.store.path, "rows": written, "scores": scores, **report}
