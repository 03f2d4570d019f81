"""strip: after training with jsrelu, db-mlp and regularize, no training-only part is left; the stripped model
equals the trained one, saves, loads and exports to ONNX."""
import torch
from torch import nn

import sparsec
from sparsec.training import REGULARIZE, after_step, regularization_loss


class Block(nn.Module):
    def __init__(self, hidden=8):
        super().__init__()
        self.ln = nn.LayerNorm(hidden)
        self.fc1, self.act, self.fc2 = nn.Linear(hidden, 32), nn.GELU(), nn.Linear(32, hidden)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.ln(x))))


def test_transform_train_strip_save_export(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(4, 6, 8)
    spec = "jsrelu{mixing_steps=2},db-mlp{uplift_steps=2},regularize{kind=tl1 weight=0.1}"
    result = sparsec.transform(Block(), spec, example_inputs=(x,), measure=False)
    gm = result.module()
    opt = torch.optim.Adam(gm.parameters(), lr=1e-2)
    for step in range(3):
        loss = gm(x).pow(2).mean() + regularization_loss(gm, step=step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        after_step(gm, step)
    with torch.no_grad():
        trained = gm(x)
    stripped = sparsec.transform(torch.export.export(gm, (x,)), "strip", example_inputs=(x,), measure=False)
    graph = stripped.program.graph
    assert not any(n.target is REGULARIZE for n in graph.nodes)
    assert not any(str(n.target) == "aten.relu.default" for n in graph.nodes)  # mixing complete: folded
    assert sorted(k for k in dict(stripped.program.named_buffers()) if k.startswith("sparsec")) == [
        "sparsec_db_mlp.beta0"]  # the frozen LayerNorm bias stays; training options and taps are gone
    assert stripped.report["passes"][0]["stats"] == {"taps_removed": 1, "holders_stripped": 2}
    with torch.no_grad():
        torch.testing.assert_close(stripped.module()(x), trained, rtol=1e-6, atol=1e-6)
    sparsec.save(stripped, str(tmp_path / "art"))
    with torch.no_grad():
        torch.testing.assert_close(sparsec.load(str(tmp_path / "art"))(x), trained, rtol=1e-6, atol=1e-6)
    report = sparsec.export_onnx(str(tmp_path / "art"), str(tmp_path / "m.onnx"), verify=True)
    assert (tmp_path / "m.onnx").exists() and report is not None
