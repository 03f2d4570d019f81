"""relufy: replace MLP activations with ReLU or a ReLU variant (ProSparse step 1; METHODS.md §1)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx

from sparsec.config import PassConfig, option
from sparsec.graph import TargetMatcher, feeds_linear, module_stack, produced_by_linear
from sparsec.passes.base import PassContext, PassResult
from sparsec.registry import register_pass

aten = torch.ops.aten

#: Activation ops replaced when they appear on their own (functional form, or an activation module of one op).
ACTIVATION_OPS = {aten.gelu.default: "gelu", aten.silu.default: "silu", aten.mish.default: "mish",
                  aten.hardswish.default: "hardswish", aten.elu.default: "elu", aten.selu.default: "selu",
                  aten.celu.default: "celu", aten.softplus.default: "softplus", aten.leaky_relu.default: "leaky_relu",
                  aten.relu.default: "relu"}

#: Activation module classes whose whole traced body is replaced (e.g. GPT-2's NewGELUActivation exports as a tanh
#: formula, not as aten.gelu). Matched by class name, so no import of transformers is needed.
ACTIVATION_MODULES = {"GELU", "SiLU", "Mish", "Hardswish", "ELU", "SELU", "CELU", "Softplus", "LeakyReLU", "ReLU",
                      "GELUActivation", "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation",
                      "GELUTanh", "PytorchGELUTanh", "GELUPytorchTanh", "AccurateGELUActivation",
                      "ClippedGELUActivation", "SiLUActivation", "SiLUActivationFunction", "MishActivation",
                      "LaplaceActivation", "ReLUSquaredActivation", "XIELUActivation"}


@dataclass(frozen=True)
class RelufyConfig(PassConfig):
    """Replace MLP activations (GELU, GELU-tanh, SiLU, Mish, ...) with ReLU or a ReLU variant.

    Candidates are activation ops and activation modules whose input comes from a linear layer and whose output
    feeds a linear layer (directly or through the gate multiply of a gated MLP); attention softmax and BERT's pooler
    tanh are never candidates. Variants: relu = max(x, 0); fatrelu = x if x >= threshold else 0 (ProSparse step 3);
    shifted = max(x - shift, 0); relu2 = max(x, 0)^2 (squared ReLU). An existing ReLU is a candidate only for the
    variants. A relufied model needs fine-tuning to recover quality: the pass only rewrites the graph.
    Reported sparsity (measured by `sparsec transform`): zeros in the MLP intermediate (ProSparse's definition).
    """

    to: Literal["relu", "fatrelu", "shifted", "relu2"] = option("relu", help="the replacement activation")
    threshold: float = option(0.01, ge=0.0, help="FATReLU threshold t (to=fatrelu): x if x >= t else 0")
    shift: float = option(0.0, help="shift b (to=shifted): max(x - b, 0)")
    scope: Literal["mlp", "all"] = option("mlp", help="mlp: only activations between linear layers; all: every"
                                          " activation matched by targets")
    targets: list[str] = option([], help="module paths, 're:REGEX' or class names to rewrite; empty = every"
                                " candidate in scope")
    ignore: list[str] = option([], help="module paths, 're:REGEX' or class names to leave alone (applied last)")


@dataclass
class Activation:
    """One activation application in the graph: its nodes, single input and single output."""

    nodes: list[fx.Node]
    input: fx.Node
    output: fx.Node
    kind: str


def find_activations(gm: fx.GraphModule) -> list[Activation]:
    """Activation module invocations (grouped nodes) and standalone activation ops, in graph order."""
    groups: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        stack = node.meta.get("nn_module_stack") or {}
        key = next((k for k, (_, cls) in reversed(list(stack.items()))
                    if str(cls).rsplit(".", 1)[-1] in ACTIVATION_MODULES), None)
        if key is not None:
            groups.setdefault(key, []).append(node)
    found, grouped = [], set()
    for key, nodes in groups.items():
        act = _as_activation(nodes)
        if act is not None:
            found.append(act)
            grouped.update(nodes)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in ACTIVATION_OPS and node not in grouped:
            x = node.args[0]
            if isinstance(x, fx.Node):
                found.append(Activation([node], x, node, ACTIVATION_OPS[node.target]))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(found, key=lambda a: order[a.output])


def _as_activation(nodes: list[fx.Node]) -> Activation | None:
    members = set(nodes)
    inputs = {a for n in nodes for a in n.all_input_nodes if a not in members and a.op != "get_attr"}
    outputs = [n for n in nodes if any(u not in members for u in n.users)]
    if len(inputs) != 1 or len(outputs) != 1:
        return None  # not a single-input single-output activation (e.g. a module called twice): use op matching
    if len(nodes) == 1 and nodes[0].target in ACTIVATION_OPS:
        kind = ACTIVATION_OPS[nodes[0].target]
    else:
        kind = [c for _, c in module_stack(nodes[0]) if c in ACTIVATION_MODULES][-1]
    return Activation(nodes, inputs.pop(), outputs[0], kind)


def _emit(graph: fx.Graph, x: fx.Node, cfg: RelufyConfig) -> list[fx.Node]:
    """Insert the replacement computation of ``x``; returns the new nodes, the last one being the result."""
    if cfg.to == "relu":
        return [graph.call_function(aten.relu.default, (x,))]
    if cfg.to == "fatrelu":
        keep = graph.call_function(aten.ge.Scalar, (x, cfg.threshold))
        return [keep, graph.call_function(aten.where.ScalarOther, (keep, x, 0.0))]
    if cfg.to == "shifted":
        shifted = graph.call_function(aten.sub.Tensor, (x, cfg.shift))
        return [shifted, graph.call_function(aten.relu.default, (shifted,))]
    relu = graph.call_function(aten.relu.default, (x,))
    return [relu, graph.call_function(aten.pow.Tensor_Scalar, (relu, 2))]


@register_pass("relufy", RelufyConfig)
def relufy(gm: fx.GraphModule, cfg: RelufyConfig, ctx: PassContext) -> PassResult:
    matcher = TargetMatcher("relufy", cfg.targets, cfg.ignore)
    layers, skipped_scope = [], 0
    for act in find_activations(gm):
        if cfg.to == "relu" and act.kind == "relu":
            continue
        if not matcher.selects(act.output):
            continue
        if cfg.scope == "mlp" and not (produced_by_linear(act.input) and feeds_linear(act.output)):
            skipped_scope += 1
            continue
        with gm.graph.inserting_before(act.output.next):  # keeps the new nodes in order
            created = _emit(gm.graph, act.input, cfg)
        new = created[-1]
        for n in created:  # the new nodes keep the module path, so later passes can target them
            n.meta["nn_module_stack"] = act.output.meta.get("nn_module_stack")
        new.meta.update({k: v for k, v in act.output.meta.items() if k in ("val", "stack_trace")})
        act.output.replace_all_uses_with(new)
        for n in reversed(act.nodes):
            if not n.users:
                gm.graph.erase_node(n)
        path = module_stack(new)[-1][0] if module_stack(new) else ""
        layers.append({"module": path, "op": "relufy", "from": act.kind, "to": cfg.to})
    matcher.check_all_used()
    gm.graph.lint()
    gm.recompile()
    looked = "GELU, SiLU, Mish, ..."
    if cfg.scope == "mlp":
        looked += " between two linear layers, fused gate/up projections included"
    if cfg.to == "relu":
        looked += "; not ReLU, with to=relu"
    if skipped_scope:
        looked += f"; {skipped_scope} outside the MLP scope (scope=all takes them)"
    return PassResult(gm, {"replaced": len(layers), "skipped_outside_mlp": skipped_scope}, layers,
                      f"no activation to replace (looked for {looked})")

