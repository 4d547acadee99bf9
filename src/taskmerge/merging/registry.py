"""The method registry: a method's typed signature *is* its configuration.

A merging method is written once, as a generator over lazily readable inputs

    fn(pretrained: Mapping, finetuned: Sequence[Mapping], *, <hyperparameters>, <context>)
        -> Iterator[(key, value)]      (per-task methods: (key, [value per task]))

registered with :func:`register`; ``taskmerge.merging.outputs`` defines keys and values (an
``Update(delta, scale)`` or a merged tensor). Every consumer reads that one producer:
``Method.__call__`` collects a state dict, ``taskmerge.io.merge_writer`` writes a sharded folder,
the search caches the float32 update. Its keyword-only parameters with defaults are its
hyperparameters (public names, see the README's table); their annotations give the type used to
parse ``-p name=value`` strings:

- ``float``/``int``/``bool``/``str``; ``typing.Literal[...]`` for a closed set of choices;
- ``Annotated[float, Range(lo, hi)]`` for a bounded number (checked before merging).

Context arguments are not hyperparameters; the caller passes those the function declares, by
these names (a consumer passes what it has; the registry hands each method only what it declares):

- ``kinds``: ``{tensor name: "linear" | "embedding" | "conv" | "norm" | "other"}``
  (``taskmerge.merging.selection``; None: the shape rule);
- ``stats``: one statistics dict per fine-tuned model (Fisher / Gram), same order;
- ``depths``: ``{tensor name: index of its residual block}`` from the model family (LiNeS' layer
  depth; tensors outside the blocks absent); None: the block is read from the name;
- ``layer_stats``: a callback ``(block, merged tensors) -> [per model {"<module>.gram_in": G}]``,
  input Grams of one block forwarded through the merged blocks below it (RegMean++;
  ``taskmerge.stats.layerwise``);
- ``device``: where to run the arithmetic (results come back on the input's device);
- ``lora``: LoRA factors per fine-tuned model (for factor-space methods);
- ``cache``: a dict the caller keeps while the inputs stay the same (one per method search), in
  which a method stores what its hyperparameters do not change (τ_MTL, joint SVDs) via
  ``primitives.memo``; results never depend on it;
- ``scratch``: a mutable mapping of float32 tensors for state a method carries across the model
  (OPCM's τ̄, TALL's τ_MTL): a dict in memory, files on disk when streaming (``io.spill``);
- ``chunk_numel``: element-wise methods may split tensors larger than this into row chunks;
- ``artifacts``: a dict in which a method leaves by-products worth saving (TALL's masks).

Declared properties:

- ``output``: ``"model"`` (one merged state dict) or ``"per_task"`` (one per input, in order);
- ``linear_in``: name of a hyperparameter ``s`` that the method yields as the ``scale`` of every
  ``Update``, with a delta independent of ``s``: ``merge(s) = θ0 + s · Δ`` exactly, so the search
  merges once per setting of the *other* hyperparameters and rescales the cached float32 Δ;
- ``sequential``: the task order matters (OPCM and the continual baselines); the generator then
  yields one *step view* per task (an iterable of ``(key, value)`` read before the next step), and
  the merge is the last view;
- ``memory``: what the method holds beyond one key of every input (its carried state), in words;
  ``taskmerge methods NAME`` prints it.
- ``key_local``: a key's result depends only on that key of the inputs (and of the statistics), for
  every setting of the hyperparameters. Then the method run over a model with some keys removed
  yields the same values for the others (tested for every such method), which is how an
  interrupted streamed merge resumes (``write_merged(resume=True)``, ``taskmerge merge --resume``).
  False for carried state (OPCM, TALL/Consensus' τ_MTL), global thresholds (TIES' default trim),
  RNG streams across keys (DARE) and per-block statistics (RegMean++); also, for now, for Fisher and
  RegMean, whose math is per key but whose statistics checks read the whole model they are handed.
- ``cross_key``: {hyperparameter: values} under which a ``key_local`` method merges some keys jointly
  (WUDI's ``qkv="stacked"`` optimises q, k and v as one matrix); ``Method.is_key_local(hparams)``.
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

from taskmerge.merging.inputs import StateDict  # noqa: F401  (re-exported: methods annotate with it)
from taskmerge.merging.outputs import collect
CONTEXT_ARGS = frozenset({"kinds", "stats", "depths", "layer_stats", "device", "lora", "cache", "scratch",
                          "chunk_numel", "artifacts"})


@dataclasses.dataclass(frozen=True)
class Range:
    """Closed (or half-open) numeric bounds for a hyperparameter."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def check(self, name: str, value: float) -> None:
        bad_lo = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        bad_hi = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        if bad_lo or bad_hi:
            lo = "-inf" if self.lo is None else self.lo
            hi = "inf" if self.hi is None else self.hi
            brackets = ("(" if self.lo_open else "[", ")" if self.hi_open else "]")
            raise ValueError(f"hyperparameter {name}={value} is out of range {brackets[0]}{lo}, {hi}{brackets[1]}")


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    type: Any  # python type, or tuple of choices for Literal
    default: Any
    range: Range | None = None

    @property
    def choices(self) -> tuple | None:
        return self.type if isinstance(self.type, tuple) else None

    def parse(self, value: Any) -> Any:
        """Convert a CLI/config value to this parameter's type and validate it."""
        if self.choices is not None:
            if isinstance(value, str) and not any(isinstance(c, str) for c in self.choices):
                value = _parse_scalar(value, type(self.choices[0]))
            if value not in self.choices:
                raise ValueError(f"hyperparameter {self.name}={value!r}: choose one of {list(self.choices)}")
            return value
        if self.type is Any or self.default is None and isinstance(value, str):
            return value
        try:
            value = _parse_scalar(value, self.type)
        except (TypeError, ValueError):
            raise ValueError(f"hyperparameter {self.name}={value!r} is not a valid {self.type.__name__}") from None
        if self.range is not None:
            self.range.check(self.name, value)
        return value


def _parse_scalar(value: Any, typ: type) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(value)
    if typ is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    if typ in (int, float) and isinstance(value, bool):
        raise ValueError(value)
    return typ(value)


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., Any]
    params: Mapping[str, Param]
    context: frozenset[str]
    output: Literal["model", "per_task"] = "model"
    linear_in: str | None = None
    sequential: bool = False
    inputs: Literal["state_dict", "lora"] = "state_dict"
    memory: str = "one key of every input"
    key_local: bool = False
    cross_key: Mapping[str, tuple] = dataclasses.field(default_factory=dict)

    def is_key_local(self, hparams: Mapping[str, Any] | None = None) -> bool:
        """``key_local`` at these hyperparameters (``cross_key`` names the settings that join keys)."""
        resolved = self.resolve(hparams)
        return self.key_local and not any(resolved[k] in values for k, values in self.cross_key.items())

    @property
    def defaults(self) -> dict[str, Any]:
        return {n: p.default for n, p in self.params.items()}

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.fn) or ""

    @property
    def where(self) -> str:
        """``module:line`` of the function that defines the method."""
        fn = inspect.unwrap(self.fn)
        return f"{fn.__module__}:{fn.__code__.co_firstlineno}"

    def resolve(self, hparams: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Defaults overridden by ``hparams``, parsed and validated; unknown names are an error."""
        hparams = dict(hparams or {})
        unknown = sorted(set(hparams) - set(self.params))
        if unknown:
            valid = ", ".join(self.params) or "(none)"
            raise ValueError(f"method {self.name!r} has no hyperparameter {', '.join(unknown)}; valid: {valid}")
        out = self.defaults
        out.update({k: self.params[k].parse(v) for k, v in hparams.items()})
        return out

    def _run(self, pretrained, finetuned, hparams, context):
        if not finetuned:
            raise ValueError(f"method {self.name!r}: the list of fine-tuned models is empty")
        kwargs = self.resolve(hparams)
        kwargs.update({k: v for k, v in context.items() if k in self.context and v is not None})
        return self.fn(pretrained, list(finetuned), **kwargs)

    def stream(self, pretrained, finetuned: Sequence, hparams=None, **context) -> Iterator:
        """The method's producer: ``(key, value)`` for every floating tensor (``merging.outputs``)."""
        produced = self._run(pretrained, finetuned, hparams, context)
        if not self.sequential:
            return produced
        view = None
        for view in produced:  # a step view stays valid once the generator is exhausted
            pass
        return iter(view)

    def steps(self, pretrained, finetuned: Sequence, hparams=None, **context) -> Iterator[StateDict]:
        """The merged state dict after each task of a sequential method."""
        if not self.sequential:
            raise TypeError(f"method {self.name!r} is not sequential: it has no per-step models")
        for view in self._run(pretrained, finetuned, hparams, context):
            yield collect(pretrained, view)

    def __call__(self, pretrained, finetuned: Sequence, hparams=None, **context):
        """The in-memory consumer: a state dict (``output="per_task"``: one per fine-tuned model)."""
        items = self.stream(pretrained, finetuned, hparams, **context)
        return collect(pretrained, items, len(finetuned) if self.output == "per_task" else None)


METHODS: dict[str, Method] = {}


def register(name: str, *, output: str = "model", linear_in: str | None = None,
             sequential: bool = False, inputs: str = "state_dict", memory: str = "one key of every input",
             key_local: bool = False, cross_key: Mapping[str, tuple] | None = None):
    """Decorator: register ``fn`` under ``name`` with its keyword-only hyperparameters."""

    def deco(fn):
        hints = typing.get_type_hints(fn, include_extras=True)
        params, context = {}, set()
        for p in inspect.signature(fn).parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY:
                continue
            if p.name in CONTEXT_ARGS:
                context.add(p.name)
                continue
            if p.default is inspect.Parameter.empty:
                raise TypeError(f"{name}: hyperparameter {p.name} needs a default")
            params[p.name] = _param_from_hint(p.name, hints.get(p.name, Any), p.default)
        if linear_in is not None and linear_in not in params:
            raise TypeError(f"{name}: linear_in={linear_in!r} is not a hyperparameter")
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        if set(cross_key or {}) - set(params):
            raise TypeError(f"{name}: cross_key names {sorted(set(cross_key) - set(params))}, not hyperparameters")
        METHODS[name] = Method(name, fn, params, frozenset(context), output, linear_in, sequential, inputs, memory,
                               key_local, dict(cross_key or {}))
        return fn

    return deco


def _param_from_hint(name: str, hint: Any, default: Any) -> Param:
    rng = None
    if typing.get_origin(hint) is typing.Annotated:
        base, *extras = typing.get_args(hint)
        rng = next((e for e in extras if isinstance(e, Range)), None)
        hint = base
    if typing.get_origin(hint) is Literal:
        return Param(name, tuple(typing.get_args(hint)), default)
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else Any
    return Param(name, hint, default, rng)


def load_plugins(spec: str | None = None) -> list[str]:
    """Import the method modules named in ``spec`` (default: ``$TASKMERGE_METHODS``), comma-separated module
    names or ``.py`` paths, so that methods outside the package register themselves. Returns their names."""
    import importlib
    import importlib.util
    import os
    from pathlib import Path

    loaded = []
    for entry in filter(None, (e.strip() for e in (spec if spec is not None else
                                                   os.environ.get("TASKMERGE_METHODS", "")).split(","))):
        if entry.endswith(".py"):
            path = Path(entry)
            name = f"taskmerge_plugin_{path.stem}"
            if name not in sys.modules:
                if not path.is_file():
                    raise ValueError(f"TASKMERGE_METHODS: {path} does not exist")
                module_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[name] = module
                module_spec.loader.exec_module(module)
        else:
            name = entry
            importlib.import_module(name)
        loaded.append(name)
    return loaded


def get_method(name: str) -> Method:
    if name not in METHODS:  # importing this module ran taskmerge/merging/__init__, which registers every method
        raise KeyError(f"unknown merging method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def merge(name: str, pretrained: StateDict, finetuned: Sequence[StateDict], hparams=None, **context):
    """Run the registered method ``name`` (convenience wrapper)."""
    return get_method(name)(pretrained, finetuned, hparams, **context)
