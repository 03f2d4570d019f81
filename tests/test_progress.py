"""Progress of long work (sparsec.progress): a line per finished step on stderr when it is not a terminal, JSON
lines with --json, nothing with --quiet, stdout unchanged; the Python API shows nothing unless asked."""
import json
import re
import time

import pytest
import torch

from sparsec import progress
from tests.cli_helpers import run_cli
from tests.test_batch_one import tiny  # noqa: F401  the fixture: a factory of batch 1 and calibration token ids

LINE = re.compile(r"^sparsec: (.+?)(?: (\d+)/(\d+))? \((\d+\.\d) s\)$")
STEPS = ["load", "calibration data", "capture", "teal: greedy search inputs", "teal: greedy search",
         "teal: calibrate", "pass teal", "export", "save"]


@pytest.fixture
def restore_mode():
    yield
    progress.configure("auto", interval=30.0)


def test_modes_of_the_progress_api(capsys, restore_mode):
    def work():
        with progress.task("outer"):
            for _ in progress.iterate(range(3), "batches", merge=True):  # a data loop: steps of 'outer'
                pass
            with progress.task("inner", total=2) as t:
                t.advance(2)
        with pytest.raises(ValueError), progress.task("broken"):
            raise ValueError
        progress.note("said once")

    progress.configure("lines")
    work()
    lines = capsys.readouterr().err.splitlines()
    assert [LINE.match(x).groups()[:3] for x in lines[:2]] == [("inner", "2", "2"), ("outer", "3", "3")]
    assert lines[2:] == ["sparsec: note: said once"]  # a failed step shows no line; its error does
    progress.configure("json")
    work()
    events = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert [(e["event"], e.get("task"), e.get("done")) for e in events] == [
        ("start", "outer", 0), ("advance", "outer", 1), ("advance", "outer", 2), ("advance", "outer", 3),
        ("start", "inner", 0), ("advance", "inner", 2), ("end", "inner", 2), ("end", "outer", 3),
        ("start", "broken", 0), ("note", None, None)]
    assert events[-1]["message"] == "said once"
    progress.configure("lines", interval=0.05)  # a long step: 'so far' lines while it runs (a daemon thread)
    with progress.task("long", total=2) as t:
        time.sleep(1.5)  # the thread wakes at least once a second
        t.advance()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("sparsec: long 0/2, ") and lines[0].endswith(" s so far"), lines
    assert LINE.match(lines[-1]).groups()[:3] == ("long", "1", "2")
    progress.configure("off")
    work()
    assert capsys.readouterr().err == ""
    progress.configure("auto")  # the Python API's default: bars on a terminal only, notes as warnings
    with pytest.warns(UserWarning, match="said once"):
        work()
    assert capsys.readouterr().err == ""


def _transform(capsys, d, out, *flags):
    return run_cli(capsys, "transform", f"{d / 'tinylm.py'}:factory", "--pass", "teal{sparsity=0.5 allocation=greedy}",
                   "-o", d / out, "--calib-data", d / "ids.pt", "--seq-len", 8, *flags)


def _same(stdout: str, out) -> str:
    return re.sub(r"\d+\.\d+ s\)", "S s)", stdout.replace(str(out), "OUT"))


def test_transform_shows_its_steps_on_stderr(tiny, capsys):  # noqa: F811
    code, stdout, err = _transform(capsys, tiny, "a")
    assert code == 0, err
    found = [LINE.match(x) for x in err.splitlines() if not x.endswith(" s so far")]  # those of a slow machine
    assert all(found), err
    assert [m.group(1) for m in found] == STEPS
    assert found[STEPS.index("teal: calibrate")].group(2, 3) == ("4", "4")  # 16 samples in batches of 4
    assert found[STEPS.index("teal: greedy search")].group(2, 3) == ("2", "2")  # one per block

    code, quiet_out, quiet_err = _transform(capsys, tiny, "b", "--quiet")
    assert code == 0 and quiet_err == ""
    assert _same(quiet_out, tiny / "b") == _same(stdout, tiny / "a")

    code, json_out, json_err = _transform(capsys, tiny, "c", "--json")
    assert code == 0, json_err
    events = [json.loads(x) for x in json_err.splitlines()]
    assert [e["task"] for e in events if e["event"] == "end"] == STEPS
    assert {e["event"] for e in events} == {"start", "advance", "end"}
    assert json.loads(json_out)["artifact"] == str(tiny / "c")


def test_python_api_shows_no_progress_unless_asked(capsys, restore_mode):
    import sparsec

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
    x = torch.randn(4, 8)
    sparsec.transform(model, "relufy", example_inputs=(x,))
    assert capsys.readouterr().err == ""
    progress.configure("lines")
    sparsec.transform(model, "relufy", example_inputs=(x,))
    assert [LINE.match(x).group(1) for x in capsys.readouterr().err.splitlines()] == ["load", "capture",
                                                                                     "pass relufy", "export"]
