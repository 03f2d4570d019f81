"""ONNX export of quantized artifacts (the ``quantize`` pass): ``sparsec::dequantize`` in standard ops, weights kept
packed in the file, ONNX Runtime vs the torch artifact, generation through the KV cache, the sparse path.

The fast set: the translation bit for bit on every (bits, group, scale dtype, dtype) and on gathered rows of any
shape; one cached zoo Llama after ``quantize{bits=4 group=32},teal{sparsity=0.5}`` exported by the CLI (packed
initializers, greedy tokens equal torch's, the sparse kernels reading the dequantized weights). The zoo matrix
(Llama, GPT-2, Gemma 3 x int8 / int4 / with teal) is slow.
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
from tests.zoo import build

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

TOL = dict(rtol=1e-4, atol=1e-4)
INT4 = "quantize{bits=4 group=32}"
PROMPT = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))
NEW = 32

#: (bits, group, scale dtype, output dtype) of the translation test
CASES = [(8, 0, torch.float32, torch.float32), (8, 32, torch.float16, torch.float32),
         (4, 32, torch.float32, torch.float32), (4, 0, torch.float16, torch.float32),
         (8, 16, torch.float32, torch.float16), (4, 16, torch.float16, torch.float16)]


class _Dequantized(nn.Module):
    """Every CASE as a constant weight [10, 64] and as the rows an embedding gathers ([B, S, 64]); q covers the whole
    int8 range (all 256 bytes for int4)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        for i, (bits, group, scale_dtype, _) in enumerate(CASES):
            if bits == 8:
                q = torch.randint(-128, 128, (10, 64), generator=g, dtype=torch.int8)
            else:
                q = torch.randint(0, 256, (10, 32), generator=g).to(torch.uint8)
            self.register_buffer(f"q{i}", q)
            self.register_buffer(f"s{i}", (torch.randn(10, 64 // group if group else 1, generator=g) * 0.05)
                                 .to(scale_dtype))

    def forward(self, ids):
        out = []
        for i, (bits, group, _, dtype) in enumerate(CASES):
            q, s = getattr(self, f"q{i}"), getattr(self, f"s{i}")
            out.append(DEQUANTIZE(q, s, bits, group, dtype))
            rows = nn.functional.embedding(ids, q), nn.functional.embedding(ids, s)
            out.append(DEQUANTIZE(*rows, bits, group, dtype))
        return tuple(out)


def _initializers(path):
    proto = onnx.load(str(path))
    return {i.name: (onnx.TensorProto.DataType.Name(i.data_type), list(i.dims)) for i in proto.graph.initializer}


def _ops(path):
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _assert_packed(path, program, bits):
    """The .onnx file holds each quantized weight of ``program`` once, as its packed integers (int8 / uint8 of the
    same shape), and no float initializer as large as the smallest of them (no dequantized copy)."""
    packed = {name: tuple(t.shape) for name, t in program.state_dict.items() if name.endswith("_q")}
    packed.update({name: tuple(t.shape) for name, t in program.constants.items() if name.endswith("_q")})
    assert packed
    inits = _initializers(path)
    kind = "INT8" if bits == 8 else "UINT8"
    for name, shape in packed.items():
        assert inits[name] == (kind, list(shape)), name
    smallest = min(int(np.prod(s)) * (8 // bits) for s in packed.values())
    floats = [(n, d) for n, (t, d) in inits.items() if t in ("FLOAT", "FLOAT16") and int(np.prod(d)) >= smallest]
    assert floats == []
    integers = [n for n, (t, d) in inits.items() if t in ("INT8", "UINT8")]
    assert len(integers) == len(packed) + (2 if bits == 4 else 0)  # int4: the constants 15 and 4 of the unpacking


def _logits(out):
    return out["logits"] if isinstance(out, dict) else out[0]


def test_translation_is_bit_exact(tmp_path):
    """ORT's dequantized weights equal the torch op's bit for bit (float32 and float16 outputs, float32 / float16
    scales, int8 / int4, per channel / group), for a constant weight and for gathered rows of dynamic shape (empty
    too); the file keeps q as int8 / uint8 and stores no dequantized copy."""
    from sparsec.backends.onnxruntime import export_onnx, onnx_session

    module = _Dequantized()
    ids = torch.tensor([[1, 9, 1], [0, 4, 7]])
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
    program = torch.export.export(module, (ids,), dynamic_shapes=(dims,))
    path = tmp_path / "dq.onnx"
    export_onnx(program, path)
    inits = _initializers(path)
    for i, (bits, group, scale_dtype, _) in enumerate(CASES):
        assert inits[f"q{i}"] == (("INT8", [10, 64]) if bits == 8 else ("UINT8", [10, 32]))
    assert not [n for n, (t, d) in inits.items() if int(np.prod(d)) >= 10 * 64 and t not in ("INT8", "UINT8")]
    ops = _ops(path)
    assert ops["BitwiseAnd"] == ops["BitShift"] == 6  # 3 int4 cases, a weight and gathered rows each
    session = onnx_session(str(path))
    name = session.get_inputs()[0].name
    for x in (ids, torch.randint(0, 10, (1, 5)), torch.zeros(1, 0, dtype=torch.long)):
        got, want = session.run(None, {name: x.numpy()}), module(x)
        assert len(got) == len(want) == 2 * len(CASES)
        for g, w in zip(got, want):
            assert torch.equal(torch.from_numpy(g), w)


@pytest.fixture(scope="module")
def qllama(tmp_path_factory):
    """(artifact, program, .onnx, JSON of the CLI): the cached zoo Llama after int4 quantize and teal 0.5, exported
    by ``sparsec export ART --to onnx --verify --json``."""
    tmp = tmp_path_factory.mktemp("quantized_export")
    model, example = build("llama")
    calib = token_forward_loop(torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(2)))
    result = sparsec.transform(model, INT4 + ",teal{sparsity=0.5}", example_inputs=example, forward_loop=calib,
                               kv_cache=True, measure=False)
    art = str(tmp / "art")
    sparsec.save(result, art)
    path = tmp / "llama.onnx"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # the CLI in process (capsys is per test)
        try:
            main(["export", art, "--to", "onnx", "-o", str(path), "--verify", "--json"])
            code = 0
        except SystemExit as exc:
            code = exc.code
    assert code == 0, out.getvalue()
    return art, result.program, path, json.loads(out.getvalue())


def test_cli_export_keeps_the_weights_packed(qllama):
    """The CLI's export verifies (example inputs, a one-token step, a prefill) and writes every quantized weight once
    as uint8 (the tied-free Llama: 16, with 16 unpackings), no float32 copy; the reported weight bytes are the
    packed ones."""
    art, program, path, report = qllama
    assert report["verification"]["ok"] and len(report["verification"]["runs"]) == 3
    _assert_packed(path, program, bits=4)
    ops = _ops(path)
    assert ops["BitwiseAnd"] == ops["BitShift"] == 16 and ops["SparseLinear"] == 0
    dense_bytes = sum(t.numel() * 4 for n, t in program.state_dict.items() if n.endswith("_q")) * 2
    assert report["weight_bytes"] < dense_bytes / 4  # int4 + scales + norms, against the float32 weights
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert meta["sparsec.pipeline"].startswith("quantize{bits=4 group=32")


def test_greedy_generation_equals_torch(qllama):
    """32 greedy tokens from the ONNX file (prefill and one-token steps through its KV cache) equal the torch
    artifact's."""
    art, _, path, _ = qllama
    want = sparsec.generate(art, PROMPT, max_new_tokens=NEW, ignore_eos=True)
    got = sparsec.generate(str(path), PROMPT, max_new_tokens=NEW, ignore_eos=True)
    assert torch.equal(got, want)


def test_sparse_kernels_read_the_dequantized_weight(qllama, tmp_path):
    """With the sparse path every thresholded quantized linear (14) takes the gather (and SparseLinear, when a
    compiler is there) on the weight its dequantizing subgraph computes: recorded as quantized, the file still packed,
    outputs and greedy tokens as torch's."""
    import onnx_ir as ir

    from sparsec.backends.onnxruntime.kernels import compiler
    from sparsec.backends.onnxruntime.runtime import verify_onnx
    from sparsec.backends.onnxruntime.sparse import apply_sparse_kernels, summary

    art, program, path, _ = qllama
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
          for spec, bits in (("quantize", 8), (INT4, 4), ("quantize,teal{sparsity=0.5}", 8))]


@pytest.mark.slow
@pytest.mark.parametrize("arch,spec,bits,count", MATRIX)
def test_zoo_matrix_matches_torch(arch, spec, bits, count, tmp_path):
    """Each zoo model, int8 per channel / int4 groups / int8 with teal: export_onnx of the TransformResult verifies,
    keeps ``count`` packed weights, and ORT's logits match the torch program (assert_close 1e-4) on a batch-2 input;
    with teal, the standard-op gather on every thresholded linear too."""
    import onnx_ir as ir

    from sparsec.backends.onnxruntime import onnx_session
    from sparsec.backends.onnxruntime.runtime import verify_onnx
    from sparsec.backends.onnxruntime.sparse import apply_sparse_kernels

    model, inputs = build(arch)
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(1))
    result = sparsec.transform(model, spec, example_inputs=(inputs["input_ids"],), measure=False,
                               forward_loop=token_forward_loop(ids, batch_size=8) if "teal" in spec else None)
    path = tmp_path / "m.onnx"
    out = sparsec.export_onnx(result, str(path), verify=True)
    assert out.verification["ok"]
    _assert_packed(path, result.program, bits)
    assert len([e for e in result.report["layers"] if e["op"] == "quantize"]) == count
    feed = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    want = _logits(result.module()(feed))
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
