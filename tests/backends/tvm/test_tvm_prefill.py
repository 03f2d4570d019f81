"""TVM build of teal{prefill=half|dense}: sparsec::threshold_prefill computed from the symbolic sequence length, the
sparse kernel behind it (a one-token step still skips the dropped inputs' weight rows); parity at 1 and 7 tokens."""
import pytest
import torch

import sparsec
from sparsec.calibration import token_forward_loop
from sparsec.inputs import run_program
from tests.passes.test_teal import prefill_spec
from tests.zoo import build

pytest.importorskip("tvm")
TOL = dict(rtol=1e-4, atol=1e-4)


def test_prefill_build_matches_torch_at_one_and_several_tokens(tmp_path):
    """The zoo Llama after teal 0.5, block 0 prefill=half and block 1 prefill=dense."""
    model, inputs = build("llama")
    ids = torch.randint(0, 256, (16, 16), generator=torch.Generator().manual_seed(1))
    result = sparsec.transform(model, prefill_spec(0.5), example_inputs=inputs, forward_loop=token_forward_loop(ids),
                               measure=False)
    manifest = sparsec.compile(result, str(tmp_path / "b"), threads=2)
    kinds = sorted(k.split("_")[2] for k in manifest["kernels"])
    assert kinds == ["dense", "sparse", "sparse", "sparse", "sparse"]  # lm_head dense; q/k/v, o, gate/up, down sparse
    compiled = sparsec.load_compiled(str(tmp_path / "b"))
    for batch, tokens in ((1, 1), (2, 1), (1, 7), (2, 7)):
        ids = torch.randint(0, 256, (batch, tokens), generator=torch.Generator().manual_seed(tokens))
        feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        want = run_program(result.program, feed)[0]
        got = torch.from_numpy(compiled({k: v.numpy() for k, v in feed.items()})["output_0"])
        torch.testing.assert_close(got, want, **TOL)
        with torch.no_grad():  # the thresholds act at both lengths (block 0 thresholds half of 7 tokens)
            assert (model(**feed)[0] - want).abs().max() > 1e-3


@pytest.mark.slow
def test_prefill_cuda_build(tmp_path):
    """--target cuda: the threshold_prefill op is scheduled by dlight and the generated CUDA source compiles with nvcc
    (no GPU here to run it); the linears after it take the GPU kernel that skips zero inputs."""
    from sparsec.backends.tvm.cuda import require_nvcc

    try:
        require_nvcc()
    except Exception as exc:
        pytest.skip(str(exc))
    model, inputs = build("llama")
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(1))
    result = sparsec.transform(model, prefill_spec(0.5), example_inputs=inputs, forward_loop=token_forward_loop(ids),
                               measure=False)
    manifest = sparsec.compile(result, str(tmp_path / "b"), target="cuda")
    assert sorted(k.split("_")[2] for k in manifest["kernels"]) == ["dense", "sparse", "sparse", "sparse", "sparse"]
