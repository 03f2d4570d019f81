"""The pass registry: a pass name maps to its config class and its graph-rewrite function.

Built-in passes live in ``sparsec.passes`` (one file each) and register on import. Third-party passes register
through the ``sparsec.passes`` entry-point group, or a file given explicitly with ``--plugin``.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from dataclasses import dataclass, field
from typing import Callable

from sparsec.config import PassConfig
from sparsec.errors import SparsecError, UsageError, did_you_mean

ENTRY_POINT_GROUP = "sparsec.passes"


@dataclass(frozen=True)
class PassInfo:
    """A registered pass. ``after``: passes that, when present, must run before this one; ``before``: after it."""

    name: str
    config_cls: type[PassConfig]
    fn: Callable
    needs_calibration: bool | str = False  # a str: "OPTION=VALUE", calibration only with that option value
    after: tuple[str, ...] = ()
    before: tuple[str, ...] = ()
    why: str = ""

    @property
    def summary(self) -> str:
        return self.config_cls.summary()

    def calibrates(self, cfg: PassConfig) -> bool:
        """Whether this pass, configured by ``cfg``, needs calibration data."""
        if isinstance(self.needs_calibration, str):
            option, _, value = self.needs_calibration.partition("=")
            return str(getattr(cfg, option)) == value
        return self.needs_calibration

    def to_json(self, detailed: bool = False) -> dict:
        d = {"name": self.name, "summary": self.summary, "needs_calibration": self.needs_calibration}
        if detailed:
            d["description"] = (self.config_cls.__doc__ or "").strip()
            d["options"] = [s.to_json() for s in self.config_cls.option_specs()]
            d["runs_after"] = list(self.after)
            d["runs_before"] = list(self.before)
        return d


_REGISTRY: dict[str, PassInfo] = {}
_loaded = False


def register_pass(name: str, config_cls: type[PassConfig], *, needs_calibration: bool | str = False,
                  after: tuple[str, ...] = (), before: tuple[str, ...] = (), why: str = ""):
    """Decorator registering ``fn(gm, cfg, ctx) -> PassResult`` as pass ``name`` configured by ``config_cls``."""

    def deco(fn):
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"pass '{name}' is already registered")
        config_cls.pass_name = name
        _REGISTRY[name] = PassInfo(name, config_cls, fn, needs_calibration, tuple(after), tuple(before), why)
        return fn

    return deco


def _load_builtin_and_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import sparsec.passes as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"sparsec.passes.{mod.name}")
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # a broken plugin must not break sparsec; say which one and why
            raise SparsecError(f"plugin '{ep.name}' ({ep.value}) from entry-point group '{ENTRY_POINT_GROUP}' failed"
                               f" to load: {exc}") from exc


def load_plugin_file(path: str) -> None:
    """Import a Python file that registers passes (``--plugin FILE``); it runs with the user's explicit consent."""
    import os

    if not os.path.isfile(path):
        raise UsageError(f"plugin file '{path}' does not exist; --plugin takes a Python file that calls register_pass")
    spec = importlib.util.spec_from_file_location(f"sparsec_plugin_{abs(hash(path))}", path)
    if spec is None:
        raise UsageError(f"plugin file '{path}' is not a Python file; --plugin takes a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and get_type_hints look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[spec.name]
        raise SparsecError(f"plugin file '{path}' failed to load: {type(exc).__name__}: {exc}") from exc


def get_pass(name: str) -> PassInfo:
    _load_builtin_and_plugins()
    if name not in _REGISTRY:
        raise UsageError(f"unknown pass '{name}'{did_you_mean(name, _REGISTRY)}; run 'sparsec passes' to list them"
                         f" (valid: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def list_passes() -> list[PassInfo]:
    """Every registered pass, sorted by name."""
    _load_builtin_and_plugins()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def pass_names() -> list[str]:
    return [p.name for p in list_passes()]
