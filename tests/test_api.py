"""The pass runner: error context, calibration validated first, instruments around passes."""
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import sparsec
from sparsec.config import PassConfig, option
from sparsec.errors import SparsecError, UsageError
from sparsec.instruments import DumpIR
from sparsec.passes.base import PassResult
from sparsec.registry import _REGISTRY, register_pass


@dataclass(frozen=True)
class _BoomConfig(PassConfig):
    """Test pass that fails."""

    when: str = option("always", help="unused")


@dataclass(frozen=True)
class _CalibConfig(PassConfig):
    """Test pass that needs calibration data and counts forward_loop batches."""


@pytest.fixture
def test_passes():
    def boom(gm, cfg, ctx):
        raise ValueError("the graph has no widgets")

    def calib(gm, cfg, ctx):
        seen = []
        ctx.forward_loop(lambda *a, **k: seen.append(1))
        return PassResult(gm, {"batches": len(seen), "after": ctx.previous})

    register_pass("_boom", _BoomConfig)(boom)
    register_pass("_calib", _CalibConfig, needs_calibration=True, after=("relufy",))(calib)
    yield
    _REGISTRY.pop("_boom")
    _REGISTRY.pop("_calib")


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_failing_pass_is_named_with_its_position(test_passes):
    with pytest.raises(SparsecError, match=r"^pass '_boom' \(2nd of 2\) failed after relufy: ValueError: the graph"
                                           r" has no widgets$"):
        sparsec.transform(Mlp().eval(), "relufy,_boom", example_inputs=(torch.randn(2, 4),))


def test_calibration_is_validated_before_anything_runs(test_passes):
    class Exploding(nn.Module):
        def forward(self, x):
            raise AssertionError("must not be captured")

    with pytest.raises(SparsecError, match="pass '_calib' needs calibration data and none was given: pass"
                                           " --calib-data FILE"):
        sparsec.transform(Exploding(), "relufy,_calib", example_inputs=(torch.randn(2, 4),))
    result = sparsec.transform(Mlp().eval(), "relufy,_calib", example_inputs=(torch.randn(2, 4),),
                               forward_loop=lambda model: [model(torch.randn(2, 4)) for _ in range(3)])
    assert result.report["passes"][1]["stats"] == {"batches": 3, "after": ["relufy"]}


def test_ordering_is_validated_not_reordered(test_passes):
    with pytest.raises(UsageError, match="pass 'relufy' must run before '_calib'.*write 'relufy,_calib'"):
        sparsec.transform(Mlp().eval(), "_calib,relufy", example_inputs=(torch.randn(2, 4),), forward_loop=print)


def test_instruments_record_time_nodes_and_dump_ir(tmp_path):
    result = sparsec.transform(Mlp().eval(), "relufy{to=relu2}", example_inputs=(torch.randn(2, 4),),
                               instruments=[DumpIR(str(tmp_path / "ir"))])
    record = result.report["passes"][0]
    assert record["seconds"] >= 0 and record["nodes_after"] == record["nodes_before"] + 1  # silu -> relu, pow
    files = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert files == ["00-input.py", "01-after-relufy.py"]
    assert "aten.silu" in (tmp_path / "ir" / "00-input.py").read_text()
    assert "aten.pow" in (tmp_path / "ir" / "01-after-relufy.py").read_text()


def test_effect_is_measured():
    torch.manual_seed(0)
    result = sparsec.transform(Mlp().eval(), "relufy", example_inputs=(torch.randn(64, 4),))
    effect = result.report["effect"]
    assert effect["dense"]["mlp_intermediate_sparsity"] == 0.0
    assert effect["transformed"]["mlp_layers"] == 1 and effect["transformed"]["weight_layers"] == 2
    assert 0.2 < effect["transformed"]["mlp_intermediate_sparsity"] < 0.8
    assert 0 < effect["output"]["mean_cosine"] <= 1.0 + 1e-6


def test_python_configs_and_overrides():
    from sparsec.pipeline import Pipeline

    cfg = sparsec.RelufyConfig(to="fatrelu", threshold=0.5)
    result = sparsec.transform(Mlp().eval(), [cfg], example_inputs=(torch.randn(2, 4),),
                               overrides=["relufy.threshold=0.25"])
    assert result.pipeline.canonical() == ("relufy{to=fatrelu threshold=0.25 shift=0.0 scope=mlp targets={}"
                                           " ignore={}}")
    assert isinstance(result.pipeline, Pipeline)


def test_forward_argument_named_like_a_builtin():
    """nn.Sequential's forward takes `input`; torch.export names that placeholder `input_1`."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    x = torch.randn(2, 8)
    result = sparsec.transform(model, "relufy", example_inputs=(x,))
    dense = torch.nn.functional.gelu(model[0](x))
    expected = (dense > 0).logical_not().float().mean().item()  # zeros ReLU makes in the MLP intermediate
    assert result.report["effect"]["transformed"]["mlp_intermediate_sparsity"] == pytest.approx(expected)
