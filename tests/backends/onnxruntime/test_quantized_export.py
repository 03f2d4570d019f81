"""ONNX export of quantized artifacts (the ``quantize`` pass): linears as ``com.microsoft.MatMulNBits`` on the packed
weights (the default) or ``sparsec::dequantize`` in standard ops (``quantized_matmul="standard"``), weights kept
packed in the file either way, ONNX Runtime vs the torch artifact, generation through the KV cache, the sparse path.

The fast set: the translation bit for bit on every (bits, group, scale dtype, dtype) and on gathered rows of any
shape; MatMulNBits's block choice (per channel, groups, a K no block divides) on a small MLP; one cached zoo Llama
after ``quantize{bits=4 group=32},teal{sparsity=0.5}`` exported by the CLI in both forms (packed initializers,
greedy tokens equal torch's, the sparse kernels reading the dequantized weights of the standard form). The zoo
matrix (Llama, GPT-2, Gemma 3 x int8 / int4 / with teal) is slow.
"""
import contextlib
import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

import sparsec
from sparsec.calibration import token_forward_loop
from sparsec.cli import main
from sparsec.ops import DEQUANTIZE
from sparsec.passes.quantize import HOLDER
from tests.cli_helpers import run_cli
from tests.zoo import build

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

TOL = dict(rtol=1e-4, atol=1e-4)
INT4 = "quantize{bits=4 group=32}"
PROMPT = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))
NEW = 32

#: (bits, group, scale dtype, output dtype, offsets) of the translation test
CASES = [(8, 0, torch.float32, torch.float32, False), (8, 32, torch.float16, torch.float32, False),
         (4, 32, torch.float32, torch.float32, False), (4, 0, torch.float16, torch.float32, False),
         (8, 16, torch.float32, torch.float16, False), (4, 16, torch.float16, torch.float16, False),
         (4, 32, torch.float16, torch.float32, True), (8, 0, torch.float32, torch.float32, True)]


class _Dequantized(nn.Module):
    """Every CASE as a constant weight [10, 64] and as the rows an embedding gathers ([B, S, 64]); q covers the whole
    int8 range (all 256 bytes for int4)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        for i, (bits, group, scale_dtype, _, offsets) in enumerate(CASES):
            if bits == 8:
                q = torch.randint(-128, 128, (10, 64), generator=g, dtype=torch.int8)
            else:
                q = torch.randint(0, 256, (10, 32), generator=g).to(torch.uint8)
            self.register_buffer(f"q{i}", q)
            for name in ("s", "o") if offsets else ("s",):
                self.register_buffer(f"{name}{i}", (torch.randn(10, 64 // group if group else 1, generator=g)
                                                    * 0.05).to(scale_dtype))

    def forward(self, ids):
        out = []
        for i, (bits, group, _, dtype, offsets) in enumerate(CASES):
            tensors = [getattr(self, f"{name}{i}") for name in (("q", "s", "o") if offsets else ("q", "s"))]
            out.append(DEQUANTIZE(*tensors[:2], bits, group, dtype, *tensors[2:]))
            rows = [nn.functional.embedding(ids, t) for t in tensors]
            out.append(DEQUANTIZE(*rows[:2], bits, group, dtype, *rows[2:]))
        return tuple(out)


def _initializers(path):
    proto = onnx.load(str(path))
    return {i.name: (onnx.TensorProto.DataType.Name(i.data_type), list(i.dims)) for i in proto.graph.initializer}


def _ops(path):
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _assert_packed(path, program, bits):
    """The .onnx file holds each quantized weight of ``program`` as its packed integers: q as it is (int8 / uint8 of
    the same shape; standard ops, or an embedding's table) and / or a linear's MatMulNBits copy ``{q}_nbits`` (uint8
    ``[N, K / block, block * bits / 8]``); no other integer matrix, and no float initializer as large as the smallest
    of them (no dequantized copy) but the unquantized layers' weights."""
    packed = {name: tuple(t.shape) for name, t in program.state_dict.items() if name.endswith("_q")}
    packed.update({name: tuple(t.shape) for name, t in program.constants.items() if name.endswith("_q")})
    assert packed
    inits = _initializers(path)
    kind = "INT8" if bits == 8 else "UINT8"
    for name, (n, width) in packed.items():
        assert name in inits or name + "_nbits" in inits, name
        assert inits.get(name, (kind, [n, width])) == (kind, [n, width]), name
        kind_b, dims = inits.get(name + "_nbits", ("UINT8", [n, 1, width]))
        assert kind_b == "UINT8" and len(dims) == 3 and dims[0] == n and dims[1] * dims[2] == width, name
    smallest = min(int(np.prod(s)) * (8 // bits) for s in packed.values())
    floats = [(n, d) for n, (t, d) in inits.items() if t in ("FLOAT", "FLOAT16") and int(np.prod(d)) >= smallest]
    unquantized = [n for n, t in program.state_dict.items()
                   if t.is_floating_point() and not n.startswith(HOLDER) and t.numel() >= smallest]
    assert len(floats) == len(unquantized), floats
    integers = {n for n, (t, d) in inits.items() if t in ("INT8", "UINT8") and len(d) > 1}
    assert integers <= set(packed) | {n + "_nbits" for n in packed}


def _nbits_nodes(path):
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits" and n.domain == "com.microsoft"]


def _logits(out):
    return out["logits"] if isinstance(out, dict) else out[0]


def test_translation_is_bit_exact(tmp_path):
    """ORT's dequantized weights equal the torch op's bit for bit (float32 and float16 outputs, float32 / float16
    scales, int8 / int4, per channel / group), for a constant weight and for gathered rows of dynamic shape (empty
    too), with and without offsets; the file keeps q as int8 / uint8 and stores no dequantized copy."""
    from sparsec.backends.onnxruntime import export_onnx, onnx_session

    module = _Dequantized()
    ids = torch.tensor([[1, 9, 1], [0, 4, 7]])
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
    program = torch.export.export(module, (ids,), dynamic_shapes=(dims,))
    path = tmp_path / "dq.onnx"
    export_onnx(program, path)
    inits = _initializers(path)
    for i, (bits, group, *_) in enumerate(CASES):
        assert inits[f"q{i}"] == (("INT8", [10, 64]) if bits == 8 else ("UINT8", [10, 32]))
    assert not [n for n, (t, d) in inits.items() if int(np.prod(d)) >= 10 * 64 and t not in ("INT8", "UINT8")]
    ops = _ops(path)
    assert ops["BitwiseAnd"] == ops["BitShift"] == 8  # 4 int4 cases, a weight and gathered rows each
    session = onnx_session(str(path))
    name = session.get_inputs()[0].name
    for x in (ids, torch.randint(0, 10, (1, 5)), torch.zeros(1, 0, dtype=torch.long)):
        got, want = session.run(None, {name: x.numpy()}), module(x)
        assert len(got) == len(want) == 2 * len(CASES)
        for g, w in zip(got, want):
            assert torch.equal(torch.from_numpy(g), w)


class _MLP(nn.Module):
    """Linears of K = 96 (no bias), 40 and 64 (bias)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(96, 40, bias=False), nn.Linear(40, 64), nn.Linear(64, 32)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


#: (pipeline, MatMulNBits block per layer: None = standard ops); ONNX Runtime's blocks are 16 to 256
#: (8 bits: standard ops, as ORT's 8-bit kernel is slow; per channel: the largest block dividing K = 96, 40, 64)
BLOCKS = [("quantize{bits=4}", {"a": 32, "b": None, "c": 64}),
          ("quantize{bits=4 group=8 scale_dtype=float16}", {"a": None, "b": None, "c": None}),  # 8 < 16
          ("quantize{bits=4 group=16 scale_dtype=float16 ignore={b}}", {"a": 16, "c": 16}),
          ("quantize{bits=4 group=32 ignore={b}}", {"a": 32, "c": 32}),
          ("quantize{bits=4 group=32 symmetric=false ignore={b}}", {"a": 32, "c": 32}),  # float zero points
          ("quantize{bits=4 symmetric=false ignore={b}}", {"a": 32, "c": 64}),
          ("quantize{group=32 ignore={b}}", {"a": None, "c": None})]


@pytest.mark.parametrize("spec,blocks", BLOCKS)
def test_matmulnbits_block_choice(spec, blocks, tmp_path):
    """Each 4-bit quantized linear takes MatMulNBits with the largest of ONNX Runtime's blocks dividing its group (its K
    per channel: also when K is no power of two; offsets: a MatMul of x's group sums added) and keeps the standard ops
    when none does, and so does every 8-bit one, recorded in the metadata; ORT's outputs equal torch's within 1e-4, in
    either form, on a batch and on one row."""
    from sparsec.backends.onnxruntime import export_onnx, onnx_session

    x = torch.randn(2, 5, 96)
    result = sparsec.transform(_MLP(), spec, example_inputs=(x,), measure=False)
    bits = result.report["passes"][0]["stats"]["bits"]
    for form in ("nbits", "standard"):
        path = tmp_path / f"{form}.onnx"
        out = export_onnx(result, path, quantized_matmul=form)
        _assert_packed(path, result.program, bits)
        nodes = _nbits_nodes(path)
        meta = json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["sparsec.quantized_matmul"])
        assert meta == out.quantized_matmul
        if form == "standard":
            assert nodes == [] and meta == {"mode": "standard"}
        else:
            attributes = [{a.name: a.i for a in n.attribute} for n in nodes]
            taken = {m: b for m, b in blocks.items() if b}
            assert sorted((a["K"], a["block_size"]) for a in attributes) == sorted(
                ({"a": 96, "c": 64}[m], b) for m, b in taken.items())
            assert all(a["bits"] == bits and a["accuracy_level"] == 0 for a in attributes)
            assert not any(len(n.input) > 3 and n.input[3] for n in nodes)  # no zero points: ORT's are slow
            offsets = [n for n in onnx.load(str(path)).graph.node if n.name.endswith("_offset_matmul")]
            assert len(offsets) == (len(nodes) if "symmetric=false" in spec else 0)
            assert [e["layer"] for e in meta["standard"]] == [m for m, b in blocks.items() if b is None]
            if bits == 8:
                assert {e["reason"] for e in meta["standard"]} == {"8-bit weights keep the standard ops"}
            assert meta["matmulnbits"] == len(taken)
        session = onnx_session(str(path))
        for feed in (x, x[:1, :1]):
            got = session.run(None, {session.get_inputs()[0].name: feed.numpy()})[0]
            torch.testing.assert_close(torch.from_numpy(got), result.module()(feed), **TOL)


def test_quantized_matmul_must_be_known(tmp_path, capsys):
    """A bad ``quantized_matmul`` is one line listing the valid ones (the CLI's: click's), before anything is done."""
    from sparsec.backends.onnxruntime import export_onnx
    from sparsec.errors import UsageError

    with pytest.raises(UsageError, match="^quantized matmul 'fast' is not one of nbits, standard [(][^\n]+$"):
        export_onnx(torch.export.export(_MLP(), (torch.randn(1, 96),)), tmp_path / "m.onnx", quantized_matmul="fast")
    code, _, err = run_cli(capsys, "export", str(tmp_path / "art"), "--to", "onnx", "-o", str(tmp_path / "m.onnx"),
                           "--quantized-matmul", "fast")
    assert code == 2 and "'fast' is not one of 'nbits', 'standard'" in err
    assert not (tmp_path / "m.onnx").exists()


def _cli(*args) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # the CLI in process (capsys is per test)
        try:
            main(["export", *args, "--json"])
            code = 0
        except SystemExit as exc:
            code = exc.code
    assert code == 0, out.getvalue()
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def qllama(tmp_path_factory):
    """(artifact, program, {form: (.onnx, JSON of the CLI)}): the cached zoo Llama after int4 quantize and teal 0.5,
    exported by ``sparsec export ART --to onnx --verify --json`` (MatMulNBits) and with ``--quantized-matmul
    standard``."""
    tmp = tmp_path_factory.mktemp("quantized_export")
    model, example = build("llama")
    calib = token_forward_loop(torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(2)))
    result = sparsec.transform(model, INT4 + ",teal{sparsity=0.5}", example_inputs=example, forward_loop=calib,
                               kv_cache=True, measure=False)
    art = str(tmp / "art")
    sparsec.save(result, art)
    files = {}
    for form, extra in (("nbits", []), ("standard", ["--quantized-matmul", "standard"])):
        path = tmp / f"llama-{form}.onnx"
        files[form] = path, _cli(art, "--to", "onnx", "-o", str(path), "--verify", *extra)
    return art, result.program, files


#: the zoo Llama's quantized linears: 2 layers x 7 (all thresholded by teal) + the LM head
LINEARS = 15


def test_cli_export_uses_matmulnbits(qllama):
    """By default every quantized linear (the LM head too) is one MatMulNBits (4 bits, blocks of 32, float32
    compute) on the packed weight: the embedding alone keeps its unpacking, the file holds no float32 copy, the
    metadata says so and the export verifies (example inputs, a one-token step, a prefill)."""
    art, program, files = qllama
    path, report = files["nbits"]
    assert report["verification"]["ok"] and len(report["verification"]["runs"]) == 3
    import onnx_ir as ir

    from sparsec.backends.onnxruntime import nbits
    from sparsec.backends.onnxruntime.sparse import linears

    attributes = [{a.name: a.i for a in n.attribute} for n in _nbits_nodes(path)]
    shapes = [(q.shape[1] * 2, q.shape[0]) for name, q in program.state_dict.items()
              if name.endswith("_q") and "embed" not in name]
    assert len(attributes) == len(shapes) == LINEARS
    assert sorted((a.pop("K"), a.pop("N")) for a in attributes) == sorted(shapes)
    assert all(a == {"bits": 4, "block_size": 32, "accuracy_level": 0} for a in attributes)
    _assert_packed(path, program, bits=4)
    inits = _initializers(path)
    assert sum(name.endswith("_q_nbits") for name in inits) == LINEARS
    assert [n for n in inits if n.endswith("_q")] == ["sparsec_quantize.model_embed_tokens_weight_q"]
    ops = _ops(path)
    assert ops["BitwiseAnd"] == ops["BitShift"] == 1 and ops["SparseLinear"] == 0  # the embedding's unpacking
    assert linears(ir.load(str(path))) == []  # no MatMul / Gemm by a constant weight is left
    expected = {"mode": "nbits", "matmulnbits": LINEARS, "blocks": {"32": LINEARS}, "standard": []}
    assert report["quantized_matmul"] == expected
    assert nbits.summary(expected) == ("15 quantized linears use com.microsoft.MatMulNBits (block 32: 15), 0 keep"
                                       " standard ops")
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert json.loads(meta["sparsec.quantized_matmul"]) == expected
    assert meta["sparsec.pipeline"].startswith("quantize{bits=4 group=32")
    dense_bytes = sum(t.numel() * 4 for n, t in program.state_dict.items() if n.endswith("_q")) * 2
    assert report["weight_bytes"] < dense_bytes / 4  # int4 + scales + norms, against the float32 weights


def test_cli_standard_form_is_the_dequantizing_graph(qllama):
    """``--quantized-matmul standard``: every quantized weight once as uint8 with its unpacking in standard ops (the
    tied-free Llama: 16), no MatMulNBits, no float32 copy; it verifies too."""
    _, program, files = qllama
    path, report = files["standard"]
    assert report["verification"]["ok"] and len(report["verification"]["runs"]) == 3
    _assert_packed(path, program, bits=4)
    ops = _ops(path)
    assert ops["BitwiseAnd"] == ops["BitShift"] == 16 and ops["MatMulNBits"] == ops["SparseLinear"] == 0
    assert not any(n.endswith("_nbits") for n in _initializers(path))
    assert report["quantized_matmul"] == {"mode": "standard"}


def test_logits_and_greedy_generation_equal_torch(qllama):
    """ORT's logits of either form equal the torch program's (assert_close 1e-4) on other token ids, and 32 greedy
    tokens from each ONNX file (prefill and one-token steps through its KV cache) equal the torch artifact's."""
    from sparsec.backends.onnxruntime import run_onnx
    from sparsec.inputs import example_inputs, run_program

    art, program, files = qllama
    feed = example_inputs(program)
    feed["input_ids"] = torch.randint(0, 256, feed["input_ids"].shape, generator=torch.Generator().manual_seed(5))
    logits = run_program(program, feed)[0]
    want = sparsec.generate(art, PROMPT, max_new_tokens=NEW, ignore_eos=True)
    for path, _ in files.values():
        got = run_onnx(str(path), {k: v.numpy() for k, v in feed.items()})["logits"]
        torch.testing.assert_close(torch.from_numpy(got), logits, **TOL)
        got = sparsec.generate(str(path), PROMPT, max_new_tokens=NEW, ignore_eos=True)
        assert torch.equal(got, want), path


def test_sparse_kernels_read_the_dequantized_weight(qllama, tmp_path):
    """With the sparse path every thresholded quantized linear (14) of the standard form takes the gather (and
    SparseLinear, when a compiler is there) on the weight its dequantizing subgraph computes: recorded as quantized,
    the file still packed, outputs and greedy tokens as torch's. In the MatMulNBits form the sparse path leaves them
    as they are and lists them as such."""
    import onnx_ir as ir

    from sparsec.backends.onnxruntime.kernels import compiler
    from sparsec.backends.onnxruntime.runtime import verify_onnx
    from sparsec.backends.onnxruntime.sparse import apply_sparse_kernels, summary

    art, program, files = qllama
    model = ir.load(str(files["nbits"][0]))
    info = apply_sparse_kernels(model, program, "all" if compiler() else "gather")
    assert [(e["kernel"], e["weight"]) for e in info["layers"]] == [("matmulnbits", "quantized")] * (LINEARS - 1)
    assert all(0.3 < e["sparsity"] < 0.7 for e in info["layers"])
    assert summary(info).endswith("; 14 take com.microsoft.MatMulNBits on the packed weight instead (dense; export"
                                  " with --quantized-matmul standard for the sparse kernels)")
    assert sum(n.op_type == "MatMulNBits" for n in model.graph) == LINEARS and "ai.sparsec" not in model.opset_imports
    path = files["standard"][0]
    want = sparsec.generate(art, PROMPT, max_new_tokens=NEW, ignore_eos=True)
    for mode in ("gather", "all") if compiler() else ("gather",):
        model = ir.load(str(path))
        info = apply_sparse_kernels(model, program, mode)
        kernel = "gather" if mode == "gather" else "sparse"
        assert [(e["kernel"], e["weight"]) for e in info["layers"]] == [(kernel, "quantized")] * 14
        assert summary(info).endswith("; 14 of them read a dequantized weight (float32 in the session, packed in the"
                                      " file)")
        out = tmp_path / f"{mode}.onnx"
        ir.save(model, str(out))
        _assert_packed(out, program, bits=4)
        assert _ops(out)["If" if mode == "gather" else "SparseLinear"] == 14
        v = verify_onnx(str(out), program, None, **TOL)  # the one-token step takes the sparse formulation
        assert v["ok"] and "one-token step" in v["runs"][1]["inputs"], v
        assert torch.equal(sparsec.generate(str(out), PROMPT, max_new_tokens=NEW, ignore_eos=True), want)


#: (arch, pipeline, bits, quantized weights): Gemma 3 and GPT-2 tie the LM head to the embedding (one table)
MATRIX = [(arch, spec, bits, count) for arch, count in (("llama", 16), ("gpt2", 10), ("gemma3", 22))
          for spec, bits in (("quantize", 8), (INT4, 4), ("quantize,teal{sparsity=0.5}", 8),
                             ("quantize{bits=4 group=32 symmetric=false},teal{sparsity=0.5}", 4))]


@pytest.mark.slow
@pytest.mark.parametrize("arch,spec,bits,count", MATRIX)
def test_zoo_matrix_matches_torch(arch, spec, bits, count, tmp_path):
    """Each zoo model, int8 per channel / int4 groups / int8 with teal / int4 with offsets and teal, in either form:
    export_onnx of the TransformResult verifies, keeps ``count`` packed weights (a tied LM head's table twice with
    MatMulNBits: the embedding's and the linear's), every linear a MatMulNBits in that form, and ORT's logits match the
    torch program (assert_close 1e-4) on a batch-2 input; with teal, the standard-op gather on every thresholded linear
    of the standard form too."""
    import onnx_ir as ir

    from sparsec.backends.onnxruntime import onnx_session
    from sparsec.backends.onnxruntime.runtime import verify_onnx
    from sparsec.backends.onnxruntime.sparse import apply_sparse_kernels, linears

    model, inputs = build(arch)
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(1))
    result = sparsec.transform(model, spec, example_inputs=(inputs["input_ids"],), measure=False,
                               forward_loop=token_forward_loop(ids, batch_size=8) if "teal" in spec else None)
    assert len([e for e in result.report["layers"] if e["op"] == "quantize"]) == count
    feed = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    want = _logits(result.module()(feed))
    for form in ("nbits", "standard"):
        path = tmp_path / f"{form}.onnx"
        out = sparsec.export_onnx(result, str(path), verify=True, quantized_matmul=form)
        assert out.verification["ok"]
        _assert_packed(path, result.program, bits)
        assert len(_nbits_nodes(path)) == out.quantized_matmul.get("matmulnbits", 0)
        if form == "nbits" and bits == 4:
            assert out.quantized_matmul["matmulnbits"] and out.quantized_matmul["standard"] == []
            assert linears(ir.load(str(path))) == []
        elif form == "nbits":  # 8 bits: every linear keeps the standard ops
            assert out.quantized_matmul["matmulnbits"] == 0 and out.quantized_matmul["standard"]
        session = onnx_session(str(path))
        got = session.run(None, {session.get_inputs()[0].name: feed.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), want, **TOL)
    if "teal" in spec:
        m = ir.load(str(path))
        info = apply_sparse_kernels(m, result.program, "gather")
        assert info["layers"] and {(e["kernel"], e["weight"]) for e in info["layers"]} == {("gather", "quantized")}
        ir.save(m, str(tmp_path / "gather.onnx"))
        _assert_packed(tmp_path / "gather.onnx", result.program, bits)
        one = {session.get_inputs()[0].name: feed[:1, :1]}  # one row: the gather branch
        assert verify_onnx(str(tmp_path / "gather.onnx"), result.program, one, **TOL)["ok"]
