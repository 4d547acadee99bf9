"""Merging methods: one module per family, each registering pure functions over tensors.

Importing this package registers every method: every module of this package is imported (adding a
method is one module here plus one config), then the modules named in ``TASKMERGE_METHODS`` (comma-
separated module names or ``.py`` paths: methods that live outside the package). Use
:func:`get_method` / :func:`merge`.
"""
import importlib
import pkgutil

from taskmerge.merging.registry import METHODS, Method, get_method, load_plugins, merge, register  # noqa: F401

_INFRASTRUCTURE = {"registry", "primitives", "inputs", "outputs", "selection", "lora"}
for _info in pkgutil.iter_modules(__path__):
    if _info.name not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_info.name}")
load_plugins()
