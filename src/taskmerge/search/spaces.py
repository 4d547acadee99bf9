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
