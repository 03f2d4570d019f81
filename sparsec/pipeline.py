"""Pipelines: one schema, three spellings (Python objects, text, YAML recipe), one canonical form.

Text grammar (MLIR-style)::

    pipeline := pass (',' pass)*
    pass     := NAME ['{' [option (' ' option)*] '}']
    option   := KEY '=' value
    value    := scalar | '{' [scalar (',' scalar)*] '}'
    scalar   := bare | '"' chars with \\" and \\\\ escapes '"'
    bare     := any characters except whitespace , { } = "

YAML recipe (``yaml.safe_load`` only)::

    version: 1
    passes:
      - relufy: {to: fatrelu, threshold: 0.02}
      - teal

The canonical form prints every option with its value, defaults included, in declaration order.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterable

from sparsec.config import PassConfig, coerce_value
from sparsec.errors import PipelineSyntaxError, SparsecError, UsageError, did_you_mean

RECIPE_VERSION = 1
_SPECIAL = set(' \t\n\r,{}="')
_BARE_OK = re.compile(r'[^\s,{}="]+')


# ----------------------------------------------------------------------------------------------- the schema


@dataclass(frozen=True)
class Pipeline:
    """An ordered list of validated pass configs."""

    configs: tuple[PassConfig, ...]

    @property
    def names(self) -> list[str]:
        return [c.pass_name for c in self.configs]

    def canonical(self) -> str:
        """The canonical text form: every pass with every option, defaults included."""
        return ",".join(_format_pass(c) for c in self.configs)

    def to_recipe(self) -> dict:
        return {"version": RECIPE_VERSION, "passes": [{c.pass_name: c.options()} for c in self.configs]}

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_recipe(), sort_keys=False, default_flow_style=False)

    def to_json(self) -> str:
        return json.dumps(self.to_recipe(), indent=2)

    def with_overrides(self, assignments: Iterable[str]) -> "Pipeline":
        """Apply ``--set pass.option=value`` overrides (``pass#N.option=value`` when a pass appears twice)."""
        configs = list(self.configs)
        for text in assignments:
            m = re.fullmatch(r"([A-Za-z_][\w-]*)(?:#(\d+))?\.([A-Za-z_]\w*)=(.*)", text, re.S)
            if not m:
                raise UsageError(f"bad --set {text!r}: expected PASS.OPTION=VALUE, e.g. teal.sparsity=0.6")
            name, nth, key, raw = m.groups()
            idx = [i for i, c in enumerate(configs) if c.pass_name == name]
            if not idx:
                raise UsageError(f"bad --set {text!r}: pass '{name}' is not in the pipeline"
                                 f"{did_you_mean(name, self.names)} (pipeline: {','.join(self.names) or 'empty'})")
            if nth is None and len(idx) > 1:
                raise UsageError(f"bad --set {text!r}: pass '{name}' appears {len(idx)} times;"
                                 f" write {name}#1.{key}=…")
            if nth is not None and not 1 <= int(nth) <= len(idx):
                raise UsageError(f"bad --set {text!r}: pass '{name}' appears {len(idx)} time(s), not #{nth}")
            i = idx[int(nth) - 1 if nth else 0]
            value = _parse_set_value(raw, text)
            configs[i] = type(configs[i]).from_options({**configs[i].options(), key: value})
        return Pipeline(tuple(configs))

    def validate_order(self) -> None:
        """Ordering constraints declared at registration; violations are errors, never silently re-ordered."""
        from sparsec.registry import get_pass

        names = self.names
        for i, name in enumerate(names):
            info = get_pass(name)
            for other in info.after:
                later = [j for j in range(i + 1, len(names)) if names[j] == other]
                if later:
                    raise UsageError(_order_message(other, name, info.why, names))
            for other in info.before:
                earlier = [j for j in range(i) if names[j] == other]
                if earlier:
                    raise UsageError(_order_message(name, other, info.why, names))


def _order_message(first: str, second: str, why: str, names: list[str]) -> str:
    fixed = _fixed_order(names)
    because = f" ({why})" if why else ""
    return (f"pass '{first}' must run before '{second}'{because}; got '{','.join(names)}', write"
            f" '{','.join(fixed)}'")


def _fixed_order(names: list[str]) -> list[str]:
    """``names`` changed as little as possible (a stable topological sort) to meet every ordering constraint."""
    from sparsec.registry import get_pass

    infos = {n: get_pass(n) for n in names}
    must = {(a, n) for n, i in infos.items() for a in i.after} | {(n, b) for n, i in infos.items() for b in i.before}
    left, out = list(names), []
    while left:  # take the first pass nothing left must precede (the first one outright on a cycle)
        out.append(left.pop(next((k for k, n in enumerate(left) if not any((a, n) in must for a in left)), 0)))
    return out


def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, list):
        return "{" + ",".join(_format_scalar(x) for x in v) + "}"
    return _format_scalar(str(v))


def _format_scalar(s: str) -> str:
    if _BARE_OK.fullmatch(s):
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _format_pass(cfg: PassConfig) -> str:
    opts = cfg.options()
    if not opts:
        return cfg.pass_name
    return cfg.pass_name + "{" + " ".join(f"{k}={_format_value(v)}" for k, v in opts.items()) + "}"


def _parse_set_value(raw: str, text: str) -> Any:
    """A --set value is a scalar or a {a,b} list in the text syntax; it needs no shell quoting of its own."""
    if raw.startswith("{"):
        p = _Parser(raw)
        value = p.value()
        p.skip_ws()
        if not p.at_end():
            p.fail("unexpected text after the list")
        return value
    return raw


# ----------------------------------------------------------------------------------------------- text parser


class _Parser:
    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def fail(self, message: str, col: int | None = None):
        raise PipelineSyntaxError(message, self.text, self.pos if col is None else col)

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_ws(self):
        while self.peek() and self.peek().isspace():
            self.pos += 1

    def scalar(self) -> tuple[str, int]:
        start = self.pos
        if self.peek() == '"':
            self.pos += 1
            out = []
            while True:
                c = self.peek()
                if not c:
                    self.fail("unterminated quoted string", start)
                self.pos += 1
                if c == '"':
                    return "".join(out), start
                if c == "\\":
                    nxt = self.peek()
                    if nxt not in ('"', "\\"):
                        self.fail('bad escape in quoted string: only \\" and \\\\ are allowed')
                    out.append(nxt)
                    self.pos += 1
                else:
                    out.append(c)
        m = _BARE_OK.match(self.text, self.pos)
        if not m:
            found = f"'{self.peek()}'" if self.peek() else "end of text"
            self.fail(f"expected a value, found {found}")
        self.pos = m.end()
        return m.group(), start

    def value(self) -> Any:
        if self.peek() != "{":
            return self.scalar()[0]
        open_col = self.pos
        self.pos += 1
        self.skip_ws()
        items = []
        if self.peek() == "}":
            self.pos += 1
            return items
        while True:
            self.skip_ws()
            if self.at_end():
                self.fail("unbalanced brace: list opened here is never closed", open_col)
            if self.peek() in ",}":
                self.fail("empty list element")
            items.append(self.scalar()[0])
            self.skip_ws()
            c = self.peek()
            if c == ",":
                self.pos += 1
            elif c == "}":
                self.pos += 1
                return items
            elif not c:
                self.fail("unbalanced brace: list opened here is never closed", open_col)
            else:
                self.fail(f"expected ',' or '}}' in list, found '{c}'")

    def options(self, pass_name: str, cfg_cls: type[PassConfig]) -> dict[str, Any]:
        open_col = self.pos
        self.pos += 1
        opts: dict[str, Any] = {}
        valid = [s.name for s in cfg_cls.option_specs()]
        while True:
            self.skip_ws()
            c = self.peek()
            if c == "}":
                self.pos += 1
                return opts
            if not c:
                self.fail(f"unbalanced brace: options of '{pass_name}' opened here are never closed", open_col)
            key_col = self.pos
            m = re.compile(r"[A-Za-z_]\w*").match(self.text, self.pos)
            if not m:
                self.fail(f"expected an option name for pass '{pass_name}', found '{c}'")
            key = m.group()
            self.pos = m.end()
            if key not in valid:
                self.fail(f"no such option '{key}' for pass '{pass_name}'{did_you_mean(key, valid)};"
                          f" valid options: {', '.join(valid)}", key_col)
            if key in opts:
                self.fail(f"option '{key}' given twice for pass '{pass_name}'", key_col)
            self.skip_ws()
            if self.peek() != "=":
                self.fail(f"expected '=' after option '{key}' (options are written key=value, separated by spaces)")
            self.pos += 1
            self.skip_ws()
            val_col = self.pos
            opts[key] = (self.value(), val_col)
            nxt = self.peek()
            if nxt and not nxt.isspace() and nxt != "}":
                self.fail(f"expected a space or '}}' after the value of '{key}', found '{nxt}'"
                          + (" (options are separated by spaces, not commas)" if nxt == "," else ""))

    def pipeline(self) -> list[PassConfig]:
        from sparsec.registry import get_pass, pass_names

        configs = []
        if not self.text.strip():
            self.fail("empty pipeline: name at least one pass, e.g. 'relufy'")
        while True:
            self.skip_ws()
            start = self.pos
            m = re.compile(r"[A-Za-z_][\w-]*").match(self.text, self.pos)
            if not m:
                c = self.peek()
                if c in (",", ""):
                    self.fail("empty pass element (a comma with no pass before or after it)")
                if c == "}":
                    self.fail("unbalanced brace: '}' with no matching '{'")
                self.fail(f"expected a pass name, found '{c}'")
            name = m.group()
            self.pos = m.end()
            names = pass_names()
            if name not in names:
                self.fail(f"unknown pass '{name}'{did_you_mean(name, names)}; valid passes: {', '.join(names)}"
                          f" (run 'sparsec passes')", start)
            cls = get_pass(name).config_cls
            raw = {}
            if self.peek() == "{":
                raw = self.options(name, cls)
            configs.append(_build_config(cls, raw, self.text, start))
            self.skip_ws()
            c = self.peek()
            if not c:
                return configs
            if c == ",":
                self.pos += 1
                continue
            if c == "}":
                self.fail("unbalanced brace: '}' with no matching '{'")
            self.fail(f"expected ',' between passes, found '{c}'")


def _build_config(cls: type[PassConfig], raw: dict[str, tuple[Any, int]], text: str, start: int) -> PassConfig:
    specs = {s.name: s for s in cls.option_specs()}
    for key, (value, col) in raw.items():  # check each value on its own so an error points at its own column
        try:
            coerce_value(cls.pass_name, specs[key], value)
        except UsageError as exc:
            raise PipelineSyntaxError(exc.message, text, col) from None
    try:
        return cls.from_options({k: v for k, (v, _) in raw.items()})
    except UsageError as exc:  # a required option left out
        raise PipelineSyntaxError(exc.message, text, start) from None


def parse_text(text: str) -> Pipeline:
    """Parse the text spelling, e.g. ``relufy,teal{sparsity=0.5 calib_samples=128}``."""
    return Pipeline(tuple(_Parser(text).pipeline()))


# ----------------------------------------------------------------------------------------------- YAML recipes


def from_recipe(data: Any, source: str = "recipe") -> Pipeline:
    """Build from a recipe mapping ``{version: 1, passes: [...]}`` (or a bare list of passes)."""
    from sparsec.registry import get_pass

    if isinstance(data, dict):
        unknown = set(data) - {"version", "passes"}
        if unknown:
            raise UsageError(f"{source}: unknown top-level key(s) {sorted(unknown, key=repr)}; a recipe has"
                             " 'version' and 'passes'")
        version = data.get("version", RECIPE_VERSION)
        if type(version) is not int or version != RECIPE_VERSION:  # not `true` or 1.0, which == 1
            raise UsageError(f"{source}: recipe version {version!r} is not supported; this sparsec reads version"
                             f" {RECIPE_VERSION}")
        data = data.get("passes")
    if not isinstance(data, list) or not data:
        raise UsageError(f"{source}: expected a non-empty list of passes under 'passes', e.g."
                         " 'passes: [relufy, {teal: {sparsity: 0.5}}]'")
    configs = []
    for i, item in enumerate(data, 1):
        if isinstance(item, str):
            name, opts = item, {}
        elif isinstance(item, dict) and len(item) == 1:
            name, opts = next(iter(item.items()))
            opts = {} if opts is None else opts
        else:
            raise UsageError(f"{source}: pass #{i} must be a name or a one-key mapping 'name: {{options}}', got"
                             f" {item!r}")
        if not isinstance(name, str):
            raise UsageError(f"{source}: pass #{i}: a pass name must be a string, got {name!r}")
        if not isinstance(opts, dict):
            raise UsageError(f"{source}: pass #{i}: options of '{name}' must be a mapping, got {opts!r}")
        if not all(isinstance(k, str) for k in opts):
            raise UsageError(f"{source}: pass #{i} ('{name}'): option names must be strings")
        try:
            configs.append(get_pass(name).config_cls.from_options(opts))
        except UsageError as exc:
            raise UsageError(f"{source}: pass #{i}: {exc.message}") from None
    return Pipeline(tuple(configs))


def parse_yaml(text: str, source: str = "recipe") -> Pipeline:
    """Parse a YAML recipe with ``yaml.safe_load`` (no tags, no code)."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except RecursionError:  # PyYAML composes nested collections recursively
        raise UsageError(f"{source}: not valid YAML: collections nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(f"{source}: not valid YAML{where}: {problem}") from None
    return from_recipe(data, source)


def load_recipe(path: str) -> Pipeline:
    import os

    if not os.path.isfile(path):
        raise UsageError(f"recipe file '{path}' does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"recipe file '{path}' cannot be read as UTF-8 text: {exc}") from None
    return parse_yaml(text, source=path)


def as_pipeline(spec: Any) -> Pipeline:
    """Normalise any spelling: a Pipeline, a text spec, a recipe dict/list, a config or a list of configs."""
    if isinstance(spec, Pipeline):
        return spec
    if isinstance(spec, PassConfig):
        return Pipeline((spec,))
    if isinstance(spec, str):
        return parse_text(spec)
    if isinstance(spec, dict):
        return from_recipe(spec)
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(c, PassConfig) for c in spec):
        return Pipeline(tuple(spec))
    if isinstance(spec, (list, tuple)):
        return from_recipe(list(spec))
    raise SparsecError(f"cannot make a pipeline from {type(spec).__name__}; give a text spec like 'relufy,teal', a"
                       " recipe mapping, or a list of pass configs")
