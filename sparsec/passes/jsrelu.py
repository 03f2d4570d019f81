"""jsrelu: J-SquaredReLU MLP activation, optionally mixed in from ReLU while fine-tuning (arXiv 2309.03004; §5)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from sparsec.config import PassConfig, option
from sparsec.graph import TargetMatcher, feeds_linear, module_stack, produced_by_linear
from sparsec.passes.base import PassContext, PassResult
from sparsec.passes.relufy import find_activations
from sparsec.registry import register_pass
from sparsec.training import register_holder

aten = torch.ops.aten


@dataclass(frozen=True)
class JSReLUConfig(PassConfig):
    """Replace MLP activations with J-SquaredReLU f(x) = (x²/2 + x)·1[x >= 0] (derivative (x+1)·1[x >= 0]).

    Built from plain aten ops (ge, mul, sub, where), so it saves, trains and exports to ONNX as is. With
    mixing_steps > 0 (fine-tuning a ReLU model) the activation is (1-k)·ReLU(x) + k·f(x), k = min(step /
    mixing_steps, 1), k a buffer advanced by sparsec.training.after_step; 'strip' removes the mixing once k = 1.
    Candidates are the activations between two linear layers (as in relufy, scope=mlp), ReLU included.
    Reports no sparsity of its own; the transform's measured effect is the MLP intermediate sparsity (ProSparse's
    definition). Sparsity emerges from training (no loss term).
    """

    mixing_steps: int = option(0, ge=0, help="steps over which the activation moves from ReLU to J-SquaredReLU"
                               " (0: pure J-SquaredReLU from the start, e.g. training from scratch)")
    targets: list[str] = option([], help="module paths, 're:REGEX' or class names to rewrite; empty = every MLP"
                                " activation")
    ignore: list[str] = option([], help="module paths, 're:REGEX' or class names to leave alone (applied last)")


@register_holder
class JSReLUMixing(nn.Module):
    """The ReLU → J-SquaredReLU mixing factor ``k`` (buffer ``mix``) and its length (buffer ``mixing_steps``)."""

    holder_name = "sparsec_jsrelu"

    def __init__(self, mixing_steps: int, device):
        super().__init__()
        self.register_buffer("mix", torch.zeros((), device=device))
        self.register_buffer("mixing_steps", torch.tensor(float(mixing_steps), device=device))

    def sparsec_after_step(self, step: int) -> None:
        self.mix.fill_(min((step + 1) / float(self.mixing_steps), 1.0))  # step+1 steps taken

    def sparsec_strip(self, gm: fx.GraphModule) -> None:
        """Once mixing is complete (k = 1), use J-SquaredReLU directly and drop the ReLU branch and the buffers."""
        if float(self.mix) < 1.0:
            return
        name = next(n for n, m in gm.named_children() if m is self)
        for node in list(gm.graph.nodes):
            if node.op == "get_attr" and node.target == f"{name}.mix":
                for scaled in list(node.users):  # mul(mix, sub(relu, js)) inside sub(relu, ·)
                    js = scaled.args[1].args[1]
                    for out in list(scaled.users):
                        out.replace_all_uses_with(js)
                gm.graph.eliminate_dead_code()
        gm.delete_submodule(name)


def jsrelu_nodes(graph: fx.Graph, x: fx.Node) -> list[fx.Node]:
    """``where(x >= 0, x·(x/2 + 1), 0)``; ``x/2 + 1`` is written ``sub(x·0.5, -1)`` so that the MLP intermediate is
    still recognised through elementwise ops (:mod:`sparsec.graph`)."""
    keep = graph.call_function(aten.ge.Scalar, (x, 0.0))
    half = graph.call_function(aten.mul.Tensor, (x, 0.5))
    plus_one = graph.call_function(aten.sub.Tensor, (half, -1.0))
    poly = graph.call_function(aten.mul.Tensor, (x, plus_one))
    return [keep, half, plus_one, poly, graph.call_function(aten.where.ScalarOther, (keep, poly, 0.0))]


def _holder(gm: fx.GraphModule, mixing_steps: int) -> str:
    name, i = JSReLUMixing.holder_name, 1
    while hasattr(gm, name):
        name, i = f"{JSReLUMixing.holder_name}_{i}", i + 1
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    gm.add_module(name, JSReLUMixing(mixing_steps, device))
    return name


@register_pass("jsrelu", JSReLUConfig, after=("relufy",))
def jsrelu(gm: fx.GraphModule, cfg: JSReLUConfig, ctx: PassContext) -> PassResult:
    matcher = TargetMatcher("jsrelu", cfg.targets, cfg.ignore)
    acts = [a for a in find_activations(gm) if matcher.selects(a.output) and produced_by_linear(a.input)
            and feeds_linear(a.output)]
    matcher.check_all_used()
    holder = _holder(gm, cfg.mixing_steps) if cfg.mixing_steps and acts else None
    layers = []
    for act in acts:
        graph = gm.graph
        with graph.inserting_before(act.output.next):
            created = jsrelu_nodes(graph, act.input)
            if holder:  # relu - k·(relu - js) = (1-k)·relu + k·js
                relu = graph.call_function(aten.relu.default, (act.input,))
                mix = graph.get_attr(f"{holder}.mix")
                diff = graph.call_function(aten.sub.Tensor, (relu, created[-1]))
                scaled = graph.call_function(aten.mul.Tensor, (mix, diff))
                created += [relu, mix, diff, scaled, graph.call_function(aten.sub.Tensor, (relu, scaled))]
        for n in created:
            n.meta["nn_module_stack"] = act.output.meta.get("nn_module_stack")
        created[-1].meta.update({k: v for k, v in act.output.meta.items() if k in ("val", "stack_trace")})
        act.output.replace_all_uses_with(created[-1])
        for n in reversed(act.nodes):
            if not n.users:
                graph.erase_node(n)
        layers.append({"module": module_stack(created[-1])[-1][0] if module_stack(created[-1]) else "",
                       "op": "jsrelu", "from": act.kind, "mixing_steps": cfg.mixing_steps})
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, {"replaced": len(layers), "mixing_steps": cfg.mixing_steps}, layers,
                      "no activation to replace (looked for activations between two linear layers)")
