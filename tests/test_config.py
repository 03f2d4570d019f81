"""Pass configs: typed options, coercion of Python objects and strings, range checks, specs."""
import dataclasses
import json
from dataclasses import dataclass
from typing import Literal

import pytest

from sparsec.config import OptionInfo, OptionSpec, PassConfig, coerce_value, option
from sparsec.errors import UsageError
from sparsec.passes.relufy import RelufyConfig


@dataclass(frozen=True)
class DemoConfig(PassConfig):
    """Demo pass for the config tests.

    More text that is not the summary.
    """

    pass_name = "demo"  # not annotated: a class attribute, not an option

    n: int = option(3, ge=1, lt=10, help="an int")
    x: float = option(0.5, gt=0.0, le=1.0, help="a float")
    flag: bool = option(False, help="a bool")
    name: str = option("abc", help="a string")
    mode: Literal["fast", "slow"] = option("fast", help="a choice")
    items: list[str] = option(["a"], help="a list")


def spec(t, **info):
    return OptionSpec("opt", t, None, OptionInfo(help="h", **info))


def bad(t, value, expected, **info):
    with pytest.raises(UsageError) as exc:
        coerce_value("p", spec(t, **info), value)
    assert exc.value.message == f"bad value {expected[0]} for option 'opt' of pass 'p': expected {expected[1]}"
    assert exc.value.exit_code == 2


# ----------------------------------------------------------------------------------------------- coerce_value


@pytest.mark.parametrize("value,result", [(5, 5), ("5", 5), (" 7 ", 7), ("-2", -2), (10**30, 10**30)])
def test_int_accepts(value, result):
    got = coerce_value("p", spec(int), value)
    assert got == result and type(got) is int


@pytest.mark.parametrize("value,expected", [
    (True, ("True", "a number (int)")),
    ("true", ("'true'", "an integer")),
    (2.0, ("2.0", "an integer")),
    ("2.5", ("'2.5'", "an integer")),
    ("2.0", ("'2.0'", "an integer")),
    ("", ("''", "an integer")),
    (None, ("None", "an integer")),
    ([1], ("[1]", "an integer")),
])
def test_int_rejects(value, expected):
    bad(int, value, expected)


@pytest.mark.parametrize("value,result", [(1, 1.0), ("1", 1.0), (0.25, 0.25), ("1e-3", 0.001), ("-0.0", -0.0),
                                          ("5e-324", 5e-324), (10**300, 1e300)])
def test_float_accepts(value, result):
    got = coerce_value("p", spec(float), value)
    assert got == result and type(got) is float
    assert repr(got) == repr(result)


@pytest.mark.parametrize("value,expected", [
    (False, ("False", "a number (float)")),
    ("abc", ("'abc'", "a number")),
    ("nan", ("'nan'", "a finite number")),
    (float("inf"), ("inf", "a finite number")),
    ("-inf", ("'-inf'", "a finite number")),
    ("1e999", ("'1e999'", "a finite number")),
    (10**400, (str(10**400), "a number")),
    (None, ("None", "a number")),
    ("0.5 0.5", ("'0.5 0.5'", "a number")),
])
def test_float_rejects(value, expected):
    bad(float, value, expected)


@pytest.mark.parametrize("value,result", [(True, True), (False, False), ("true", True), ("False", False),
                                          ("TRUE", True)])
def test_bool_accepts(value, result):
    assert coerce_value("p", spec(bool), value) is result


@pytest.mark.parametrize("value", [1, 0, "yes", "1", "", None, 1.0])
def test_bool_rejects(value):
    bad(bool, value, (repr(value), "true or false"))


def test_str_literal_list():
    assert coerce_value("p", spec(str), "x y") == "x y"
    bad(str, "", ("''", "a non-empty string"))
    bad(str, 3, ("3", "a non-empty string"))
    lit = Literal["relu", "fatrelu"]
    assert coerce_value("p", spec(lit), "fatrelu") == "fatrelu"
    bad(lit, "Relu", ("'Relu'", "one of relu, fatrelu (did you mean 'relu'?)"))
    bad(lit, "zzz", ("'zzz'", "one of relu, fatrelu"))
    bad(lit, 1, ("1", "one of relu, fatrelu"))
    ls = list[str]
    assert coerce_value("p", spec(ls), "a") == ["a"]
    assert coerce_value("p", spec(ls), ("a", "b")) == ["a", "b"]
    assert coerce_value("p", spec(ls), []) == []
    src = ["a"]
    out = coerce_value("p", spec(ls), src)
    assert out == src and out is not src  # a copy, so the caller's list cannot change a frozen config
    bad(ls, [1, "a"], ("[1, 'a']", "a list of strings, e.g. {a,b}"))
    bad(ls, 3, ("3", "a list of strings, e.g. {a,b}"))
    bad(ls, {"a": 1}, ("{'a': 1}", "a list of strings, e.g. {a,b}"))


def test_unsupported_type_is_a_programming_error():
    with pytest.raises(TypeError, match="unsupported option type"):
        coerce_value("p", spec(dict), {})


@pytest.mark.parametrize("info,value,ok,text", [
    ({"ge": 0}, 0, True, "0 <= x"),
    ({"ge": 0}, -1, False, "0 <= x"),
    ({"gt": 0}, 0, False, "0 < x"),
    ({"le": 1}, 1, True, "x <= 1"),
    ({"lt": 1}, 1, False, "x < 1"),
    ({"gt": 0.0, "le": 1.0}, 1.0, True, "0.0 < x <= 1.0"),
    ({"gt": 0.0, "le": 1.0}, 1.5, False, "0.0 < x <= 1.0"),
    ({"ge": 1, "lt": 10}, 10, False, "1 <= x < 10"),
])
def test_ranges(info, value, ok, text):
    assert OptionInfo(help="h", **info).range_text() == text
    if ok:
        assert coerce_value("p", spec(float, **info), value) == value
    else:
        bad(float, value, (repr(float(value)), text.replace("x", "opt")), **info)


def test_no_range():
    assert OptionInfo(help="h").range_text() == ""
    assert coerce_value("p", spec(float), -1e300) == -1e300


# ----------------------------------------------------------------------------------------------- PassConfig


def test_defaults_and_options_order():
    cfg = DemoConfig()
    assert cfg.options() == {"n": 3, "x": 0.5, "flag": False, "name": "abc", "mode": "fast", "items": ["a"]}
    assert list(cfg.options()) == ["n", "x", "flag", "name", "mode", "items"]
    assert list(RelufyConfig().options()) == ["to", "threshold", "shift", "scope", "targets", "ignore"]


def test_strings_are_coerced_on_construction():
    cfg = DemoConfig(n="4", x="1", flag="true", mode="slow", items="b")
    assert cfg.options() == {"n": 4, "x": 1.0, "flag": True, "name": "abc", "mode": "slow", "items": ["b"]}
    assert type(cfg.x) is float


def test_bad_values_on_construction():
    with pytest.raises(UsageError, match=r"^bad value 0 for option 'n' of pass 'demo': expected 1 <= n < 10$"):
        DemoConfig(n=0)
    with pytest.raises(UsageError, match=r"^bad value 0\.0 for option 'x' of pass 'demo': expected 0\.0 < x <= 1\.0$"):
        DemoConfig(x=0)
    with pytest.raises(UsageError, match=r"^bad value 1 for option 'flag' of pass 'demo': expected true or false$"):
        DemoConfig(flag=1)
    with pytest.raises(UsageError, match=r"^bad value True for option 'n' of pass 'demo': expected a number \(int\)$"):
        DemoConfig(n=True)


def test_list_defaults_are_per_instance_and_configs_are_frozen():
    a, b = DemoConfig(), DemoConfig()
    assert a.items == b.items == ["a"] and a.items is not b.items
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.n = 5
    assert a == b and DemoConfig(n=4) != a


def test_from_options():
    assert DemoConfig.from_options({"n": "9", "mode": "slow"}) == DemoConfig(n=9, mode="slow")
    assert DemoConfig.from_options({}) == DemoConfig()
    with pytest.raises(UsageError) as exc:
        DemoConfig.from_options({"nn": 1})
    assert exc.value.message == ("no such option 'nn' for pass 'demo' (did you mean 'n'?); valid options: n, x, flag,"
                                 " name, mode, items")
    with pytest.raises(UsageError, match=r"^no such option 'zzz' for pass 'demo'; valid options: "):
        DemoConfig.from_options({"zzz": 1})
    with pytest.raises(UsageError, match="no such option 'mdoe' for pass 'demo' \\(did you mean 'mode'\\?\\)"):
        DemoConfig.from_options({"n": 2, "mdoe": "slow"})


def test_option_specs():
    specs = DemoConfig.option_specs()
    assert [(s.name, s.type_name, s.default) for s in specs] == [
        ("n", "int", 3), ("x", "float", 0.5), ("flag", "bool", False), ("name", "str", "abc"),
        ("mode", "fast|slow", "fast"), ("items", "list[str]", ["a"])]
    assert specs[0].info == OptionInfo(help="an int", ge=1, lt=10)
    js = [s.to_json() for s in specs]
    assert js[0] == {"name": "n", "type": "int", "default": 3, "help": "an int", "range": "1 <= x < 10"}
    assert js[2] == {"name": "flag", "type": "bool", "default": False, "help": "a bool"}
    assert js[4] == {"name": "mode", "type": "fast|slow", "default": "fast", "help": "a choice",
                     "choices": ["fast", "slow"]}
    assert js[5] == {"name": "items", "type": "list[str]", "default": ["a"], "help": "a list"}
    json.dumps(js)  # serialisable


def test_relufy_specs():
    js = {s["name"]: s for s in (s.to_json() for s in RelufyConfig.option_specs())}
    assert js["to"] == {"name": "to", "type": "relu|fatrelu|shifted|relu2", "default": "relu",
                        "help": "the replacement activation", "choices": ["relu", "fatrelu", "shifted", "relu2"]}
    assert js["threshold"] == {"name": "threshold", "type": "float", "default": 0.01,
                               "help": "FATReLU threshold t (to=fatrelu): x if x >= t else 0", "range": "0.0 <= x"}
    assert js["shift"]["type"] == "float" and "range" not in js["shift"]
    assert js["targets"]["type"] == "list[str]" and js["targets"]["default"] == []


def test_required_option():
    @dataclass(frozen=True)
    class Req(PassConfig):
        """Needs k."""

        pass_name = "req"
        k: int = option(help="required")
        m: int = option(2, help="optional")

    [k, m] = Req.option_specs()
    assert k.to_json() == {"name": "k", "type": "int", "default": None, "help": "required"}
    assert m.default == 2
    assert Req.from_options({"k": "5"}).options() == {"k": 5, "m": 2}
    with pytest.raises(UsageError, match=r"^pass 'req' needs option\(s\) k: they have no default$"):
        Req.from_options({"m": 1})


def test_summary():
    assert DemoConfig.summary() == "Demo pass for the config tests."
    assert RelufyConfig.summary() == ("Replace MLP activations (GELU, GELU-tanh, SiLU, Mish, ...) with ReLU or a ReLU"
                                      " variant.")

    @dataclass(frozen=True)
    class Blank(PassConfig):
        """   """

    assert Blank.summary() == ""
