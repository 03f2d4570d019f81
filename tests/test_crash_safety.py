"""Crash safety: SIGKILL `sparsec transform` and `sparsec export --to onnx` at several moments.

After each kill the output is the previous complete output, a complete new one, or absent (a first run) — never a
partial directory or file that a later load accepts — and the next run removes the temporaries the killed run left.
Kill moments are file-system events seen by polling (the temporary appears, a file appears in it, the output is
swapped) and fixed fractions of the measured duration of an uninterrupted run.
"""
import json
import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sparsec.artifact import MANIFEST_FILE, read_artifact
from sparsec.errors import SparsecError
from tests.test_cli import FACTORY, SPARSEC, snapshot

OLD_SPEC, NEW_SPEC = "relufy", "relufy{to=relu2}"
TMP_MARK = ".sparsec-tmp-"


def temporaries(d: Path) -> list[Path]:
    return [p for p in d.iterdir() if TMP_MARK in p.name]


def in_a_temporary(name: str):
    return lambda d: any((t / name).exists() for t in temporaries(d) if t.is_dir())


def a_temporary(d: Path) -> bool:
    return bool(temporaries(d))


def pipeline_of(out: Path) -> str | None:
    try:
        return json.loads((out / MANIFEST_FILE).read_text())["pipeline"]
    except (OSError, ValueError, KeyError):
        return None


def run_and_kill(argv: list, d: Path, when, *, timeout: float = 300) -> dict:
    """Start ``argv`` in ``d``; SIGKILL it when ``when(d)`` first holds (polled every 0.5 ms), or after ``when``
    seconds when it is a number. Returns the exit code, whether it was killed and the temporaries at that moment."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([*SPARSEC, *map(str, argv)], cwd=d, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    start, killed, seen = time.monotonic(), False, []
    while proc.poll() is None and time.monotonic() - start < timeout:
        due = time.monotonic() - start >= when if isinstance(when, (int, float)) else when(d)
        if due:
            proc.send_signal(signal.SIGKILL)
            killed = True
            seen = sorted(f"{t.name}/{sorted(os.listdir(t)) if t.is_dir() else ''}" for t in temporaries(d))
            break
        time.sleep(0.0005)
    stderr = proc.communicate(timeout=timeout)[1]
    return {"code": proc.returncode, "killed": killed, "seen": seen, "stderr": stderr,
            "seconds": time.monotonic() - start}


def kill_points(duration: float, markers: dict) -> dict:
    """The file-system markers, then 25 %, 50 % and 75 % of ``duration``."""
    return {**markers, **{f"{int(f * 100)}%": f * duration for f in (0.25, 0.5, 0.75)}}


def run_all(jobs: dict) -> dict:
    """Run ``name -> callable`` two at a time; name -> its result."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(fn) for name, fn in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


# ------------------------------------------------------------------------------------------------ transform


@pytest.fixture(scope="module")
def transform_setup(tmp_path_factory):
    """A directory with the factory file and a previous complete artifact (OLD_SPEC)."""
    import sparsec

    d = tmp_path_factory.mktemp("transform")
    (d / "mlp.py").write_text(FACTORY)
    namespace = {}
    exec(FACTORY, namespace)
    model, example = namespace["factory"]()
    sparsec.save(sparsec.transform(model, OLD_SPEC, example_inputs=example), str(d / "previous"))
    return d


@pytest.fixture(scope="module")
def transform_duration(transform_setup):
    """Seconds of an uninterrupted `sparsec transform` of the factory."""
    d = transform_setup
    timed = run_and_kill(["transform", d / "mlp.py:factory", "--pass", NEW_SPEC, "-o", "timed"], d, lambda _: False)
    assert timed["code"] == 0, timed["stderr"]
    return timed["seconds"]


def _kill_transform(base: Path, point: str, when, tmp_path: Path, previous: bool = True) -> dict:
    d = tmp_path / point.replace("%", "pct")
    d.mkdir()
    if previous:
        shutil.copytree(base / "previous", d / "out")
    before = snapshot(d / "out") if previous else None
    argv = ["transform", base / "mlp.py:factory", "--pass", NEW_SPEC, "-o", "out", "--force"]
    killed = run_and_kill(argv, d, when)
    return {"d": d, "before": before, "argv": argv, **killed}


def _check_transform_kill(case: dict) -> None:
    """The output is absent, the previous artifact byte for byte, or a complete new one; then the next run succeeds
    and leaves no temporaries."""
    d, out = case["d"], case["d"] / "out"
    assert case["killed"] and case["code"] == -signal.SIGKILL, case
    if out.exists():
        if case["before"] is not None and snapshot(out) == case["before"]:
            assert pipeline_of(out).startswith("relufy{to=relu ")
        else:
            assert pipeline_of(out).startswith("relufy{to=relu2 "), case
        read_artifact(str(out)).module()  # checksums verified, the program loads
    else:
        assert case["before"] is None, f"the previous artifact is gone: {case}"
    for tmp in temporaries(d):  # what the kill left is hidden, and refused by load unless it is complete
        assert tmp.name.startswith(".")
        try:
            art = read_artifact(str(tmp))
        except SparsecError:
            continue
        art.module()  # accepted: every checksum matched, so it is a complete artifact whose program loads
    again = run_and_kill(case["argv"], d, lambda _: False)
    assert again["code"] == 0, again["stderr"]
    assert temporaries(d) == []
    assert pipeline_of(out).startswith("relufy{to=relu2 ")
    read_artifact(str(out)).module()


def test_kill_transform_while_it_writes(transform_setup, tmp_path):
    """The fast check: SIGKILL once the temporary holds model.pt2, over a previous artifact."""
    case = _kill_transform(transform_setup, "temp-model", in_a_temporary("model.pt2"), tmp_path)
    assert any("model.pt2" in s for s in case["seen"]), case
    _check_transform_kill(case)


@pytest.mark.slow
def test_kill_transform_at_every_point(transform_setup, transform_duration, tmp_path):
    duration = transform_duration
    points = kill_points(duration, {
        "temp-dir": a_temporary,
        "temp-report": in_a_temporary("report.json"),
        "temp-manifest": in_a_temporary("manifest.json"),
        "swapped": lambda d: (pipeline_of(d / "out") or "").startswith("relufy{to=relu2 "),
    })
    cases = run_all({p: (lambda p=p, w=w: _kill_transform(transform_setup, p, w, tmp_path)) for p, w in points.items()})
    cases["first-run:temp-dir"] = _kill_transform(transform_setup, "first-run", a_temporary, tmp_path, previous=False)
    assert len(cases) >= 5
    for point, case in cases.items():
        _check_transform_kill(case)


# ------------------------------------------------------------------------------------------------ export


@pytest.fixture(scope="module")
def two_artifacts(transform_setup, tmp_path_factory):
    """A directory with the artifacts 'old' (OLD_SPEC) and 'new' (NEW_SPEC)."""
    base = transform_setup
    d = tmp_path_factory.mktemp("artifacts")
    shutil.copytree(base / "previous", d / "old")
    made = run_and_kill(["transform", base / "mlp.py:factory", "--pass", NEW_SPEC, "-o", "new"], d, lambda _: False)
    assert made["code"] == 0, made["stderr"]
    return d


@pytest.fixture(scope="module")
def export_setup(two_artifacts):
    """model.onnx exported from the old artifact beside both artifacts, and the duration of exporting the new one."""
    pytest.importorskip("onnxruntime")
    d = two_artifacts
    old = run_and_kill(["export", "old", "--to", "onnx", "-o", "previous.onnx"], d, lambda _: False)
    assert old["code"] == 0, old["stderr"]
    timed = run_and_kill(["export", "new", "--to", "onnx", "-o", "timed.onnx"], d, lambda _: False)
    assert timed["code"] == 0, timed["stderr"]
    return d, timed["seconds"]


def _onnx_pipeline(path: Path) -> str:
    """The pipeline in the model's metadata, after ONNX Runtime has loaded the model."""
    import onnx

    from sparsec.backends.onnxruntime import onnx_session

    onnx_session(str(path))
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}["sparsec.pipeline"]


def _kill_export(setup, point: str, when, tmp_path: Path) -> dict:
    base, _ = setup
    d = tmp_path / f"export-{point.replace('%', 'pct')}"
    d.mkdir()
    for name in ("old", "new"):
        os.symlink(base / name, d / name)
    shutil.copy(base / "previous.onnx", d / "model.onnx")
    before = (d / "model.onnx").read_bytes()
    if when == "replaced":  # the moment model.onnx is another file than the copy of the previous one
        inode = (d / "model.onnx").stat().st_ino
        when = lambda d: (d / "model.onnx").stat().st_ino != inode  # noqa: E731
    argv = ["export", "new", "--to", "onnx", "-o", "model.onnx", "--force"]
    return {"d": d, "before": before, "argv": argv, **run_and_kill(argv, d, when)}


def _check_export_kill(case: dict) -> None:
    d, out = case["d"], case["d"] / "model.onnx"
    assert case["killed"] and case["code"] == -signal.SIGKILL, case
    assert out.exists(), "the previous model.onnx is gone"
    if out.read_bytes() == case["before"]:
        assert _onnx_pipeline(out).startswith("relufy{to=relu ")
    else:
        assert _onnx_pipeline(out).startswith("relufy{to=relu2 "), case
    assert sorted(p.name for p in d.iterdir() if TMP_MARK not in p.name) == ["model.onnx", "new", "old"]
    again = run_and_kill(case["argv"], d, lambda _: False)
    assert again["code"] == 0, again["stderr"]
    assert temporaries(d) == []
    assert _onnx_pipeline(out).startswith("relufy{to=relu2 ")


@pytest.mark.slow
def test_kill_export_at_every_point(export_setup, tmp_path):
    _, duration = export_setup
    points = kill_points(duration, {
        "temp-dir": a_temporary,
        "temp-model": in_a_temporary("model.onnx"),
        "replaced": "replaced",
    })
    cases = run_all({p: (lambda p=p, w=w: _kill_export(export_setup, p, w, tmp_path)) for p, w in points.items()})
    assert len(cases) >= 5
    for case in cases.values():
        _check_export_kill(case)


# ------------------------------------------------------------------------------------------------ compile (TVM)


@pytest.fixture(scope="module")
def compile_setup(two_artifacts):
    """BUILD compiled from the old artifact, and the duration of compiling the new one."""
    pytest.importorskip("tvm")
    d = two_artifacts
    old = run_and_kill(["compile", "old", "-o", "previous-build"], d, lambda _: False)
    assert old["code"] == 0, old["stderr"]
    timed = run_and_kill(["compile", "new", "-o", "timed-build"], d, lambda _: False)
    assert timed["code"] == 0, timed["stderr"]
    return d, timed["seconds"]


def _kill_compile(setup, point: str, when, tmp_path: Path) -> dict:
    base, _ = setup
    d = tmp_path / f"compile-{point.replace('%', 'pct')}"
    d.mkdir()
    for name in ("old", "new"):
        os.symlink(base / name, d / name)
    shutil.copytree(base / "previous-build", d / "build")
    argv = ["compile", "new", "-o", "build", "--force"]
    return {"d": d, "before": snapshot(d / "build"), "argv": argv, **run_and_kill(argv, d, when)}


def _check_compile_kill(case: dict) -> None:
    from sparsec.backends.tvm.build import read_build_manifest

    d, out = case["d"], case["d"] / "build"
    assert case["killed"] and case["code"] == -signal.SIGKILL, case
    if out.exists():  # the previous build byte for byte, or a complete new one (a build swap is two renames, so
        read_build_manifest(str(out))  # no build at all is possible too)
        if snapshot(out) != case["before"]:
            assert json.loads((out / "manifest.json").read_text())["source"] == "new", case
    again = run_and_kill(case["argv"], d, lambda _: False)
    assert again["code"] == 0, again["stderr"]
    assert temporaries(d) == []
    read_build_manifest(str(out))


@pytest.mark.slow
def test_kill_compile_at_every_point(compile_setup, tmp_path):
    _, duration = compile_setup
    points = kill_points(duration, {
        "temp-dir": a_temporary,
        "temp-library": in_a_temporary("model.so"),
        "temp-manifest": in_a_temporary("manifest.json"),
    })
    cases = run_all({p: (lambda p=p, w=w: _kill_compile(compile_setup, p, w, tmp_path)) for p, w in points.items()})
    assert len(cases) >= 5
    for case in cases.values():
        _check_compile_kill(case)
