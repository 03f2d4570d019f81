"""Measure what a transform did, by running the graph on inputs and counting exact zeros.

Definitions (METHODS.md, "Sparsity definitions"):
- ``linear_input_sparsity``: zeros among the inputs of every weight layer (linear / conv / GPT-2 Conv1D),
  element-weighted over layers and tokens (TEAL's quantity, element- rather than parameter-weighted).
- ``mlp_intermediate_sparsity``: zeros in the inputs of weight layers fed elementwise by another weight layer's
  output, i.e. the MLP intermediate ``act(gate(x)) * up(x)`` or ``act(fc1(x))`` (ProSparse's definition).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from sparsec.graph import weight_layers


class _ZeroCounter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, watched: dict[fx.Node, list]):
        super().__init__(gm)
        self.watched = watched

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n in self.watched and isinstance(value, torch.Tensor):
            self.watched[n][0] += int((value == 0).sum())
            self.watched[n][1] += value.numel()
        return value


def run_and_count_zeros(gm: fx.GraphModule, args: tuple, kwargs: dict) -> tuple[Any, dict]:
    """Run ``gm`` on the inputs; returns (outputs, statistics as defined in this module's docstring)."""
    layers = weight_layers(gm)
    counts = {layer.input: [0, 0] for layer in layers}
    from sparsec.frontend import flat_inputs

    with torch.no_grad():
        out = _ZeroCounter(gm, counts).run(*flat_inputs(gm, args, kwargs))

    def frac(selected):
        zeros = sum(counts[layer.input][0] for layer in selected)
        total = sum(counts[layer.input][1] for layer in selected)
        return zeros / total if total else 0.0

    mlp = [layer for layer in layers if layer.mlp_intermediate]
    per_layer = [{"module": layer.module, "mlp_intermediate": layer.mlp_intermediate,
                  "input_sparsity": frac([layer])} for layer in layers]
    return out, {"linear_input_sparsity": frac(layers), "mlp_intermediate_sparsity": frac(mlp),
                 "weight_layers": len(layers), "mlp_layers": len(mlp), "layers": per_layer}


def compare_outputs(reference: Any, other: Any) -> dict:
    """Max absolute difference and mean cosine similarity (over last-dim vectors) of the floating outputs."""
    ref = [t for t in torch.utils._pytree.tree_leaves(reference) if isinstance(t, torch.Tensor)
           and t.is_floating_point()]
    oth = [t for t in torch.utils._pytree.tree_leaves(other) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not ref or len(ref) != len(oth):
        return {}
    a, b = ref[0].float(), oth[0].float()
    cos = torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dim=-1)
    return {"max_abs_diff": max(float((x.float() - y.float()).abs().max()) for x, y in zip(ref, oth)),
            "mean_cosine": float(cos.mean())}
