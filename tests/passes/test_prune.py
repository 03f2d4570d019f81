"""prune and fold: weight masks on a small conv net and the Hugging Face zoo; training, folding, ONNX export."""
import re

import pytest
import torch
from torch import nn

import sparsec
from sparsec.errors import UsageError
from sparsec.frontend import capture, load_model
from sparsec.passes.base import PassContext
from sparsec.passes.fold import fold_masks
from sparsec.passes.prune import PruneConfig, PruneMasks, prune
from sparsec.training import after_step
from tests.cli_helpers import without_progress
from tests.zoo import build

aten = torch.ops.aten


class ConvNet(nn.Module):
    """Two convolutions and two linears; every input dimension is a multiple of 4."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 8, 3), nn.Conv2d(8, 16, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


LAYERS = ["conv1", "conv2", "fc1", "fc2"]


def _net():
    torch.manual_seed(0)
    return ConvNet().eval(), torch.randn(2, 4, 10, 10)


def _weights(module) -> dict[str, torch.Tensor]:
    params = dict(module.named_parameters())
    return {name: params[f"{name}.weight"].detach() for name in LAYERS}


def _input_last(w: torch.Tensor, in_out: bool = False) -> torch.Tensor:
    """The weight with the output dimension first and the input dimension last (conv: input channels last)."""
    return w.t() if in_out else w.movedim(1, -1) if w.dim() > 2 else w


def _groups_have_zeros(w: torch.Tensor, n: int, m: int) -> bool:
    groups = w.reshape(-1, m)
    return bool(((groups == 0).sum(1) >= m - n).all())


def _mask_nodes(gm) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.mul.Tensor
            and all(a.op == "get_attr" for a in n.args)]


@pytest.mark.parametrize("sparsity", [0.3, 0.55])
def test_unstructured_per_layer_zeros_the_smallest(sparsity):
    net, x = _net()
    before = {k: v.clone() for k, v in _weights(net).items()}
    result = sparsec.transform(net, f"prune{{sparsity={sparsity}}}", example_inputs=(x,), measure=False)
    after = _weights(result.module())
    for name in LAYERS:
        w, orig = after[name], before[name]
        zero = w == 0
        assert abs(int(zero.sum()) - sparsity * w.numel()) <= 1, name
        assert orig[zero].abs().max() <= orig[~zero].abs().min(), name
        assert torch.equal(w[~zero], orig[~zero])
        assert torch.equal(_weights(net)[name], orig)  # the user's model is not modified
    entries = result.report["layers"]
    assert [e["module"] for e in entries] == LAYERS
    assert all(e["op"] == "prune" and e["pattern"] == "unstructured" for e in entries)


def test_global_ratio_picks_the_globally_smallest():
    net, x = _net()
    before = _weights(net)
    result = sparsec.transform(net, "prune{sparsity=0.6 scope=global}", example_inputs=(x,), measure=False)
    after = _weights(result.module())
    kept = torch.cat([before[k][after[k] != 0].abs() for k in LAYERS])
    dropped = torch.cat([before[k][after[k] == 0].abs() for k in LAYERS])
    total = sum(w.numel() for w in after.values())
    assert abs(dropped.numel() - 0.6 * total) <= 1
    assert dropped.max() <= kept.min()
    per_layer = [e["weight_sparsity"] for e in result.report["layers"]]
    assert max(per_layer) - min(per_layer) > 0.1  # not the same ratio in every layer
    assert result.report["passes"][0]["stats"]["weight_sparsity"] == pytest.approx(0.6, abs=1 / total)


def test_absolute_threshold_tau():
    net, x = _net()
    before = _weights(net)
    result = sparsec.transform(net, "prune{tau=0.08}", example_inputs=(x,), measure=False)
    for name, w in _weights(result.module()).items():
        assert torch.equal(w == 0, before[name].abs() < 0.08), name


def test_n_m_on_convolutions_and_linears():
    net, x = _net()
    before = _weights(net)
    result = sparsec.transform(net, "prune{pattern=2:4}", example_inputs=(x,), measure=False)
    for name, w in _weights(result.module()).items():
        canon, orig = _input_last(w), _input_last(before[name])
        assert _groups_have_zeros(canon, 2, 4), name
        kept = (canon != 0).reshape(-1, 4)
        mags = orig.abs().reshape(-1, 4)  # the two kept weights of a group are its two largest
        assert torch.equal(torch.where(kept, mags, torch.inf).min(1).values >= torch.where(~kept, mags, -1).max(1)
                           .values, torch.ones(mags.shape[0], dtype=torch.bool))
    result = sparsec.transform(net, "prune{pattern=1:8 targets={fc1,fc2}}", example_inputs=(x,), measure=False)
    after = _weights(result.module())
    assert _groups_have_zeros(after["fc2"], 1, 8) and int((after["fc2"] == 0).sum()) == 8 * 32 * 7 // 8
    assert torch.equal(after["conv1"], before["conv1"])


@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_channel_zeroes_whole_rows_with_the_smallest_norms(sparsity):
    net, x = _net()
    before = _weights(net)
    result = sparsec.transform(net, f"prune{{pattern=channel sparsity={sparsity}}}", example_inputs=(x,),
                               measure=False)
    for name, w in _weights(result.module()).items():
        rows, orig = w.reshape(w.shape[0], -1), before[name].reshape(w.shape[0], -1)
        dead = (rows == 0).all(1)
        assert torch.equal(dead, (rows == 0).any(1)), name  # rows are all zero or untouched
        assert int(dead.sum()) == round(sparsity * rows.shape[0]), name
        norms = orig.norm(dim=1)
        assert norms[dead].max() <= norms[~dead].min(), name


def test_sparsity_zero_is_bit_exact_on_the_conv_net():
    net, x = _net()
    result = sparsec.transform(net, "prune{sparsity=0}", example_inputs=(x,), measure=False)
    assert len(_mask_nodes(result.module())) == 4
    for batch in (x, torch.randn(5, 4, 10, 10)):
        with torch.no_grad():
            assert torch.equal(result.module()(batch), net(batch))


def test_report_counts_weights_flops_and_bytes():
    net, x = _net()
    result = sparsec.transform(net, "prune{pattern=2:4}", example_inputs=(x,))
    entries = {e["module"]: e for e in result.report["layers"]}
    # output positions per use on the example batch of 2: conv1 2·8·8, conv2 2·8·8, fc1 and fc2 2
    positions = {"conv1": 128, "conv2": 128, "fc1": 2, "fc2": 2}
    numel = {"conv1": 8 * 4 * 9, "conv2": 16 * 8 * 9, "fc1": 32 * 16, "fc2": 8 * 32}
    for name, e in entries.items():
        assert e["zeros"] == numel[name] // 2 and e["weight_sparsity"] == 0.5
        assert e["flops"] == numel[name] * positions[name]
        assert e["flops_removed"] == numel[name] // 2 * positions[name]
        assert e["bytes_removed"] == numel[name] // 2 * 4
    stats = result.report["passes"][0]["stats"]
    assert stats["layers_pruned"] == 4 and stats["weight_sparsity"] == 0.5
    assert stats["flops_removed"] == sum(e["flops_removed"] for e in entries.values())
    assert stats["model_flops"] == stats["flops"] and stats["flops_removed_fraction"] == 0.5
    assert "zeros in the weights" in stats["definition"]
    assert result.report["effect"]["transformed"]["weight_layers"] == 4  # masked weights are still weight layers


def test_training_keeps_pruned_weights_at_zero():
    """10 Adam steps with weight decay on the transformed module, then on a live mask holder with after_step."""
    net, x = _net()
    result = sparsec.transform(net, "prune{sparsity=0.5}", example_inputs=(x,), measure=False)
    for module in (result.module(), _pruned_gm(net, x)):
        masks = {k.rsplit(".", 1)[-1][:-len("_weight")]: v for k, v in module.named_buffers()}
        start = {k: v.clone() for k, v in _weights(module).items()}
        opt = torch.optim.Adam(module.parameters(), lr=1e-2, weight_decay=0.1)
        for step in range(10):
            loss = module(torch.randn(8, 4, 10, 10)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            after_step(module, step)
        for name, w in _weights(module).items():
            assert torch.equal(w[~masks[name]], torch.zeros(int((~masks[name]).sum()))), name
            assert not torch.equal(w[masks[name]], start[name][masks[name]]), name  # the kept weights trained


def _pruned_gm(net, x, cfg=PruneConfig(sparsity=0.5)):
    gm = capture(load_model(net, (x,))).program.module()
    return prune(gm, cfg, PassContext((x,), {})).gm


def test_after_step_writes_the_zeros_back():
    net, x = _net()
    gm = _pruned_gm(net, x)
    holder = gm.sparsec_prune
    assert isinstance(holder, PruneMasks)
    with torch.no_grad():
        gm.fc1.weight.fill_(1.0)  # e.g. an optimiser or a checkpoint load wrote into pruned positions
    after_step(gm, 0)
    assert torch.equal(gm.fc1.weight == 0, ~holder.fc1_weight)


def test_after_step_keeps_zeros_in_a_loaded_artifact(tmp_path):
    """prune -> save -> load, the dense weights written back into the pruned positions (e.g. resuming from a dense
    checkpoint), 10 Adam steps with weight decay: after_step finds the weights again and keeps them zero."""
    model, inputs = build("llama")
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    result = sparsec.transform(model, "prune{sparsity=0.5}", example_inputs=inputs, measure=False)
    sparsec.save(result, str(tmp_path / "m"))
    loaded = sparsec.load(str(tmp_path / "m"))
    holder = dict(loaded.named_modules())["sparsec_prune"]
    pruned = {e["parameter"]: getattr(holder, re.sub(r"\W", "_", e["parameter"])) for e in result.report["layers"]}
    params = dict(loaded.named_parameters())
    assert len(pruned) == 15
    with torch.no_grad():
        for name in pruned:
            params[name].copy_(dense[name])
    opt = torch.optim.Adam(loaded.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(10):
        ids = torch.randint(0, 256, (2, 12))
        loss = loaded(input_ids=ids, attention_mask=torch.ones_like(ids))[0].square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        after_step(loaded, step)
    for name, mask in pruned.items():
        w = params[name].detach()
        assert int((~mask).sum()) > 0 and bool((w[~mask] == 0).all()), name
        assert not torch.equal(w[mask], dense[name][mask]), name  # the kept weights trained


def test_fold_removes_the_masks_and_keeps_outputs():
    net, x = _net()
    pruned = sparsec.transform(net, "prune{pattern=2:4}", example_inputs=(x,), measure=False)
    want = pruned.module()(x)
    folded = sparsec.transform(net, "prune{pattern=2:4},fold", example_inputs=(x,), measure=False)
    assert folded.report["passes"][1]["stats"] == {"masks_folded": 4}
    again = sparsec.transform(pruned.program, "fold", measure=False)  # a saved / loaded program folds as well
    stripped = sparsec.transform(pruned.program, "strip", measure=False)  # strip restores the holder and folds
    assert stripped.report["passes"][0]["stats"]["holders_stripped"] == 1
    for result in (folded, again, stripped):
        module = result.module()
        assert not _mask_nodes(module) and not list(module.named_buffers())
        assert torch.equal(module(x), want)
        assert all(_groups_have_zeros(_input_last(w), 2, 4) for w in _weights(module).values())
    gm = _pruned_gm(net, x)  # the strip hook of the mask holder folds the same way
    want = gm(x)
    gm.sparsec_prune.sparsec_strip(gm)
    assert not _mask_nodes(gm) and not hasattr(gm, "sparsec_prune") and torch.equal(gm(x), want)


def test_onnx_export_keeps_the_2_4_zeros(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    net, x = _net()
    result = sparsec.transform(net, "prune{pattern=2:4},fold", example_inputs=(x,), measure=False)
    sparsec.export_onnx(result, str(tmp_path / "m.onnx"), verify=True)
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy())
             for i in onnx.load(str(tmp_path / "m.onnx")).graph.initializer}
    for name, w in _weights(result.module()).items():
        onnx_w = inits[f"{name}.weight"]
        in_out = onnx_w.shape != w.shape  # a linear weight may be stored transposed for MatMul
        assert torch.equal(onnx_w.t() if in_out else onnx_w, w), name
        assert _groups_have_zeros(_input_last(onnx_w, in_out), 2, 4), name


@pytest.fixture(scope="module")
def zoo_2_4():
    """Llama (aten.linear, weights [out, in]) and GPT-2 (Conv1D: aten.addmm, weights [in, out]), pruned 2:4."""
    out = {}
    for arch in ("llama", "gpt2"):
        model, inputs = build(arch)
        out[arch] = (model, inputs, sparsec.transform(model, "prune{pattern=2:4}", example_inputs=inputs,
                                                      measure=False))
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_zoo_2_4_along_the_input_dimension(arch, zoo_2_4):
    model, inputs, result = zoo_2_4[arch]
    params = dict(result.module().named_parameters())
    entries = result.report["layers"]
    assert len(entries) == {"llama": 15, "gpt2": 9}[arch]  # 7 or 4 per block, 2 blocks, and the LM head
    for e in entries:
        w = params[e["parameter"]]
        in_out = arch == "gpt2" and e["module"] != "lm_head"
        assert _groups_have_zeros(_input_last(w, in_out), 2, 4), e["module"]
        assert e["weight_sparsity"] >= 0.5
    out = result.module()(**inputs)[0]
    assert torch.isfinite(out).all()


def test_zoo_sparsity_zero_is_bit_exact():
    model, inputs = build("bert")
    result = sparsec.transform(model, "prune{sparsity=0}", example_inputs=inputs, measure=False)
    assert len(result.report["layers"]) == 13  # 6 per block and the pooler
    for shape in [(2, 12), (1, 5)]:
        ids = torch.randint(0, 256, shape)
        kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with torch.no_grad():
            assert torch.equal(result.module()(**kw)[0], model(**kw)[0])


FACTORY = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.odd, self.fc2 = nn.Linear(8, 10), nn.Linear(10, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.odd(torch.relu(self.fc1(x)))))


def factory():
    return Net(), (torch.randn(2, 8),)
'''

ERRORS = {
    "ratio-1": ("prune{sparsity=1}", "bad value 1.0 for option 'sparsity' of pass 'prune': expected 0.0 <= sparsity"
                " < 1.0"),
    "ratio-negative": ("prune{sparsity=-0.1}", "bad value -0.1 for option 'sparsity' of pass 'prune': expected 0.0"
                       " <= sparsity < 1.0"),
    "n-not-below-m": ("prune{pattern=4:4}", "prune: pattern '4:4' keeps N=4 of every M=4 weights, which prunes"
                      " nothing or everything; valid patterns: unstructured, channel, or N:M with integers"
                      " 0 < N < M (e.g. 2:4)"),
    "n-m-not-integers": ("prune{pattern=2.5:4}", "prune: pattern '2.5:4' is not N:M with integers; valid patterns:"),
    "unknown-pattern": ("prune{pattern=block}", "prune: unknown pattern 'block'; valid patterns: unstructured,"
                        " channel, or N:M"),
    "m-does-not-divide": ("prune{pattern=2:4}", "pass 'prune' (1st of 1) failed: prune: layer 'odd' has 10 inputs,"
                          " not divisible by M=4 of pattern 2:4; ignore it (ignore={odd}) or choose an M that"
                          " divides 10"),
    "target-matches-nothing": ("prune{targets={fc3}}", "pass 'prune' (1st of 1) failed: target 'fc3' of pass"
                               " 'prune' matches no candidate"),
    "tau-with-n-m": ("prune{pattern=2:4 tau=0.1}", "prune: tau applies to pattern=unstructured, not pattern=2:4"),
    "global-with-channel": ("prune{pattern=channel scope=global}", "prune: scope=global applies to"
                            " pattern=unstructured, not pattern=channel; use scope=layer"),
    "pruned-twice": ("prune{targets={fc1}},prune", "pass 'prune' (2nd of 2) failed after prune: prune: the weight of"
                     " layer 'fc1' is already pruned by an earlier prune pass"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_is_one_line_with_exit_2(case, tmp_path, capsys):
    from sparsec.cli import main

    spec, message = ERRORS[case]
    (tmp_path / "net.py").write_text(FACTORY)
    with pytest.raises(SystemExit) as exit_info:
        main(["transform", f"{tmp_path / 'net.py'}:factory", "--pass", spec, "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    err = without_progress(err)  # progress lines may precede the error (docs/errors.md)
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_errors_in_python():
    with pytest.raises(UsageError, match="keeps N=3 of every M=2"):
        PruneConfig(pattern="3:2")
    with pytest.raises(UsageError, match="not N:M with integers"):
        PruneConfig(pattern="a:4")
    assert PruneConfig(pattern=" 2 : 4 ").pattern == " 2 : 4 "
    net, x = _net()
    with pytest.raises(UsageError, match="no linear or convolution layer with a weight parameter matched"):
        sparsec.transform(net, "prune{ignore={ConvNet}}", example_inputs=(x,), measure=False)


def test_masked_weights_keep_their_size_for_later_passes():
    """teal's parameter-weighted sparsity and the report's byte counts read the weight size through the mask."""
    from sparsec.graph import weight_layers, weight_numel

    net, x = _net()
    gm = sparsec.transform(net, "prune{sparsity=0.5}", example_inputs=(x,), measure=False).module()
    sizes = {layer.module: weight_numel(gm, layer) for layer in weight_layers(gm)}
    assert sizes == {name: w.numel() for name, w in _weights(net).items()}
