"""The ``sparsec`` command line, run as the real console script in subprocesses.

The error contract (docs/errors.md): exit code 1 for a failure, 2 for usage / pipeline syntax; stderr is one
``error: ...`` line (a pipeline syntax error adds the spec and a caret line); no traceback unless ``--debug``;
nothing written (no OUT, no temporaries) and the user's input files unchanged.

Each subprocess spends seconds importing torch, so the fixture ``runs`` starts every command at once on a thread
pool when the module begins, and each test waits for and checks its own command's result.
"""
import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.cli_helpers import without_progress

BIN = Path(sys.executable).parent / "sparsec"
SPARSEC = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "sparsec.cli"]
ARTIFACT_FILES = ["manifest.json", "model.pt2", "recipe.yaml", "report.json"]

FACTORY = '''
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.act = nn.GELU()
        self.down = nn.Linear(32, 16)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def factory():
    torch.manual_seed(0)
    return MLP(), (torch.randn(2, 16),)
'''


class Evil:
    """Unpickling this runs a shell command (it creates the file ``marker``)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def sparsec(*args, cwd, env=None):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    return subprocess.run([*SPARSEC, *map(str, args)], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=300)


def snapshot(path: Path) -> dict:
    """Bytes and mtime of a file, or of every file under a directory (and the directory's entries)."""
    if path.is_file():
        return {".": (path.read_bytes(), path.stat().st_mtime_ns)}
    snap = {"<entries>": sorted(str(p.relative_to(path)) for p in path.rglob("*"))}
    for p in path.rglob("*"):
        if p.is_file():
            snap[str(p.relative_to(path))] = (p.read_bytes(), p.stat().st_mtime_ns)
    return snap


def temporaries(*dirs: Path) -> list:
    return [p for d in dirs for p in d.iterdir() if ".sparsec-tmp-" in p.name]


def assert_error(proc, code: int, *fragments: str) -> str:
    """The error contract for one command; returns the error line."""
    err = without_progress(proc.stderr)
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}; stderr:\n{err}"
    assert "Traceback" not in err, err
    assert proc.stdout == "", proc.stdout
    lines = err.rstrip("\n").split("\n")
    assert lines[0].startswith("error: "), err
    if len(lines) > 1:  # a PipelineSyntaxError: the spec, then a caret under the column the message names
        assert len(lines) == 3, err
        column = int(re.search(r"column (\d+)", lines[0]).group(1))
        assert lines[2] == "  " + " " * (column - 1) + "^", err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


# ------------------------------------------------------------------------------------------------ the commands

MODEL_CASES = {
    # id: (MODEL, extra args, exit code, fragments of the error line); {d} is the inputs directory
    "missing-model": ("nope.pt2", [], 2, ["'{d}/nope.pt2' does not exist", "MODEL is a Hugging Face directory"]),
    "empty-dir": ("emptydir", [], 2, ["'{d}/emptydir' is a directory but not a model", "no config.json"]),
    "random-pt2": ("random.pt2", [], 1, ["'{d}/random.pt2' is not a readable torch.export archive",
                                         "re-create it with torch.export.save"]),
    "truncated-pt2": ("truncated.pt2", [], 1, ["'{d}/truncated.pt2' is not a readable torch.export archive"]),
    "truncated-weights": ("mlp.py:factory", ["--weights", "{d}/truncated.safetensors"], 1,
                          ["weights file '{d}/truncated.safetensors' is not a valid safetensors file", "truncated"]),
    "state-dict-as-model": ("weights.safetensors", [], 2, ["'{d}/weights.safetensors' holds weights only",
                                                           "--weights {d}/weights.safetensors"]),
    "evil-pickle": ("evil.pt", [], 1, ["'{d}/evil.pt' is a pickle that safe loading refuses",
                                       f"it calls {os.system.__module__}.system", "--unsafe-pickle"]),
}

SPEC_CASES = {
    # id: (arguments after MODEL, fragments of the error line); all exit 2
    "unknown-pass": (["--pass", "relu"], ["unknown pass 'relu'", "did you mean 'relufy'", "; valid passes: ",
                                         "(run 'sparsec passes')"]),
    "unknown-pass-option": (["--pass", "relufy{nope=1}"], ["no such option 'nope' for pass 'relufy'",
                                                           "valid options: to, threshold"]),
    "unknown-cli-option": (["--bogus", "--pass", "relufy"], ["No such option '--bogus'", "sparsec transform --help"]),
    "bad-choice-value": (["--pass", "relufy{to=bogus}"], ["bad value 'bogus' for option 'to' of pass 'relufy'",
                                                          "expected one of relu, fatrelu"]),
    "bad-number-value": (["--pass", "relufy{threshold=abc}"], ["bad value 'abc' for option 'threshold'",
                                                               "expected a number"]),
    "unbalanced-brace": (["--pass", "relufy{to=relu"], ["unbalanced brace", "'relufy'"]),
    "empty-element": (["--pass", "relufy,,relufy"], ["empty pass element"]),
    "no-pass": ([], ["give exactly one of --pass SPEC and --recipe FILE"]),
}


CONTRACT_CASES = {
    # id: (arguments, exit code, fragments of the error line); {d} is the inputs directory, {factory} the factory
    "inspect-tampered": (["inspect", "{d}/tampered-report"], 1, [
        "artifact '{d}/tampered-report': report.json does not match its checksum in manifest.json (modified or"
        " damaged); re-create the artifact"]),
    "export-tampered": (["export", "{d}/tampered-model", "--to", "onnx", "-o", "m.onnx"], 1, [
        "artifact '{d}/tampered-model': model.pt2 does not match its checksum in manifest.json"]),
    "load-tampered": (["transform", "{d}/tampered-model", "--pass", "relufy", "-o", "out"], 1, [
        "artifact '{d}/tampered-model': model.pt2 does not match its checksum in manifest.json"]),
    "inspect-newer": (["inspect", "{d}/newer"], 1, [
        "'{d}/newer' has artifact format version 2; this sparsec reads version 1: re-create it with this sparsec"]),
    "export-newer": (["export", "{d}/newer", "--to", "onnx", "-o", "m.onnx"], 1, [
        "'{d}/newer' has artifact format version 2; this sparsec reads version 1"]),
    "load-newer": (["transform", "{d}/newer", "--pass", "relufy", "-o", "out"], 1, [
        "'{d}/newer' has artifact format version 2; this sparsec reads version 1"]),
    "run-newer": (["run", "{d}/newer"], 1, ["'{d}/newer' has artifact format version 2; this sparsec reads version 1"]),
    "compile-newer": (["compile", "{d}/newer", "-o", "out"], 1, [
        "'{d}/newer' has artifact format version 2; this sparsec reads version 1"]),
    "inspect-not-json": (["inspect", "{d}/not-json"], 1, [
        "'{d}/not-json/manifest.json' is not valid JSON (", "); the artifact is damaged: re-create it"]),
    "inspect-bad-field": (["inspect", "{d}/bad-field"], 1, [
        "'{d}/bad-field/manifest.json': field 'source' is missing or of the wrong type; the artifact is damaged:"
        " re-create it"]),
    "inspect-missing-file": (["inspect", "{d}/missing-file"], 1, [
        "artifact '{d}/missing-file' is missing model.pt2; re-create it"]),
    "max-memory-too-small": (["transform", "{factory}", "--pass", "relufy", "-o", "out", "--max-memory", "1KiB"], 1,
                             ["not enough memory: the transform needs about ", " (parameters ",
                              "but the budget is 1.00 KiB (--max-memory); use a smaller model, or raise --max-memory"
                              " if more memory can be used"]),
    "max-memory-bad": (["transform", "{factory}", "--pass", "relufy", "-o", "out", "--max-memory", "8gigs"], 2,
                       ["bad memory size '8gigs': expected a number with a unit, e.g. 8GiB, 512MiB or 2GB"]),
    "recipe-python-tag": (["transform", "{factory}", "--recipe", "{d}/evil.yaml", "-o", "out"], 2, [
        "{d}/evil.yaml: not valid YAML at line 1, column 9: could not determine a constructor for the tag"
        " 'tag:yaml.org,2002:python/object/apply:os.system'"]),
    "recipe-missing": (["transform", "{factory}", "--recipe", "nope.yaml", "-o", "out"], 2, [
        "recipe file 'nope.yaml' does not exist"]),
    "set-malformed": (["transform", "{factory}", "--pass", "relufy", "--set", "relufy.to", "-o", "out"], 2, [
        "bad --set 'relufy.to': expected PASS.OPTION=VALUE, e.g. teal.sparsity=0.6"]),
    "set-unknown-pass": (["transform", "{factory}", "--pass", "relufy", "--set", "teal.sparsity=0.5", "-o", "out"], 2,
                         ["bad --set 'teal.sparsity=0.5': pass 'teal' is not in the pipeline (pipeline: relufy)"]),
    "remote-code": (["transform", "{d}/remote-code", "--pass", "relufy", "-o", "out"], 1, [
        "'{d}/remote-code' needs its own Python code to load; if you trust it, pass --trust-remote-code"]),
    "evil-weights": (["transform", "{factory}", "--weights", "{d}/evil.pt", "--pass", "relufy", "-o", "out"], 1, [
        "weights file '{d}/evil.pt' is a pickle that safe loading refuses (it may run arbitrary code)",
        "--unsafe-pickle applies to a whole-module MODEL only"]),
}


def _make_artifacts(d: Path) -> None:
    """A good artifact and damaged copies: a changed report / model, a newer format version, a manifest that is not
    JSON, one with a field of the wrong type, one with a file missing."""
    import shutil

    import sparsec

    namespace = {}
    exec(FACTORY, namespace)
    model, example = namespace["factory"]()
    sparsec.save(sparsec.transform(model, "relufy", example_inputs=example, measure=False), str(d / "art"))
    for name in ["tampered-report", "tampered-model", "newer", "not-json", "bad-field", "missing-file"]:
        shutil.copytree(d / "art", d / name)
    report = d / "tampered-report" / "report.json"
    report.write_text(report.read_text().replace('"relufy"', '"relufx"', 1))
    model = d / "tampered-model" / "model.pt2"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 1
    model.write_bytes(bytes(data))
    for name, change in [("newer", {"format_version": 2}), ("bad-field", {"source": "x"})]:
        manifest = json.loads((d / name / "manifest.json").read_text())
        (d / name / "manifest.json").write_text(json.dumps({**manifest, **change}))
    (d / "not-json" / "manifest.json").write_text('{"format": "sparsec-artifact",')
    (d / "missing-file" / "model.pt2").unlink()


def _make_inputs(d: Path) -> None:
    """The user's files: a factory, good / corrupt .pt2 files, state dicts, an evil pickle, an empty directory, a
    recipe with a Python tag, a Hugging Face directory with its own code, good and damaged artifacts."""
    (d / "mlp.py").write_text(FACTORY)
    program = torch.export.export(nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4)), (torch.randn(2, 4),))
    torch.export.save(program, d / "good.pt2")
    data = (d / "good.pt2").read_bytes()
    (d / "truncated.pt2").write_bytes(data[: len(data) // 2])
    (d / "random.pt2").write_bytes(os.urandom(4096))
    from safetensors.torch import save_file

    mlp = nn.Sequential()
    mlp.up, mlp.act, mlp.down = nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)
    save_file(mlp.state_dict(), str(d / "weights.safetensors"))
    data = (d / "weights.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    torch.save(Evil(d / "MARKER"), d / "evil.pt")
    assert b"system" in (d / "evil.pt").read_bytes()
    (d / "emptydir").mkdir()
    (d / "evil.yaml").write_text(f'passes: !!python/object/apply:os.system ["touch {d}/MARKER"]\n')
    (d / "remote-code").mkdir()
    (d / "remote-code" / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}}))
    for code in ("configuration_evil.py", "modeling_evil.py"):
        (d / "remote-code" / code).write_text(f"open({str(d / 'MARKER')!r}, 'w').write('ran')\n")
    _make_artifacts(d)


def _end_to_end(d: Path, factory: str) -> dict:
    """transform -> inspect -> transform again without --force (refused) -> with --force (replaces)."""
    out = d / "out"
    steps = {"transform": sparsec("transform", factory, "--pass", "relufy", "-o", out, "--max-memory", "8GiB", cwd=d)}
    if steps["transform"].returncode:
        return steps
    steps["files"] = sorted(p.name for p in out.iterdir())
    steps["mode"] = out.stat().st_mode & 0o777
    steps["inspect"] = sparsec("inspect", out, "--json", cwd=d)
    before = snapshot(out)
    again = ["transform", factory, "--pass", "relufy{to=relu2}", "-o", out]
    steps["no-force"] = sparsec(*again, cwd=d)
    steps["untouched"] = snapshot(out) == before
    steps["force"] = sparsec(*again, "--force", cwd=d)
    steps["temporaries"] = temporaries(d)
    return steps


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    _make_inputs(d)
    return d


@pytest.fixture(scope="module")
def inputs_before(inputs):
    return snapshot(inputs)


@pytest.fixture(scope="module")
def runs(inputs, inputs_before, tmp_path_factory):
    """Every command of this module, started at once: name -> (future of its result, its working directory)."""
    factory = f"{inputs}/mlp.py:factory"
    jobs = {}
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:

        def start(name, fn, *args, **kwargs):
            d = tmp_path_factory.mktemp(name)
            jobs[name] = (pool.submit(fn, *args, cwd=d, **kwargs) if fn is sparsec else pool.submit(fn, d, *args), d)

        start("end-to-end", _end_to_end, factory)  # the longest chain first
        start("trace", sparsec, "trace", factory, "--json")
        for case, (model, extra, _, _) in MODEL_CASES.items():
            start(case, sparsec, "transform", inputs / model, *[a.format(d=inputs) for a in extra], "--pass",
                  "relufy", "-o", "out")
        for case, (argv, _) in SPEC_CASES.items():
            start(case, sparsec, "transform", factory, *argv, "-o", "out")
        for case, (argv, _, _) in CONTRACT_CASES.items():
            start(case, sparsec, *[a.format(d=inputs, factory=factory) for a in argv])
        start("inspect-missing", sparsec, "inspect", "nope")
        start("debug", sparsec, "--debug", "inspect", "nope")
        start("debug-usage", sparsec, "--debug", "pipeline", "show", "relu")
        start("non-artifact-force", _non_artifact_force, factory)
        start("help", sparsec, "--help", env={"PYTHONPROFILEIMPORTTIME": "1"})
        start("passes", sparsec, "passes")
        start("passes-relufy", sparsec, "passes", "relufy", "--json")
        start("env", sparsec, "env", "--json")
        start("round-trip", _round_trip, "relufy{to=fatrelu threshold=0.05}")
        yield jobs
        for future, _ in jobs.values():
            future.cancel()


def result(runs, name):
    future, d = runs[name]
    return future.result(), d


# ------------------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_model(case, runs, inputs):
    _, _, code, fragments = MODEL_CASES[case]
    proc, d = result(runs, case)
    assert_error(proc, code, *[f.format(d=inputs) for f in fragments])
    assert not (d / "out").exists()
    assert not temporaries(d, inputs)
    assert not (inputs / "MARKER").exists(), "the pickle's code ran"


@pytest.mark.parametrize("case", list(SPEC_CASES))
def test_bad_pipeline_or_usage(case, runs, inputs):
    argv, fragments = SPEC_CASES[case]
    proc, d = result(runs, case)
    line = assert_error(proc, 2, *fragments)
    if line.startswith("error: pipeline spec"):
        assert proc.stderr.split("\n")[1] == "  " + argv[1]
    assert not (d / "out").exists()
    assert not temporaries(d, inputs)


@pytest.mark.parametrize("case", list(CONTRACT_CASES))
def test_error_contract(case, runs, inputs):
    """Damaged artifacts (checked by load, inspect, export and run), unsafe files, resource limits, recipes, --set."""
    _, code, fragments = CONTRACT_CASES[case]
    proc, d = result(runs, case)
    assert_error(proc, code, *[f.format(d=inputs) for f in fragments])
    assert not (d / "out").exists() and not (d / "m.onnx").exists()
    assert not temporaries(d, inputs)
    assert not (inputs / "MARKER").exists(), "code from an input file ran"


def test_inspect_a_missing_artifact(runs):
    proc, _ = result(runs, "inspect-missing")
    assert_error(proc, 1, "'nope' is not a sparsec artifact directory")


def test_debug_shows_the_traceback(runs):
    proc, _ = result(runs, "debug")
    assert proc.returncode == 1
    assert proc.stderr.startswith("Traceback (most recent call last):")
    assert "SparsecError: 'nope' is not a sparsec artifact directory" in proc.stderr
    assert proc.stderr.rstrip("\n").split("\n")[-1] == ("error: 'nope' is not a sparsec artifact directory (it does"
                                                        " not exist or is not a directory)")


def test_debug_keeps_the_usage_exit_code(runs):
    proc, _ = result(runs, "debug-usage")
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "PipelineSyntaxError" in proc.stderr
    assert proc.stderr.rstrip("\n").split("\n")[-3].startswith("error: pipeline spec, column 1: unknown pass 'relu'")


def _non_artifact_force(d: Path, factory: str):
    out = d / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    proc = sparsec("transform", factory, "--pass", "relufy", "-o", out, "--force", cwd=d)
    return proc, out, snapshot(out) == before


def test_force_does_not_replace_a_non_artifact(runs):
    (proc, out, untouched), d = result(runs, "non-artifact-force")
    assert_error(proc, 1, f"output '{out}' exists and is not a sparsec artifact", "choose another -o")
    assert untouched and not temporaries(d)


# ------------------------------------------------------------------------------------------------ commands


def test_help_does_not_import_torch(runs):
    proc, _ = result(runs, "help")
    assert proc.returncode == 0, proc.stderr
    assert "transform" in proc.stdout and "inspect" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "sparsec.cli" in imported and "click" in imported
    assert not any(m == "torch" or m.startswith("torch.") for m in imported)


def test_passes_lists_relufy(runs):
    proc, _ = result(runs, "passes")
    assert proc.returncode == 0, proc.stderr
    assert "relufy" in [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def test_passes_relufy_json(runs):
    proc, _ = result(runs, "passes-relufy")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["name"] == "relufy" and info["needs_calibration"] is False
    options = {o["name"]: o for o in info["options"]}
    assert {"to", "threshold", "scope"} <= set(options)
    assert options["to"]["default"] == "relu" and options["to"]["help"]


def _round_trip(d: Path, spec: str):
    yaml = sparsec("pipeline", "show", spec, "--format", "yaml", cwd=d)
    if yaml.returncode:
        return yaml, None
    (d / "recipe.yaml").write_text(yaml.stdout)
    return yaml, sparsec("pipeline", "show", d / "recipe.yaml", cwd=d)


def test_pipeline_yaml_round_trip(runs):
    from sparsec.pipeline import parse_text

    (yaml, text), _ = result(runs, "round-trip")
    assert yaml.returncode == 0, yaml.stderr
    assert text.returncode == 0, text.stderr
    assert text.stdout.strip() == parse_text("relufy{to=fatrelu threshold=0.05}").canonical()
    assert "to=fatrelu" in text.stdout and "threshold=0.05" in text.stdout


def test_env_json(runs):
    from importlib import metadata

    proc, _ = result(runs, "env")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["torch"] == metadata.version("torch") and info["sparsec"]


def test_trace_json(runs):
    proc, _ = result(runs, "trace")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert [(lin["module"], lin["in_features"], lin["out_features"]) for lin in info["linears"]] == [
        ("up", 16, 32), ("down", 32, 16)]
    assert [lin["mlp_intermediate_input"] for lin in info["linears"]] == [False, True]
    assert [(a["module"], a["kind"]) for a in info["activations"]] == [("act", "gelu")]


def test_transform_writes_an_artifact(runs):
    steps, d = result(runs, "end-to-end")
    proc = steps["transform"]
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {d / 'out'}" in proc.stdout and "relufy: replaced=1" in proc.stdout
    assert "error" not in proc.stderr
    assert steps["files"] == ARTIFACT_FILES
    umask = os.umask(0)
    os.umask(umask)
    assert steps["mode"] == 0o777 & ~umask  # the mode of a plain mkdir, not mkdtemp's 0700


def test_inspect_json(runs):
    steps, _ = result(runs, "end-to-end")
    proc = steps["inspect"]
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["manifest"]["source"]["kind"] == "factory"
    assert report["manifest"]["pipeline"].startswith("relufy{to=relu ")
    assert [(layer["module"], layer["pass"]) for layer in report["layers"]] == [("act", "relufy")]


def test_existing_artifact_needs_force(runs):
    steps, d = result(runs, "end-to-end")
    out = d / "out"
    assert_error(steps["no-force"], 1, f"output '{out}' already exists", "pass --force")
    assert steps["untouched"]
    proc = steps["force"]
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "manifest.json").read_text())["pipeline"].startswith("relufy{to=relu2 ")
    assert sorted(p.name for p in out.iterdir()) == ARTIFACT_FILES
    assert not steps["temporaries"]


def test_inputs_unchanged(runs, inputs, inputs_before):
    for future, _ in runs.values():
        future.result()
    assert snapshot(inputs) == inputs_before, "a command changed or added files beside the user's inputs"


def test_every_row_of_errors_md_names_a_test():
    """docs/errors.md: every row ends with the ids of tests that exist (and, for this module, with cases that exist);
    a row with bare case ids belongs to a section whose introduction names the test; a row may name a test file
    instead. A row marked '—' (with the reason) states openly that no test can check it here; at least 25 rows are
    tested."""
    root = Path(__file__).parent.parent
    defined = {name for p in (root / "tests").rglob("test_*.py")
               for name in re.findall(r"^\s*def (test_\w+)\(", p.read_text(), re.M)}
    cases = {"test_bad_model": MODEL_CASES, "test_bad_pipeline_or_usage": SPEC_CASES,
             "test_error_contract": CONTRACT_CASES}
    test_id = re.compile(r"`(?:[\w/.]+::)?(test_\w+)(?:\[([^\]`]*)\])?")
    tested, intro = 0, ""
    for line in (root / "docs" / "errors.md").read_text().splitlines():
        if line.startswith("## "):
            intro = ""
        if not line.startswith("|"):
            intro += line
            continue
        if line.startswith(("| Situation", "|---")):
            continue
        last = line.rstrip(" |").rsplit("|", 1)[-1].strip()
        if last.startswith("—"):
            continue
        ids = test_id.findall(last) or test_id.findall(intro)
        files = re.findall(r"`(tests/[\w/]+\.py)`", last)
        assert ids or files, f"this row of docs/errors.md names no test: {line}"
        assert all((root / f).is_file() for f in files), f"a test file named in docs/errors.md is missing: {line}"
        tested += 1
        for name, case in ids:
            assert name in defined, f"{name} (in docs/errors.md) is not a test"
            if name in cases and case:
                assert case in cases[name], f"{name}[{case}] (in docs/errors.md) is not a case of {name}"
    assert tested >= 25
