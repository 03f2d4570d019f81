"""quantize: weight-only integer quantization of linear layers and embedding tables (round to nearest, symmetric)."""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx as fx
from torch import nn

from sparsec.config import PassConfig, option
from sparsec.errors import UsageError
from sparsec.graph import TargetMatcher, call_nodes, is_rotation, module_path, op_name, weight_layers
from sparsec.ops import DEQUANTIZE, QUANT_BITS, pack_int4
from sparsec.passes.base import PassContext, PassResult
from sparsec.passes.prune import _orientation, _weight_source
from sparsec.registry import register_pass

aten = torch.ops.aten

HOLDER = "sparsec_quantize"  #: name (prefix) of the submodule holding the quantized values and scales
_EMBEDDING = aten.embedding.default
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DEFINITION = ("rel_error: ||W - dequantize(quantize(W))|| / ||W|| (Frobenius) per weight; bytes: the weight's"
               " storage before (its dtype) and after (packed values + scales)")


@dataclass(frozen=True)
class QuantizeConfig(PassConfig):
    """Quantize the weights of linear layers and embedding tables to 8 or 4 bits (weight-only, symmetric, round to
    nearest), computed as sparsec::dequantize(q, scale) then the original op.

    Per group of `group` consecutive weights along the input dimension (a linear's in-features, an embedding's
    hidden size; 0 = one group per output row): scale = max|w| / (2^(bits-1) - 1), q = round(w / scale) clamped to
    [-2^(bits-1), 2^(bits-1) - 1], stored as int8, or for 4 bits two per byte (ONNX Runtime's MatMulNBits layout). The
    model computes with w' = q * scale, so every later pass (teal, cats: run them after this one, they calibrate on
    the quantized model) and every backend sees the quantized weights. A weight shared by several layers (a tied LM
    head and embedding) is quantized once. Run rotate, prune and fold before it: they change the weights. Reported
    per weight: the relative error ||W - w'|| / ||W|| and the bytes before and after.
    """

    bits: int = option(8, help="bits per weight: 8 or 4")
    group: int = option(0, ge=0, help="weights per scale along the input dimension (32, 64, 128, …; it must divide"
                        " the input features); 0 = one scale per output row (per channel)")
    scale_dtype: Literal["float32", "float16"] = option("float32", help="dtype the scales are stored in")
    targets: list[str] = option([], help="module paths, 're:REGEX' or class names of the linear layers and"
                                " embeddings to quantize; empty = every linear layer (the LM head included) and"
                                " every embedding table")
    ignore: list[str] = option([], help="module paths, 're:REGEX' or class names to leave in floating point"
                               " (applied last)")

    def __post_init__(self):
        super().__post_init__()
        if self.bits not in QUANT_BITS:
            raise UsageError(f"quantize: bits={self.bits} is not supported; valid: bits=8 or bits=4")
        if self.bits == 4 and self.group % 2:
            raise UsageError(f"quantize: group={self.group} is odd; 4-bit values are packed two per byte, so the"
                             " group must be even (32, 64, 128) or 0")


@dataclass
class _Weight:
    """One weight to quantize: its get_attr node, its uses (a layer's op node) and its [out, in] orientation."""

    nodes: list[fx.Node]  # get_attr nodes reading it (a tied weight may have one per name)
    param: torch.Tensor
    module: str  # the first layer using it, for messages
    transposed: bool = False  # the parameter is stored [in, out] (GPT-2's Conv1D)
    linears: list[tuple[fx.Node, fx.Node]] = field(default_factory=list)  # (linear op, the get_attr it reads)
    embeddings: list[fx.Node] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.nodes[0].target


def quantize_weight(w: torch.Tensor, bits: int, group: int, scale_dtype: torch.dtype):
    """``(q, scale)`` of ``w [N, K]`` (module docstring): q int8 ``[N, K]`` (8 bits) or uint8 ``[N, K / 2]`` (4 bits),
    scale ``[N, K / group]`` (``[N, 1]`` for group 0) in ``scale_dtype``."""
    n, k = w.shape
    g = group or k
    qmax = 2 ** (bits - 1) - 1
    wg = w.detach().to(torch.float32).reshape(n, k // g, g)
    scale = (wg.abs().amax(-1) / qmax).to(scale_dtype)
    s = scale.to(torch.float32).unsqueeze(-1)
    q = torch.where(s > 0, torch.round(wg / torch.where(s > 0, s, 1.0)), 0.0).clamp_(-qmax - 1, qmax)
    q = q.reshape(n, k).to(torch.int8)
    return (q if bits == 8 else pack_int4(q)), scale


def _collect(gm: fx.GraphModule, cfg: QuantizeConfig, matcher: TargetMatcher) -> list[_Weight]:
    weights: dict[int, _Weight] = {}  # by id of the parameter

    def entry(src: fx.Node, node: fx.Node, path: str) -> _Weight | None:
        if src.op != "get_attr":
            if src.op == "call_function" and src.target is DEQUANTIZE:
                raise UsageError(f"quantize: layer '{path}' is already quantized by an earlier quantize pass;"
                                 " quantize each layer once (use targets / ignore to split layers between passes)")
            if src.op == "call_function" and src.target is aten.mul.Tensor:
                raise UsageError(f"quantize: the weight of layer '{path}' is masked by prune; run fold before"
                                 " quantize (e.g. 'prune,fold,quantize') so the zeros are in the weight")
            return None
        param = operator.attrgetter(src.target)(gm)
        if param.dtype not in _FLOATS:
            raise UsageError(f"quantize: the weight of layer '{path}' is {str(param.dtype).removeprefix('torch.')},"
                             " not a floating-point type; only float weights are quantized: ignore it"
                             f" (ignore={{{path}}})")
        w = weights.setdefault(id(param), _Weight([], param, path))
        if src not in w.nodes:
            w.nodes.append(src)
        return w

    for layer in weight_layers(gm):
        if is_rotation(layer) or layer.node.target not in (aten.linear.default, aten.addmm.default, aten.mm.default,
                                                           aten.matmul.default):
            continue
        if not matcher.selects(layer.node):
            continue
        src, flips = _weight_source(layer)
        w = entry(src, layer.node, layer.module)
        if w is None:
            continue
        orientation = _orientation(layer, flips, w.param)
        if orientation is None:
            raise UsageError(f"quantize: layer '{layer.module}' ({op_name(layer.node.target)}) uses its weight"
                             f" through reshapes, so its input dimension is unknown; ignore it"
                             f" (ignore={{{layer.module}}})")
        if w.linears and w.transposed != (orientation == "in_out") or w.embeddings and orientation == "in_out":
            raise UsageError(f"quantize: the weight of layer '{layer.module}' is used in two orientations; ignore"
                             f" one of its layers (ignore={{{layer.module}}})")
        w.transposed = orientation == "in_out"
        w.linears.append((layer.node, src))
    for node in call_nodes(gm, {_EMBEDDING}):
        if isinstance(node.args[0], fx.Node) and matcher.selects(node):
            w = entry(node.args[0], node, module_path(node) or node.args[0].target)
            if w is not None:
                if w.transposed:
                    raise UsageError(f"quantize: the weight of embedding '{module_path(node)}' is also used as"
                                     f" [in, out]; ignore one of them (ignore={{{module_path(node)}}})")
                w.embeddings.append(node)
    return list(weights.values())


def _holder(gm: fx.GraphModule) -> tuple[str, nn.Module]:
    name, i = HOLDER, 1
    while hasattr(gm, name):
        name, i = f"{HOLDER}_{i}", i + 1
    holder = nn.Module()
    gm.add_module(name, holder)
    return name, holder


def _meta_from(node: fx.Node, like: fx.Node) -> None:
    node.meta["nn_module_stack"] = like.meta.get("nn_module_stack")


def _drop_unused(gm: fx.GraphModule, quantized: set[int]) -> None:
    """Remove the float weights that were quantized from ``gm``, under every name, unless the graph still reads them
    (a tied weight whose other use was not targeted)."""
    still_read = set()
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and id(operator.attrgetter(node.target)(gm)) in quantized:
            if node.users:
                still_read.add(id(operator.attrgetter(node.target)(gm)))
            else:
                gm.graph.erase_node(node)
    for name, param in list(gm.named_parameters(remove_duplicate=False)):
        if id(param) in quantized - still_read:
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, attr)


@register_pass("quantize", QuantizeConfig, after=("rotate", "prune", "fold", "db-mlp"), before=("teal", "cats"),
               why="quantize changes weights that rotate, prune and db-mlp write; teal and cats calibrate on the"
               " quantized model")
def quantize(gm: fx.GraphModule, cfg: QuantizeConfig, ctx: PassContext) -> PassResult:
    matcher = TargetMatcher("quantize", cfg.targets, cfg.ignore)
    weights = _collect(gm, cfg, matcher)
    matcher.check_all_used()
    for w in weights:  # every check before the first change: an error leaves the model as it was
        if w.param.dim() != 2:
            raise UsageError(f"quantize: the weight of layer '{w.module}' has shape {tuple(w.param.shape)}, not a"
                             f" matrix; ignore it (ignore={{{w.module}}})")
        k = w.param.shape[0 if w.transposed else 1]
        if cfg.group and k % cfg.group:
            raise UsageError(f"quantize: group={cfg.group} does not divide the {k} input features of layer"
                             f" '{w.module}'; choose a group that divides {k} (or 0), or ignore it"
                             f" (ignore={{{w.module}}})")
        if cfg.bits == 4 and k % 2:
            raise UsageError(f"quantize: layer '{w.module}' has {k} input features, an odd number, which 4-bit"
                             f" packing (two per byte) cannot take; use bits=8 or ignore it (ignore={{{w.module}}})")
    holder_name, holder = _holder(gm)
    graph, used, entries = gm.graph, set(), []
    totals = {"bytes_before": 0, "bytes_after": 0}
    scale_dtype = getattr(torch, cfg.scale_dtype)
    for w in weights:
        canonical = w.param.detach().t() if w.transposed else w.param.detach()
        q, scale = quantize_weight(canonical, cfg.bits, cfg.group, scale_dtype)
        buf = re.sub(r"\W", "_", w.name)
        while buf in used:
            buf += "_"
        used.add(buf)
        holder.register_buffer(f"{buf}_q", q)
        holder.register_buffer(f"{buf}_scale", scale)
        args = (cfg.bits, cfg.group, w.param.dtype)
        with graph.inserting_after(w.nodes[0]):
            qn = graph.get_attr(f"{holder_name}.{buf}_q")
        with graph.inserting_after(qn):
            sn = graph.get_attr(f"{holder_name}.{buf}_scale")
        for node in (qn, sn):
            _meta_from(node, w.linears[0][0] if w.linears else w.embeddings[0])
        if w.linears:
            with graph.inserting_after(sn):
                value = graph.call_function(DEQUANTIZE, (qn, sn, *args))
            _meta_from(value, w.linears[0][0])
            if w.transposed:
                with graph.inserting_after(value):
                    value = graph.call_function(aten.t.default, (value,))
                _meta_from(value, w.linears[0][0])
            for linear, src in w.linears:
                linear.replace_input_with(src, value)
        for emb in w.embeddings:
            rest = emb.args[2:]
            with graph.inserting_before(emb):
                gq = graph.call_function(_EMBEDDING, (qn, emb.args[1], *rest))
                gs = graph.call_function(_EMBEDDING, (sn, emb.args[1], *rest))
                value = graph.call_function(DEQUANTIZE, (gq, gs, *args))
            for node in (gq, gs, value):
                _meta_from(node, emb)
            emb.replace_all_uses_with(value)
            graph.erase_node(emb)
        dq = DEQUANTIZE(q, scale, *args)
        err = float((dq.double() - canonical.double()).norm() / canonical.double().norm().clamp_min(1e-300))
        before = w.param.numel() * w.param.element_size()
        after = q.numel() * q.element_size() + scale.numel() * scale.element_size()
        totals["bytes_before"] += before
        totals["bytes_after"] += after
        entries.append({"module": w.module, "op": "quantize", "parameter": w.name, "bits": cfg.bits,
                        "group": cfg.group, "shape": list(canonical.shape), "uses": [
                            module_path(n) for n in [*(la for la, _ in w.linears), *w.embeddings]],
                        "rel_error": round(err, 6), "bytes_before": before, "bytes_after": after})
    _drop_unused(gm, {id(w.param) for w in weights})
    graph.lint()
    gm.recompile()
    stats = {"bits": cfg.bits, "group": cfg.group, "weights_quantized": len(entries), **totals,
             "compression": round(totals["bytes_before"] / totals["bytes_after"], 4) if entries else None,
             "definition": _DEFINITION}
    return PassResult(gm, stats, entries, "no linear layer or embedding with a floating-point weight matched the"
                      " targets")
