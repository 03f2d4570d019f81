"""Pass configuration classes: typed options with defaults, ranges and help, validated on construction.

A pass config is a frozen dataclass deriving from :class:`PassConfig`; each field is declared with :func:`option`.
Values may come as Python objects (the API, YAML) or as strings (the text pipeline syntax, ``--set``); both are
coerced to the declared type and range-checked here, so every spelling of a pipeline validates the same way.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from sparsec.errors import UsageError, did_you_mean

_MISSING = dataclasses.MISSING


@dataclass(frozen=True)
class OptionInfo:
    help: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def range_text(self) -> str:
        lo = f"{self.ge} <= " if self.ge is not None else f"{self.gt} < " if self.gt is not None else ""
        hi = f" <= {self.le}" if self.le is not None else f" < {self.lt}" if self.lt is not None else ""
        return f"{lo}x{hi}" if lo or hi else ""


def option(default: Any = _MISSING, *, help: str, ge=None, gt=None, le=None, lt=None) -> Any:
    """Declare a pass option. Lists take their default by value (copied per instance)."""
    info = OptionInfo(help=help, ge=ge, gt=gt, le=le, lt=lt)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=tuple(default): list(d), metadata={"sparsec": info})
    return dataclasses.field(default=default, metadata={"sparsec": info})


@dataclass(frozen=True)
class OptionSpec:
    """One option of a pass as shown by ``sparsec passes NAME``."""

    name: str
    type: Any
    default: Any
    info: OptionInfo

    @property
    def type_name(self) -> str:
        t = self.type
        if get_origin(t) is Literal:
            return "|".join(str(a) for a in get_args(t))
        if get_origin(t) is list:
            return f"list[{get_args(t)[0].__name__}]"
        return t.__name__

    def to_json(self) -> dict:
        d = {"name": self.name, "type": self.type_name, "default": None if self.default is _MISSING else self.default,
             "help": self.info.help}
        if get_origin(self.type) is Literal:
            d["choices"] = list(get_args(self.type))
        if self.info.range_text():
            d["range"] = self.info.range_text()
        return d


def _fail(pass_name: str, opt: str, value: Any, expected: str) -> UsageError:
    return UsageError(f"bad value {value!r} for option '{opt}' of pass '{pass_name}': expected {expected}")


def coerce_value(pass_name: str, spec: OptionSpec, value: Any) -> Any:
    """Convert ``value`` (a Python object or a string from the text syntax) to ``spec``'s type and check its range."""
    t, name = spec.type, spec.name
    if get_origin(t) is Literal:
        choices = get_args(t)
        if value not in choices:
            raise _fail(pass_name, name, value, "one of " + ", ".join(map(str, choices)) + did_you_mean(str(value), choices))
        return value
    if get_origin(t) is list:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
            raise _fail(pass_name, name, value, "a list of strings, e.g. {a,b}")
        return list(items)
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise _fail(pass_name, name, value, "true or false")
    if t is str:
        if not isinstance(value, str) or not value:
            raise _fail(pass_name, name, value, "a non-empty string")
        return value
    if t in (int, float):
        if isinstance(value, bool):
            raise _fail(pass_name, name, value, f"a number ({t.__name__})")
        try:
            if isinstance(value, str):
                num = int(value) if t is int else float(value)
            elif t is int and isinstance(value, int) or t is float and isinstance(value, (int, float)):
                num = t(value)
            else:
                raise ValueError
        except (ValueError, OverflowError):
            raise _fail(pass_name, name, value, "an integer" if t is int else "a number") from None
        if t is float and not math.isfinite(num):
            raise _fail(pass_name, name, value, "a finite number")
        _check_range(pass_name, spec, num)
        return num
    raise TypeError(f"unsupported option type {t!r} for {pass_name}.{name}")  # a programming error, not user input


def _check_range(pass_name: str, spec: OptionSpec, num: float) -> None:
    i = spec.info
    ok = ((i.ge is None or num >= i.ge) and (i.gt is None or num > i.gt)
          and (i.le is None or num <= i.le) and (i.lt is None or num < i.lt))
    if not ok:
        raise _fail(pass_name, spec.name, num, i.range_text().replace("x", spec.name, 1))


class PassConfig:
    """Base of every pass config. Subclasses are frozen dataclasses whose fields are declared with :func:`option`.

    The class docstring's first line is the pass summary shown by ``sparsec passes``.
    """

    pass_name: typing.ClassVar[str] = ""

    def __post_init__(self):
        for spec in self.option_specs():
            object.__setattr__(self, spec.name, coerce_value(self.pass_name, spec, getattr(self, spec.name)))

    @classmethod
    def option_specs(cls) -> list[OptionSpec]:
        hints = typing.get_type_hints(cls)
        specs = []
        for f in dataclasses.fields(cls):
            default = (f.default if f.default is not _MISSING else  # _MISSING: a required option
                       f.default_factory() if f.default_factory is not _MISSING else _MISSING)
            specs.append(OptionSpec(f.name, hints[f.name], default, f.metadata["sparsec"]))
        return specs

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "PassConfig":
        """Build from a mapping of option name → value; unknown keys are rejected with a did-you-mean."""
        specs = cls.option_specs()
        names = [s.name for s in specs]
        for key in options:
            if key not in names:
                raise UsageError(f"no such option '{key}' for pass '{cls.pass_name}'{did_you_mean(key, names)};"
                                 f" valid options: {', '.join(names)}")
        missing = [s.name for s in specs if s.default is _MISSING and s.name not in options]
        if missing:
            raise UsageError(f"pass '{cls.pass_name}' needs option(s) {', '.join(missing)}: they have no default")
        return cls(**options)

    def options(self) -> dict[str, Any]:
        """Every option with its value, defaults included, in declaration order."""
        return {s.name: getattr(self, s.name) for s in self.option_specs()}

    @classmethod
    def summary(cls) -> str:
        return next(iter((cls.__doc__ or "").strip().splitlines()), "")
