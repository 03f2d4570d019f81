"""The pass registry: listing, lookup, ordering constraints, plugin files."""
from dataclasses import dataclass
from typing import Literal

import pytest

from sparsec import registry
from sparsec.config import PassConfig, option
from sparsec.errors import PipelineSyntaxError, SparsecError, UsageError
from sparsec.pipeline import parse_text
from sparsec.registry import get_pass, list_passes, load_plugin_file, pass_names, register_pass


@dataclass(frozen=True)
class FirstConfig(PassConfig):
    """Throw-away pass that must come first."""


@dataclass(frozen=True)
class SecondConfig(PassConfig):
    """Throw-away pass that runs after _test_first."""

    k: int = option(1, help="k")


@dataclass(frozen=True)
class EarlyConfig(PassConfig):
    """Throw-away pass that runs before _test_first."""


def _noop(gm, cfg, ctx):
    return None


@pytest.fixture
def clean_registry():
    """Remove every pass a test registers, so other tests see the registry as it was."""
    list_passes()  # load the built-in passes first, so they are part of the snapshot
    before = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(before)


@pytest.fixture
def order_passes(clean_registry):
    register_pass("_test_first", FirstConfig)(_noop)
    register_pass("_test_second", SecondConfig, after=("_test_first",), why="it reads what _test_first writes")(
        lambda gm, cfg, ctx: None)
    register_pass("_test_early", EarlyConfig, before=("_test_first",))(lambda gm, cfg, ctx: None)


def test_relufy_is_listed_with_its_summary():
    passes = {p.name: p for p in list_passes()}
    assert "relufy" in passes and "relufy" in pass_names()
    assert pass_names() == sorted(pass_names())
    info = passes["relufy"]
    assert info.summary == "Replace MLP activations (GELU, GELU-tanh, SiLU, Mish, ...) with ReLU or a ReLU variant."
    assert info.to_json() == {"name": "relufy", "summary": info.summary, "needs_calibration": False}
    detailed = info.to_json(detailed=True)
    assert detailed["description"].startswith(info.summary + "\n")
    assert [o["name"] for o in detailed["options"]] == ["to", "threshold", "shift", "scope", "targets", "ignore"]
    assert detailed["runs_after"] == [] and detailed["runs_before"] == []
    assert get_pass("relufy") is info and info.config_cls.pass_name == "relufy"


def test_unknown_pass():
    with pytest.raises(UsageError) as exc:
        get_pass("relu")
    assert exc.value.message.startswith("unknown pass 'relu' (did you mean 'relufy'?); run 'sparsec passes' to list"
                                        " them (valid: ")
    assert "relufy" in exc.value.message.split("(valid: ")[1]
    assert exc.value.exit_code == 2
    with pytest.raises(UsageError, match=r"^unknown pass 'qqqq'; run 'sparsec passes'"):
        get_pass("qqqq")


def test_register_twice(clean_registry):
    register_pass("_test_first", FirstConfig)(_noop)
    register_pass("_test_first", FirstConfig)(_noop)  # the same function again (a re-import) is fine
    with pytest.raises(ValueError, match="pass '_test_first' is already registered"):
        register_pass("_test_first", FirstConfig)(lambda gm, cfg, ctx: None)
    assert get_pass("_test_first").fn is _noop


def test_fixture_cleans_up():
    assert "_test_first" not in registry._REGISTRY and "_test_second" not in registry._REGISTRY


def test_order_after(order_passes):
    assert get_pass("_test_second").after == ("_test_first",)
    assert get_pass("_test_second").to_json(detailed=True)["runs_after"] == ["_test_first"]
    with pytest.raises(UsageError) as exc:
        parse_text("_test_second,_test_first").validate_order()
    assert exc.value.message == ("pass '_test_first' must run before '_test_second' (it reads what _test_first"
                                 " writes); got '_test_second,_test_first', write '_test_first,_test_second'")
    assert exc.value.exit_code == 2
    parse_text("_test_first,_test_second").validate_order()
    parse_text("_test_second").validate_order()  # the other pass is absent: nothing to order
    parse_text("_test_first,relufy,_test_second{k=2}").validate_order()
    with pytest.raises(UsageError, match=r"write 'relufy,_test_first,_test_second'$"):
        parse_text("relufy,_test_second,_test_first").validate_order()


def test_order_before(order_passes):
    with pytest.raises(UsageError) as exc:
        parse_text("_test_first,_test_early").validate_order()
    assert exc.value.message == ("pass '_test_early' must run before '_test_first'; got '_test_first,_test_early',"
                                 " write '_test_early,_test_first'")
    parse_text("_test_early,_test_first,_test_second").validate_order()


def test_order_suggestion_is_valid(order_passes):
    with pytest.raises(UsageError) as exc:
        parse_text("_test_second,_test_early,_test_first").validate_order()
    fixed = exc.value.message.rsplit("write '", 1)[1].rstrip("'")
    assert fixed == "_test_early,_test_first,_test_second"
    parse_text(fixed).validate_order()
    with pytest.raises(UsageError, match=r"write '_test_first,_test_second,relufy,_test_second'$"):
        parse_text("_test_second,_test_first,relufy,_test_second").validate_order()


def test_test_passes_in_the_text_syntax(order_passes):
    assert parse_text("_test_first , _test_second{k=3}").canonical() == "_test_first,_test_second{k=3}"
    with pytest.raises(PipelineSyntaxError) as exc:
        parse_text("_test_first{k=1}")
    assert exc.value.column == 12 and "no such option 'k' for pass '_test_first'; valid options: " in exc.value.message


# ----------------------------------------------------------------------------------------------- plugin files


def test_plugin_missing_file(tmp_path):
    path = str(tmp_path / "nope.py")
    with pytest.raises(UsageError) as exc:
        load_plugin_file(path)
    assert exc.value.message == (f"plugin file '{path}' does not exist; --plugin takes a Python file that calls"
                                 " register_pass")
    assert exc.value.exit_code == 2


def test_plugin_not_python(tmp_path):
    f = tmp_path / "plugin.txt"
    f.write_text("x = 1\n")
    with pytest.raises(UsageError, match=r"is not a Python file; --plugin takes a \.py file"):
        load_plugin_file(str(f))


@pytest.mark.parametrize("body,error", [
    ("raise RuntimeError('boom')\n", "RuntimeError: boom"),
    ("import no_such_module_for_sparsec_tests\n", "ModuleNotFoundError: No module named"),
    ("def broken(:\n", "SyntaxError: "),
])
def test_plugin_that_raises(tmp_path, body, error):
    f = tmp_path / "bad_plugin.py"
    f.write_text(body)
    with pytest.raises(SparsecError) as exc:
        load_plugin_file(str(f))
    assert not isinstance(exc.value, UsageError) and exc.value.exit_code == 1
    assert exc.value.message.startswith(f"plugin file '{f}' failed to load: {error}")


PLUGIN = '''\
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sparsec.config import PassConfig, option
from sparsec.registry import register_pass


@dataclass(frozen=True)
class PluginConfig(PassConfig):
    """A pass from a plugin file."""

    mode: Literal["a", "b"] = option("a", help="a mode")
    scale: float = option(1.0, gt=0, help="a scale")


@register_pass("_test_plugin", PluginConfig, after=("relufy",))
def plugin_pass(gm, cfg, ctx):
    return None
'''


def test_plugin_registers_a_pass(tmp_path, clean_registry):
    f = tmp_path / "good_plugin.py"
    f.write_text(PLUGIN)  # written like the built-in passes: postponed annotations, a dataclass config
    load_plugin_file(str(f))
    info = get_pass("_test_plugin")
    assert info.summary == "A pass from a plugin file." and info.after == ("relufy",)
    assert [s.type_name for s in info.config_cls.option_specs()] == ["a|b", "float"]
    assert parse_text("_test_plugin{mode=b}").canonical() == "_test_plugin{mode=b scale=1.0}"
    with pytest.raises(UsageError, match="pass 'relufy' must run before '_test_plugin'"):
        parse_text("_test_plugin,relufy").validate_order()
