"""The pipeline layer: text syntax, canonical form, round trips through every spelling, errors, YAML, --set."""
import json

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsec.errors import PipelineSyntaxError, SparsecError, UsageError
from sparsec.passes.relufy import RelufyConfig
from sparsec.pipeline import (Pipeline, as_pipeline, from_recipe, load_recipe, parse_text, parse_yaml)

DEFAULT = "relufy{to=relu threshold=0.01 shift=0.0 scope=mlp targets={} ignore={}}"


def canon(text: str) -> str:
    return parse_text(text).canonical()


def syntax_error(text: str, column: int, fragment: str) -> PipelineSyntaxError:
    """Parse ``text``, expect a syntax error at ``column`` whose message contains ``fragment``; check the caret."""
    with pytest.raises(PipelineSyntaxError) as info:
        parse_text(text)
    exc = info.value
    assert isinstance(exc, UsageError) and exc.exit_code == 2
    assert exc.column == column
    assert exc.message.startswith(f"pipeline spec, column {column + 1}: ")
    assert fragment in exc.message
    message, text_line, caret_line = str(exc).rsplit("\n", 2)
    assert message == exc.message
    assert text_line == "  " + text
    assert caret_line == "  " + " " * column + "^"
    return exc


# ----------------------------------------------------------------------------------------------- text syntax


def test_plain_pass_canonical_prints_every_default():
    assert canon("relufy") == DEFAULT
    assert parse_text("relufy").names == ["relufy"]


@pytest.mark.parametrize("text", ["relufy{}", "relufy{ }", "  relufy  ", "relufy{to=relu}",
                                  "relufy{threshold=0.01 shift=0}", "relufy{ to = relu  scope=mlp }"])
def test_spellings_of_the_default(text):
    assert canon(text) == DEFAULT


def test_options_and_two_passes():
    p = parse_text("relufy{to=fatrelu threshold=0.02} , relufy{scope=all shift=-1.5e-3}")
    assert p.names == ["relufy", "relufy"]
    a, b = p.configs
    assert (a.to, a.threshold, a.shift, a.scope) == ("fatrelu", 0.02, 0.0, "mlp")
    assert (b.to, b.threshold, b.shift, b.scope) == ("relu", 0.01, -0.0015, "all")
    assert p.canonical() == ("relufy{to=fatrelu threshold=0.02 shift=0.0 scope=mlp targets={} ignore={}},"
                             "relufy{to=relu threshold=0.01 shift=-0.0015 scope=all targets={} ignore={}}")


def test_lists_and_quoted_strings():
    p = parse_text(r'relufy{targets={"re:.*\\.mlp\\..*", Foo, "a b", "x{y}", "q\"q", "k=v,w"} ignore={}}')
    cfg = p.configs[0]
    assert cfg.targets == [r"re:.*\.mlp\..*", "Foo", "a b", "x{y}", 'q"q', "k=v,w"]
    assert cfg.ignore == []
    assert p.canonical() == (r'relufy{to=relu threshold=0.01 shift=0.0 scope=mlp targets={re:.*\.mlp\..*,Foo,"a b",'
                             r'"x{y}","q\"q","k=v,w"} ignore={}}')


def test_bare_scalar_for_a_list_option_is_a_one_element_list():
    assert parse_text("relufy{targets=model.layers.0.mlp ignore=Foo}").configs[0].targets == ["model.layers.0.mlp"]
    assert canon("relufy{ignore=Foo}").endswith("targets={} ignore={Foo}}")


def test_empty_quoted_string_survives():
    cfg = parse_text('relufy{targets={""}}').configs[0]
    assert cfg.targets == [""]
    assert canon('relufy{targets={""}}').endswith('targets={""} ignore={}}')


@pytest.mark.parametrize("text", [
    "relufy",
    "relufy{to=fatrelu threshold=0.02}",
    r'relufy{targets={"re:.*\\.mlp\\..*", Foo} ignore={"a b", "c\\d"}}',
    "relufy{shift=1e300 threshold=5e-324},relufy{to=relu2 scope=all}",
    "relufy{shift=-0.0 threshold=1E-7}",
])
def test_text_canonical_parse_canonical_is_identity(text):
    c1 = canon(text)
    assert canon(c1) == c1
    assert parse_text(c1) == parse_text(text)


def test_canonical_yaml_and_json_round_trips():
    p = parse_text(r'relufy{to=shifted shift=-2.5 targets={"re:.*\\.mlp\\..*", "a b", "yes", "1.5", "null"}}')
    c = p.canonical()
    y = p.to_yaml()
    assert yaml.safe_load(y)["passes"][0]["relufy"]["targets"] == [r"re:.*\.mlp\..*", "a b", "yes", "1.5", "null"]
    assert parse_yaml(y).canonical() == c
    assert parse_yaml(parse_yaml(y).to_yaml()).canonical() == c
    j = p.to_json()
    assert json.loads(j) == {"version": 1, "passes": [{"relufy": {
        "to": "shifted", "threshold": 0.01, "shift": -2.5, "scope": "mlp",
        "targets": [r"re:.*\.mlp\..*", "a b", "yes", "1.5", "null"], "ignore": []}}]}
    assert from_recipe(json.loads(j)).canonical() == c
    assert as_pipeline(json.loads(j)).canonical() == c


def test_python_objects_to_canonical():
    cfg = RelufyConfig(to="fatrelu", threshold=1, targets=("a b", "re:x"))  # int → float, tuple → list
    assert cfg.threshold == 1.0 and isinstance(cfg.threshold, float) and cfg.targets == ["a b", "re:x"]
    expected = 'relufy{to=fatrelu threshold=1.0 shift=0.0 scope=mlp targets={"a b",re:x} ignore={}}'
    assert as_pipeline(cfg).canonical() == expected
    assert as_pipeline([cfg, RelufyConfig()]).canonical() == expected + "," + DEFAULT
    assert as_pipeline(expected).canonical() == expected
    assert as_pipeline(["relufy"]).canonical() == DEFAULT
    assert as_pipeline({"passes": [{"relufy": {"to": "fatrelu", "threshold": 1, "targets": ["a b", "re:x"]}}]}
                       ).canonical() == expected
    assert Pipeline((cfg,)) == parse_text(expected)


def test_as_pipeline_rejects_other_types():
    with pytest.raises(SparsecError, match="cannot make a pipeline from int"):
        as_pipeline(3)


_target_chars = st.sampled_from(list('ab.*:\\ ,{}="\'#\t\n\r\x00\x85\u2028-_/é') + ["re:", "true", "null", "1e5"])
_targets = st.lists(st.lists(_target_chars, max_size=8).map("".join), max_size=4)


@settings(max_examples=200, deadline=None)
@given(to=st.sampled_from(["relu", "fatrelu", "shifted", "relu2"]),
       threshold=st.floats(min_value=0.0, allow_nan=False, allow_infinity=False),
       shift=st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([1e-320, -1e308, 1e16, -0.0]),
       scope=st.sampled_from(["mlp", "all"]), targets=_targets, ignore=_targets)
def test_round_trip_property(to, threshold, shift, scope, targets, ignore):
    cfg = RelufyConfig(to=to, threshold=threshold, shift=shift, scope=scope, targets=targets, ignore=ignore)
    p = Pipeline((cfg,))
    c = p.canonical()
    for back in (parse_text(c), parse_yaml(p.to_yaml()), from_recipe(json.loads(p.to_json()))):
        assert back.canonical() == c
        got = back.configs[0]
        assert got.options() == cfg.options()
        assert repr(got.threshold) == repr(threshold) and repr(got.shift) == repr(shift)  # -0.0 stays -0.0
    assert canon(c + "," + c) == c + "," + c


# ----------------------------------------------------------------------------------------------- errors


def test_unknown_pass_did_you_mean():
    exc = syntax_error("relu", 0, "unknown pass 'relu' (did you mean 'relufy'?)")
    assert exc.exit_code == 2
    assert "valid passes: cats, db-mlp, fold, jsrelu, prune, quantize, regularize, relufy, rotate, strip, teal (run 'sparsec passes')" \
        in exc.message
    syntax_error("relufy,relufyy{to=relu}", 7, "unknown pass 'relufyy' (did you mean 'relufy'?)")
    exc = syntax_error("zzz", 0, "unknown pass 'zzz'; valid passes:")
    assert "did you mean" not in exc.message


def test_unknown_option_did_you_mean():
    syntax_error("relufy{tto=relu}", 7, "no such option 'tto' for pass 'relufy' (did you mean 'to'?)")
    syntax_error("relufy{to=relu  thresold=1}", 16, "no such option 'thresold' for pass 'relufy' (did you mean"
                 " 'threshold'?); valid options: to, threshold, shift, scope, targets, ignore")
    syntax_error("relufy{to=relu to=relu2}", 15, "option 'to' given twice for pass 'relufy'")


@pytest.mark.parametrize("text,column,fragment", [
    ("relufy{threshold=-1}", 17, "bad value -1.0 for option 'threshold' of pass 'relufy': expected 0.0 <= threshold"),
    ("relufy{threshold=abc}", 17, "bad value 'abc' for option 'threshold' of pass 'relufy': expected a number"),
    ("relufy{threshold=nan}", 17, "expected a finite number"),
    ("relufy{shift=inf}", 13, "bad value 'inf' for option 'shift' of pass 'relufy': expected a finite number"),
    ("relufy{threshold={1}}", 17, "expected a number"),
    ("relufy{to=gelu}", 10, "bad value 'gelu' for option 'to' of pass 'relufy': expected one of relu, fatrelu,"
                            " shifted, relu2 (did you mean 'relu'?)"),
    ("relufy{scope={mlp}}", 13, "for option 'scope' of pass 'relufy': expected one of mlp, all"),
    # the column is the bad value's own, even when another option's name appears in the message
    ("relufy{to=relu threshold=to}", 25, "bad value 'to' for option 'threshold'"),
    ("relufy{scope=all to=shift}", 20, "bad value 'shift' for option 'to'"),
    ("relufy,relufy{shift=1 threshold=x}", 32, "bad value 'x' for option 'threshold'"),
])
def test_bad_values(text, column, fragment):
    syntax_error(text, column, fragment)


@pytest.mark.parametrize("text,column,fragment", [
    ("relufy{to=relu", 6, "unbalanced brace: options of 'relufy' opened here are never closed"),
    ("relufy{", 6, "unbalanced brace: options of 'relufy' opened here are never closed"),
    ("relufy}", 6, "unbalanced brace: '}' with no matching '{'"),
    ("relufy{to=relu}}", 15, "unbalanced brace: '}' with no matching '{'"),
    ("}", 0, "unbalanced brace: '}' with no matching '{'"),
    ("relufy{targets={a,b}", 6, "unbalanced brace: options of 'relufy' opened here are never closed"),
    ("relufy{targets={a,b", 15, "unbalanced brace: list opened here is never closed"),
    ("relufy{targets={a, ", 15, "unbalanced brace: list opened here is never closed"),
    ("relufy{targets={a,,b}}", 18, "empty list element"),
    ("relufy{targets={a b}}", 18, "expected ',' or '}' in list, found 'b'"),
    ('relufy{targets="abc}', 15, "unterminated quoted string"),
    (r'relufy{targets="a\nb"}', 18, r'bad escape in quoted string: only \" and \\ are allowed'),
    ("relufy,,relufy", 7, "empty pass element (a comma with no pass before or after it)"),
    ("relufy,", 7, "empty pass element"),
    (",relufy", 0, "empty pass element"),
    ("relufy , ", 9, "empty pass element"),
    ("", 0, "empty pipeline: name at least one pass, e.g. 'relufy'"),
    ("   ", 0, "empty pipeline"),
    ("relufy{to=relu,threshold=0.02}", 14,
     "expected a space or '}' after the value of 'to', found ',' (options are separated by spaces, not commas)"),
    ("relufy{to=relu, threshold=0.02}", 14, "(options are separated by spaces, not commas)"),
    ("relufy{to}", 9, "expected '=' after option 'to' (options are written key=value, separated by spaces)"),
    ("relufy{to=}", 10, "expected a value, found '}'"),
    ("relufy{to=", 10, "expected a value, found end of text"),
    ("relufy{=relu}", 7, "expected an option name for pass 'relufy', found '='"),
    ("relufy relufy", 7, "expected ',' between passes, found 'r'"),
    ("relufy{to=relu\"x\"}", 14, "expected a space or '}' after the value of 'to', found '\"'"),
    ("1relufy", 0, "expected a pass name, found '1'"),
])
def test_syntax_errors(text, column, fragment):
    syntax_error(text, column, fragment)


def test_caret_keeps_tabs_so_it_lines_up():
    with pytest.raises(PipelineSyntaxError) as info:
        parse_text("relufy,\t,relufy")
    assert info.value.column == 8
    assert str(info.value).endswith("\n  relufy,\t,relufy\n  " + " " * 7 + "\t^")


# ----------------------------------------------------------------------------------------------- YAML recipes


RECIPE = """\
version: 1
passes:
  - relufy: {to: fatrelu, threshold: 0.02, targets: ["re:.*\\\\.mlp\\\\..*", Foo]}
  - relufy
  - relufy:
"""


def test_yaml_recipe():
    p = parse_yaml(RECIPE)
    assert p.canonical() == (r"relufy{to=fatrelu threshold=0.02 shift=0.0 scope=mlp targets={re:.*\.mlp\..*,Foo}"
                             " ignore={}}," + DEFAULT + "," + DEFAULT)
    assert parse_yaml("- relufy\n").canonical() == DEFAULT  # a bare list of passes
    assert parse_yaml("passes: [relufy]\n").canonical() == DEFAULT  # version defaults to 1


def test_load_recipe(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text(RECIPE, encoding="utf-8")
    assert load_recipe(str(f)) == parse_yaml(RECIPE)
    with pytest.raises(UsageError, match=r"recipe file '.*missing\.yaml' does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes: [relufy: {to: gelu}]\n")
    with pytest.raises(UsageError) as info:
        load_recipe(str(bad))
    assert info.value.message.startswith(f"{bad}: pass #1: bad value 'gelu' for option 'to' of pass 'relufy'")


def test_yaml_is_safe_loaded(tmp_path):
    target = tmp_path / "pwned"
    evil = f'version: 1\npasses: !!python/object/apply:os.system ["echo pwned > {target}"]\n'
    with pytest.raises(UsageError) as info:
        parse_yaml(evil)
    assert info.value.exit_code == 2
    assert info.value.message.startswith("recipe: not valid YAML at line 2")
    assert "python/object/apply:os.system" in info.value.message
    assert not target.exists()
    evil_file = tmp_path / "evil.yaml"
    evil_file.write_text(evil)
    with pytest.raises(UsageError):
        load_recipe(str(evil_file))
    assert not target.exists()


@pytest.mark.parametrize("text,message", [
    ("version: 1\npasses: [relufy]\nextra: 1\nmore: 2\n",
     "recipe: unknown top-level key(s) ['extra', 'more']; a recipe has 'version' and 'passes'"),
    ("version: 2\npasses: [relufy]\n", "recipe: recipe version 2 is not supported; this sparsec reads version 1"),
    ("version: true\npasses: [relufy]\n", "recipe: recipe version True is not supported"),
    ("version: '1'\npasses: [relufy]\n", "recipe: recipe version '1' is not supported"),
    ("version: 1\npasses: relufy\n", "recipe: expected a non-empty list of passes under 'passes'"),
    ("version: 1\npasses: []\n", "recipe: expected a non-empty list of passes under 'passes'"),
    ("version: 1\n", "recipe: expected a non-empty list of passes under 'passes'"),
    ("", "recipe: expected a non-empty list of passes"),
    ("just text\n", "recipe: expected a non-empty list of passes"),
    ("passes:\n  - relufy: [a, b]\n", "recipe: pass #1: options of 'relufy' must be a mapping, got ['a', 'b']"),
    ("passes:\n  - relufy\n  - relufy: fatrelu\n", "recipe: pass #2: options of 'relufy' must be a mapping, got"
                                                   " 'fatrelu'"),
    ("passes:\n  - {relufy: {}, other: {}}\n", "recipe: pass #1 must be a name or a one-key mapping"),
    ("passes:\n  - 3\n", "recipe: pass #1 must be a name or a one-key mapping 'name: {options}', got 3"),
    ("passes:\n  - 3: {}\n", "recipe: pass #1: a pass name must be a string, got 3"),
    ("passes:\n  - relufy: {1: a}\n", "recipe: pass #1 ('relufy'): option names must be strings"),
    ("passes:\n  - relu\n", "recipe: pass #1: unknown pass 'relu' (did you mean 'relufy'?)"),
    ("passes:\n  - relufy: {tto: relu}\n",
     "recipe: pass #1: no such option 'tto' for pass 'relufy' (did you mean 'to'?)"),
    ("passes:\n  - relufy: {threshold: -1}\n",
     "recipe: pass #1: bad value -1.0 for option 'threshold' of pass 'relufy': expected 0.0 <= threshold"),
    ("passes:\n  - relufy: {threshold: true}\n", "bad value True for option 'threshold' of pass 'relufy':"
                                                 " expected a number (float)"),
    ("passes:\n  - relufy: {targets: [1, 2]}\n", "bad value [1, 2] for option 'targets' of pass 'relufy':"
                                                 " expected a list of strings, e.g. {a,b}"),
    ("passes: [relufy\n", "recipe: not valid YAML at line 2, column 1:"),
])
def test_bad_recipes(text, message):
    with pytest.raises(UsageError) as info:
        parse_yaml(text)
    assert message in info.value.message
    assert info.value.exit_code == 2


def test_recipe_source_names_the_file():
    with pytest.raises(UsageError, match=r"^my\.yaml: recipe version 3 is not supported"):
        parse_yaml("version: 3\npasses: [relufy]", source="my.yaml")


# ----------------------------------------------------------------------------------------------- --set


def test_overrides():
    p = parse_text("relufy")
    q = p.with_overrides(["relufy.to=fatrelu", "relufy.threshold=0.5", "relufy.targets={a, \"b c\"}",
                          "relufy.ignore=re:.*x"])
    assert q.canonical() == ('relufy{to=fatrelu threshold=0.5 shift=0.0 scope=mlp targets={a,"b c"}'
                             " ignore={re:.*x}}")
    assert p.canonical() == DEFAULT  # the original is unchanged
    assert p.with_overrides([]) == p
    assert p.with_overrides(["relufy.targets={}"]).configs[0].targets == []
    assert p.with_overrides(["relufy.targets=a b"]).configs[0].targets == ["a b"]  # a scalar is taken verbatim


def test_overrides_on_duplicates():
    p = parse_text("relufy,relufy")
    q = p.with_overrides(["relufy#2.to=relu2", "relufy#1.shift=1"])
    assert [c.to for c in q.configs] == ["relu", "relu2"]
    assert [c.shift for c in q.configs] == [1.0, 0.0]
    with pytest.raises(UsageError, match=r"^bad --set 'relufy\.to=relu2': pass 'relufy' appears 2 times; write"
                                         r" relufy#1\.to=…$"):
        p.with_overrides(["relufy.to=relu2"])
    with pytest.raises(UsageError, match=r"pass 'relufy' appears 2 time\(s\), not #3"):
        p.with_overrides(["relufy#3.to=relu2"])
    with pytest.raises(UsageError, match=r"not #0"):
        p.with_overrides(["relufy#0.to=relu2"])


@pytest.mark.parametrize("assignment,message", [
    ("relu.to=relu", "bad --set 'relu.to=relu': pass 'relu' is not in the pipeline (did you mean 'relufy'?)"
                     " (pipeline: relufy)"),
    ("teal.sparsity=0.5", "bad --set 'teal.sparsity=0.5': pass 'teal' is not in the pipeline (pipeline: relufy)"),
    ("relufy.tto=relu", "no such option 'tto' for pass 'relufy' (did you mean 'to'?)"),
    ("relufy.to=gelu", "bad value 'gelu' for option 'to' of pass 'relufy'"),
    ("relufy.threshold=-1", "bad value -1.0 for option 'threshold' of pass 'relufy': expected 0.0 <= threshold"),
    ("relufy.to", "bad --set 'relufy.to': expected PASS.OPTION=VALUE, e.g. teal.sparsity=0.6"),
    ("relufy=relu", "bad --set 'relufy=relu': expected PASS.OPTION=VALUE"),
    ("to=relu", "bad --set 'to=relu': expected PASS.OPTION=VALUE"),
    (".to=relu", "bad --set '.to=relu': expected PASS.OPTION=VALUE"),
    ("relufy#x.to=relu", "bad --set 'relufy#x.to=relu': expected PASS.OPTION=VALUE"),
])
def test_bad_overrides(assignment, message):
    with pytest.raises(UsageError) as info:
        parse_text("relufy").with_overrides([assignment])
    assert message in info.value.message
    assert info.value.exit_code == 2


def test_override_list_syntax_error():
    with pytest.raises(PipelineSyntaxError) as info:
        parse_text("relufy").with_overrides(["relufy.targets={a,b"])
    assert info.value.column == 0 and "unbalanced brace: list opened here is never closed" in info.value.message
    with pytest.raises(PipelineSyntaxError) as info:
        parse_text("relufy").with_overrides(["relufy.targets={a} x"])
    assert info.value.column == 4 and "unexpected text after the list" in info.value.message
