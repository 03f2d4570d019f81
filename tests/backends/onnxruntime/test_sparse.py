"""The sparse ONNX Runtime path: sparsec's SparseLinear custom op (built with g++), the standard-op gather
formulation, the per-layer choice, export, CLI.

Every check runs real ONNX Runtime sessions with the real compiled library and compares with torch at 1e-4.
"""
import json
import os

import numpy as np
import pytest
import torch

import sparsec
from sparsec.backends.onnxruntime import export_onnx, onnx_session
from sparsec.backends.onnxruntime import kernels
from sparsec.backends.onnxruntime import sparse as sparse_module
from sparsec.backends.onnxruntime.sparse import MARGIN, NO_COMPILER, _linear_model, decode_inputs, thresholded_linears
from sparsec.inputs import run_program
from sparsec.ops import threshold
from tests.cli_helpers import run_cli

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
if kernels.compiler() is None:
    pytest.skip("no C++ compiler: the custom-op library cannot be built", allow_module_level=True)

TOL = dict(rtol=1e-4, atol=1e-4)


def _sparse_linear_session(k, n, bias, t=0.5):
    from onnx import TensorProto, helper, numpy_helper

    g = np.random.default_rng(3)
    wt = g.standard_normal((k, n), dtype=np.float32) * 0.1
    b = g.standard_normal(n, dtype=np.float32) if bias else None
    inits = [numpy_helper.from_array(wt, "Wt"), numpy_helper.from_array(np.array(t, np.float32), "t")]
    if bias:
        inits.append(numpy_helper.from_array(b, "B"))
    node = helper.make_node("SparseLinear", ["x", "t", "Wt"] + (["B"] if bias else []), ["y"], domain="ai.sparsec")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("ai.sparsec", 1)])
    model.ir_version = 10
    return onnx_session(model.SerializeToString(), threads=2, custom_ops=True), wt, b


def _reference(x, t, wt, b):
    x, wt = torch.from_numpy(x), torch.from_numpy(wt)
    return torch.nn.functional.linear(threshold(x, torch.tensor(t)), wt.T, None if b is None else torch.from_numpy(b))


@pytest.mark.parametrize("bias", [False, True])
def test_sparse_linear_matches_torch(bias):
    """Batch-1 decode, multi-row blocks (7 rows: one full block of 4 and a partial one), 3-D inputs, tile edges
    (N = 4100 is not a multiple of the tile), sparsity 0 / 0.5 / 0.9 / 1, t < 0 (nothing zeroed)."""
    k, n = 300, 4100
    session, wt, b = _sparse_linear_session(k, n, bias)
    g = np.random.default_rng(0)
    for shape in [(1, k), (7, k), (2, 3, k), (1, 1, k)]:
        for scale in (100.0, 1.0, 0.3, 0.0):  # |x| > 0.5 for nearly all / about 60 % / about 10 % / none
            x = (g.standard_normal(shape) * scale).astype(np.float32)
            got = session.run(None, {"x": x})[0]
            assert got.shape == shape[:-1] + (n,)
            torch.testing.assert_close(torch.from_numpy(got), _reference(x, 0.5, wt, b), **TOL)
    session, wt, b = _sparse_linear_session(k, n, bias, t=-1.0)
    x = np.zeros((2, k), np.float32)
    x[0, 0] = 1.0
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"x": x})[0]), _reference(x, -1.0, wt, b), **TOL)


def test_nan_propagates_like_torch():
    session, wt, b = _sparse_linear_session(64, 32, False)
    x = np.zeros((2, 64), np.float32)
    x[0, 5] = np.nan
    got = session.run(None, {"x": x})[0]
    assert np.isnan(got[0]).all() and (got[1] == 0).all()
    assert np.isnan(_reference(x, 0.5, wt, b).numpy()[0]).all()


def test_decode_inputs_have_exact_sparsity():
    for s in (0.0, 0.5, 0.9):
        for x, masked in decode_inputs(1000, s, 3, np.random.default_rng(1)):
            assert (masked == 0).sum() == round(s * 1000) and (np.abs(x) <= 0.5).sum() == round(s * 1000)


class _Block(torch.nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.up, self.down = torch.nn.Linear(d, h), torch.nn.Linear(h, d, bias=False)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class _Stack(torch.nn.Module):
    def __init__(self, d=256, h=1024, n=2):
        super().__init__()
        self.layers = torch.nn.ModuleList(_Block(d, h) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.fixture(scope="module")
def teal_stack():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 256)
    return sparsec.transform(_Stack().eval(), "teal{sparsity=0.7 calib_rounds=1}", example_inputs=(x,),
                             forward_loop=lambda m: m(x), measure=False)


def _feeds():
    g = torch.Generator().manual_seed(5)
    return [{"x": torch.randn(1, 1, 256, generator=g)}, {"x": torch.randn(3, 11, 256, generator=g)}]


def _matches_torch(path, program):
    session = onnx_session(str(path))  # finds the custom ops by itself
    module = program.module()
    for feed in _feeds():
        got = session.run(None, {k: v.numpy() for k, v in feed.items()})
        for g, w in zip(got, run_program(program, feed, module)):
            torch.testing.assert_close(torch.from_numpy(g), w, **TOL)


def _sparse_nodes(path):
    proto = onnx.load(str(path))
    return [n for n in proto.graph.node if n.domain == "ai.sparsec"], {p.key: p.value for p in proto.metadata_props}


def test_all_replaces_every_thresholded_linear(teal_stack, tmp_path):
    path = tmp_path / "m.onnx"
    out = export_onnx(teal_stack, path, verify=True, sparse_kernel="all")
    assert out.verification["ok"]
    nodes, meta = _sparse_nodes(path)
    assert [n.op_type for n in nodes] == ["SparseLinear"] * 4
    assert [len(n.input) for n in nodes] == [4, 3, 4, 3]  # up (bias folded in), down (no bias)
    info = json.loads(meta["sparsec.sparse_kernel"])
    assert info == out.sparse_kernel and info["mode"] == "all"
    assert [(e["layer"], e["shape"], e["kernel"]) for e in info["layers"]] == [
        ("layers.0.up", [256, 1024], "sparse"), ("layers.0.down", [1024, 256], "sparse"),
        ("layers.1.up", [256, 1024], "sparse"), ("layers.1.down", [1024, 256], "sparse")]
    assert all(0.6 < e["sparsity"] < 0.8 for e in info["layers"][::2])  # measured on the example inputs
    proto = onnx.load(str(path))
    assert not {"Abs", "Greater"} & {n.op_type for n in proto.graph.node}  # the masks went with the MatMuls
    _matches_torch(path, teal_stack.program)


@pytest.mark.parametrize("bias", [False, True])
def test_gather_matches_torch_for_any_rows(bias):
    """The standard-op gather formulation on dynamic [batch, seq, K] input: one row takes the gather branch, several
    rows the dense one; sparsity 0 / about 0.4 / about 0.9 / 1 (no active input: the bias alone)."""
    k, n = 300, 130
    model = onnx.load_from_string(_linear_model(k, n, bias, "gather", np.random.default_rng(3), rows=("b", "s")))
    init = {i.name: onnx.numpy_helper.to_array(i).copy() for i in model.graph.initializer}
    assert [node.op_type for node in model.graph.node if node.op_type in ("If", "MatMul")] == ["If"]
    assert {node.domain for node in model.graph.node} == {""}
    session = onnx_session(model.SerializeToString(), threads=2)
    g = np.random.default_rng(0)
    for shape in [(1, 1, k), (1, 7, k), (3, 1, k), (2, 3, k)]:
        for scale in (100.0, 1.0, 0.3, 0.0):
            x = (g.standard_normal(shape) * scale).astype(np.float32)
            got = session.run(None, {"x": x})[0]
            assert got.shape == shape[:-1] + (n,)
            torch.testing.assert_close(torch.from_numpy(got), _reference(x, 0.5, init["Wt"], init.get("B")), **TOL)


def test_gather_mode_uses_standard_ops_only(teal_stack, tmp_path):
    """--sparse-kernel gather: every thresholded linear becomes an If with the gather branch; no custom domain."""
    path = tmp_path / "m.onnx"
    out = export_onnx(teal_stack, path, verify=True, sparse_kernel="gather")
    assert out.verification["ok"]
    assert [(e["layer"], e["kernel"]) for e in out.sparse_kernel["layers"]] == [
        ("layers.0.up", "gather"), ("layers.0.down", "gather"), ("layers.1.up", "gather"), ("layers.1.down", "gather")]
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("If") == 4 and "MatMul" not in ops
    assert {n.domain for n in proto.graph.node} | {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    _matches_torch(path, teal_stack.program)  # a (1, 1) token (gather branch) and a (3, 11) batch (dense branch)


def test_time_linear_times_each_kernel_on_the_same_inputs():
    timed = sparse_module.time_linear(64, 32, 0.9, reps=3, kernels=("dense", "sparse", "gather"))
    assert sorted(timed) == ["dense", "gather", "sparse"] and all(t > 0 for t in timed.values())


def test_auto_keeps_the_measured_faster_kernel(teal_stack, tmp_path):
    path = tmp_path / "m.onnx"
    out = export_onnx(teal_stack, path, sparse_kernel="auto")
    layers = out.sparse_kernel["layers"]
    assert len(layers) == 4
    for e in layers:
        best = min(("sparse", "gather"), key=lambda kind: e[f"{kind}_us"])
        assert e["kernel"] == (best if e[f"{best}_us"] * MARGIN < e["dense_us"] else "dense")
    nodes, meta = _sparse_nodes(path)
    assert len(nodes) == sum(e["kernel"] == "sparse" for e in layers)
    ifs = [n for n in onnx.load(str(path)).graph.node if n.op_type == "If"]
    assert len(ifs) == sum(e["kernel"] == "gather" for e in layers)
    assert json.loads(meta["sparsec.sparse_kernel"])["layers"] == layers
    _matches_torch(path, teal_stack.program)


def test_without_a_compiler(teal_stack, tmp_path, monkeypatch, capsys):
    """auto times the standard-op gather alone (and says so); gather needs no compiler; all fails before exporting,
    naming what is missing."""
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no g++ / c++ to be found
    kernels.library_path.cache_clear()
    try:
        assert kernels.compiler() is None
        out = export_onnx(teal_stack, tmp_path / "auto.onnx", sparse_kernel="auto")
        assert out.sparse_kernel["note"] == ("no C++ compiler found: SparseLinear left out, the standard-op gather"
                                             " timed alone")
        assert {e["kernel"] for e in out.sparse_kernel["layers"]} <= {"gather", "dense"}
        assert all("sparse_us" not in e and "gather_us" in e for e in out.sparse_kernel["layers"])
        assert _sparse_nodes(tmp_path / "auto.onnx")[0] == []
        export_onnx(teal_stack, tmp_path / "gather.onnx", sparse_kernel="gather")
        assert _sparse_nodes(tmp_path / "gather.onnx")[0] == []
        art = tmp_path / "art"
        sparsec.save(teal_stack, str(art))
        code, _, err = run_cli(capsys, "export", str(art), "--to", "onnx", "-o", str(tmp_path / "all.onnx"),
                            "--sparse-kernel", "all")
        assert code == 1 and err.strip() == f"error: {NO_COMPILER}"
        assert sorted(os.listdir(tmp_path)) == ["art", "auto.onnx", "gather.onnx"]
        model, inputs = _sparse_model_file(tmp_path)
        monkeypatch.setenv("SPARSEC_CACHE", str(tmp_path / "cache"))  # not built yet
        code, _, err = run_cli(capsys, "run", model, "--inputs", inputs)
        assert code == 1 and err.strip() == (
            f"error: '{model}' uses sparsec's custom ops (ai.sparsec), which need a C++ compiler (g++) to build;"
            " install one (or set CXX), or re-export without --sparse-kernel")
    finally:
        kernels.library_path.cache_clear()


def _sparse_model_file(tmp_path):
    """A one-node SparseLinear model file (k = 8) and an inputs file for it."""
    path = tmp_path / "sparse.onnx"
    path.write_bytes(_linear_model(8, 4, False, "sparse", np.random.default_rng(0)))
    np.savez(tmp_path / "in.npz", x=np.ones((1, 8), np.float32))
    return str(path), str(tmp_path / "in.npz")


def test_fresh_build_from_this_repository_alone(tmp_path, monkeypatch):
    """The library builds from the sources in csrc/ alone (no ONNX Runtime header: ort_api_subset.h declares the
    entries used), into an empty cache, and the freshly built op matches torch."""
    assert sorted(p.name for p in kernels.SOURCE.parent.iterdir()) == ["ort_api_subset.h", "sparse_linear.cc"]
    monkeypatch.setenv("SPARSEC_CACHE", str(tmp_path / "cache"))  # no previously built library can answer
    kernels.library_path.cache_clear()
    try:
        assert kernels.cached_library() is None
        built = kernels.library_path()
        assert built.startswith(str(tmp_path / "cache" / "ort-kernels")) and os.path.isfile(built)
        session, wt, b = _sparse_linear_session(64, 40, bias=True)
        x = np.random.default_rng(1).standard_normal((3, 64), dtype=np.float32)
        (y,) = session.run(None, {"x": x})
        torch.testing.assert_close(torch.from_numpy(y), _reference(x, 0.5, wt, b), **TOL)
    finally:
        kernels.library_path.cache_clear()


def test_failed_build_is_one_clear_error(tmp_path, monkeypatch, capsys):
    """Running a model that needs the kernels builds them; a compiler that fails gives one line, exit 1."""
    model, inputs = _sparse_model_file(tmp_path)
    broken = tmp_path / "cxx"
    broken.write_text("#!/bin/sh\necho 'sparse_linear.cc:1: error: broken compiler' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    monkeypatch.setenv("SPARSEC_CACHE", str(tmp_path / "cache"))
    kernels.library_path.cache_clear()
    try:
        code, _, err = run_cli(capsys, "run", model, "--inputs", inputs)
        assert code == 1 and err.strip() == (
            f"error: building the ONNX Runtime sparse kernels with {broken} failed: sparse_linear.cc:1: error:"
            " broken compiler (export without --sparse-kernel, or set CXX to a working C++17 compiler)")
        assert os.listdir(tmp_path / "cache" / "ort-kernels") == []  # no partial library
    finally:
        kernels.library_path.cache_clear()


def test_thresholded_linears_needs_the_whole_pattern():
    """A MatMul on a plain input, or with a non-constant weight, is not a candidate."""
    import onnx_ir as ir

    model = ir.from_proto(onnx.load_from_string(_linear_model(8, 4, False, "dense", np.random.default_rng(0))))
    assert thresholded_linears(model) == []  # MatMul(x, Wt): no threshold in front


def test_cli_export_sparse_kernel_and_run(teal_stack, tmp_path, capsys):
    art = tmp_path / "art"
    sparsec.save(teal_stack, str(art))
    model = tmp_path / "m.onnx"
    code, out, err = run_cli(capsys, "export", str(art), "--to", "onnx", "-o", str(model), "--sparse-kernel", "all",
                          "--verify")
    assert code == 0, err
    assert ("sparse kernel: 4 of 4 thresholded linears use SparseLinear, 0 the standard-op gather (mode all)" in out
            and "BEYOND" not in out)
    x = np.random.default_rng(0).standard_normal((1, 1, 256)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    code, out, err = run_cli(capsys, "run", str(model), "--inputs", str(tmp_path / "in.npz"), "-o",
                          str(tmp_path / "out.npz"))
    assert code == 0, err
    want = run_program(teal_stack.program, {"x": torch.from_numpy(x)})[0]
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "out.npz")["output_0"]), want, **TOL)
    code, _, err = run_cli(capsys, "export", str(art), "--to", "onnx", "-o", str(tmp_path / "n.onnx"),
                        "--sparse-kernel", "fast")
    assert code == 2 and "'fast' is not one of 'none', 'auto', 'all', 'gather'" in err
