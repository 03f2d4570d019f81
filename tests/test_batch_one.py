"""A factory whose example input has batch 1 (the natural decode example): the batch stays dynamic, so teal's
calibration batches of 4 run; a model that takes batch 1 only is calibrated with batch 1, said in one line."""
import json

import pytest
import torch

from tests.cli_helpers import run_cli

TINY_LM = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up_proj = nn.Linear(d, 2 * d)
        self.down_proj = nn.Linear(2 * d, d)

    def forward(self, h):
        return h + self.down_proj(torch.nn.functional.silu(self.up_proj(self.norm(h))))


class TinyLM(nn.Module):
    def __init__(self, vocab=64, d=32, batch_one=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(2))
        self.head = nn.Linear(d, vocab)
        self.batch_one = batch_one

    def forward(self, input_ids):
        h = self.embed(input_ids)
        if self.batch_one:  # folds the batch into the features: only batch 1 keeps the width
            h = h.transpose(0, 1).reshape(1, input_ids.shape[1], -1)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def factory():
    torch.manual_seed(0)
    return TinyLM(), {"input_ids": torch.randint(0, 64, (1, 8))}


def positional_factory():
    torch.manual_seed(0)
    return TinyLM(), (torch.randint(0, 64, (1, 8)),)


def batch_one_factory():
    torch.manual_seed(0)
    return TinyLM(batch_one=True), {"input_ids": torch.randint(0, 64, (1, 8))}
'''


@pytest.fixture
def tiny(tmp_path):
    (tmp_path / "tinylm.py").write_text(TINY_LM)
    torch.save(torch.randint(0, 64, (16, 8)), tmp_path / "ids.pt")
    return tmp_path


def _transform(capsys, d, factory, out):
    return run_cli(capsys, "transform", f"{d / 'tinylm.py'}:{factory}", "--pass", "teal{sparsity=0.5}", "-o", d / out,
                   "--calib-data", d / "ids.pt", "--seq-len", 8)


def _program(path):
    import sparsec.ops  # noqa: F401  the sparsec:: ops in the program

    return torch.export.load(str(path / "model.pt2")).module()


def test_batch_one_example_keeps_the_batch_dynamic(tiny, capsys):
    code, stdout, err = _transform(capsys, tiny, "factory", "out")
    assert code == 0, err
    teal = json.loads((tiny / "out" / "report.json").read_text())["passes"][0]["stats"]
    assert teal["measured_sparsity"] == pytest.approx(0.5, abs=0.03)
    assert "note:" not in err  # calibration ran with --batch-size 4
    out = _program(tiny / "out")(input_ids=torch.randint(0, 64, (4, 8)))
    assert out.shape == (4, 8, 64)


def test_a_model_of_batch_one_only_is_calibrated_with_batch_one(tiny, capsys):
    code, stdout, err = _transform(capsys, tiny, "batch_one_factory", "out1")
    assert code == 0, err
    notes = [line for line in err.splitlines() if "note:" in line]
    assert len(notes) == 1 and "batch 1" in notes[0] and "--batch-size 1" in notes[0], err
    teal = json.loads((tiny / "out1" / "report.json").read_text())["passes"][0]["stats"]
    assert teal["measured_sparsity"] == pytest.approx(0.5, abs=0.03)
    assert _program(tiny / "out1")(input_ids=torch.randint(0, 64, (1, 8))).shape == (1, 8, 64)


def test_a_positional_example_is_calibrated_positionally(tiny, capsys):
    """The example ``(ids,)`` captures a program of positional inputs: token calibration feeds the ids by position."""
    code, stdout, err = _transform(capsys, tiny, "positional_factory", "out2")
    assert code == 0, err
    teal = json.loads((tiny / "out2" / "report.json").read_text())["passes"][0]["stats"]
    assert teal["measured_sparsity"] == pytest.approx(0.5, abs=0.03)
    assert _program(tiny / "out2")(torch.randint(0, 64, (4, 8))).shape == (4, 8, 64)
