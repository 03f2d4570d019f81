"""fold: write pruning masks into the weights and remove them from the graph (METHODS.md §6)."""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch.fx as fx

from sparsec.config import PassConfig
from sparsec.passes.base import PassContext, PassResult
from sparsec.passes.prune import HOLDER, mask_nodes, set_parameter
from sparsec.registry import register_pass


@dataclass(frozen=True)
class FoldConfig(PassConfig):
    """Write the zeros of the prune masks into the weights and remove the masks, for export and deployment.

    Every weight * mask of the prune pass becomes a plain weight holding the zeros (the exported ONNX / TVM weights
    hold them), and the mask buffers are deleted. Outputs are unchanged bit for bit. Works on the graph itself, so
    it also folds a pruned model that was saved, loaded or captured again. Reported: the masks folded and the weight
    sparsity (zeros in the folded weights).
    """


def fold_masks(gm: fx.GraphModule) -> list[dict]:
    """Fold every prune mask of ``gm`` into its weight; returns ``{parameter, weight_sparsity}`` per weight."""
    folded = []
    for node in mask_nodes(gm):
        weight, mask = node.args
        value = operator.attrgetter(weight.target)(gm).detach() * operator.attrgetter(mask.target)(gm)
        param = set_parameter(gm, weight.target, value)
        node.replace_all_uses_with(weight)
        gm.graph.erase_node(node)
        if not mask.users:
            gm.graph.erase_node(mask)
        folded.append({"parameter": weight.target, "weight_sparsity": round(float((param == 0).float().mean()), 6)})
    for name in [n for n, _ in gm.named_children() if n.startswith(HOLDER)]:
        gm.delete_submodule(name)
    gm.graph.lint()
    gm.recompile()
    return folded


@register_pass("fold", FoldConfig, after=("prune",))
def fold(gm: fx.GraphModule, cfg: FoldConfig, ctx: PassContext) -> PassResult:
    folded = fold_masks(gm)
    entries = [{"module": f["parameter"].rpartition(".")[0], "op": "fold", **f} for f in folded]
    return PassResult(gm, {"masks_folded": len(folded)}, entries, "no mask to fold (looked for prune's masks)")
