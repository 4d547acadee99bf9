"""Search spaces from Hydra configs: ``methods.<key>`` entries (configs/method/*.yaml, adjusted by a
setting's primary config and the command line) and a ``search`` block."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from taskmerge.search.common import Space


def spaces_from_config(methods: DictConfig, search: DictConfig) -> list[Space]:
    """One :class:`Space` per configured method.

    A method entry (``configs/method/<key>.yaml``) has ``name`` (the registered method), ``params``
    (fixed hyperparameters), ``grid`` (ordered values per hyperparameter) and optionally ``strategy``
    (grid | greedy | per_task), ``accept`` (greedy: ge | gt) and ``orders`` (sequential methods).
    The key labels the CSV rows, so two configs of one method (``knots_ties``, ``knots_dare_ties``)
    stay apart. A setting adjusts a method under ``methods.<key>`` in its primary config (merged over
    the method's file when that method is selected); an entry without ``name`` is such an adjustment
    of a method that is not selected, and is ignored. ``search.grid`` replaces the first grid axis
    of every method; ``search.orders`` and ``search.accept``, when set, override the methods' own;
    ``search.selection`` picks the metric.
    """
    spaces = []
    for key, entry in methods.items():
        m = OmegaConf.to_container(entry, resolve=True)
        if "name" not in m:
            continue
        grid = dict(m.get("grid") or {})
        if search.get("grid") is not None and grid:
            grid[next(iter(grid))] = list(search.grid)
        name = m["name"]
        spaces.append(Space(name, grid, dict(m.get("params") or {}), strategy=m.get("strategy", "grid"),
                            accept=search.get("accept") or m.get("accept", "ge"),
                            select=search.get("selection") or "avg_normalized_accuracy",
                            orders=search.get("orders") or m.get("orders", 10),
                            label=key if key != name else None))
    return spaces


def validate_spaces(cfg: DictConfig, lora_available: bool | None = None, results=None) -> list[Space]:
    """Check a whole search before any work (fine-tuning, baselines, merging); return its spaces.

    Every configured method must exist; every grid point, the fixed hyperparameters included, must
    pass the method's own checks (``Method.resolve``: names, types, ranges); strategies, selection
    metrics, ``accept`` and ``orders`` must be known; the ``device`` must exist on this machine; and
    local paths the config names (``model.path``, ``finetuned.pattern`` for every task,
    ``finetuned.heads``) must exist. ``lora_available=False`` refuses methods that merge LoRA
    factors. ``results`` (the CSV the run appends to) must not belong to another experiment
    (``search.store.experiment_identity``). Each failure is one ``ValueError`` line naming the
    config key, the bad value or the file.
    """
    from taskmerge.devices import config_device
    from taskmerge.merging.registry import get_method
    from taskmerge.search.engine import SELECTION

    config_device(cfg)
    search = cfg.get("search") or {}
    if search.get("grid") is not None and not OmegaConf.is_list(search.grid) and not isinstance(search.grid, list):
        raise ValueError(f"search.grid={search.grid!r}: a list of values, e.g. search.grid=[0.3,0.5]")
    spaces = spaces_from_config(cfg.get("methods") or {}, cfg.get("search") or {})
    for space in spaces:
        where = f"methods.{space.name}"
        try:
            method = get_method(space.method)
        except KeyError as e:  # the message lists the registered methods
            raise ValueError(f"{where}.name: {e.args[0]}") from None
        if space.strategy not in ("grid", "greedy", "per_task"):
            raise ValueError(f"{where}.strategy={space.strategy!r}: choose grid, greedy or per_task")
        if space.strategy == "per_task" and method.output != "per_task":
            raise ValueError(f"{where}.strategy=per_task selects one point per task and needs a per-task method, "
                             f"not {space.method!r}")
        if space.select not in SELECTION:
            raise ValueError(f"search.selection={space.select!r}: choose one of {sorted(SELECTION)}")
        if space.accept not in ("ge", "gt"):
            raise ValueError(f"{where}.accept={space.accept!r}: choose ge or gt")
        if method.sequential and not (isinstance(space.orders, int) and space.orders >= 1):
            raise ValueError(f"{where}.orders={space.orders!r}: the number of task orders must be an integer >= 1")
        if lora_available is False and method.inputs == "lora":
            raise ValueError(f"{where}: method {space.method} merges LoRA factors and needs LoRA fine-tunes "
                             f"(finetune=lora)")
        for axis, values in space.grid.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"{where}.grid.{axis}={values!r}: a grid axis is a non-empty list of values")
        try:
            method.resolve(space.fixed)
            for point in space.points(method.linear_in):
                method.resolve(point)
        except ValueError as e:
            grid = f" (grid {space.grid})" if space.grid else ""
            raise ValueError(f"{where}: {e}{grid}") from None
    _check_paths(cfg)
    if results is not None:
        from taskmerge.search.store import check_identity, experiment_identity

        check_identity(results, experiment_identity(cfg))
    return spaces


def _check_paths(cfg: DictConfig) -> None:
    """Local paths the config names must exist (hub ids such as ``google/t5-large-lm-adapt`` are not checked)."""
    from pathlib import Path

    def local(p) -> bool:
        return isinstance(p, str) and (p.startswith(("/", "./", "../", "~")))

    model = cfg.get("model") or {}
    path = model.get("path") if hasattr(model, "get") else None
    if local(path) and not Path(path).expanduser().exists():
        raise ValueError(f"model.path={path}: no such file or folder")
    finetuned = cfg.get("finetuned") or {}
    tasks = list((cfg.get("tasks") or {}).get("names") or [])
    for key in ("pattern", "heads"):
        pattern = finetuned.get(key) if hasattr(finetuned, "get") else None
        if not pattern:
            continue
        if "{task}" not in pattern:
            raise ValueError(f"finetuned.{key}={pattern}: the pattern must contain {{task}}, one file per task")
        missing = [t for t in tasks if not Path(pattern.format(task=t)).expanduser().exists()]
        if missing:
            raise ValueError(f"finetuned.{key}={pattern}: nothing at {pattern.format(task=missing[0])}"
                             + (f" (nor for {len(missing) - 1} other tasks)" if len(missing) > 1 else ""))
