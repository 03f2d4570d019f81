"""cats on the Hugging Face zoo (random weights): gate-activation thresholds, calibrated FATReLU, errors."""
import pytest
import torch

import sparsec
from sparsec.calibration import token_forward_loop
from sparsec.errors import UsageError
from sparsec.ops import THRESHOLD
from tests.zoo import RELU_OVERRIDE, build


def _ids(seed, n=32, length=32):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def _thresholds(program):
    return [n for n in program.graph.nodes if n.op == "call_function" and n.target is THRESHOLD]


def test_cats_thresholds_the_gate_activation_of_a_gated_mlp():
    model, inputs = build("llama")
    result = sparsec.transform(model, "cats{sparsity=0.5}", example_inputs=inputs,
                               forward_loop=token_forward_loop(_ids(1), batch_size=16),
                               heldout_loop=token_forward_loop(_ids(2), batch_size=16))
    layers = result.report["layers"]
    assert [e["module"] for e in layers] == ["model.layers.0.mlp.act_fn", "model.layers.1.mlp.act_fn"]
    nodes = _thresholds(result.program)
    assert len(nodes) == 2
    for node in nodes:  # threshold(silu(gate(x))) * up(x)
        assert node.args[0].target is torch.ops.aten.silu.default
        assert [u.target for u in node.users] == [torch.ops.aten.mul.Tensor]
    for e in layers:
        assert e["op"] == "cats" and e["activation"] == "silu" and e["threshold"] > 0
        assert abs(e["measured_sparsity"] - 0.5) <= 0.02 and abs(e["heldout_sparsity"] - 0.5) <= 0.02, e
    assert abs(result.report["sparsity"]["mlp_intermediate"] - 0.5) <= 0.02
    assert result.report["effect"]["dense"]["mlp_intermediate_sparsity"] == 0.0
    # sparsity 0: bit for bit
    zero = sparsec.transform(model, "cats{sparsity=0}", example_inputs=inputs,
                             forward_loop=token_forward_loop(_ids(1, n=2)), measure=False)
    with torch.no_grad():
        assert torch.equal(zero.module()(**inputs)[0], model(**inputs)[0])
    with pytest.raises(UsageError, match=r"cats: no ReLU activation of an MLP \(fatrelu=true\) matched the"
                                         r" targets; relufy the model first"):
        sparsec.transform(model, "cats{fatrelu=true}", example_inputs=inputs, forward_loop=print)


def test_fatrelu_on_an_existing_relu():
    model, inputs = build("bert", **RELU_OVERRIDE["bert"])
    loop = token_forward_loop(_ids(1), batch_size=16)
    result = sparsec.transform(model, "cats{sparsity=0.75 fatrelu=true}", example_inputs=inputs, forward_loop=loop,
                               heldout_loop=token_forward_loop(_ids(2), batch_size=16))
    layers = result.report["layers"]
    assert [e["module"] for e in layers] == [f"encoder.layer.{i}.intermediate.intermediate_act_fn" for i in (0, 1)]
    assert all(e["op"] == "fatrelu" and e["threshold"] > 0 for e in layers)
    assert all(abs(e["heldout_sparsity"] - 0.75) <= 0.02 for e in layers), layers
    # a target below the ReLU's own sparsity (about half) keeps the plain ReLU: threshold 0
    low = sparsec.transform(model, "cats{sparsity=0.2 fatrelu=true}", example_inputs=inputs, forward_loop=loop,
                            measure=False)
    assert [e["threshold"] for e in low.report["layers"]] == [0.0, 0.0]
    with torch.no_grad():
        assert torch.equal(low.module()(**inputs)[0], model(**inputs)[0])
    gpt2, gpt2_inputs = build("gpt2")  # GELU, not gated
    with pytest.raises(UsageError, match=r"cats: no gated MLP .* matched the targets; use cats\{fatrelu=true\}"):
        sparsec.transform(gpt2, "cats", example_inputs=gpt2_inputs, forward_loop=print)


def test_cats_on_a_fused_gate_up_projection_matches_a_hand_thresholded_model():
    """Phi-3: gate_up_proj's output is chunked into gate and up; CATS thresholds act(gate), as a hook would."""
    model, inputs = build("phi3")
    result = sparsec.transform(model, "cats{sparsity=0.5}", example_inputs=inputs, measure=False,
                               forward_loop=token_forward_loop(_ids(1), batch_size=16))
    layers = result.report["layers"]
    assert [e["module"] for e in layers] == ["model.layers.0.mlp.activation_fn", "model.layers.1.mlp.activation_fn"]
    assert all(e["threshold"] > 0 and abs(e["measured_sparsity"] - 0.5) <= 0.02 for e in layers), layers
    hooks = [layer.mlp.activation_fn.register_forward_hook(lambda m, a, out, t=e["threshold"]: out * (out.abs() > t))
             for layer, e in zip(model.model.layers, layers)]
    try:
        with torch.no_grad():
            want = model(**inputs).logits
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(result.module()(**inputs)[0], want)
    zero = sparsec.transform(model, "cats{sparsity=0}", example_inputs=inputs, measure=False,
                             forward_loop=token_forward_loop(_ids(1, n=2)))
    with torch.no_grad():
        assert torch.equal(zero.module()(**inputs)[0], model(**inputs).logits)
