"""Frontend: every MODEL kind loads and captures; module paths on nodes; failures name the module."""
import pytest
import torch
from torch import nn

import sparsec
from sparsec.errors import SparsecError
from sparsec.frontend import capture, load_model
from sparsec.graph import module_path


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), DataDependent())

    def forward(self, x):
        return self.inner(x)


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # a Python branch on a tensor value: torch.export cannot capture it
            return x
        return -x


def test_every_call_node_knows_its_module_path():
    captured = capture(load_model(Net().eval(), (torch.randn(2, 5, 8),)))
    gm = captured.program.module()
    paths = {module_path(n) for n in gm.graph.nodes if n.op == "call_function" and n.target in
             (torch.ops.aten.linear.default, torch.ops.aten.gelu.default)}
    assert paths == {"blocks.0.fc1", "blocks.0.act", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.act", "blocks.1.fc2"}


def test_dynamic_batch_and_sequence():
    captured = capture(load_model(Net().eval(), (torch.randn(2, 5, 8),)))
    shape = next(n.meta["val"].shape for n in captured.program.graph.nodes if n.op == "placeholder" and n.name == "x")
    assert [isinstance(d, int) for d in shape] == [False, False, True]
    static = capture(load_model(Net().eval(), (torch.randn(2, 5, 8),)), dynamic=False)
    shape = next(n.meta["val"].shape for n in static.program.graph.nodes if n.op == "placeholder" and n.name == "x")
    assert list(shape) == [2, 5, 8]


def test_pt2_file_round_trip(tmp_path):
    net = Net().eval()
    x = torch.randn(2, 5, 8)
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(net, (x,)), str(path))
    before = path.read_bytes()
    result = sparsec.transform(str(path), "relufy")
    assert result.report["passes"][0]["stats"]["replaced"] == 2
    assert path.read_bytes() == before  # the input is never modified
    net.blocks[0].act = net.blocks[1].act = nn.ReLU()
    assert torch.equal(result.module()(x), net(x))


def test_factory_with_safetensors_weights(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    (tmp_path / "factory_mod.py").write_text(
        "import torch\nfrom tests.test_frontend import Net\n"
        "def build():\n    return Net().eval(), (torch.randn(2, 5, 8),)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    trained = Net().eval()
    save_file(trained.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = load_model("factory_mod:build", weights=str(tmp_path / "w.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.module.state_dict().values(), trained.state_dict().values()))
    by_file = load_model(f"{tmp_path / 'factory_mod.py'}:build")
    assert by_file.kind == "factory" and len(by_file.args) == 1


def test_weights_that_do_not_fit_are_named(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    (tmp_path / "factory_mod2.py").write_text(
        "import torch\nfrom tests.test_frontend import Net\n"
        "def build():\n    return Net().eval(), (torch.randn(2, 5, 8),)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    save_file({"blocks.0.fc1.weight": torch.zeros(16, 8), "extra": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(SparsecError, match=r"does not fit the factory's model: \d+ missing .*1 unexpected \(first: extra\)"):
        load_model("factory_mod2:build", weights=str(tmp_path / "w.safetensors"))


def test_capture_failure_names_the_module():
    with pytest.raises(SparsecError) as info:
        capture(load_model(Branchy().eval(), (torch.randn(2, 4),)))
    message = str(info.value)
    assert "failed in module inner.1 (DataDependent)" in message
    assert "torch.where" in message and "\n" not in message


def test_hf_directory(tmp_path):
    from tests.zoo import build

    model, _ = build("gpt2")
    model.save_pretrained(tmp_path / "gpt2")
    loaded = load_model(str(tmp_path / "gpt2"))
    assert loaded.kind == "hf" and set(loaded.kwargs) == {"input_ids", "attention_mask"}
    info = sparsec.trace(str(tmp_path / "gpt2"))
    assert [a["module"] for a in info["activations"]] == ["transformer.h.0.mlp.act", "transformer.h.1.mlp.act"]
    assert {a["kind"] for a in info["activations"]} == {"NewGELUActivation"}
    assert [lin["module"] for lin in info["linears"] if lin["mlp_intermediate_input"]] == [
        "transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
