"""ONNX export of teal{prefill=half|dense}: sparsec::threshold_prefill becomes standard ops that read the sequence
length at run time (parity with torch at 1 and 7 tokens), and the sparse path leaves those layers to it."""
import pytest
import torch

import sparsec
from sparsec.calibration import token_forward_loop
from sparsec.inputs import run_program
from tests.passes.test_teal import prefill_spec
from tests.zoo import build

pytest.importorskip("onnxruntime")
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The zoo Llama after teal 0.5, block 0 prefill=half and block 1 prefill=dense, exported with standard ops."""
    model, inputs = build("llama")
    ids = torch.randint(0, 256, (16, 16), generator=torch.Generator().manual_seed(1))
    result = sparsec.transform(model, prefill_spec(0.5), example_inputs=inputs, forward_loop=token_forward_loop(ids),
                               measure=False)
    path = tmp_path_factory.mktemp("ort") / "m.onnx"
    sparsec.export_onnx(result, str(path))
    return model, result, path


def test_prefill_matches_torch_at_one_and_several_tokens(exported):
    import onnx

    from sparsec.backends.onnxruntime.runtime import onnx_session

    model, result, path = exported
    domains = {n.domain for n in onnx.load(str(path), load_external_data=False).graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    session = onnx_session(str(path))
    for batch, tokens in ((1, 1), (2, 1), (1, 7), (2, 7)):
        ids = torch.randint(0, 256, (batch, tokens), generator=torch.Generator().manual_seed(tokens))
        feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        want = run_program(result.program, feed)[0]
        got = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in feed.items()})[0])
        torch.testing.assert_close(got, want, **TOL)
        with torch.no_grad():  # the thresholds act at both lengths (block 0 thresholds half of 7 tokens)
            assert (model(**feed)[0] - want).abs().max() > 1e-3


def test_sparse_path_leaves_prefill_thresholds_to_the_standard_ops(exported):
    """SparseLinear and the gather threshold every row they get: neither is put behind threshold_prefill."""
    import onnx_ir as ir

    from sparsec.backends.onnxruntime.sparse import apply_sparse_kernels, thresholded_linears

    _, result, path = exported
    model = ir.load(str(path))
    assert thresholded_linears(model) == []
    before = [n.op_type for n in model.graph]
    for mode in ("all", "gather", "auto"):
        assert apply_sparse_kernels(model, result.program, mode)["layers"] == []
    assert [n.op_type for n in model.graph] == before and "Or" in before
