"""Run the embedded default end to end: fine-tune (or reuse), search every configured method, report."""
from __future__ import annotations

import hashlib
import logging
import time

from omegaconf import DictConfig

from taskmerge.devices import config_device
from taskmerge.experiments.text_suite import TextEvaluator, TextSuite, repo_path
from taskmerge.merging import Method, get_method
from taskmerge.merging.selection import tensor_kinds
from taskmerge.search.engine import Profile, SearchContext, search_method, write_baselines
from taskmerge.search.spaces import spaces_from_config, validate_spaces
from taskmerge.search.store import ResultStore, experiment_identity
from taskmerge.train.checkpoints import load_metadata

log = logging.getLogger(__name__)


class MethodContext:
    """What each method needs beyond the weights, built lazily and once: tensor kinds, statistics, LoRA factors."""

    def __init__(self, suite: TextSuite, finetuned: list[dict], profile):
        self.suite, self.finetuned, self.profile, self._cache = suite, finetuned, profile, {}

    def __call__(self, method: Method) -> dict:
        out = {"device": config_device(self.suite.cfg)}
        if "kinds" in method.context:
            out["kinds"] = self._get("kinds", lambda: tensor_kinds(self.suite.encoder.state_dict(), self.suite.encoder))
        if "stats" in method.context:
            out["stats"] = self._get("stats", lambda: [self.suite.statistics(t, sd) for t, sd in
                                                       zip(self.suite.tasks, self.finetuned)])
        if "lora" in method.context:
            out["lora"] = self._get("lora", self.suite.lora_factors)
        return out

    def _get(self, key, build):
        if key not in self._cache:
            t0 = time.perf_counter()
            self._cache[key] = build()
            self.profile.prepare += time.perf_counter() - t0
        return self._cache[key]


def applicable(method: Method, cfg: DictConfig) -> bool:
    if method.inputs == "lora" and cfg.finetune.mode != "lora":
        log.warning("skipping %s: it merges LoRA factors and needs finetune=lora", method.name)
        return False
    return True


def results_csv(cfg: DictConfig):
    """results/<experiment>.csv; in a Hydra multirun, one CSV per job: results/<experiment>/<id>.csv.

    The job's id hashes its overrides, so re-running the same sweep resumes each job's own CSV;
    ``<id>.overrides`` beside it records the overrides in words.
    """
    root = repo_path(cfg.paths.results)
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            overrides = hc.job.override_dirname or "default"
            job = hashlib.sha256(overrides.encode()).hexdigest()[:10]
            folder = root / cfg.experiment
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{job}.overrides").write_text(overrides + "\n")
            return folder / f"{job}.csv"
    except (ValueError, ImportError):  # not inside a Hydra app (tests, the CLI)
        pass
    return root / f"{cfg.experiment}.csv"


def prepare(cfg: DictConfig) -> TextSuite:
    suite = TextSuite(cfg).load()
    for task in suite.tasks:
        suite.finetune_task(task, force=cfg.force)
    return suite


def run(cfg: DictConfig) -> dict:
    validate_spaces(cfg, results=results_csv(cfg))  # the whole search is checked before any fine-tuning or row
    t_start = time.perf_counter()
    suite = prepare(cfg)
    t_other = time.perf_counter()
    evaluator = TextEvaluator(suite)
    pretrained = {k: v.detach().to("cpu", copy=True) for k, v in suite.encoder.state_dict().items()}
    finetuned = suite.finetuned_states()
    pretrained_acc = suite.pretrained_accuracy(lambda task, split: evaluator.evaluate(pretrained, task, split))
    refs = {}
    for task in suite.tasks:
        meta = load_metadata(suite.checkpoint(task))
        for split in ("validation", "test"):
            refs[(task, split)] = (meta[f"{split}_accuracy"], pretrained_acc[f"{task}/{split}"])
    profile = Profile(prepare=time.perf_counter() - t_other)
    ctx = SearchContext(cfg.experiment, pretrained, finetuned, evaluator, refs, suite.checkpoints_id(), cfg.seed,
                        method_context=MethodContext(suite, finetuned, profile), profile=profile)
    store = ResultStore(results_csv(cfg), experiment_identity(cfg))
    write_baselines(ctx, store)
    selected = {}
    t_loop, before = time.perf_counter(), profile.merge + profile.evaluate + profile.prepare
    for space in spaces_from_config(cfg.methods, cfg.search):
        if not applicable(get_method(space.method), cfg):
            continue
        best = search_method(space, ctx, store)
        selected[space.name] = best
        log.info("%s: selected %s (val avg. norm. %.3f, test avg. norm. %.3f)", space.name, best["hparams"],
                 best["val"], best["test"])
    from taskmerge.report import write_report

    outputs = write_report(store.path)
    # other = everything in the search loop and the report that is neither merging, evaluating nor preparing
    profile.other += time.perf_counter() - t_loop - (profile.merge + profile.evaluate + profile.prepare - before)
    return {"csv": store.path, **outputs, "selected": selected, "profile": ctx.profile,
            "total_seconds": time.perf_counter() - t_start}
