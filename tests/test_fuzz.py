"""Fuzzing the readers of untrusted text: the pipeline parser, YAML recipes, ``--set`` values and artifact manifests.

Random and mutated inputs (mutations of valid specs, recipes and manifests) may only ever raise sparsec's own
user-facing errors (SparsecError and its subclasses UsageError / PipelineSyntaxError) with a one-line message, and
each example must finish within a few seconds (no hang). ``SPARSEC_FUZZ_EXAMPLES`` sets the examples per target:
150 by default (``make test``), 2,000 in ``make test-all``.
"""
import contextlib
import io
import json
import os
import signal
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsec.artifact import MANIFEST_FILE, REPORT_FILE, read_artifact, sha256_file
from sparsec.errors import PipelineSyntaxError, SparsecError
from sparsec.pipeline import from_recipe, parse_text, parse_yaml

EXAMPLES = int(os.environ.get("SPARSEC_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SECONDS_PER_EXAMPLE = 10

VALID_SPECS = [
    "relufy",
    "relufy{to=fatrelu threshold=0.02 targets={re:.*mlp.*,GELU}}",
    'relufy{to=shifted shift=0.5 ignore={"a b","c\\"d"}},teal{sparsity=0.4 calib_rounds=1}',
    "teal{sparsity=0.5 allocation=uniform scope=all targets={} ignore={lm_head}}",
    "relufy{to=relu2 scope=all},relufy{to=relu}",
]
VALID_RECIPES = [parse_text(s).to_yaml() for s in VALID_SPECS] + [
    "version: 1\npasses:\n  - relufy: {to: fatrelu, threshold: 0.02}\n  - teal\n",
    "passes: [relufy, {teal: {sparsity: 0.5, targets: [re:.*mlp.*, GELU]}}]\n",
]
SETS = ["relufy.to=fatrelu", "relufy#2.threshold=0.5", "teal.sparsity=0.6", "relufy.targets={a,\"b c\"}",
        "teal.ignore=re:.*x"]
SPECIAL = ' \t\n,{}="\\#.:!&*[]-?|>%@`\'\x00'


class Hang(Exception):
    """An example ran longer than SECONDS_PER_EXAMPLE."""


@contextlib.contextmanager
def no_hang(seconds: float = SECONDS_PER_EXAMPLE):
    def alarm(signum, frame):
        raise Hang(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def only_sparsec_errors(fn, *args):
    """Run ``fn(*args)``; any exception must be a SparsecError with a one-line message (PipelineSyntaxError: the
    message, the spec and a caret). Returns the result, or the SparsecError."""
    try:
        with no_hang():
            return fn(*args)
    except SparsecError as exc:
        assert exc.exit_code in (1, 2)
        assert exc.message and "\n" not in exc.message, repr(exc.message)
        if isinstance(exc, PipelineSyntaxError):
            assert 0 <= exc.column <= len(exc.text)
            assert str(exc).count("\n") == 2 + exc.text.count("\n")
        return exc


# ------------------------------------------------------------------------------------------------- mutations

def mutations(valid: list[str], alphabet: str):
    """A valid text with 1-6 random edits: insert, delete, replace a character, duplicate or drop a slice."""
    edit = st.tuples(st.sampled_from(["insert", "delete", "replace", "duplicate", "drop"]), st.floats(0, 1),
                     st.floats(0, 1), st.text(alphabet=alphabet, min_size=1, max_size=4))

    def apply(text: str, edits) -> str:
        for kind, a, b, chars in edits:
            i, j = sorted((int(a * len(text)), int(b * len(text))))
            if kind == "insert":
                text = text[:i] + chars + text[i:]
            elif kind == "delete":
                text = text[:i] + text[i + 1:]
            elif kind == "replace":
                text = text[:i] + chars + text[i + 1:]
            elif kind == "duplicate":
                text = text[:j] + text[i:j] + text[j:]
            else:
                text = text[:i] + text[j:]
        return text

    return st.builds(apply, st.sampled_from(valid), st.lists(edit, min_size=1, max_size=6))


TEXT_ALPHABET = st.sampled_from(list(SPECIAL + string.ascii_letters + string.digits + "_-+e.é\u00a0\u2028"))
random_text = st.text(alphabet=TEXT_ALPHABET, max_size=80) | st.text(max_size=40)
option_words = ["to", "threshold", "shift", "scope", "targets", "ignore", "sparsity", "allocation", "prefill",
                "calib_rounds", "calib_bits", "relufy", "teal", "fatrelu", "relu2", "nan", "inf", "-1", "1e999",
                "0.5", "true", "{}", "{a,b}", '"x"']
word_soup = st.lists(st.sampled_from(option_words + list(SPECIAL)), max_size=20).map("".join)


# ------------------------------------------------------------------------------------------------- pipeline text

@FUZZ
@given(random_text | word_soup)
def test_text_parser_random(text):
    only_sparsec_errors(parse_text, text)


@FUZZ
@given(mutations(VALID_SPECS, SPECIAL + "az09=_"))
def test_text_parser_mutated(text):
    out = only_sparsec_errors(parse_text, text)
    if not isinstance(out, SparsecError):  # whatever parses has a canonical form that parses to itself
        assert parse_text(out.canonical()) == out


# ------------------------------------------------------------------------------------------------- YAML recipes

@FUZZ
@given(random_text | word_soup)
def test_yaml_recipe_random_text(text):
    only_sparsec_errors(parse_yaml, text)


@FUZZ
@given(mutations(VALID_RECIPES, SPECIAL + "az09:-_ \n"))
def test_yaml_recipe_mutated(text):
    out = only_sparsec_errors(parse_yaml, text)
    if not isinstance(out, SparsecError):
        assert parse_yaml(out.to_yaml()) == out


json_scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**70, max_value=2**70)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
                | st.sampled_from(option_words))
yaml_values = st.recursive(json_scalars | st.binary(max_size=8) | st.dates(),
                           lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.sampled_from(option_words) | json_scalars.filter(
                               lambda k: isinstance(k, (str, int, bool, type(None)))), inner, max_size=4),
                           max_leaves=12)
pass_items = (st.sampled_from(["relufy", "teal", "relu", ""]) | yaml_values
              | st.dictionaries(st.sampled_from(["relufy", "teal", "nope"]),
                                st.none() | st.dictionaries(st.sampled_from(option_words), yaml_values, max_size=4),
                                min_size=1, max_size=2))
recipes = (st.fixed_dictionaries({}, optional={"version": st.just(1) | yaml_values,
                                               "passes": st.lists(pass_items, max_size=4) | yaml_values,
                                               "extra": yaml_values})
           | st.lists(pass_items, max_size=4) | yaml_values)


@FUZZ
@given(recipes)
def test_recipe_structures(data):
    only_sparsec_errors(from_recipe, data)
    try:
        text = yaml.safe_dump(data)
    except yaml.YAMLError:
        return
    only_sparsec_errors(parse_yaml, text)


def test_deeply_nested_yaml_is_a_usage_error():
    for text in ["[" * 1000, "passes: " + "[" * 1000 + "]" * 1000, "passes:\n" + "".join(
            " " * i + "- \n" for i in range(1000))]:
        exc = only_sparsec_errors(parse_yaml, text)
        assert isinstance(exc, SparsecError) and exc.exit_code == 2, exc
        assert "nested too deeply" in exc.message


# ------------------------------------------------------------------------------------------------- --set values

BASE_PIPELINES = [parse_text("relufy,teal"), parse_text("relufy,relufy"), parse_text("teal")]
assignments = (st.tuples(st.sampled_from(["relufy", "teal", "relu", "relufy#1", "relufy#2", "relufy#0",
                                          "relufy#99999999999999999999", "teal#1", "_x-y"]),
                         st.sampled_from(option_words + ["", "x"]), random_text | word_soup)
               .map(lambda t: f"{t[0]}.{t[1]}={t[2]}"))


@FUZZ
@given(st.sampled_from(BASE_PIPELINES), st.lists(assignments | random_text | mutations(SETS, SPECIAL + "az09.=#"),
                                                 min_size=1, max_size=3))
def test_set_values(pipeline, sets):
    out = only_sparsec_errors(pipeline.with_overrides, sets)
    if not isinstance(out, SparsecError):
        assert parse_text(out.canonical()) == out


# ------------------------------------------------------------------------------------------------- manifests

@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A real artifact (a tiny MLP relufied, written by sparsec.save) with a held-out sparsity section."""
    import torch
    from torch import nn

    import sparsec

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.act, self.down = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)

        def forward(self, x):
            return self.down(self.act(self.up(x)))

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("fuzz") / "art"
    sparsec.save(sparsec.transform(MLP(), "relufy", example_inputs=(torch.randn(2, 8),)), str(out))
    report = json.loads((out / REPORT_FILE).read_text())  # the held-out section a calibrated pass adds, to mutate too
    report["sparsity"] = {"heldout_data": "text.txt", "teal_param_weighted": 0.5, "mlp_intermediate": None}
    (out / REPORT_FILE).write_text(json.dumps(report))
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["files"][REPORT_FILE] = sha256_file(str(out / REPORT_FILE))
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    return out


def read_and_inspect(path: Path):
    """What `sparsec inspect` does (text and --json) and what `load` checks before the program: only SparsecError."""
    from sparsec.cli import cli

    read_artifact(str(path), load_program=False)
    for extra in ([], ["--json"]):
        with contextlib.redirect_stdout(io.StringIO()):
            cli.main(args=["inspect", str(path), *extra], prog_name="sparsec", standalone_mode=False)


def copy_artifact(src: Path, dst: Path) -> Path:
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


BYTES = st.binary(min_size=1, max_size=4) | st.sampled_from([b"{", b"}", b"[", b"]", b",", b'"', b"\\", b"null",
                                                               b"1e999", b"NaN", b"-0", b"\xff", b"9" * 40])


@FUZZ
@given(st.data())
def test_manifest_mutated_bytes(artifact, tmp_path_factory, data):
    d = copy_artifact(artifact, tmp_path_factory.mktemp("m"))
    text = (d / MANIFEST_FILE).read_bytes()
    for _ in range(data.draw(st.integers(1, 5))):
        i = data.draw(st.integers(0, len(text)))
        j = data.draw(st.integers(i, min(len(text), i + 8)))
        text = text[:i] + data.draw(BYTES | st.just(b"")) + text[j:]
    (d / MANIFEST_FILE).write_bytes(text)
    only_sparsec_errors(read_and_inspect, d)


def _paths(value, prefix=()):
    """Every path (a tuple of keys / indices) into a JSON value."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


@FUZZ
@given(st.sampled_from([MANIFEST_FILE, REPORT_FILE]), st.data())
def test_manifest_and_report_mutated_fields(artifact, tmp_path_factory, which, data):
    """Replace or delete a random field of manifest.json or report.json (a changed report gets a matching checksum,
    as a forger would write it)."""
    d = copy_artifact(artifact, tmp_path_factory.mktemp("f"))
    doc = json.loads((d / which).read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        paths = list(_paths(doc))
        path = data.draw(st.sampled_from(paths))
        new = data.draw(json_values)
        if not path:
            doc = new
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = new
    (d / which).write_text(json.dumps(doc))
    if which == REPORT_FILE:
        manifest = json.loads((d / MANIFEST_FILE).read_text())
        manifest["files"][REPORT_FILE] = sha256_file(str(d / REPORT_FILE))
        (d / MANIFEST_FILE).write_text(json.dumps(manifest))
    only_sparsec_errors(read_and_inspect, d)


def test_unmutated_artifact_reads_and_inspects(artifact):
    assert only_sparsec_errors(read_and_inspect, artifact) is None
