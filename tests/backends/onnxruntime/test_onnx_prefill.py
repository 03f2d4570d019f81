"""ONNX export of teal{prefill=half|dense}: sparsec::threshold_prefill becomes standard ops that read the sequence
length at run time (parity with torch at 1 and 7 tokens), and the sparse path takes a one-token step only."""
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


def _feeds():
    for batch, tokens in ((1, 1), (2, 1), (1, 7), (2, 7)):
        ids = torch.randint(0, 256, (batch, tokens), generator=torch.Generator().manual_seed(tokens))
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_prefill_matches_torch_at_one_and_several_tokens(exported):
    import onnx

    from sparsec.backends.onnxruntime.runtime import onnx_session

    model, result, path = exported
    domains = {n.domain for n in onnx.load(str(path), load_external_data=False).graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    session = onnx_session(str(path))
    for feed in _feeds():
        want = run_program(result.program, feed)[0]
        got = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in feed.items()})[0])
        torch.testing.assert_close(got, want, **TOL)
        with torch.no_grad():  # the thresholds act at both lengths (block 0 thresholds half of 7 tokens)
            assert (model(**feed)[0] - want).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["all", "gather"])
def test_sparse_path_only_on_one_row(exported, mode):
    """SparseLinear (``all``) and the gather behind threshold_prefill, each inside If(one row): a one-token step
    takes them (thresholded in both modes), several tokens the original MatMul on the prefill mask."""
    import onnx_ir as ir

    from sparsec.backends.onnxruntime.runtime import onnx_session
    from sparsec.backends.onnxruntime.sparse import apply_sparse_kernels, thresholded_linears

    _, result, path = exported
    model = ir.load(str(path))
    found = thresholded_linears(model)
    assert len(found) == 14 and all(tl.prefill for tl in found)
    info = apply_sparse_kernels(model, result.program, mode)
    assert [e["kernel"] for e in info["layers"]] == ["sparse" if mode == "all" else "gather"] * 14
    assert all(0.4 < e["sparsity"] < 0.6 for e in info["layers"]), info  # a thresholded token's, not the prefill's
    ifs = [n for n in model.graph if n.op_type == "If"]
    inner = [m.op_type for n in ifs for m in n.attributes["then_branch"].value]
    assert len(ifs) == 14 and inner.count("SparseLinear") == (14 if mode == "all" else 0)
    session = onnx_session(ir.to_proto(model).SerializeToString(), custom_ops=mode == "all")
    for feed in _feeds():
        want = run_program(result.program, feed)[0]
        got = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in feed.items()})[0])
        torch.testing.assert_close(got, want, **TOL)
