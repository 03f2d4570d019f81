"""strip: remove every training-only part of a transformed model before export (see sparsec.training)."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch.fx as fx

from sparsec.config import PassConfig
from sparsec.passes.base import PassContext, PassResult
from sparsec.registry import register_pass
from sparsec.training import REGULARIZE, restore_holders


@dataclass(frozen=True)
class StripConfig(PassConfig):
    """Remove training-only parts before export: regularize taps, and whatever each training holder strips.

    Every sparsec::regularize tap is replaced by its input and the tap buffers are deleted; every submodule with a
    sparsec_strip(gm) method (pruning masks: folded into the weights; jsrelu: the ReLU mixing folded at its current
    value) is called. The stripped model computes exactly what the trained one computes in eval mode. Reports no
    sparsity (the transform's measured effect is the MLP intermediate sparsity, ProSparse's definition).
    """


@register_pass("strip", StripConfig, after=("regularize", "jsrelu", "db-mlp", "prune"))
def strip(gm: fx.GraphModule, cfg: StripConfig, ctx: PassContext) -> PassResult:
    restore_holders(gm)
    taps = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is REGULARIZE]
    for tap in taps:
        tap.replace_all_uses_with(tap.args[0])
        gm.graph.erase_node(tap)
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users and re.match(r"sparsec_regularize(_\d+)?\.", node.target):
            gm.graph.erase_node(node)
    holders = [name for name, _ in gm.named_children() if re.fullmatch(r"sparsec_regularize(_\d+)?", name)]
    for name in holders:
        gm.delete_submodule(name)
    stripped = []
    for name, module in list(gm.named_modules()):
        hook = getattr(module, "sparsec_strip", None)
        if callable(hook):
            hook(gm)
            stripped.append(name)
    gm.graph.lint()
    gm.recompile()
    layers = [{"module": name, "op": "strip"} for name in stripped]
    return PassResult(gm, {"taps_removed": len(taps), "holders_stripped": len(stripped)}, layers,
                      "nothing to strip (looked for regularize taps and training holders: prune, jsrelu, db-mlp)")
