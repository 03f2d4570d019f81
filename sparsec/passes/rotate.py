"""rotate: calibrated orthogonal rotations of linear-layer inputs before magnitude thresholding (LaRoSa-style)."""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from sparsec import progress
from sparsec.calibration import all_reduce_sum
from sparsec.config import PassConfig, option
from sparsec.errors import SparsecError, UsageError
from sparsec.graph import ROTATION_HOLDER as HOLDER
from sparsec.graph import (TRANSPARENT_OPS, TargetMatcher, WeightLayer, is_rotation, linear_source, weight_layers,
                           weight_operand)
from sparsec.passes.base import PassContext, PassResult
from sparsec.passes.prune import set_parameter
from sparsec.passes.teal import _IN_BLOCK, _MATMUL_OPS
from sparsec.registry import register_pass

aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default
#: Ops between a value projection and attention that keep each head's features together (GQA's repeat_kv included).
_HEAD_LAYOUT = TRANSPARENT_OPS | {aten.slice.Tensor, aten.expand.default, aten.unsqueeze.default}


@dataclass(frozen=True)
class RotateConfig(PassConfig):
    """Rotate linear-layer inputs into the principal axes of their calibration data, so that magnitude thresholding
    (teal, run after this pass) drops less of them (the idea of LaRoSa, layerwise rotated sparse activation;
    training-free).

    A rotation is Q = the eigenvectors of E[x xᵀ] (uncentred second moment of the input x over the calibration
    tokens, float64); the model computes W x = (W Q)(Qᵀ x), the same function up to rounding. Two kinds:
    inputs: a tensor read by selected layers (q/k/v, gate/up) gets z = x @ Q inserted (aten.matmul by the buffer
    sparsec_rotate.*, d_in x d_in) and the layers read z with weights W Q. That costs d_in² multiply-adds per token, so
    a tensor is rotated only when d_in² <= max_cost x the multiply-adds of the layers reading it (Gemma 3 270M, 0.25:
    gate/up input 0.16 yes; q/k/v 0.42, o 1.6, down 3.2 no; MiniLM: intermediate 0.25 yes, q/k/v 0.33 no).
    heads: the attention output, per head, Q_g per key/value head g from the o-projection input's per-head second
    moments, folded into the weights (value rows Q_gᵀ W_v, output columns W_o Q_g): no run-time cost, no new nodes.
    Only where the value reaches scaled_dot_product_attention through per-head layout ops, or is a piece of a fused
    q/k/v projection (Phi-3 qkv_proj, GPT-2 c_attn, GPT-NeoX query_key_value; each head's rows are found by running
    the layout ops from the projection to the attention on its feature indices), and the output reaches the
    o-projection through layout ops, and not where o's input is rotated whole; each fold is checked on the example
    inputs (o now reads its old input times the block-diagonal Q) and undone, reported rotated=false, if it fails.
    Measured (benchmarks/results/teal_quality.md): teal at 0.5 after rotate, Gemma 3 270M perplexity 32.45 uniform,
    30.07 greedy (teal alone 41.19 / 36.55; dense 23.19); MiniLM embedding cosine 0.9411 (0.9107), with max_cost=0.34
    0.9504.
    """

    max_cost: float = option(0.25, ge=0.0, help="rotate a shared input only when its rotation's multiply-adds are at"
                             " most this fraction of the layers reading it (0: none; the inputs are the expensive"
                             " kind, heads are free)")
    heads: bool = option(True, help="rotate the attention output per head, folded into the value and output"
                         " projections (no run-time cost)")
    targets: list[str] = option([], help="module paths, 're:REGEX' or class names of the weight layers whose input is"
                                " rotated; empty = the linears inside numbered blocks")
    ignore: list[str] = option([], help="module paths, 're:REGEX' or class names to leave unrotated (applied last)")


class _SecondMoment(nn.Module):
    """Identity that sums x xᵀ over tokens (float64): whole (``head_dim`` 0) or per head of ``head_dim`` features."""

    def __init__(self, dim: int, head_dim: int = 0):
        super().__init__()
        self.head_dim = head_dim
        shape = (dim // head_dim, head_dim, head_dim) if head_dim else (dim, dim)
        self.sum = torch.zeros(shape, dtype=torch.float64)
        self.tokens = 0

    def forward(self, x):
        flat = x.detach().reshape(-1, x.shape[-1]).double()
        if self.head_dim:
            h = flat.reshape(flat.shape[0], -1, self.head_dim)
            self.sum += torch.einsum("nhd,nhe->hde", h, h)
        else:
            self.sum += flat.T @ flat
        self.tokens += flat.shape[0]
        return x


def _weight(gm: fx.GraphModule, layer: WeightLayer) -> tuple[str, bool] | None:
    """(parameter path, whether it is stored [out, in] as aten.linear's) of a layer whose weight is a plain parameter
    operand; None otherwise (a pruned weight * mask, a weight through reshapes)."""
    w = weight_operand(layer.node)
    if not (isinstance(w, fx.Node) and w.op == "get_attr"
            and isinstance(operator.attrgetter(w.target)(gm), nn.Parameter)):
        return None
    return w.target, layer.node.target is aten.linear.default


def _out_features(gm, layer: WeightLayer) -> int:
    target, out_in = _weight(gm, layer)
    shape = operator.attrgetter(target)(gm).shape
    return int(shape[0] if out_in else shape[-1])


def _rotate_weight(gm, layer: WeightLayer, q: torch.Tensor, features, side: str) -> None:
    """Rotate the layer's ``features`` (a slice or index tensor) by Q: side 'in' = its input features (W ← W Q),
    side 'out' = its output features (W ← Qᵀ W on those rows, and the bias of aten.linear / addmm with them). In
    float64; W stored [out, in] (aten.linear) or [in, out] (mm, matmul, addmm)."""
    target, out_in = _weight(gm, layer)
    w = operator.attrgetter(target)(gm).detach()
    new = w.double().clone()
    if (side == "in") == out_in:  # rotate columns of the stored matrix
        new[:, features] = new[:, features] @ q
    else:
        new[features, :] = q.T @ new[features, :]
    set_parameter(gm, target, new.to(w.dtype))
    if side == "out":
        node = layer.node
        bias = node.args[2] if node.target is aten.linear.default and len(node.args) > 2 \
            else node.args[0] if node.target is aten.addmm.default else None
        if isinstance(bias, fx.Node) and bias.op == "get_attr":
            b = operator.attrgetter(bias.target)(gm).detach()
            new_b = b.double().clone()
            new_b[features] = q.T @ new_b[features]
            set_parameter(gm, bias.target, new_b.to(b.dtype))


def _value_projection(o: WeightLayer, by_node: dict) -> tuple[WeightLayer, int] | None:
    """(value projection, head size) when ``o`` reads attention output through layout ops and the attention's
    value comes from a weight layer through per-head layout ops (views, transposes, GQA's expand); else None."""
    x = o.input
    while x.op == "call_function" and x.target in TRANSPARENT_OPS:
        x = x.args[0]
    if not (x.op == "call_function" and x.target is _SDPA):
        return None
    v = x.args[2]
    while isinstance(v, fx.Node) and v.op == "call_function" and v.target in _HEAD_LAYOUT:
        if v.target is aten.slice.Tensor and (len(v.args) > 2 and v.args[2] not in (0, None)
                                              or len(v.args) > 3 and v.args[3] < 2 ** 62):
            break  # a part of the heads, or a piece of a fused q/k/v projection
        v = v.args[0]
    if v not in by_node:
        source = linear_source(x.args[2])
        if source is None or source[1] is None:  # a piece of a fused projection, else nothing
            return None
        v = source[0]
    if v not in by_node:
        return None
    return by_node[v], int(x.meta["val"].shape[-1])


@register_pass("rotate", RotateConfig, needs_calibration=True, after=("relufy",), before=("teal",))
def rotate(gm: fx.GraphModule, cfg: RotateConfig, ctx: PassContext) -> PassResult:
    matcher = TargetMatcher("rotate", cfg.targets, cfg.ignore)
    all_layers = [la for la in weight_layers(gm) if not is_rotation(la)]
    by_node = {la.node: la for la in all_layers}
    layers = [la for la in all_layers if la.node.target in _MATMUL_OPS and _IN_BLOCK.search(la.module)
              and _weight(gm, la) is not None and matcher.selects(la.node)]
    matcher.check_all_used()
    if not layers:
        raise UsageError("rotate: no linear layer inside numbered transformer blocks matched the targets; list the"
                         " model's layers with 'sparsec trace MODEL' and give targets=… (module paths, 're:REGEX' or"
                         " class names)")
    readers: dict[fx.Node, list[WeightLayer]] = {}
    for la in layers:
        readers.setdefault(la.input, []).append(la)
    inputs, skipped = [], []
    for x, group in readers.items():
        d = int(x.meta["val"].shape[-1])
        cost = d / sum(_out_features(gm, la) for la in group)  # d² / Σ d·out
        (inputs if cost <= cfg.max_cost else skipped).append((x, group, cost))
    heads = []
    if cfg.heads:
        whole = {la.node for _, group, _ in inputs for la in group}  # their input is rotated whole instead
        for la in [la for la in layers if la.node not in whole]:
            found = _value_projection(la, by_node)
            if found is not None and _weight(gm, found[0]) is not None:
                heads.append((la, *found))
    if not inputs and not heads:
        raise UsageError(f"rotate: nothing to rotate: no selected input costs at most max_cost={cfg.max_cost:g} of"
                         f" its layers (cheapest {min(c for _, _, c in skipped):.3g}) and heads={cfg.heads} found no"
                         " attention output; raise max_cost or use targets=…")

    observers = []
    for k, (x, _, _) in enumerate(inputs):
        observers.append(_observe(gm, x, f"{HOLDER}_observer{k}", _SecondMoment(int(x.meta["val"].shape[-1]))))
    for k, (o, _, head_dim) in enumerate(heads):
        d = int(o.input.meta["val"].shape[-1])
        observers.append(_observe(gm, o.input, f"{HOLDER}_observer_h{k}", _SecondMoment(d, head_dim)))
    gm.recompile()
    try:
        with torch.no_grad(), progress.task("rotate: calibrate"):
            ctx.forward_loop(gm)
    finally:
        for node, name in observers:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        moments = [gm.get_submodule(name) for _, name in observers]
        for _, name in observers:
            gm.delete_submodule(name)
        gm.recompile()
    for m in moments:
        all_reduce_sum(m.sum)
        if m.tokens == 0:
            raise SparsecError("rotate: the calibration data never reached the rotated layers: the forward_loop ran"
                               " no batch through the model")

    holder = nn.Module()
    gm.add_module(HOLDER, holder)
    entries = []
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    for (x, group, cost), m in progress.iterate(list(zip(inputs, moments)), "rotate: rotate inputs"):
        q = torch.linalg.eigh(m.sum)[1]
        name = group[0].module.replace(".", "_") or "input"  # unique: a layer reads one input
        holder.register_buffer(name, q.to(device=device, dtype=x.meta["val"].dtype))
        with gm.graph.inserting_before(min((la.node for la in group), key=_order(gm))):
            qn = gm.graph.get_attr(f"{HOLDER}.{name}")
            z = gm.graph.call_function(aten.matmul.default, (x, qn))
        stack = dict(group[0].node.meta.get("nn_module_stack") or {})
        stack.popitem() if stack else None  # the layers' parent: the rotation belongs to it (report, block search)
        for node in (qn, z):
            node.meta["nn_module_stack"] = stack
        z.meta["val"] = x.meta["val"]
        for la in group:
            la.node.replace_input_with(x, z)
            _rotate_weight(gm, la, q, slice(None), "in")
        entries.append({"module": group[0].module, "op": "rotate", "kind": "input",
                        "layers": [la.module for la in group],
                        "dim": int(q.shape[0]), "cost": round(cost, 6)})
    if heads:
        entries += _fold_heads_checked(gm, ctx, heads, [m.sum for m in moments[len(inputs):]])
    gm.graph.lint()
    gm.recompile()
    entries += [{"module": group[0].module, "op": "rotate", "kind": "input", "rotated": False,
                 "layers": [la.module for la in group], "dim": int(x.meta["val"].shape[-1]), "cost": round(cost, 6)}
                for x, group, cost in skipped]
    stats = {"inputs_rotated": len(inputs), "inputs_skipped_cost": len(skipped),
             "heads_folded": sum(1 for e in entries if e["kind"] == "heads" and e.get("rotated", True)),
             "max_cost": cfg.max_cost, "calibration_tokens": moments[0].tokens}
    return PassResult(gm, stats, entries)


def _order(gm):
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    return index.__getitem__


def _observe(gm, x: fx.Node, name: str, module: nn.Module) -> tuple[fx.Node, str]:
    gm.add_module(name, module)
    with gm.graph.inserting_after(x):
        node = gm.graph.call_module(name, (x,))
    x.replace_all_uses_with(node, delete_user_cb=lambda u: u is not node)
    return node, name


def _head_rotation(moments: torch.Tensor, n_kv: int) -> torch.Tensor | None:
    """Block-diagonal rotation of the attention output (float64): per query head h, the eigenvectors of the summed
    second moments of the query heads sharing its key/value head (h // (heads / n_kv), as repeat_kv); ``moments``:
    [heads, head_dim, head_dim]. None when the heads do not share the key/value heads evenly."""
    n_q = moments.shape[0]
    if n_kv == 0 or n_q % n_kv:
        return None
    group = n_q // n_kv
    qs = [torch.linalg.eigh(moments[g * group:(g + 1) * group].sum(0))[1] for g in range(n_kv)]
    return torch.block_diag(*[qs[h // group] for h in range(n_q)])


def _fold_heads_checked(gm, ctx: PassContext, heads: list, moments: list[torch.Tensor]) -> list[dict]:
    """Fold each attention output's per-head rotation R into its value (rows: Rᵀ per key/value head) and output
    projection (columns: W_o R), then check on the example inputs that every folded output projection now reads
    (its old input) @ R; a fold that fails the check (attention that is not per-head linear in the value) is undone
    and reported with rotated=false."""
    entries, folds = [], []
    rows = _value_rows(gm, ctx, heads)
    for (o, v, head_dim), mom, kv_rows in zip(heads, moments, rows):
        n_kv = len(kv_rows)
        entry = {"module": o.module, "op": "rotate", "kind": "heads", "value": v.module, "heads": mom.shape[0],
                 "kv_heads": n_kv, "head_dim": head_dim}
        r = _head_rotation(mom, n_kv)
        if r is None:
            entries.append({**entry, "rotated": False, "why": f"{mom.shape[0]} query heads do not share {n_kv}"
                            " key/value heads evenly"})
        else:
            entries.append(entry)
            folds.append((o, v, head_dim, r, entry, kv_rows))
    if not folds:
        return entries
    before = _layer_inputs(gm, ctx, [o for o, *_ in folds])
    saved = {}
    for o, v, head_dim, r, _, kv_rows in folds:
        for la in (o, v):
            for node in _parameter_nodes(la):
                saved.setdefault(node.target, operator.attrgetter(node.target)(gm).detach())
        for g, g_rows in enumerate(kv_rows):  # key/value head g is read by query heads g * group ...: their rotation
            h = g * (r.shape[0] // head_dim // len(kv_rows)) * head_dim
            _rotate_weight(gm, v, r[h:h + head_dim, h:h + head_dim], g_rows, "out")
        _rotate_weight(gm, o, r, slice(None), "in")
    after = _layer_inputs(gm, ctx, [o for o, *_ in folds])
    for (o, v, _, r, entry, _), x0, x1 in zip(folds, before, after):
        expect = (x0.double() @ r).to(x1.dtype)
        if not torch.allclose(x1, expect, rtol=1e-3, atol=1e-5 * float(x0.abs().max().clamp_min(1.0))):
            for la in (o, v):
                for node in _parameter_nodes(la):
                    set_parameter(gm, node.target, saved[node.target])
            entry.update(rotated=False, why="the output projection's input is not the value's heads rotated (an"
                         " attention that is not per-head linear in the value)")
    return entries


def _value_rows(gm, ctx: PassContext, heads: list) -> list[list[torch.Tensor]]:
    """Per head fold, the output features of the value projection that make each key/value head, in head order: the
    layout ops from the projection to the attention's value, run on the example inputs' shapes with the projection's
    output replaced by its feature indices (a fused q/k/v projection's v rows; per head in GPT-NeoX's layout)."""
    from sparsec.frontend import flat_inputs

    run = fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        run.run(*flat_inputs(gm, ctx.args, ctx.kwargs))
    out = []
    for o, v, _ in heads:
        x = o.input
        while x.op == "call_function" and x.target in TRANSPARENT_OPS:
            x = x.args[0]
        chain, n = [], x.args[2]
        while n is not v.node:
            chain.append(n)
            n = n.args[0]
        shape = run.env[v.node].shape
        local = {v.node: torch.arange(shape[-1], dtype=torch.float64).expand(shape)}
        for n in reversed(chain):
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: local[a] if a in local else run.env[a])
            local[n] = n.target(*args, **kwargs)
        per_head = [tuple(int(i) for i in h) for h in local[x.args[2]][0, :, 0, :]]  # [batch, heads, tokens, dim]
        out.append([torch.tensor(h) for h in dict.fromkeys(per_head)])
    return out


def _parameter_nodes(layer: WeightLayer) -> list[fx.Node]:
    return [a for a in layer.node.all_input_nodes if a.op == "get_attr"]


def _layer_inputs(gm, ctx: PassContext, layers: list[WeightLayer]) -> list[torch.Tensor]:
    """The inputs of ``layers`` when ``gm`` runs on the example inputs."""
    from sparsec.frontend import flat_inputs

    wanted, seen = {la.input for la in layers}, {}

    class Tap(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in wanted:
                seen[n] = out
            return out

    with torch.no_grad():
        Tap(gm).run(*flat_inputs(gm, ctx.args, ctx.kwargs))
    return [seen[la.input] for la in layers]

