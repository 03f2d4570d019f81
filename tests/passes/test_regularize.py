"""regularize: penalty values against the formulas, gradients, schedules, tap placement, and its errors."""
import math

import pytest
import torch
from torch import nn

import sparsec
from sparsec.training import REGULARIZE, regularization_loss, schedule_weight
from benchmarks.lenet import LeNet5
from tests.zoo import build
from tests.cli_helpers import run_cli


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _transformed(spec, model=None, x=None):
    torch.manual_seed(0)
    model = model or MLP()
    x = torch.randn(6, 8) if x is None else x
    result = sparsec.transform(model, spec, example_inputs=(x,), measure=False)
    return model, x, result.module(), result


def _taps(program):
    return sum(1 for n in program.graph.nodes if n.op == "call_function" and n.target is REGULARIZE)


def _tl1(x, a):
    return ((a + 1) * x.abs() / (a + x.abs())).sum()


def test_l1_equals_the_formula_summed_and_normalized():
    model, x, gm, _ = _transformed("regularize{kind=l1 weight=1 normalize=false}")
    out = gm(x)
    h = torch.relu(model.fc1(x))
    assert torch.equal(out, model(x))  # the tap is an identity
    torch.testing.assert_close(regularization_loss(gm), h.abs().sum())
    _, _, gm2, _ = _transformed("regularize{kind=l1 weight=0.5}")
    gm2(x)
    torch.testing.assert_close(regularization_loss(gm2), 0.5 * h.abs().sum() / h.numel())


@pytest.mark.parametrize("a", [0.1, 1.0, 10.0])
def test_tl1_equals_the_formula(a):
    model, x, gm, _ = _transformed(f"regularize{{kind=tl1 a={a} weight=1 normalize=false}}")
    gm(x)
    torch.testing.assert_close(regularization_loss(gm), _tl1(torch.relu(model.fc1(x)), a))


def test_tl1_limits_count_nonzeros_and_l1():
    """a → 0: the number of non-zeros; a → ∞: L1 (DSTF)."""
    model, x, gm, _ = _transformed("regularize{kind=tl1 a=1e-7 weight=1 normalize=false}", x=torch.randn(64, 8))
    gm(x)
    h = torch.relu(model.fc1(x)).double()
    nonzeros = int((h != 0).sum())
    assert 0 < nonzeros < h.numel()
    assert abs(regularization_loss(gm).item() - nonzeros) / nonzeros < 1e-4
    _, _, gm2, _ = _transformed("regularize{kind=tl1 a=1e9 weight=1 normalize=false}", x=x)
    gm2(x)
    assert abs(regularization_loss(gm2).detach().item() - float(h.abs().sum())) / float(h.abs().sum()) < 1e-5


def test_gradients_reach_the_parameters_and_match_autograd():
    model, x, gm, _ = _transformed("regularize{kind=tl1 a=0.5 weight=2}")
    gm(x)
    regularization_loss(gm).backward()
    ref = 2 * _tl1(torch.relu(model.fc1(x)), 0.5) / (6 * 32)
    ref.backward()
    grads = dict(gm.named_parameters())
    torch.testing.assert_close(grads["fc1.weight"].grad, model.fc1.weight.grad)
    torch.testing.assert_close(grads["fc1.bias"].grad, model.fc1.bias.grad)
    assert grads["fc2.weight"].grad is None or not grads["fc2.weight"].grad.any()
    with torch.no_grad():
        gm(x)
    assert not regularization_loss(gm).requires_grad  # a forward without autograd records values only


def test_weights_target_penalises_every_weight_layer():
    model, x, gm, result = _transformed("regularize{target=weights scope=all weight=1 normalize=false}")
    assert _taps(result.program) == 2
    gm(x)
    loss = regularization_loss(gm)
    torch.testing.assert_close(loss, model.fc1.weight.abs().sum() + model.fc2.weight.abs().sum())
    loss.backward()
    torch.testing.assert_close(dict(gm.named_parameters())["fc2.weight"].grad, model.fc2.weight.sign())


def test_llama_taps_the_mlp_intermediates_bit_exact():
    model, inputs = build("llama", hidden_act="relu")
    with torch.no_grad():
        ref = model(**inputs).logits
    result = sparsec.transform(model, "regularize", example_inputs=inputs, measure=False)
    assert _taps(result.program) == 2
    assert [e["module"] for e in result.report["layers"]] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    with torch.no_grad():
        assert torch.equal(result.module()(**inputs)[0], ref)


def test_lenet_scope_all_taps_every_relu_map():
    _, x, gm, result = _transformed("regularize{scope=all kind=tl1}", model=LeNet5(), x=torch.rand(2, 1, 32, 32))
    assert [e["module"] for e in result.report["layers"]] == ["act1", "act2", "act3", "act4"]
    _, _, _, mlp = _transformed("regularize", model=LeNet5(), x=x)
    assert [e["module"] for e in mlp.report["layers"]] == ["act3", "act4"]  # the MLP intermediates (inputs of fc2, fc3)
    _, _, _, weights = _transformed("regularize{target=weights}", model=LeNet5(), x=x)
    assert [e["module"] for e in weights.report["layers"]] == ["fc1", "fc2", "fc3"]  # produce or read them
    _, _, _, every = _transformed("regularize{target=weights scope=all}", model=LeNet5(), x=x)
    assert [e["module"] for e in every.report["layers"]] == ["conv1", "conv2", "fc1", "fc2", "fc3"]


PEAKS, ENDS = [0.1, 0.5, 0.5, 2.0], [100, 300, 400, 600]


def _progressive(step):
    return schedule_weight("progressive", 1.0, step, peaks=PEAKS, ends=ENDS)


def test_progressive_schedule_at_stage_starts_midpoints_and_ends():
    assert _progressive(0) == _progressive(100) == 0.1  # warm-up: the first peak up to its end step
    assert _progressive(300) == 0.5 and _progressive(600) == 2.0 and _progressive(10_000) == 2.0
    assert _progressive(200) == pytest.approx(0.3)  # midpoint of a sine stage: halfway
    assert _progressive(350) == 0.5  # equal peaks: a constant stage
    assert _progressive(500) == pytest.approx(1.25)
    t = 150  # a quarter into stage 2: η = (sin(-π/2 + π/4) + 1) / 2
    assert _progressive(t) == pytest.approx(0.1 + (math.sin(-math.pi / 4) + 1) / 2 * 0.4)
    assert schedule_weight("linear", 2.0, 25, warmup_steps=100) == 0.5
    assert schedule_weight("linear", 2.0, 250, warmup_steps=100) == 2.0
    assert schedule_weight("constant", 2.0, 7) == 2.0


def test_regularization_loss_follows_the_schedule():
    spec = "regularize{weight=2 normalize=false schedule=progressive peaks={0.1,0.5,0.5,2.0} ends={100,300,400,600}}"
    model, x, gm, result = _transformed(spec)
    assert result.pipeline.canonical().count("peaks={0.1,0.5,0.5,2.0}") == 1
    gm(x)
    base = torch.relu(model.fc1(x)).abs().sum()
    for step in (0, 200, 300, 500, 700):
        torch.testing.assert_close(regularization_loss(gm, step=step), 2 * _progressive(step) * base)


def test_yaml_numbers_are_accepted():
    from sparsec.passes.regularize import RegularizeConfig

    cfg = RegularizeConfig(schedule="progressive", peaks=[0.005, 0.05], ends=[10, 20])
    assert cfg.peaks == ["0.005", "0.05"] and cfg.ends == ["10", "20"]


@pytest.mark.parametrize("spec, message", [
    ("regularize{kind=l3}", "bad value 'l3' for option 'kind' of pass 'regularize': expected one of l1, tl1"),
    ("regularize{weight=-1}", "bad value -1.0 for option 'weight' of pass 'regularize': expected 0.0 <= weight"),
    ("regularize{kind=tl1 a=0}", "bad value 0.0 for option 'a' of pass 'regularize': expected 0.0 < a"),
    ("regularize{schedule=progressive peaks={1,2} ends={10}}", "regularize: schedule=progressive needs peaks"
     " and ends of equal, non-zero length (got 2 peaks and 1 ends), e.g. peaks={0.1,1} ends={100,200}"),
    ("regularize{schedule=progressive peaks={1,2} ends={20,10}}", "regularize: ends must be non-negative and"
     " strictly increasing (got {20,10})"),
    ("regularize{peaks={1}}", "regularize: peaks and ends apply to schedule=progressive only (schedule is"
     " constant); remove them or set schedule=progressive"),
    ("regularize{schedule=linear}", "regularize: schedule=linear needs warmup_steps > 0 (the steps over which"
     " λ rises)"),
], ids=["unknown-kind", "negative-weight", "a-zero", "unequal-stages", "decreasing-ends", "peaks-not-progressive",
        "linear-no-warmup"])
def test_bad_options(capsys, spec, message):
    code, _, err = run_cli(capsys, "pipeline", "show", spec)
    err = err.strip()
    first = err.splitlines()[0]
    assert code == 2 and first.startswith("error: ") and first.endswith(message), (code, err)


def test_loss_before_forward_and_without_taps():
    from sparsec.errors import SparsecError, UsageError

    _, _, gm, _ = _transformed("regularize")
    with pytest.raises(SparsecError, match="^regularization_loss called before any forward pass: run the model on a"
                       " batch first"):
        regularization_loss(gm)
    with pytest.raises(UsageError, match="^regularization_loss: the model has no regularize taps"):
        regularization_loss(MLP())
    _, x, gm2, _ = _transformed("regularize{schedule=linear warmup_steps=10}")
    gm2(x)
    with pytest.raises(UsageError, match="the linear schedule needs the optimiser step"):
        regularization_loss(gm2)
