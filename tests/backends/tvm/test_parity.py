"""Parity of TVM builds with the torch artifact at threshold ties, and on the real models (the tie rule:
tests/backends/parity.py; both the sparse and the ``--dense`` build show the real Gemma 3's tie)."""
import numpy as np
import pytest
import torch

import sparsec
from sparsec.backends.tvm.build import compile_program, load_compiled
from tests.backends.parity import GEMMA_RELUFY_TOL, TOL, assert_matches_up_to_ties

pytest.importorskip("tvm")


class _Thresholded(torch.nn.Module):
    """threshold(x, t) -> Linear(640 -> 256), Gemma 3's k/v projection shape."""

    def __init__(self, t: float):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(640, 256, bias=False)
        self.register_buffer("t", torch.tensor(t))

    def forward(self, x):
        return self.proj(torch.ops.sparsec.threshold(x, self.t))


@pytest.mark.parametrize("rows", [1, 9])
def test_fused_threshold_drops_exact_ties(rows, tmp_path):
    """|x| == t is dropped and |x| = nextafter(t) kept, as torch's x * (|x| > t), in the GEMV (1 row) and union
    (9 rows) paths: the kernel is exact at ties, so a tie differs only through the values computed before it."""
    x = torch.randn(rows, 640, generator=torch.Generator().manual_seed(3))
    t = float(x[rows - 1, 7].abs())
    x[0, 11] = -t  # a tie in every row block
    x[rows - 1, 12] = float(np.nextafter(np.float32(t), np.float32(np.inf)))  # just above: kept
    model = _Thresholded(t).eval()
    program = torch.export.export(model, (torch.randn(2, 640),),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch", max=64)}})
    manifest = compile_program(program, str(tmp_path / "b"), threads=2)
    assert [k.split("_")[2] for k in manifest["kernels"]] == ["threshold"]
    got = load_compiled(str(tmp_path / "b"))(x=x)[0]
    want = model(x).detach()
    torch.testing.assert_close(got, want, **TOL)
    dropped = model.proj(x * (x.abs() > t) + torch.where(x.abs() == t, x, 0)).detach()
    assert (dropped - want).abs().max() > 1e-2  # the ties matter: keeping them would fail the comparison


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["teal{sparsity=0.5}", "relufy"])
def test_real_gemma_build_matches_torch(spec, tmp_path):
    """The real Gemma 3 270M, sparse build, at 1 and 9 tokens of real text (BOS first) and 16 of another sentence."""
    from transformers import AutoTokenizer

    from sparsec.frontend import SAMPLE_SENTENCES, builtin_model_dir

    result = sparsec.transform("builtin:gemma3-270m", spec, measure=False, calib_samples=8)
    manifest = sparsec.compile(result, str(tmp_path / "b"), threads=2)
    assert {k.split("_")[2] for k in manifest["kernels"]} == {
        "threshold" if spec.startswith("teal") else "sparse", "dense"}
    compiled = sparsec.load_compiled(str(tmp_path / "b"))
    tok = AutoTokenizer.from_pretrained(builtin_model_dir("gemma3-270m"))
    ids = [tok(s, return_tensors="pt")["input_ids"] for s in SAMPLE_SENTENCES[:2]]
    for feed_ids in (ids[0][:, :1], ids[0][:, :9], ids[1][:, :16]):
        feed = {"input_ids": feed_ids, "attention_mask": torch.ones_like(feed_ids)}
        assert_matches_up_to_ties(list(compiled(feed).values()), result.program, feed,
                                  tol=GEMMA_RELUFY_TOL if spec == "relufy" else TOL)


def _matches_at(compiled, program, shapes):
    """The build matches the torch program (ties flipped) at token-id inputs of each shape."""
    for shape in shapes:
        ids = torch.randint(5, 60, shape, generator=torch.Generator().manual_seed(1))
        feed = {k: ids if k == "input_ids" else torch.ones_like(ids) if k == "attention_mask" else torch.zeros_like(ids)
                for k in compiled.input_names}
        assert_matches_up_to_ties(list(compiled(feed).values()), program, feed)


def test_bert_position_slice_compiles(tmp_path):
    """BERT slices its position_ids buffer to the sequence length (torch: seq, TVM's importer: min(seq, 64)); the
    build bounds it by torch's shape and matches at 1 and 13 tokens and batch 2."""
    from tests.zoo import RELU_OVERRIDE, build

    model, inputs = build("bert", **RELU_OVERRIDE["bert"])
    result = sparsec.transform(model, "relufy", example_inputs=inputs, measure=False)
    manifest = compile_program(result.program, str(tmp_path / "b"), threads=2)
    assert {k.split("_")[2] for k in manifest["kernels"]} == {"sparse", "dense"}
    _matches_at(load_compiled(str(tmp_path / "b")), result.program, [(1, 1), (1, 13), (2, 7)])


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["teal{sparsity=0.5}", "relufy"])
def test_real_minilm_build_matches_torch(spec, tmp_path):
    result = sparsec.transform("builtin:minilm", spec, measure=False, calib_samples=8)
    sparsec.compile(result, str(tmp_path / "b"), threads=2)
    _matches_at(sparsec.load_compiled(str(tmp_path / "b")), result.program, [(1, 1), (1, 9), (2, 24)])
