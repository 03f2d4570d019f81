"""jsrelu: J-SquaredReLU value and derivative, ReLU mixing advanced by after_step, strip, on a small MLP and Llama."""
import pytest
import torch
from torch import nn

import sparsec
from sparsec.training import after_step
from tests.zoo import build


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _hidden(spec):
    """The activation of the transformed MLP, probed through fc1 = identity-like and fc2 = a selector."""
    torch.manual_seed(0)
    model = MLP()
    with torch.no_grad():  # fc1 passes x[:, 0] to every unit with a different scale; fc2 reads unit 0 only
        model.fc1.weight.zero_()
        model.fc1.weight[:, 0] = 1.0
        model.fc1.bias.zero_()
        model.fc2.weight.zero_()
        model.fc2.weight[0, 0] = 1.0
        model.fc2.bias.zero_()
    result = sparsec.transform(model, spec, example_inputs=(torch.randn(8, 4),), measure=False)
    return result.module()


def _f(gm, x):
    inp = torch.zeros(len(x), 4)
    inp[:, 0] = x
    return gm(inp)[:, 0]


X = torch.tensor([-3.0, -1.0, -1e-3, 0.0, 1e-3, 0.5, 1.0, 2.5])


def test_value_and_derivative_match_the_formulas():
    gm = _hidden("jsrelu")
    assert sum(n.target is torch.ops.aten.relu.default for n in gm.graph.nodes) == 0
    x = X.clone().requires_grad_(True)
    y = _f(gm, x)
    torch.testing.assert_close(y, torch.where(X >= 0, X * X / 2 + X, 0.0))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.where(X >= 0, X + 1, 0.0))
    assert x.grad[3] == 1.0  # the jump at 0: derivative 1 at x = 0


def test_mixing_moves_from_relu_to_jsrelu_over_mixing_steps():
    gm = _hidden("jsrelu{mixing_steps=4}")
    relu, js = torch.relu(X), torch.where(X >= 0, X * X / 2 + X, 0.0)
    with torch.no_grad():
        assert torch.equal(_f(gm, X), relu)  # k = 0 before the first step
        for step in range(6):
            after_step(gm, step)
            k = min((step + 1) / 4, 1.0)
            torch.testing.assert_close(_f(gm, X), (1 - k) * relu + k * js)
    assert float(gm.sparsec_jsrelu.mix) == 1.0
    stripped = sparsec.transform(torch.export.export(gm, (torch.randn(8, 4),)), "strip",
                                 example_inputs=(torch.randn(8, 4),), measure=False)
    names = [str(n.target) for n in stripped.program.graph.nodes]
    assert "aten.relu.default" not in names and not any("sparsec" in k for k in dict(stripped.program.named_buffers()))
    with torch.no_grad():
        torch.testing.assert_close(_f(stripped.module(), X), js)


def test_llama_mlp_activations_replaced_gradients_flow():
    model, inputs = build("llama", hidden_act="relu")
    result = sparsec.transform(model, "jsrelu", example_inputs=inputs)
    assert result.report["passes"][0]["stats"]["replaced"] == 2
    assert [e["module"] for e in result.report["layers"]] == ["model.layers.0.mlp.act_fn", "model.layers.1.mlp.act_fn"]
    assert result.report["effect"]["transformed"]["mlp_layers"] == 2  # still an MLP intermediate for measurement
    gm = result.module()
    out = gm(**inputs)[0]
    out.float().pow(2).mean().backward()
    grads = {k: p.grad for k, p in gm.named_parameters()}
    assert grads["model.layers.0.mlp.gate_proj.weight"].abs().sum() > 0


def test_bad_mixing_steps(capsys):
    from sparsec.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["pipeline", "show", "jsrelu{mixing_steps=-1}"])
    err = capsys.readouterr().err.strip().splitlines()[0]
    assert exc.value.code == 2 and err.endswith("bad value -1 for option 'mixing_steps' of pass 'jsrelu': expected"
                                                " 0 <= mixing_steps"), err
