"""quantize: int8 / int4 weights of linear layers and embeddings, on the Hugging Face zoo; order with teal; errors."""
import pytest
import torch
from torch import nn

import sparsec
from sparsec.calibration import token_forward_loop
from sparsec.errors import UsageError
from sparsec.ops import DEQUANTIZE, THRESHOLD, dequantize, pack_int4, unpack_int4
from sparsec.passes.quantize import QuantizeConfig, gptq_weight, quantize_weight
from tests.zoo import build


def _logits(out):
    return out["logits"] if isinstance(out, dict) else out.logits if hasattr(out, "logits") else out[0]


def _dequantized_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is DEQUANTIZE]


@pytest.mark.parametrize("bits,group", [(8, 0), (8, 32), (4, 32), (4, 0)])
def test_quantize_weight_rounds_to_nearest(bits, group):
    torch.manual_seed(1)
    w = torch.randn(24, 64) * torch.rand(24, 1)
    w[3] = 0.0  # an all-zero row: scale 0, values 0
    q, scale, _ = quantize_weight(w, bits, group, torch.float32)
    assert q.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert q.shape == (24, 64 if bits == 8 else 32) and scale.shape == (24, 64 // group if group else 1)
    values = q if bits == 8 else unpack_int4(q)
    qmax = 2 ** (bits - 1) - 1
    assert int(values.abs().max()) == qmax  # the largest magnitude of every group maps to ±qmax
    assert int(values.min()) >= -qmax and torch.equal(values[3], torch.zeros(64, dtype=torch.int8))
    w2 = dequantize(q, scale, bits, group, torch.float32)
    per_weight = scale.repeat_interleave(group or 64, dim=1)
    assert bool(((w2 - w).abs() <= per_weight / 2 * (1 + 1e-6)).all())  # round to nearest: at most half a step
    assert torch.equal(w2[3], torch.zeros(64))


def test_int4_packing_is_the_matmulnbits_layout():
    v = torch.tensor([[-8, 7, 0, -1, 3, -3]], dtype=torch.int8)
    packed = pack_int4(v)
    assert packed.tolist() == [[0 | 15 << 4, 8 | 7 << 4, 11 | 5 << 4]]  # even k low, stored value + 8
    assert torch.equal(unpack_int4(packed), v)


def test_fp16_scales():
    w = torch.randn(8, 64)
    q, scale, _ = quantize_weight(w, 8, 32, torch.float16)
    assert scale.dtype == torch.float16
    assert torch.allclose(dequantize(q, scale, 8, 32, torch.float32), w, atol=float(scale.max()) / 2 * 1.01)


INT4 = "quantize{bits=4 group=32 scale_dtype=float16}"


@pytest.mark.parametrize("arch,dequantized,spec", [("llama", 16, "quantize"), ("llama", 16, INT4),
                                                   ("llama", 16, "quantize{bits=4 group=32 method=rtn}"),
                                                   ("gpt2", 11, INT4), ("gemma3", 23, "quantize"),
                                                   ("gemma3", 23, "quantize{bits=4 group=32 symmetric=false}"),
                                                   ("gpt2", 11, "quantize{symmetric=false}")])
def test_zoo_computes_with_the_dequantized_weights(arch, dequantized, spec, tmp_path):
    """Every linear (LM head included) and embedding reads dequantize(q, scale[, offset]); the program equals the
    Hugging Face model with its weights replaced by the dequantized ones, bit for bit, also after save and load."""
    model, inputs = build(arch)
    ids = inputs["input_ids"]
    result = sparsec.transform(model, spec, example_inputs=(ids,), measure=False)
    gm = result.module()
    assert len(_dequantized_nodes(gm)) == dequantized
    assert not any(p.dim() == 2 for p in gm.parameters())  # no floating-point matrix is left
    entries = result.report["layers"]
    stats = result.report["passes"][0]["stats"]
    assert stats["weights_quantized"] == len(entries)
    assert stats["compression"] == pytest.approx(stats["bytes_before"] / stats["bytes_after"], rel=1e-4)
    bits8 = "bits=4" not in spec
    offsets = "symmetric=false" in spec
    assert stats["compression"] > (3.7 if bits8 and not offsets else 3.5 if bits8 else 5.2 if offsets else 6)
    assert all(0 < e["rel_error"] < (0.01 if bits8 else 0.2) for e in entries)
    assert {e["method"] for e in entries} == {"rtn" if "rtn" in spec else "mse"}
    assert stats["symmetric"] is not offsets and {e["symmetric"] for e in entries} == {not offsets}

    reference = build(arch)[0]
    for e in entries:
        name, k = e["parameter"], e["shape"][1]
        q = getattr(gm, "sparsec_quantize").get_buffer(name.replace(".", "_") + "_q")
        s = getattr(gm, "sparsec_quantize").get_buffer(name.replace(".", "_") + "_scale")
        o = getattr(gm, "sparsec_quantize").get_buffer(name.replace(".", "_") + "_offset") if offsets else None
        bits = 8 if q.shape[1] == k else 4
        w = dequantize(q, s, bits, 0 if s.shape[1] == 1 else k // s.shape[1], torch.float32, o)
        owner = reference.get_submodule(name.rpartition(".")[0])
        with torch.no_grad():  # GPT-2's Conv1D stores [in, out]
            getattr(owner, name.rpartition(".")[2]).copy_(w.t() if type(owner).__name__ == "Conv1D" else w)
    expected = reference(ids).logits
    assert torch.equal(_logits(gm(ids)), expected)
    sparsec.save(result, str(tmp_path / "art"))
    assert torch.equal(_logits(sparsec.load(str(tmp_path / "art"))(ids)), expected)


def test_tied_head_and_embedding_share_one_quantized_table():
    model, inputs = build("gemma3")
    result = sparsec.transform(model, "quantize", example_inputs=(inputs["input_ids"],), measure=False)
    tied = [e for e in result.report["layers"] if "model.embed_tokens" in e["uses"]]
    assert len(tied) == 1 and tied[0]["uses"] == ["lm_head", "model.embed_tokens"]
    assert len(result.report["layers"]) == 22
    only_head = sparsec.transform(model, "quantize{targets={lm_head}}", example_inputs=(inputs["input_ids"],),
                                  measure=False).module()
    assert [n.args[0].op for n in _dequantized_nodes(only_head)] == ["get_attr"]  # the head; the table stays float
    assert only_head.get_parameter("model.embed_tokens.weight").dtype == torch.float32


def test_teal_calibrates_on_the_quantized_model():
    model, inputs = build("llama")
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(1))
    result = sparsec.transform(model, "quantize{bits=4 group=32},teal{sparsity=0.5}", example_inputs=(ids[:1],),
                               forward_loop=token_forward_loop(ids, batch_size=8), measure=False)
    gm = result.module()
    assert len(_dequantized_nodes(gm)) == 16
    assert sum(1 for n in gm.graph.nodes if n.target is THRESHOLD) == 14
    teal = result.report["layers"][16:]
    assert all(e["op"] == "teal" and abs(e["measured_sparsity"] - 0.5) < 0.05 for e in teal)
    assert {e["weight_numel"] for e in teal} == {64 * 64, 64 * 32, 128 * 64}  # the quantized weights' sizes
    with pytest.raises(UsageError, match="pass 'quantize' must run before 'teal' .*write 'quantize,teal'"):
        sparsec.transform(model, "teal,quantize", example_inputs=(ids[:1],), forward_loop=print)


class _IntTable(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.arange(64).reshape(8, 8))
        self.fc = nn.Linear(8, 6)

    def forward(self, ids):
        return self.fc(torch.nn.functional.embedding(ids, self.table).float())


def test_errors_name_the_layer_and_change_nothing():
    model, inputs = build("llama")
    ids = (inputs["input_ids"],)
    from sparsec.errors import SparsecError
    from sparsec.registry import get_pass

    info = get_pass("quantize")  # calibration data only for gptq: the command line then builds it from --calib-data
    assert info.calibrates(QuantizeConfig(method="gptq")) and not info.calibrates(QuantizeConfig())
    with pytest.raises(SparsecError, match="^pass 'quantize' needs calibration data and none was given: pass"
                                           " --calib-data FILE on the command line, or forward_loop=fn in Python$"):
        sparsec.transform(model, "quantize{method=gptq}", example_inputs=ids, measure=False)
    cases = [
        ("quantize{bits=3}", "quantize: bits=3 is not supported; valid: bits=8 or bits=4"),
        ("quantize{method=awq}", "bad value 'awq' for option 'method' of pass 'quantize': expected one of rtn, mse,"
                                 " gptq"),
        ("quantize{method=gptq damp=0}", "bad value 0.0 for option 'damp' of pass 'quantize': expected 0.0 < damp"),
        ("quantize{bits=4 group=5}", "quantize: group=5 is odd; 4-bit values are packed two per byte"),
        ("quantize{act_order=true}", "quantize: act_order=true applies to method=gptq, not method=mse; add"
                                     " method=gptq or drop act_order"),
        ("quantize{group=48}", "quantize: group=48 does not divide the 64 input features of layer"
                               " 'model.layers.0.self_attn.q_proj'; choose a group that divides 64"),
        ("quantize{targets={model.layers.7}}", "target 'model.layers.7' of pass 'quantize' matches no candidate"),
        ("prune,quantize", "quantize: the weight of layer 'model.layers.0.self_attn.q_proj' is masked by prune; run"
                           " fold before quantize"),
        ("quantize,quantize", "quantize: layer 'model.layers.0.self_attn.q_proj' is already quantized by an"
                              " earlier quantize pass"),
    ]
    for spec, message in cases:
        with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
            sparsec.transform(model, spec, example_inputs=ids, measure=False)
        if "gptq needs" in message:  # a parse error adds a caret line under the spec; this one is raised by the pass
            assert "\n" not in str(err.value)
    net = _IntTable()
    with pytest.raises(UsageError, match="quantize: the weight of layer 'table' is int64, not a floating-point type"):
        sparsec.transform(net, "quantize", example_inputs=(torch.tensor([[1, 2]]),), measure=False)
    result = sparsec.transform(net, "quantize{targets={fc}}", example_inputs=(torch.tensor([[1, 2]]),),
                               measure=False)
    assert [e["module"] for e in result.report["layers"]] == ["fc"]


def _zoo_weights(arch):
    return [p.detach() for p in build(arch)[0].parameters() if p.dim() == 2]


@pytest.mark.parametrize("bits,group,scale_dtype", [(4, 32, torch.float32), (4, 0, torch.float32),
                                                    (4, 32, torch.float16), (8, 32, torch.float32),
                                                    (8, 0, torch.float16)])
def test_mse_never_worse_than_rtn(bits, group, scale_dtype):
    """mse's squared error is at most rtn's in every group of every zoo weight (rtn's choice is one of its candidates,
    compared with the scales as stored) and lower in total; its values use the whole signed range, -2^(bits-1) too."""
    lo, hi = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    total = {"rtn": 0.0, "mse": 0.0}
    for w in _zoo_weights("llama") + _zoo_weights("gpt2"):
        g = group or w.shape[1]
        err = {}
        for method in ("rtn", "mse"):
            q, scale, _ = quantize_weight(w, bits, group, scale_dtype, method)
            values = q if bits == 8 else unpack_int4(q)
            assert int(values.min()) >= lo and int(values.max()) <= hi
            if method == "mse" and bits == 4:
                assert int(values.min()) == lo
            w2 = dequantize(q, scale, bits, group, torch.float32)
            err[method] = (w2 - w).square().reshape(w.shape[0], -1, g).sum(-1)
            total[method] += float(err[method].sum())
        assert bool((err["mse"] <= err["rtn"]).all())
    assert total["mse"] < total["rtn"] * (0.8 if bits == 4 else 0.95)


@pytest.mark.parametrize("bits,group,scale_dtype", [(4, 32, torch.float32), (4, 0, torch.float16),
                                                    (8, 32, torch.float16)])
def test_offsets_fit_weights_off_center(bits, group, scale_dtype):
    """symmetric=false on zoo weights shifted by +0.5 std: w' = q * scale + offset with q over the full signed range;
    mse's squared error is at most rtn's in every group, and well below the symmetric mse's in total; a constant
    group is exact (scale 0, offset its value)."""
    lo, hi = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    total = {"rtn": 0.0, "mse": 0.0, "symmetric": 0.0}
    for w in _zoo_weights("llama"):
        w = w + 0.5 * w.std()
        g = group or w.shape[1]
        err = {}
        for method in ("rtn", "mse", "symmetric"):
            q, scale, offset = quantize_weight(w, bits, group, scale_dtype, "mse" if method == "symmetric" else method,
                                               symmetric=method == "symmetric")
            assert (offset is None) == (method == "symmetric")
            assert offset is None or (offset.shape == scale.shape and offset.dtype == scale_dtype)
            values = q if bits == 8 else unpack_int4(q)
            assert int(values.min()) >= lo and int(values.max()) <= hi
            w2 = dequantize(q, scale, bits, group, torch.float32, offset)
            err[method] = (w2 - w).square().reshape(w.shape[0], -1, g).sum(-1)
            total[method] += float(err[method].sum())
        assert bool((err["mse"] <= err["rtn"]).all())
    assert total["mse"] < total["symmetric"] * 0.75, total
    w = torch.randn(4, 64)
    w[1, :32] = 0.25
    q, scale, offset = quantize_weight(w, 4, 32, torch.float32, "mse", symmetric=False)
    assert float(scale[1, 0]) == 0.0 and float(offset[1, 0]) == 0.25
    assert torch.equal(dequantize(q, scale, 4, 32, torch.float32, offset)[1, :32], w[1, :32])


def _layer_inputs(model, ids, names):
    """{module name: its inputs [tokens, K]} when ``model`` runs ``ids``."""
    seen, hooks = {}, []
    for name in names:
        hooks.append(model.get_submodule(name).register_forward_hook(
            lambda m, args, out, name=name: seen.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_weight_lowers_the_layer_output_error(bits):
    """On the zoo Llama's calibration inputs X of each linear, ||X (W' - W)ᵀ|| is lower with GPTQ's W' than with
    mse's (and rtn's) for every layer; q stays in range and the group scales are those dequantize reads."""
    model, _ = build("llama")
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(1))
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    xs = _layer_inputs(model, ids, names)
    for name in names:
        w, x = model.get_submodule(name).weight.detach(), xs[name]
        out = {}
        for method in ("rtn", "mse", "gptq"):
            q, s, _ = (gptq_weight(w, x.T.double() @ x.double(), bits, 32, torch.float32) if method == "gptq"
                    else quantize_weight(w, bits, 32, torch.float32, method))
            values = q if bits == 8 else unpack_int4(q)
            assert -2 ** (bits - 1) <= int(values.min()) and int(values.max()) < 2 ** (bits - 1)
            assert s.shape == (w.shape[0], w.shape[1] // 32)
            out[method] = float((x @ (dequantize(q, s, bits, 32, torch.float32) - w).T).norm())
        assert out["gptq"] < out["mse"] <= out["rtn"] * 1.05, (name, out)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 0), (8, 32)])
def test_gptq_act_order_lowers_the_error_on_skewed_inputs(bits, group):
    """Inputs whose energy spans 100x (a log-spaced scale per column, shuffled): with act_order (the columns of most
    XᵀX first, each group's scale fixed beforehand) ||X (W' - W)ᵀ|| is lower than in order, with the same scale
    layout."""
    g = torch.Generator().manual_seed(0)
    k, n = 128, 64
    x = torch.randn(512, k, generator=g) * torch.logspace(-1, 1, k)[torch.randperm(k, generator=g)]
    w = torch.randn(n, k, generator=g)
    h = x.T.double() @ x.double()
    errors = {}
    for act_order in (False, True):
        q, s, _ = gptq_weight(w, h, bits, group, torch.float32, act_order=act_order)
        assert s.shape == (n, k // (group or k))
        errors[act_order] = float((x @ (dequantize(q, s, bits, group, torch.float32) - w).T).norm())
    assert errors[True] < 0.995 * errors[False], errors


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_offsets_lowers_the_output_error(act_order):
    """GPTQ with symmetric=false on weights off center and correlated inputs: ||X (W' - W)ᵀ|| below the offsets' mse
    rounding and below symmetric GPTQ; offsets have the scales' layout."""
    g = torch.Generator().manual_seed(1)
    k, n = 128, 64
    x = torch.randn(512, 32, generator=g) @ torch.randn(32, k, generator=g) + 0.1 * torch.randn(512, k, generator=g)
    w = torch.randn(n, k, generator=g) + 0.5
    h = x.T.double() @ x.double()

    def error(q, s, o):
        return float((x @ (dequantize(q, s, 4, 32, torch.float32, o) - w).T).norm())

    q, s, o = gptq_weight(w, h, 4, 32, torch.float32, act_order=act_order, symmetric=False)
    assert o.shape == s.shape == (n, k // 32)
    errors = {"gptq": error(q, s, o), "mse": error(*quantize_weight(w, 4, 32, torch.float32, "mse", symmetric=False)),
              "symmetric gptq": error(*gptq_weight(w, h, 4, 32, torch.float32, act_order=act_order))}
    assert errors["gptq"] < 0.9 * min(errors["mse"], errors["symmetric gptq"]), errors


def test_gptq_weight_with_a_dead_input_and_per_channel_scales():
    """An input that is always zero gets weight 0 (GPTQ's rule); group 0 keeps one scale per row."""
    torch.manual_seed(0)
    w, x = torch.randn(16, 64), torch.randn(256, 64)
    x[:, 5] = 0.0
    q, s, _ = gptq_weight(w, x.T @ x, 4, 0, torch.float32)
    assert s.shape == (16, 1)
    w2 = dequantize(q, s, 4, 0, torch.float32)
    assert torch.equal(w2[:, 5], torch.zeros(16))
    assert float((x @ (w2 - w).T).norm()) < float((x @ (dequantize(*quantize_weight(w, 4, 0, torch.float32, "mse")[:2],
                                                                      4, 0, torch.float32) - w).T).norm())


@pytest.mark.parametrize("arch,stages,gptq", [("llama", 3, 15), ("gemma3", 3, 21)])
def test_gptq_pass_block_by_block(arch, stages, gptq, tmp_path):
    """method=gptq: the linears with their own weight by GPTQ, one stage per block (plus an untied LM head), the
    tied Gemma head / embedding by mse; the program equals the model with the dequantized weights bit for bit; the
    logits on the calibration data are closer to the float model's than mse's; the source model is unchanged."""
    model, _ = build(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(1))
    loop = token_forward_loop(ids, batch_size=4)
    errors = {}
    for method in ("mse", "gptq"):
        result = sparsec.transform(model, f"quantize{{bits=4 group=32 method={method}}}", example_inputs=(ids[:1],),
                                   forward_loop=loop, measure=False)
        gm = result.module()
        with torch.no_grad():
            errors[method] = float((_logits(gm(ids)) - model(ids).logits).norm())
    assert errors["gptq"] < 0.9 * errors["mse"], errors
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    stats = result.report["passes"][0]["stats"]
    assert (stats["method"], stats["gptq_stages"], stats["gptq_weights"]) == ("gptq", stages, gptq)
    assert stats["calibration_tokens"] == 128
    methods = [e["method"] for e in result.report["layers"]]
    assert methods.count("gptq") == gptq and methods.count("mse") == len(methods) - gptq
    assert [e["method"] for e in result.report["layers"] if "model.embed_tokens" in e["uses"]] == ["mse"]
    assert result.report["pipeline"].startswith("quantize{bits=4 group=32 scale_dtype=float32 method=gptq damp=0.01")
    reference = build(arch)[0]
    for e in result.report["layers"]:
        name = e["parameter"]
        q = gm.sparsec_quantize.get_buffer(name.replace(".", "_") + "_q")
        s = gm.sparsec_quantize.get_buffer(name.replace(".", "_") + "_scale")
        with torch.no_grad():
            reference.get_parameter(name).copy_(dequantize(q, s, 4, 32, torch.float32))
    assert torch.equal(_logits(gm(ids)), reference(ids).logits)


def test_gptq_then_teal_after_rotate():
    """rotate, quantize{method=gptq}, teal: GPTQ calibrates on the rotated model with the pipeline's data."""
    model, _ = build("llama")
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(1))
    result = sparsec.transform(model, "rotate,quantize{bits=4 group=32 method=gptq},teal{sparsity=0.5}",
                               example_inputs=(ids[:1],), forward_loop=token_forward_loop(ids, batch_size=8),
                               measure=False)
    gm = result.module()
    assert len(_dequantized_nodes(gm)) == 16 and sum(1 for n in gm.graph.nodes if n.target is THRESHOLD) == 14
    teal = [e for e in result.report["layers"] if e["op"] == "teal"]
    assert all(abs(e["measured_sparsity"] - 0.5) < 0.05 for e in teal)
