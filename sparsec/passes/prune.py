"""prune: magnitude pruning masks on the weights of linear and convolution layers (METHODS.md §4 DSTF, §6)."""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx
from torch import nn

from sparsec.config import PassConfig, option
from sparsec.errors import UsageError
from sparsec.graph import TRANSPARENT_OPS, TargetMatcher, WeightLayer, is_rotation, op_name, weight_layers
from sparsec.passes.base import PassContext, PassResult
from sparsec.registry import register_pass
from sparsec.training import register_holder

aten = torch.ops.aten

HOLDER = "sparsec_prune"  #: name (prefix) of the submodule holding the mask buffers
_N_M = re.compile(r"^\s*(\S+?)\s*:\s*(\S+?)\s*$")
_CONV_OPS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default}
_INPUT_FIRST = {aten.addmm.default, aten.mm.default, aten.matmul.default}  # weight operand is [in, out]
_FLIPS = {aten.t.default, aten.transpose.int}  # on a 2-D weight: swap its two dimensions
_SAME_LAYOUT = {aten.alias.default, aten.clone.default, aten.contiguous.default, aten.dropout.default, aten.to.dtype,
                aten._to_copy.default}
_DEFINITION = ("weight sparsity: zeros in the weights of the pruned layers; flops_removed: multiplications skipped"
               " by those zeros in one forward pass on the example inputs; bytes_removed: their dense storage")


@dataclass(frozen=True)
class PruneConfig(PassConfig):
    """Zero the smallest-magnitude weights of linear and convolution layers with fixed masks (magnitude pruning).

    Each pruned weight w gets a boolean mask buffer and is used as w * mask in the forward pass, so the gradients of
    pruned weights are zero while training; the zeros are also written into the weights, and
    sparsec.training.after_step re-applies the masks after every optimiser step. The fold pass (and strip) writes
    the zeros into the weights and removes the masks before export. Patterns: unstructured (per layer, or global:
    the globally smallest magnitudes, or every |w| < tau as in DSTF); N:M (at most N non-zeros in every M
    consecutive weights along the input dimension, e.g. 2:4; for convolutions along the input channels at each
    kernel position); channel (whole output neurons / channels with the smallest L2 norm; their bias is kept).
    sparsity=0 reproduces the model bit for bit. Reported sparsity: weight sparsity (zeros in the weights), and
    the multiplications and weight bytes the zeros remove (per forward on the example inputs).
    """

    pattern: str = option("unstructured", help="unstructured | N:M (e.g. 2:4: at most N non-zeros in every M"
                          " weights along the input dimension) | channel (whole output rows by L2 norm)")
    sparsity: float = option(0.5, ge=0.0, lt=1.0, help="fraction of weights to zero (unstructured: per layer or"
                             " over all targeted weights, see scope; channel: fraction of output rows per layer);"
                             " unused by N:M and when tau > 0")
    scope: Literal["layer", "global"] = option("layer", help="unstructured only: layer = every layer gets"
                                               " `sparsity`; global = the smallest magnitudes over all targeted"
                                               " layers")
    tau: float = option(0.0, ge=0.0, help="absolute magnitude threshold (DSTF): zero every weight with |w| < tau"
                        " instead of a ratio; 0 = use sparsity (unstructured only)")
    targets: list[str] = option([], help="module paths, 're:REGEX' or class names of the weight layers to prune;"
                                " empty = every linear / convolution with a weight parameter")
    ignore: list[str] = option([], help="module paths, 're:REGEX' or class names to leave dense (applied last)")

    def __post_init__(self):
        super().__post_init__()
        if self.pattern not in ("unstructured", "channel"):
            parse_n_m(self.pattern)
        if self.tau > 0 and self.pattern != "unstructured":
            raise UsageError(f"prune: tau applies to pattern=unstructured, not pattern={self.pattern}; set tau=0 or"
                             " pattern=unstructured")
        if self.scope == "global" and self.pattern != "unstructured":
            raise UsageError(f"prune: scope=global applies to pattern=unstructured, not pattern={self.pattern};"
                             " use scope=layer")


def parse_n_m(pattern: str) -> tuple[int, int]:
    """(N, M) of an 'N:M' pattern; a one-line UsageError for anything else."""
    valid = "valid patterns: unstructured, channel, or N:M with integers 0 < N < M (e.g. 2:4)"
    match = _N_M.match(pattern)
    if not match:
        raise UsageError(f"prune: unknown pattern '{pattern}'; {valid}")
    try:
        n, m = int(match.group(1)), int(match.group(2))
    except ValueError:
        raise UsageError(f"prune: pattern '{pattern}' is not N:M with integers; {valid}") from None
    if not 0 < n < m:
        raise UsageError(f"prune: pattern '{pattern}' keeps N={n} of every M={m} weights, which prunes nothing or"
                         f" everything; {valid}")
    return n, m


def mask_nodes(gm: nn.Module) -> list[fx.Node]:
    """The ``weight * mask`` nodes of the prune pass in ``gm``'s graph (none when it has no graph)."""
    graph = getattr(gm, "graph", None)
    return [node for node in (graph.nodes if graph is not None else ())
            if node.op == "call_function" and node.target is aten.mul.Tensor and len(node.args) == 2
            and all(isinstance(a, fx.Node) and a.op == "get_attr" for a in node.args)
            and node.args[1].target.split(".", 1)[0].startswith(HOLDER)]


@register_holder
class PruneMasks(nn.Module):
    """The mask buffers of the pruned weights (one boolean buffer per weight, same shape; True = kept).

    Training hooks (:mod:`sparsec.training`): ``sparsec_after_step`` writes the zeros into the weights this holder
    pruned again, so they stay exactly zero whatever writes into them. torch.export and loading keep only the
    buffers; ``sparsec_restore`` finds the pruned weights again through the graph's ``w * mask`` nodes.
    ``sparsec_strip(gm)`` folds the masks into the weights and removes them (:func:`sparsec.passes.fold.fold_masks`).
    """

    holder_name = HOLDER

    def __init__(self):
        super().__init__()
        self._weights: list[tuple[nn.Parameter, str]] = []  # (pruned parameter, name of its mask buffer)

    def add(self, name: str, weight: nn.Parameter, mask: torch.Tensor) -> None:
        self.register_buffer(name, mask)
        self._weights.append((weight, name))

    def sparsec_restore(self, owner: fx.GraphModule, name: str) -> None:
        """Bind the weights again after torch.export / loading: ``owner`` holds this holder as ``name``."""
        self._weights = [(operator.attrgetter(node.args[0].target)(owner), node.args[1].target[len(name) + 1:])
                         for node in mask_nodes(owner) if node.args[1].target.startswith(f"{name}.")]

    @torch.no_grad()
    def sparsec_after_step(self, step: int) -> None:
        for weight, name in self._weights:
            weight.mul_(getattr(self, name))

    def sparsec_strip(self, gm: fx.GraphModule) -> None:
        from sparsec.passes.fold import fold_masks

        fold_masks(gm)


@dataclass
class _Weight:
    """One weight parameter to prune: its get_attr node, the layers using it and its input-last view."""

    node: fx.Node
    target: str
    param: torch.Tensor
    layers: list[WeightLayer]
    orientation: str | None  # out_in | in_out | conv | None (reaches the op through reshapes: unstructured only)
    positions: int = 0  # output positions (tokens, pixels) over all uses, on the example inputs

    def canonical(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (shaped like the weight) with the output dimension first and the input dimension last."""
        if self.orientation == "in_out":
            return t.t()
        if self.orientation == "conv":
            return t.movedim(1, -1)
        return t

    def from_canonical(self, t: torch.Tensor) -> torch.Tensor:
        if self.orientation == "in_out":
            return t.t()
        if self.orientation == "conv":
            return t.movedim(-1, 1)
        return t


def _weight_source(layer: WeightLayer) -> tuple[fx.Node, int]:
    """The get_attr node feeding the layer's weight operand, and how many 2-D transposes lie in between
    (-1 when other layout ops do)."""
    idx = 2 if layer.node.target is aten.addmm.default else 1
    node, flips = layer.node.args[idx], 0
    while node.op == "call_function" and node.target in TRANSPARENT_OPS:
        if node.target in _FLIPS or node.target is aten.permute.default and list(node.args[1]) == [1, 0]:
            flips = flips + 1 if flips >= 0 else flips
        elif node.target not in _SAME_LAYOUT:
            flips = -1
        node = node.args[0]
    return node, flips


def _orientation(layer: WeightLayer, flips: int, param: torch.Tensor) -> str | None:
    op = layer.node.target
    if op in _CONV_OPS:
        transposed = op is aten.convolution.default and bool(layer.node.args[6])
        return "conv" if flips == 0 and not transposed and param.dim() >= 3 else None
    if flips < 0 or param.dim() != 2:
        return None
    in_out = (op in _INPUT_FIRST) != (flips % 2 == 1)
    return "in_out" if in_out else "out_in"


def _positions(layer: WeightLayer, out_dim: int) -> int:
    """Output positions of one use of a weight (tokens × batch for a linear, pixels × batch for a conv)."""
    from torch.fx.experimental.symbolic_shapes import optimization_hint

    val = layer.node.meta.get("val")
    if not isinstance(val, torch.Tensor) or out_dim == 0:
        return 0
    numel = 1
    for d in val.shape:
        numel *= optimization_hint(d, fallback=1)
    return numel // out_dim


def _collect(gm: fx.GraphModule, cfg: PruneConfig, matcher: TargetMatcher) -> list[_Weight]:
    weights: dict[fx.Node, _Weight] = {}
    for layer in weight_layers(gm):
        if is_rotation(layer) or not matcher.selects(layer.node):
            continue
        src, flips = _weight_source(layer)
        if src.op == "call_function" and src.target is aten.mul.Tensor:
            raise UsageError(f"prune: the weight of layer '{layer.module}' is already pruned by an earlier prune"
                             " pass; prune each layer once (use targets / ignore to split layers between passes)")
        param = operator.attrgetter(src.target)(gm)
        orientation = _orientation(layer, flips, param)
        if orientation is None and cfg.pattern != "unstructured":
            raise UsageError(f"prune: layer '{layer.module}' ({op_name(layer.node.target)}) uses its weight through"
                             f" reshapes, so pattern={cfg.pattern} cannot find its input dimension; use"
                             f" pattern=unstructured for it or ignore={{{layer.module}}}")
        w = weights.get(src)
        if w is None:
            w = weights[src] = _Weight(src, src.target, param, [], orientation)
        elif w.orientation != orientation:
            w.orientation = None
        w.layers.append(layer)
        out_dim = w.canonical(param).shape[0] if orientation else 0
        w.positions += _positions(layer, out_dim)
    return list(weights.values())


def _masks(weights: list[_Weight], cfg: PruneConfig) -> list[torch.Tensor]:
    """A boolean mask per weight (True = kept)."""
    if cfg.pattern == "unstructured":
        if cfg.tau > 0:
            return [w.param.detach().abs() >= cfg.tau for w in weights]
        if cfg.scope == "global":
            flat = torch.cat([w.param.detach().abs().flatten().float() for w in weights])
            keep = _keep_largest(flat, round(cfg.sparsity * flat.numel()))
            return [m.view_as(w.param) for w, m in zip(weights, keep.split([w.param.numel() for w in weights]))]
        return [_keep_largest(w.param.detach().abs().flatten().float(),
                              round(cfg.sparsity * w.param.numel())).view_as(w.param) for w in weights]
    masks = []
    for w in weights:
        c = w.canonical(w.param.detach())
        if cfg.pattern == "channel":
            rows = c.reshape(c.shape[0], -1)
            keep_rows = _keep_largest(rows.float().norm(dim=1), round(cfg.sparsity * rows.shape[0]))
            mask = keep_rows.view(-1, *[1] * (c.dim() - 1)).expand_as(c)
        else:
            n, m = parse_n_m(cfg.pattern)
            if c.shape[-1] % m:
                raise UsageError(f"prune: layer '{w.layers[0].module}' has {c.shape[-1]} inputs, not divisible by"
                                 f" M={m} of pattern {cfg.pattern}; ignore it (ignore={{{w.layers[0].module}}}) or"
                                 f" choose an M that divides {c.shape[-1]}")
            groups = c.abs().float().reshape(*c.shape[:-1], c.shape[-1] // m, m)
            mask = torch.zeros_like(groups, dtype=torch.bool)
            mask.scatter_(-1, groups.topk(n, dim=-1).indices, True)
            mask = mask.reshape(c.shape)
        masks.append(w.from_canonical(mask).contiguous())
    return masks


def _keep_largest(values: torch.Tensor, drop: int) -> torch.Tensor:
    """Boolean mask over a 1-D tensor: False at exactly ``drop`` smallest values (ties broken by position)."""
    keep = torch.ones_like(values, dtype=torch.bool)
    if drop > 0:
        keep[torch.topk(values, drop, largest=False, sorted=False).indices] = False
    return keep


def _holder(gm: fx.GraphModule) -> tuple[str, PruneMasks]:
    name, i = HOLDER, 1
    while hasattr(gm, name):
        name, i = f"{HOLDER}_{i}", i + 1
    holder = PruneMasks()
    gm.add_module(name, holder)
    return name, holder


def set_parameter(gm: nn.Module, target: str, value: torch.Tensor) -> nn.Parameter:
    """Replace the parameter at ``target`` with a new one holding ``value`` (the old tensor may be the user's)."""
    owner, _, attr = target.rpartition(".")
    old = operator.attrgetter(target)(gm)
    new = nn.Parameter(value, requires_grad=old.requires_grad)
    (gm.get_submodule(owner) if owner else gm).register_parameter(attr, new)
    return new


@register_pass("prune", PruneConfig)
def prune(gm: fx.GraphModule, cfg: PruneConfig, ctx: PassContext) -> PassResult:
    matcher = TargetMatcher("prune", cfg.targets, cfg.ignore)
    weights = _collect(gm, cfg, matcher)
    matcher.check_all_used()
    if not weights:
        raise UsageError("prune: no linear or convolution layer with a weight parameter matched the targets; list"
                         " the model's layers with 'sparsec trace MODEL' and give targets=… (module paths,"
                         " 're:REGEX' or class names)")
    masks = _masks(weights, cfg)
    holder_name, holder = _holder(gm)
    graph, used = gm.graph, set()
    entries, totals = [], {"weights": 0, "zeros": 0, "flops": 0, "flops_removed": 0, "bytes_removed": 0}
    for w, mask in zip(weights, masks):
        buf = re.sub(r"\W", "_", w.target)
        while buf in used:
            buf += "_"
        used.add(buf)
        param = w.param
        if not bool(mask.all()):
            param = set_parameter(gm, w.target, w.param.detach() * mask)
        holder.add(buf, param, mask.to(w.param.device))
        with graph.inserting_after(w.node):
            m = graph.get_attr(f"{holder_name}.{buf}")
        with graph.inserting_after(m):
            masked = graph.call_function(aten.mul.Tensor, (w.node, m))
        for node in (m, masked):
            node.meta["nn_module_stack"] = w.layers[0].node.meta.get("nn_module_stack")
        if "val" in w.node.meta:
            masked.meta["val"] = w.node.meta["val"]
        w.node.replace_all_uses_with(masked, delete_user_cb=lambda user: user is not masked)

        numel, zeros = param.numel(), int((param == 0).sum())
        flops = numel * w.positions
        entry = {"module": w.layers[0].module, "op": "prune", "parameter": w.target, "pattern": cfg.pattern,
                 "weight_sparsity": round(zeros / numel, 6), "zeros": zeros, "weights": numel, "flops": flops,
                 "flops_removed": zeros * w.positions, "bytes_removed": zeros * param.element_size()}
        entries.append(entry)
        for key in ("weights", "zeros", "flops", "flops_removed", "bytes_removed"):
            totals[key] += entry[key]
    graph.lint()
    gm.recompile()
    all_flops = sum(_total_flops(gm, layer) for layer in weight_layers(gm))
    stats = {"pattern": cfg.pattern, "layers_pruned": len(entries), **totals,
             "weight_sparsity": round(totals["zeros"] / totals["weights"], 6),
             "model_flops": all_flops,
             "flops_removed_fraction": round(totals["flops_removed"] / all_flops, 6) if all_flops else 0.0,
             "definition": _DEFINITION}
    return PassResult(gm, stats, entries)


def _total_flops(gm: fx.GraphModule, layer: WeightLayer) -> int:
    """Dense multiplications of one weight layer on the example inputs (every weight layer of the model)."""
    src, flips = _weight_source(layer)
    if src.op == "call_function" and src.target is aten.mul.Tensor:
        src = src.args[0]
    param = operator.attrgetter(src.target)(gm)
    orientation = _orientation(layer, flips, param)
    if orientation is None:
        return 0
    out_dim = _Weight(src, src.target, param, [layer], orientation).canonical(param).shape[0]
    return param.numel() * _positions(layer, out_dim)
