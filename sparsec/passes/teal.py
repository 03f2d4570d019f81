"""teal: training-free magnitude thresholding of linear-layer inputs (TEAL, arXiv 2408.14690; METHODS.md §2)."""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx
from torch import nn

from sparsec.calibration import AbsHistogram
from sparsec.config import PassConfig, option
from sparsec.errors import SparsecError, UsageError
from sparsec.graph import TRANSPARENT_OPS, TargetMatcher, WeightLayer, weight_layers
from sparsec.ops import THRESHOLD
from sparsec.passes.base import PassContext, PassResult
from sparsec.registry import register_pass

aten = torch.ops.aten

#: Matrix-multiply ops TEAL thresholds by default (convolutions only when targeted with scope=all).
_MATMUL_OPS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default}
_IN_BLOCK = re.compile(r"(^|\.)\d+(\.|$)")  # a numbered child of a ModuleList: layers.3, h.0, layer.5, ...
#: What measured_sparsity counts (METHODS.md, "Sparsity definitions"); *_param_weighted is TEAL's own number.
_SPARSITY_DEFINITION = "zeros in thresholded linear inputs, calibration data"


@dataclass(frozen=True)
class TealConfig(PassConfig):
    """Zero the small-magnitude inputs of every linear layer in the transformer blocks: x * (|x| > t) (TEAL).

    One threshold t per weight layer, a buffer of the rewritten module, applied by the custom op sparsec::threshold
    (it saves, loads and re-exports). t is the |x| quantile at the target sparsity, measured on calibration data with
    a streaming histogram (bounded memory, relative error <= 2^-calib_bits; see sparsec.calibration). Inputs shared
    by several layers (q/k/v, gate/up) are calibrated once. Round 1 calibrates on the dense model, as TEAL does; each
    further round (calib_rounds) re-calibrates with the thresholds of the previous round applied, so that the
    sparsity of later layers is measured on the already sparsified model they will see. Default targets: the linears
    inside numbered blocks (Llama/Mistral/Qwen2/Gemma q,k,v,o,gate,up,down; GPT-2 c_attn, attn c_proj, c_fc, mlp
    c_proj; BERT query/key/value, attention output, intermediate, output), not the LM head or pooler.
    sparsity=0 sets every threshold to 0, which reproduces the model bit for bit.
    Reported sparsity: zeros in the inputs of the thresholded layers on the calibration data (TEAL's definition,
    parameter-weighted, and element-weighted).
    """

    sparsity: float = option(0.5, ge=0.0, lt=1.0, help="target fraction of zeros in each thresholded input")
    allocation: Literal["uniform", "greedy"] = option(
        "uniform", help="uniform: the same sparsity for every layer; greedy (TEAL's block-wise search): not"
        " implemented yet")
    prefill: Literal["all", "half", "dense"] = option(
        "all", help="what is thresholded for inputs of more than one token: all = every token (only 'all' is"
        " implemented)")
    calib_rounds: int = option(2, ge=1, le=10, help="calibration rounds: 1 = on the dense model only (TEAL); each"
                               " more round re-calibrates with the previous thresholds applied")
    calib_bits: int = option(8, ge=2, le=12, help="histogram resolution: 2^calib_bits bins per octave of |x|"
                             " (relative quantile error <= 2^-calib_bits)")
    scope: Literal["blocks", "all"] = option("blocks", help="blocks: linears inside numbered blocks (not the LM"
                                             " head); all: every weight layer matched by targets")
    targets: list[str] = option([], help="module paths, 're:REGEX' or class names of the weight layers to"
                                " threshold; empty = every candidate in scope")
    ignore: list[str] = option([], help="module paths, 're:REGEX' or class names to leave dense (applied last)")

    def __post_init__(self):
        super().__post_init__()
        if self.allocation == "greedy":
            raise UsageError("teal: allocation=greedy (TEAL's block-wise greedy search) is not implemented yet; use"
                             " allocation=uniform")
        if self.prefill != "all":
            raise UsageError(f"teal: prefill={self.prefill} is not implemented yet; only prefill=all (threshold"
                             " every token) is available")


class _Tensor:
    """Calibration state of one distinct input tensor and the thresholds of the layers it feeds."""

    def __init__(self, node: fx.Node, layers: list[WeightLayer], bits: int):
        self.node, self.layers = node, layers
        self.hist = AbsHistogram(bits)
        self.thresholds: list[torch.Tensor] = []  # one 0-d buffer per layer
        self.collect, self.measure = False, False
        self.zeros = [0] * len(layers)
        self.numel = 0

    def observe(self, x: torch.Tensor) -> None:
        if self.collect:
            self.hist.update(x)
        if self.measure:
            a = x.detach().abs()
            self.numel += a.numel()
            for j, t in enumerate(self.thresholds):
                self.zeros[j] += int((a <= t).sum()) if float(t) >= 0 else int((x == 0).sum())


class _Observer(nn.Module):
    """Identity that streams its input into a :class:`_Tensor` (present only while calibrating)."""

    def __init__(self, state: _Tensor):
        super().__init__()
        self.state = state

    def forward(self, x):
        self.state.observe(x)
        return x


def _candidates(gm: fx.GraphModule, cfg: TealConfig, matcher: TargetMatcher) -> list[WeightLayer]:
    out = []
    for layer in weight_layers(gm):
        if cfg.scope == "blocks" and (layer.node.target not in _MATMUL_OPS or not _IN_BLOCK.search(layer.module)):
            continue
        if matcher.selects(layer.node):
            out.append(layer)
    return out


def _weight_numel(gm: fx.GraphModule, layer: WeightLayer) -> int:
    node = layer.node.args[2 if layer.node.target is aten.addmm.default else 1]
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in TRANSPARENT_OPS:
        node = node.args[0]
    try:
        return int(operator.attrgetter(node.target)(gm).numel())
    except (AttributeError, TypeError):
        return 0


def _container(gm: fx.GraphModule) -> str:
    name, i = "sparsec_teal", 1
    while hasattr(gm, name):
        name, i = f"sparsec_teal_{i}", i + 1
    return name


def _buffer_name(module: str, used: set) -> str:
    base = re.sub(r"\W", "_", module) or "input"
    name, i = base, 1
    while name in used:
        name, i = f"{base}_{i}", i + 1
    used.add(name)
    return name


def _run(ctx: PassContext, gm: fx.GraphModule) -> None:
    with torch.no_grad():
        ctx.forward_loop(gm)


@register_pass("teal", TealConfig, needs_calibration=True, after=("relufy",))
def teal(gm: fx.GraphModule, cfg: TealConfig, ctx: PassContext) -> PassResult:
    matcher = TargetMatcher("teal", cfg.targets, cfg.ignore)
    layers = _candidates(gm, cfg, matcher)
    matcher.check_all_used()
    if not layers:
        where = "inside numbered transformer blocks (scope=blocks)" if cfg.scope == "blocks" else "in the model"
        raise UsageError(f"teal: no linear layer {where} matched the targets; list the model's layers with 'sparsec"
                         " trace MODEL' and give targets=… (module paths, 're:REGEX' or class names), or scope=all")
    groups: dict[fx.Node, list[WeightLayer]] = {}
    for layer in layers:
        groups.setdefault(layer.input, []).append(layer)

    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    holder_name = _container(gm)
    holder = nn.Module()
    gm.add_module(holder_name, holder)
    graph, used, states, observers = gm.graph, set(), [], []
    for k, (x, group) in enumerate(groups.items()):
        state = _Tensor(x, group, cfg.calib_bits)
        obs_name = f"{holder_name}_observer{k}"
        gm.add_module(obs_name, _Observer(state))
        with graph.inserting_after(x):
            obs = graph.call_module(obs_name, (x,))
        obs.meta.update({key: x.meta[key] for key in ("val", "nn_module_stack") if key in x.meta})
        observers.append((obs, obs_name))
        for layer in group:
            buf = _buffer_name(layer.module, used)
            holder.register_buffer(buf, torch.tensor(-1.0, device=device))  # < 0: nothing zeroed while calibrating
            state.thresholds.append(getattr(holder, buf))
            with graph.inserting_before(layer.node):
                t = graph.get_attr(f"{holder_name}.{buf}")
                thr = graph.call_function(THRESHOLD, (obs, t))
            for node in (t, thr):  # the module path of the layer, so reports and later passes can target them
                node.meta["nn_module_stack"] = layer.node.meta.get("nn_module_stack")
            thr.meta.update({key: x.meta[key] for key in ("val", "stack_trace") if key in x.meta})
            layer.node.replace_input_with(x, thr)
        states.append(state)
    graph.lint()
    gm.recompile()

    targets = [cfg.sparsity] * len(layers)  # uniform allocation
    rounds = cfg.calib_rounds if cfg.sparsity > 0 else 0
    try:
        for r in range(rounds):
            for s in states:
                s.hist.reset()
                s.collect = True
            _run(ctx, gm)
            for s in states:
                s.collect = False
                s.hist.all_reduce()
                if s.hist.count == 0:
                    raise SparsecError(f"calibration data never reached the input of {s.layers[0].module}: the"
                                       " forward_loop ran no batch through the model")
                values = s.hist.quantiles([cfg.sparsity] * len(s.layers))
                for t, v in zip(s.thresholds, values):
                    t.fill_(v)
        if rounds == 0:
            for s in states:
                for t in s.thresholds:
                    t.fill_(0.0)
        for s in states:
            s.measure = True
        _run(ctx, gm)
        for s in states:
            s.measure = False
            _all_reduce_counts(s)
    finally:
        for obs, name in observers:
            obs.replace_all_uses_with(obs.args[0])
            graph.erase_node(obs)
            gm.delete_submodule(name)
        graph.lint()
        gm.recompile()

    by_node, zeros, total, wsum, wzero = {}, 0, 0, 0.0, 0.0
    for s in states:
        if s.numel == 0:
            raise SparsecError(f"calibration data never reached the input of {s.layers[0].module}")
        for j, layer in enumerate(s.layers):
            measured = s.zeros[j] / s.numel
            w = _weight_numel(gm, layer)
            zeros, total = zeros + s.zeros[j], total + s.numel
            wsum, wzero = wsum + w, wzero + w * measured
            by_node[layer.node] = {"module": layer.module, "op": "teal", "threshold": float(s.thresholds[j]),
                                   "target_sparsity": cfg.sparsity, "measured_sparsity": round(measured, 6)}
    entries = [by_node[layer.node] for layer in layers]  # graph order
    stats = {"thresholds": len(layers), "tensors_calibrated": len(states), "target_sparsity": cfg.sparsity,
             "measured_sparsity": round(zeros / total, 6) if total else 0.0,
             "measured_sparsity_param_weighted": round(wzero / wsum, 6) if wsum else 0.0,
             "calibration_rounds": rounds, "definition": _SPARSITY_DEFINITION}
    return PassResult(gm, stats, entries)


def _all_reduce_counts(state: _Tensor) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        counts = torch.tensor([state.numel, *state.zeros], dtype=torch.int64)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        state.numel, state.zeros = int(counts[0]), [int(c) for c in counts[1:]]
