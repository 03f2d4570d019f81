"""db-mlp: zeroth biases per position, clipping and restricted LayerNorm after after_step, on a LayerNorm block and
Llama (RMSNorm)."""
import pytest
import torch
from torch import nn

import sparsec
from sparsec.training import after_step
from tests.zoo import build


class Block(nn.Module):
    """A post-attention-style MLP block: LayerNorm → fc1 → ReLU → fc2, plus the residual."""

    def __init__(self, hidden=8):
        super().__init__()
        self.ln = nn.LayerNorm(hidden)
        self.fc1, self.act, self.fc2 = nn.Linear(hidden, 32), nn.ReLU(), nn.Linear(32, hidden)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.ln(x))))


def _train_steps(gm, x, steps, lr=1.0):
    opt = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        gm(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        after_step(gm, step)


def _transform(spec, x):
    torch.manual_seed(0)
    model = Block()
    with torch.no_grad():
        model.ln.weight.uniform_(-0.8, 0.8)  # |γ| < 1, some negative: the restriction has work to do
    return model, sparsec.transform(model, spec, example_inputs=(x,), measure=False)


def test_finetune_is_bit_exact_then_clips_and_lifts():
    x = torch.randn(4, 6, 8)
    model, result = _transform("db-mlp{uplift_steps=4 c=0.1}", x)
    assert (model.ln.weight.abs() < 1).all()
    gm = result.module()
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    holder = gm.sparsec_db_mlp
    assert holder.bias0.shape == (6, 8) and not holder.bias0.any()
    beta = holder.beta0.clone()  # frozen: a buffer, not a parameter
    assert "sparsec_db_mlp.beta0" in dict(gm.named_buffers())
    opt = torch.optim.SGD(gm.parameters(), lr=5.0)
    for step in range(5):
        gm(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        before = holder.gamma0.detach().clone()
        after_step(gm, step)
        gamma, lift = holder.gamma0.detach(), min((step + 1) / 4, 1.0)
        torch.testing.assert_close(gamma, before.sign() * before.abs().clamp(min=lift))  # |γ| >= lift, same sign
        assert bool((holder.bias0.abs() <= 0.1 * gamma.abs()).all()) and holder.bias0.abs().max() > 0
    assert torch.equal(holder.beta0, beta) and bool((gamma.abs() >= 1.0).all())


def test_scratch_drops_the_norm_bias_and_clamps_gamma():
    x = torch.randn(4, 6, 8)
    _, result = _transform("db-mlp{mode=scratch}", x)
    gm = result.module()
    names = dict(gm.named_parameters())
    assert "ln.bias" not in names and "ln.weight" not in names and "sparsec_db_mlp.gamma0" in names
    _train_steps(gm, x, 2)
    assert bool((gm.sparsec_db_mlp.gamma0 >= 1.0).all())
    assert bool((gm.sparsec_db_mlp.bias0.abs() <= 0.1 * gm.sparsec_db_mlp.gamma0 + 1e-7).all())


def test_llama_rmsnorm_zeroth_biases_with_jsrelu_and_shorter_sequences():
    model, inputs = build("llama", hidden_act="relu")
    result = sparsec.transform(model, "jsrelu{mixing_steps=10},db-mlp{positions=16}", example_inputs=inputs,
                               measure=False)
    layers = [e for e in result.report["layers"] if e["op"] == "db-mlp"]
    assert [(e["module"], e["norm"]) for e in layers] == [
        ("model.layers.0.mlp", "model.layers.0.post_attention_layernorm"),
        ("model.layers.1.mlp", "model.layers.1.post_attention_layernorm")]
    gm = result.module()
    with torch.no_grad():
        ref = model(**inputs).logits
        assert torch.equal(gm(**inputs)[0], ref)
        short = {k: v[:, :5] for k, v in inputs.items()}  # the bias is sliced to the sequence length
        assert torch.equal(gm(**short)[0], model(**short).logits)
    gm(**inputs)[0].pow(2).mean().backward()
    assert gm.sparsec_db_mlp.bias0.grad.abs().sum() > 0


def test_no_norm_before_the_mlp(capsys):
    from sparsec.cli import main
    from sparsec.errors import UsageError

    class NoNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    with pytest.raises(UsageError, match=r"^pass 'db-mlp' \(1st of 1\) failed: db-mlp: no MLP reads the output of a"):
        sparsec.transform(NoNorm(), "db-mlp", example_inputs=(torch.randn(2, 3, 8),), measure=False)
    with pytest.raises(SystemExit) as exc:
        main(["pipeline", "show", "db-mlp{c=0}"])
    err = capsys.readouterr().err.strip().splitlines()[0]
    assert exc.value.code == 2 and err.endswith("bad value 0.0 for option 'c' of pass 'db-mlp': expected 0.0 < c")


def test_phi3_fused_gate_up_mlp_gets_zeroth_biases():
    model, inputs = build("phi3")
    result = sparsec.transform(model, "db-mlp", example_inputs=inputs, measure=False)
    assert [(e["module"], e["norm"]) for e in result.report["layers"]] == [
        ("model.layers.0.mlp", "model.layers.0.post_attention_layernorm"),
        ("model.layers.1.mlp", "model.layers.1.post_attention_layernorm")]
    with torch.no_grad():
        assert torch.equal(result.module()(**inputs)[0], model(**inputs).logits)
