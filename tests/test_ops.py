"""sparsec::threshold: values, exactness at t <= 0, fake kernel under torch.export, save/load/re-export, autograd."""
import io

import torch

import sparsec.ops  # noqa: F401
from sparsec.ops import THRESHOLD


class _Net(torch.nn.Module):
    def __init__(self, t: float):
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)
        self.register_buffer("t", torch.tensor(t))

    def forward(self, x):
        return self.lin(torch.ops.sparsec.threshold(x, self.t))


def test_values_and_exactness():
    x = torch.tensor([-2.0, -0.5, -0.0, 0.0, 0.25, 0.5, 3.0, float("inf"), float("-inf"), float("nan")])
    y = torch.ops.sparsec.threshold(x, torch.tensor(0.5))
    want = torch.tensor([-2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, float("inf"), float("-inf"), float("nan")])
    assert torch.equal(y[:-1], want[:-1]) and y[-1].isnan()
    for t in (-1.0, 0.0):  # nothing but zeros is zeroed: the same bits, signs of zeros and NaN included
        z = torch.ops.sparsec.threshold(x, torch.tensor(t))
        assert torch.equal(z.view(torch.int32)[:-1], x.view(torch.int32)[:-1]) and z[-1].isnan()
    h = torch.randn(64, dtype=torch.bfloat16)
    assert torch.equal(torch.ops.sparsec.threshold(h, torch.tensor(0.0)), h)


def test_opcheck_and_autograd():
    x = torch.randn(4, 5, requires_grad=True)
    t = torch.tensor(0.3)
    torch.library.opcheck(THRESHOLD, (x, t))
    torch.ops.sparsec.threshold(x, t).sum().backward()
    assert torch.equal(x.grad, (x.detach().abs() > t).float())


def test_export_save_load_reexport():
    m = _Net(0.5).eval()
    x = torch.randn(3, 8)
    ep = torch.export.export(m, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},), strict=False)
    assert sum(n.target is THRESHOLD for n in ep.graph.nodes) == 1
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf).module()
    x2 = torch.randn(5, 8)
    assert torch.equal(loaded(x2), m(x2))
    again = torch.export.export(loaded, (x2,), strict=False)
    assert torch.equal(again.module()(x2), m(x2))


def test_threshold_prefill_positions_opcheck_and_autograd():
    """sparsec::threshold_prefill (teal{prefill=…}): half leaves positions < S // 2, dense every position when S > 1;
    one token is thresholded by both. Passed positions keep their bits; the gradient is the same mask."""
    import pytest

    from sparsec.ops import THRESHOLD_PREFILL

    x, t = torch.randn(2, 5, 16), torch.tensor(0.3)
    for mode, tokens, dense in (("half", 5, 2), ("half", 1, 0), ("dense", 5, 5), ("dense", 1, 0)):
        v = x[:, :tokens].clone().requires_grad_()
        y = torch.ops.sparsec.threshold_prefill(v, t, mode)
        keep = v.detach().abs() > t
        keep[:, :dense] = True
        assert torch.equal(y, v * keep) and torch.equal(y[:, :dense], v[:, :dense])
        assert (y[:, dense:] == 0).any(-1).all()
        y.sum().backward()
        assert torch.equal(v.grad, keep.float())
        torch.library.opcheck(THRESHOLD_PREFILL, (v, t, mode))
    with pytest.raises(RuntimeError, match="mode must be one of \\('half', 'dense'\\), got 'all'"):
        torch.ops.sparsec.threshold_prefill(x, t, "all")
    with pytest.raises(RuntimeError, match="x needs a token axis"):
        torch.ops.sparsec.threshold_prefill(x[0, 0], t, "half")
