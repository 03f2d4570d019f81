"""Per-CPU schedules of the CPU linear kernels (float and quantized): every candidate computes the same, a tuned build
matches torch and records its schedules, the database makes the next build take the same ones without measuring, and a
damaged or foreign database is ignored with one warning line."""
import json
import re

import numpy as np
import pytest
import torch

import sparsec
from sparsec.calibration import token_forward_loop
from sparsec.inputs import run_program
from tests.zoo import build

tvm = pytest.importorskip("tvm")

from sparsec.backends.tvm import tuning  # noqa: E402
from sparsec.backends.tvm.env import cpu_target, host_cpu, import_tvm  # noqa: E402
from sparsec.backends.tvm.kernels import linear_kernel, pack_weight, reference  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("every", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_every_schedule_candidate_computes_the_same(every):
    """The schedules (rows per pass x tiles per thread x GEMM group x splits: all 108 in the slow set, the 16 corners
    in the fast one) on one token (the GEMV), a few tokens (the union path) and 20 tokens (the GEMM), with a fused
    threshold, against numpy."""
    import_tvm(2)
    k, n = 96, 1024  # 8 tiles of 128 columns at most: 4 GEMM panels of 32 (AVX-512) or 8 of 16, every group divides
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g)
    xs = {m: torch.randn(m, k, generator=g) for m in (1, 5, 20)}
    thr = np.array([0.5], np.float32)
    seen = 0
    corners = (lambda values: values) if every else (lambda values: (values[0], values[-1]))
    for r in corners(tuning.ROWS_PER_PASS):
        for t in corners(tuning.TILES_PER_THREAD):
            for group in corners(tuning.GROUPS):
                for s in corners(tuning.SPLITS):
                    schedule = {"rows_per_pass": r, "tiles_per_thread": t, "group": group, "splits": s}
                    args = tuning.kernel_args(k, n, schedule, 2)
                    assert args["tiles"] * s == max(2 * t, s)  # 2 threads: t tasks each, a tile per s of them
                    f = tvm.compile(linear_kernel(k, n, threshold=True, **args).with_attr("global_symbol", "main"),
                                    cpu_target())["main"]
                    wp = tvm.runtime.tensor(pack_weight(w, tiles=args["tiles"]).numpy())
                    for m, x in xs.items():
                        y = tvm.runtime.empty((m, n), "float32")
                        f(tvm.runtime.tensor(x.numpy()), wp, tvm.runtime.tensor(thr),
                          tvm.runtime.tensor(np.zeros(n, np.float32)), y)
                        np.testing.assert_allclose(y.numpy(), reference(x.numpy(), w.numpy(), 0.5), rtol=1e-5,
                                                   atol=1e-5)
                    seen += 1
    assert seen == (108 if every else 16)


@pytest.fixture(scope="module")
def llama_teal():
    model, inputs = build("llama")
    loop = token_forward_loop(torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(2)))
    return sparsec.transform(model, "teal{sparsity=0.5}", example_inputs=inputs, forward_loop=loop, measure=False)


def _check_parity(build_dir, program):
    compiled = sparsec.load_compiled(str(build_dir))
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(3))
    feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for got, want in zip(compiled(feed).values(), run_program(program, feed)):
        torch.testing.assert_close(got, want, **TOL)
    return compiled(feed)


def test_tuned_build_matches_torch_and_the_database_replays_its_schedules(llama_teal, tmp_path, monkeypatch):
    db = tmp_path / "tuning.json"
    monkeypatch.setenv("SPARSEC_TUNING_DB", str(db))
    first = sparsec.compile(llama_teal, str(tmp_path / "tuned"), threads=2, tune_seconds=1)
    assert set(first["schedules"]) == set(first["kernels"])
    assert {s["source"] for s in first["schedules"].values()} == {"tuned"}
    entries = json.loads(db.read_text())["entries"]
    assert len(entries) == len(first["kernels"])
    for key, entry in entries.items():
        cpu, threads, shape, dtype, kind = key.split("|")
        assert (cpu, threads, dtype) == (host_cpu(), "2", "float32") and re.fullmatch(r"\d+x\d+", shape)
        assert entry["rows_per_pass"] in tuning.ROWS_PER_PASS and entry["gemv_us"] > 0
        # the default is a candidate: never recorded a schedule measured slower than it
        assert entry["gemv_us"] <= entry["default_gemv_us"] and entry["gemm_us"] <= entry["default_gemm_us"]
    out_tuned = _check_parity(tmp_path / "tuned", llama_teal.program)
    again = sparsec.compile(llama_teal, str(tmp_path / "again"), threads=2, tune_seconds=0)
    assert {name: {**s, "source": "tuned"} for name, s in again["schedules"].items()} == first["schedules"]
    assert {s["source"] for s in again["schedules"].values()} == {"database"}
    out_again = _check_parity(tmp_path / "again", llama_teal.program)
    for a, b in zip(out_tuned.values(), out_again.values()):
        assert torch.equal(a, b)  # the same schedules: the same build, bit for bit


def _warnings(record) -> list[str]:
    return [str(w.message) for w in record if "tuning database" in str(w.message)]


def test_a_damaged_or_foreign_database_is_ignored_with_one_warning(llama_teal, tmp_path, monkeypatch):
    db = tmp_path / "tuning.json"
    monkeypatch.setenv("SPARSEC_TUNING_DB", str(db))
    db.write_text(f'{{"format": "sparsec-tuning", "version": {tuning.VERSION}, "entries": {{')  # cut short
    with pytest.warns(UserWarning) as record:
        m = sparsec.compile(llama_teal, str(tmp_path / "a"), threads=2, tune_seconds=0)
    assert {s["source"] for s in m["schedules"].values()} == {"default"}
    [message] = _warnings(record)
    assert message.startswith(f"ignoring the tuning database '{db}' (") and "the file is left as it is" in message
    assert db.read_text().endswith("{")  # not written over
    kernel = m["kernels"][0]
    kind, k, n, dtype = re.fullmatch(r"sparsec_linear_(\w+?)_(\d+)_(\d+)_(\w+)", kernel).groups()
    key = tuning.entry_key(host_cpu(), 2, int(k), int(n), dtype, kind)
    db.write_text(json.dumps({"format": "sparsec-tuning", "version": tuning.VERSION,
                              "entries": {key: {"rows_per_pass": 3, "tiles_per_thread": 1, "group": 1}}}))
    with pytest.warns(UserWarning) as record:
        m = sparsec.compile(llama_teal, str(tmp_path / "b"), threads=2, tune_seconds=0)
    assert m["schedules"][kernel]["source"] == "default"
    assert _warnings(record) == [f"ignoring tuning database entry '{key}' in '{db}': not a schedule of this sparsec"
                                 f" (rows_per_pass in (2, 4, 8, 16), tiles_per_thread in (1, 2, 4), group in (1, 2, 4),"
                                 " splits in (1, 2, 4))"]
    _check_parity(tmp_path / "b", llama_teal.program)


def test_a_budget_too_short_for_other_candidates_keeps_the_default_schedule():
    """With no time to build more than one candidate, tuning measures and records the kernels' own schedule (the
    first candidate), never another one it did not compare with it."""
    import_tvm(2)
    k, n = 256, 1024
    default = tuning.default_schedule(k, n, 2)
    assert tuning.gemv_candidates(default)[0] == (default["rows_per_pass"], default["tiles_per_thread"], 1)
    entry = tuning.tune(k, n, "float32", "threshold", 2, seconds=0.0)
    assert {name: entry[name] for name in ("rows_per_pass", "tiles_per_thread", "group", "splits")} == default
    assert entry["gemv_us"] == entry["default_gemv_us"] and entry["gemm_us"] == entry["default_gemm_us"]
    assert sorted(tuning.gemv_candidates(default)) == sorted(
        (r, t, s) for r in tuning.ROWS_PER_PASS for t in tuning.TILES_PER_THREAD for s in (1, 2))
    for t in tuning.TILES_PER_THREAD:  # the GEMM's default group for any tiles divides their panels
        for s in tuning.SPLITS:
            own = tuning.default_schedule(k, n, 2, t, s)
            assert (own["tiles_per_thread"], own["splits"]) == (t, s)
            linear_kernel(k, n, **tuning.kernel_args(k, n, own, 2))  # ValueError if the group did not divide


def test_an_earlier_versions_database_is_dropped_with_one_warning_and_rewritten(tmp_path, monkeypatch):
    """A version 1 database (whose tuner could record schedules slower than the default) is not used: one warning,
    the default schedule, and tuning writes the current version over it."""
    db = tmp_path / "tuning.json"
    monkeypatch.setenv("SPARSEC_TUNING_DB", str(db))
    import_tvm(2)
    k, n = 256, 1024
    key = tuning.entry_key(host_cpu(), 2, k, n, "float32", "threshold")
    old = {"rows_per_pass": 2, "tiles_per_thread": 4, "group": 1}
    db.write_text(json.dumps({"format": "sparsec-tuning", "version": 1, "entries": {key: old}}))
    with pytest.warns(UserWarning) as record:
        default = tuning.Scheduler(0, 2)
        assert default(k, n, "float32", "threshold") == tuning.kernel_args(k, n, tuning.default_schedule(k, n, 2), 2)
    assert default.chosen["sparsec_linear_threshold_256_1024_float32"]["source"] == "default"
    assert _warnings(record) == [f"ignoring the entries of the tuning database '{db}' (version 1, an earlier"
                                 " sparsec's tuner): kernels take the default schedule, or are measured again and"
                                 " recorded when tuning"]
    with pytest.warns(UserWarning):
        tuning.Scheduler(0.2, 2)(k, n, "float32", "threshold")
    data = json.loads(db.read_text())
    assert data["version"] == tuning.VERSION and list(data["entries"]) == [key]
    assert data["entries"][key]["gemv_us"] > 0  # measured now, not the version 1 entry


def test_every_quantized_rows_per_pass_computes_the_same():
    """Every candidate rows-per-pass of the quantized decode (per channel and group-wise, with offsets) on one token
    with a fused threshold, against ``linear(x', dequantize(q, s, offset))``."""
    from sparsec.backends.tvm.quantized import pack_quantized, quantized_linear_kernel
    from sparsec.ops import DEQUANTIZE
    from sparsec.passes.quantize import quantize_weight

    import_tvm(2)
    k, n = 256, 512
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(n, k, generator=g), torch.randn(1, k, generator=g)
    for bits, group, offsets in [(8, 0, False), (4, 32, True)]:
        q, s, o = quantize_weight(w, bits, group, torch.float32, symmetric=not offsets)
        ops = [tvm.runtime.tensor(t.numpy()) for t in pack_quantized(q, s, bits, offset=o)]
        want = torch.nn.functional.linear(x * (x.abs() > 0.5), DEQUANTIZE(q, s, bits, group, torch.float32, o))
        rows = tuning.quantized_rows(f"int{bits}g{group}_float32")
        assert rows == (tuning.QUANTIZED_ROWS_PER_PASS["group" if group else "channel"])
        for r in rows:
            f = tvm.compile(quantized_linear_kernel(k, n, bits, group, threshold=True, rows_per_pass=r,
                                                    offsets=offsets).with_attr("global_symbol", "main"),
                            cpu_target())["main"]
            y = tvm.runtime.empty((1, n), "float32")
            f(tvm.runtime.tensor(x.numpy()), *ops, tvm.runtime.tensor(np.array([0.5], np.float32)),
              tvm.runtime.tensor(np.zeros(n, np.float32)), y)
            torch.testing.assert_close(torch.from_numpy(y.numpy()), want, rtol=1e-4,
                                       atol=1e-4 * float(want.abs().max()))


@pytest.mark.slow  # 75 s; every fast-set quantized build goes through the same Scheduler (its defaults)
def test_quantized_kernels_are_tuned_recorded_and_replayed(tmp_path, monkeypatch):
    """A quantized build with tuning: every quantized kernel gets a measured rows-per-pass, recorded under its format
    (``int4g32s16_float32``), the build matches torch, the next build takes the database's; an entry with a rows per
    pass no candidate has is ignored with one warning naming the valid ones."""
    db = tmp_path / "tuning.json"
    monkeypatch.setenv("SPARSEC_TUNING_DB", str(db))
    model, inputs = build("llama")
    loop = token_forward_loop(torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(2)))
    art = sparsec.transform(model, "quantize{bits=4 group=32 scale_dtype=float16},teal{sparsity=0.5}",
                            example_inputs=inputs, forward_loop=loop, measure=False)
    first = sparsec.compile(art, str(tmp_path / "tuned"), threads=2, tune_seconds=0.5)
    quantized = {name: s for name, s in first["schedules"].items() if name.startswith("sparsec_linear_int4g32s16_")}
    assert quantized and {s["source"] for s in quantized.values()} == {"tuned"}
    assert all(s["rows_per_pass"] in tuning.QUANTIZED_ROWS_PER_PASS["group"] for s in quantized.values())
    keys = [key for key in json.loads(db.read_text())["entries"] if key.split("|")[3] == "int4g32s16_float32"]
    assert len(keys) == len(quantized)
    _check_parity(tmp_path / "tuned", art.program)
    again = sparsec.compile(art, str(tmp_path / "again"), threads=2, tune_seconds=0)
    assert {name: again["schedules"][name] for name in quantized} == {
        name: {**s, "source": "database"} for name, s in quantized.items()}
    data = json.loads(db.read_text())
    data["entries"][keys[0]]["rows_per_pass"] = 2  # a per-channel candidate, not a group-wise one
    db.write_text(json.dumps(data))
    with pytest.warns(UserWarning) as record:
        assert tuning.Database().get(keys[0]) is None
    assert _warnings(record) == [f"ignoring tuning database entry '{keys[0]}' in '{db}': not a schedule of this"
                                 " sparsec (rows_per_pass in (4, 8, 16, 32))"]


@pytest.mark.parametrize("kind", tuning.KINDS)
def test_kernels_are_timed_with_half_of_the_decode_tokens_inputs_dropped(kind):
    """Each kind as the lowering names it (``sparse``: behind a relufy activation) is timed as it runs in a decode
    step: half of the token's inputs zero or under the threshold, none for a dense kernel."""
    x, thr = tuning.bench_inputs(512, kind, 3, torch.Generator().manual_seed(0))
    assert x.shape == (3, 512)
    kept = (x[0].abs() > thr) if kind == "threshold" else (x[0] != 0)
    assert int(kept.sum()) == (512 if kind == "dense" else 256)
    with pytest.raises(ValueError, match="kernel kind must be one of dense, sparse, threshold, got 'relu'"):
        tuning.bench_inputs(512, "relu", 1, torch.Generator())


def test_compile_tunes_by_default_and_the_budget_is_an_environment_setting(llama_teal, tmp_path, monkeypatch, capsys):
    """``sparsec compile`` without --tune-seconds measures every kernel the database lacks (2 s each unless
    SPARSEC_TUNE_SECONDS says otherwise); a budget that is not a number is one usage line and nothing written."""
    from tests.cli_helpers import one_error_line, run_cli

    art = tmp_path / "art"
    sparsec.save(llama_teal, str(art))
    monkeypatch.setenv("SPARSEC_TUNING_DB", str(tmp_path / "tuning.json"))
    monkeypatch.delenv("SPARSEC_TUNE_SECONDS")
    assert tuning.default_seconds() == tuning.DEFAULT_SECONDS == 2.0
    code, stdout, err = run_cli(capsys, "compile", art, "--threads", "2", "-o", tmp_path / "build", "--json")
    assert code == 0, err
    schedules = json.loads(stdout)["schedules"]
    assert schedules and {s["source"] for s in schedules.values()} == {"tuned"}
    assert len(json.loads((tmp_path / "tuning.json").read_text())["entries"]) == len(schedules)
    _check_parity(tmp_path / "build", llama_teal.program)
    monkeypatch.setenv("SPARSEC_TUNE_SECONDS", "two")
    code, _, err = run_cli(capsys, "compile", art, "--threads", "2", "-o", tmp_path / "again")
    assert code == 2 and one_error_line(err) == (
        "error: SPARSEC_TUNE_SECONDS must be a number of seconds >= 0 (0: no tuning), got 'two': set it to 2, or"
        " unset it")
    assert not (tmp_path / "again").exists()


def test_schedules_timed_while_other_processes_keep_the_cores_busy_are_not_recorded(tmp_path, monkeypatch):
    """Another process spinning on a core while a kernel is timed: its schedule is not recorded (the timings are not
    this CPU's), the kernel takes the default, one warning says why and what to do."""
    import subprocess
    import sys

    db = tmp_path / "tuning.json"
    monkeypatch.setenv("SPARSEC_TUNING_DB", str(db))
    monkeypatch.setenv("SPARSEC_TUNE_MAX_LOAD", "0.5")
    import_tvm(2)
    k, n = 256, 1024
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        scheduler = tuning.Scheduler(0.5, 2)
        with pytest.warns(UserWarning) as record:
            args = scheduler(k, n, "float32", "threshold")
            scheduler(k, 2 * n, "float32", "threshold")
    finally:
        spinner.kill()
        spinner.wait()
    assert args == tuning.kernel_args(k, n, tuning.default_schedule(k, n, 2), 2)
    assert {s["source"] for s in scheduler.chosen.values()} == {"default"}
    [message] = [str(w.message) for w in record]
    assert re.fullmatch(r"not recording the schedules timed while other processes kept \d+\.\d cores busy \(from"
                        r" sparsec_linear_threshold_256_1024_float32 on; at most 0.5 leave timings true\): those"
                        r" kernels take the default schedule; compile again on an idle machine to tune them", message)
    assert not db.exists()


def test_a_wide_layers_default_tiles_are_a_schedule_of_the_database(tmp_path, monkeypatch):
    """A 262144-column LM head's default has more tiles per thread than the candidates (1, 2, 4): tuning that keeps
    it records an entry later builds take without a warning; other counts are still refused."""
    import warnings

    db = tmp_path / "tuning.json"
    monkeypatch.setenv("SPARSEC_TUNING_DB", str(db))
    import_tvm(2)
    k, n = 640, 262144
    default = tuning.default_schedule(k, n, 2)
    tiles = default["tiles_per_thread"]
    assert tiles not in tuning.TILES_PER_THREAD
    key = tuning.entry_key(host_cpu(), 2, k, n, "float32", "threshold")
    for entry in (default, {**default, "tiles_per_thread": 3}):
        db.write_text(json.dumps({"format": "sparsec-tuning", "version": tuning.VERSION, "entries": {key: entry}}))
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            got = tuning.Database().get(key)
        if entry is default:
            assert got == default and not record
        else:
            assert got is None and _warnings(record) == [
                f"ignoring tuning database entry '{key}' in '{db}': not a schedule of this sparsec (rows_per_pass in"
                f" (2, 4, 8, 16), tiles_per_thread in (1, 2, 4, {tiles}), group in (1, 2, 4), splits in (1, 2, 4))"]


def test_an_entry_without_splits_is_unsplit_and_other_splits_are_refused(tmp_path, monkeypatch):
    """Entries this database version held before tiles could be split have no ``splits``: one task per tile. A split
    the kernels do not offer is refused like any other foreign value."""
    import warnings

    db = tmp_path / "tuning.json"
    monkeypatch.setenv("SPARSEC_TUNING_DB", str(db))
    key = tuning.entry_key(host_cpu(), 2, 2048, 5632, "float16", "sparse")
    unsplit = {"rows_per_pass": 16, "tiles_per_thread": 1, "group": 2}
    for entry, want in ((unsplit, {**unsplit, "splits": 1}), ({**unsplit, "splits": 2}, {**unsplit, "splits": 2}),
                        ({**unsplit, "splits": 3}, None)):
        db.write_text(json.dumps({"format": "sparsec-tuning", "version": tuning.VERSION, "entries": {key: entry}}))
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            assert tuning.Database().get(key) == want
        assert len(_warnings(record)) == (want is None)
    assert tuning.kernel_args(2048, 5632, {**unsplit, "splits": 2}, 2) == {
        "tiles": 1, "rows_per_pass": 16, "group": 2, "splits": 2}
