"""quantize: weight-only integer quantization of linear layers and embedding tables (symmetric or with offsets;
rtn, mse or GPTQ)."""
from __future__ import annotations

import inspect
import operator
import re
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx as fx
from torch import nn

from sparsec.config import PassConfig, option
from sparsec.errors import SparsecError, UsageError
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
               " storage before (its dtype) and after (packed values + scales + offsets)")


@dataclass(frozen=True)
class QuantizeConfig(PassConfig):
    """Quantize the weights of linear layers and embedding tables to 8 or 4 bits (weight-only, symmetric or with
    offsets; rtn, mse or GPTQ), computed as sparsec::dequantize(q, scale[, offset]) then the original op.

    Per group of `group` consecutive weights along the input dimension (a linear's in-features, an embedding's hidden
    size; 0 = one group per output row) one scale, and w ≈ q * scale with q in [-2^(bits-1), 2^(bits-1) - 1], stored as
    int8, or for 4 bits two per byte (ONNX Runtime's MatMulNBits layout); symmetric=false: also one offset per group, w
    ≈ q * scale + offset (the 2^bits levels spread over the group's range instead of around 0). method=rtn: scale =
    max|w| / (2^(bits-1) - 1), q = round(w / scale); mse (default): the scale of least squared error among rtn's and a
    grid (group_scales); gptq: GPTQ on the calibration data, block by block in graph order (gptq_weight, _gptq). The
    model computes with w' = q * scale (+ offset), so every later pass (teal, cats: run them after this one, they
    calibrate on the quantized model) and every backend sees the quantized weights. A weight shared by several layers (a
    tied LM head and embedding) is quantized once. Run rotate, prune and fold before it: they change the weights.
    Reported per weight: the relative error ||W - w'|| / ||W|| and the bytes before and after.
    """

    bits: int = option(8, help="bits per weight: 8 or 4")
    group: int = option(0, ge=0, help="weights per scale along the input dimension (32, 64, 128, …; it must divide"
                        " the input features); 0 = one scale per output row (per channel)")
    scale_dtype: Literal["float32", "float16"] = option("float32", help="dtype the scales are stored in")
    method: Literal["rtn", "mse", "gptq"] = option(
        "mse", help="how q and the scales are chosen: rtn = round to nearest, scale max|w| / (2^(bits-1) - 1); mse ="
        " per group the scale of least squared error among rtn's and a grid (llama.cpp's make_qx_quants; the largest"
        " |w| may map to -2^(bits-1)); gptq = GPTQ on the calibration data (needs a forward_loop), weights without"
        " their own input statistics (embeddings, a head tied to one) by mse")
    damp: float = option(0.01, gt=0.0, le=1.0, help="gptq: dampening added to the diagonal of XᵀX, as a fraction"
                         " of its mean")
    symmetric: bool = option(True, help="false: each group also gets an offset, w ≈ q * scale + offset, its"
                             " 2^bits levels spanning the group's (clipped) range rather than ±max|w|: less error,"
                             " one more scale_dtype value per group")
    act_order: bool = option(False, help="gptq: quantize the columns in order of decreasing XᵀX diagonal (the inputs"
                             " of most energy first), each with its group's scale fixed beforehand from the"
                             " original weights (static groups: the groups stay contiguous)")
    targets: list[str] = option([], help="module paths, 're:REGEX' or class names of the linear layers and"
                                " embeddings to quantize; empty = every linear layer (the LM head included) and"
                                " every embedding table")
    ignore: list[str] = option([], help="module paths, 're:REGEX' or class names to leave in floating point"
                               " (applied last)")

    def __post_init__(self):
        super().__post_init__()
        if self.bits not in QUANT_BITS:
            raise UsageError(f"quantize: bits={self.bits} is not supported; valid: bits=8 or bits=4")
        if self.act_order and self.method != "gptq":
            raise UsageError(f"quantize: act_order=true applies to method=gptq, not method={self.method}; add"
                             " method=gptq or drop act_order")
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
    inputs: list[fx.Node] = field(default_factory=list)  # the activation operand of each linear
    embeddings: list[fx.Node] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.nodes[0].target


def _levels(bits: int) -> tuple[int, int]:
    """The smallest and largest integer of a signed ``bits``-bit value: -2^(bits-1), 2^(bits-1) - 1."""
    return -2 ** (bits - 1), 2 ** (bits - 1) - 1


#: mse's candidate divisors besides rtn's: the group's largest-magnitude weight maps to -2^(bits-1) * (1 + 0.0125 i),
#: i = -9..9 (4 bits: -8 ± 0.1 i, llama.cpp's make_qx_quants grid; i = 0 is its Q4_0 rounding), the other end of the
#: range clipped at 2^(bits-1) - 1.
_MSE_GRID = [1 + 0.0125 * i for i in range(-9, 10)]


def _round(wg: torch.Tensor, s: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """round(wg / s) clamped to [lo, hi]; 0 where s is 0."""
    return torch.where(s != 0, torch.round(wg / torch.where(s != 0, s, 1.0)), 0.0).clamp_(lo, hi)


def group_scales(wg: torch.Tensor, bits: int, method: str,
                 scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` of the groups ``wg [..., g]`` (float32): q float ``[..., g]`` of integers, scale ``[..., 1]``
    float32 holding values of ``scale_dtype``. rtn: scale = max|w| / (2^(bits-1) - 1), q = round(w / scale). mse: of
    rtn's scale and the grid :data:`_MSE_GRID` (each with its rounding, then also with the least-squares scale of that
    rounding, sum(w q) / sum(q²), and the rounding to it), the one with the least squared error of the group as
    stored (scales rounded to ``scale_dtype``); so never a larger error than rtn's, group by group."""
    lo, hi = _levels(bits)
    amax, at = wg.abs().max(-1, keepdim=True)

    def stored(s):
        return s.to(scale_dtype).to(torch.float32)

    s = stored(amax / hi)
    q = _round(wg, s, lo, hi)
    if method == "rtn":
        return q, s
    best = (wg - q * s).square().sum(-1, keepdim=True)
    signed = wg.gather(-1, at)
    for m in _MSE_GRID:
        for refine in (False, True):
            if refine:  # least squares scale of the rounding just tried
                cs = stored(torch.where(qq.square().sum(-1, keepdim=True) > 0, (wg * qq).sum(-1, keepdim=True)
                                        / qq.square().sum(-1, keepdim=True).clamp_min(1), 0.0))
            else:
                cs = stored(signed / (lo * m))
            qq = _round(wg, cs, lo, hi)
            err = (wg - qq * cs).square().sum(-1, keepdim=True)
            better = err < best
            best = torch.where(better, err, best)
            s = torch.where(better, cs, s)
            q = torch.where(better, qq, q)
    return q, s


#: mse's clipping of an offset group's range [lo, hi]: each end moved inwards by these fractions of hi - lo
_AFFINE_CLIP = (0.0, 0.02, 0.05, 0.1)


def group_affine(wg: torch.Tensor, bits: int, method: str,
                 scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, scale, offset)`` of the groups ``wg [..., g]`` (float32) with w ≈ q * scale + offset, q float ``[..., g]``
    of integers in [-2^(bits-1), 2^(bits-1) - 1], scale and offset ``[..., 1]`` float32 holding values of
    ``scale_dtype``. rtn: the 2^bits levels span [min w, max w]. mse: of the ranges with either end clipped inwards by
    :data:`_AFFINE_CLIP` of the range (each also with the least-squares scale and offset of its rounding, and the
    rounding to them), the one with the least squared error as stored; never more error than rtn's. A constant group
    gets scale 0 and offset its value."""
    lo, hi = _levels(bits)

    def stored(v):
        return v.to(scale_dtype).to(torch.float32)

    def fit(s, o):
        s, o = stored(s), stored(o)
        q = _round(wg - o, s, lo, hi)
        return q, s, o, (wg - q * s - o).square().sum(-1, keepdim=True)

    wmin, wmax = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    span = wmax - wmin
    best = None
    for a in (_AFFINE_CLIP if method != "rtn" else (0.0,)):
        for b in (_AFFINE_CLIP if method != "rtn" else (0.0,)):
            s = span * (1 - a - b) / (hi - lo)
            tries = [fit(s, wmin + a * span - lo * s)]
            if method != "rtn":  # least squares (scale, offset) of that rounding
                q, n = tries[0][0], wg.shape[-1]
                sq, sw, sqq, sqw = (q.sum(-1, keepdim=True), wg.sum(-1, keepdim=True),
                                    q.square().sum(-1, keepdim=True), (q * wg).sum(-1, keepdim=True))
                det = n * sqq - sq * sq
                ls = torch.where(det > 0, (n * sqw - sq * sw) / det.clamp_min(1e-30), tries[0][1])
                tries.append(fit(ls, torch.where(det > 0, (sw - ls * sq) / n, tries[0][2])))
            for cand in tries:
                if best is None:
                    best = list(cand)
                    continue
                better = cand[3] < best[3]
                best = [torch.where(better, c, b_) for c, b_ in zip(cand, best)]
    q, s, o, _ = best
    return q, s, o


def quantize_weight(w: torch.Tensor, bits: int, group: int, scale_dtype: torch.dtype, method: str = "rtn",
                    symmetric: bool = True, chunk: int = 1 << 22):
    """``(q, scale, offset)`` of ``w [N, K]`` (module docstring; method rtn or mse, see :func:`group_scales` and
    :func:`group_affine`): q int8 ``[N, K]`` (8 bits) or uint8 ``[N, K / 2]`` (4 bits), scale ``[N, K / group]``
    (``[N, 1]`` for group 0) in ``scale_dtype``, offset like scale (None when ``symmetric``). Rows are done ``chunk``
    weights at a time (bounded memory for an embedding table)."""
    n, k = w.shape
    g = group or k
    rows = max(1, chunk // k)
    qs, scales, offsets = [], [], []
    for r in range(0, n, rows):
        wg = w[r:r + rows].detach().to(torch.float32).reshape(-1, k // g, g)
        if symmetric:
            q, s = group_scales(wg, bits, method, scale_dtype)
        else:
            q, s, o = group_affine(wg, bits, method, scale_dtype)
            offsets.append(o.squeeze(-1).to(scale_dtype))
        qs.append(q.reshape(-1, k).to(torch.int8))
        scales.append(s.squeeze(-1).to(scale_dtype))
    q, scale = torch.cat(qs), torch.cat(scales)
    return (q if bits == 8 else pack_int4(q)), scale, (torch.cat(offsets) if offsets else None)


def _upper_cholesky_of_inverse(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of ``(h + d I)⁻¹``, d = ``damp`` times the mean diagonal (x10 up to three times if
    that is numerically not positive definite)."""
    k, mean = h.shape[0], float(h.diagonal().mean())
    for attempt in range(4):
        chol, info = torch.linalg.cholesky_ex(h + torch.eye(k, dtype=h.dtype, device=h.device) * damp * 10 ** attempt
                                              * mean)
        if not info:
            hinv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if not info:
                return hinv
    raise SparsecError("quantize: GPTQ's Hessian stayed singular after 1000x the dampening")


def gptq_weight(w: torch.Tensor, h: torch.Tensor, bits: int, group: int, scale_dtype: torch.dtype,
                damp: float = 0.01, block: int = 128, act_order: bool = False, symmetric: bool = True):
    """GPTQ (Frantar et al. 2022, arXiv 2210.17323) of ``w [N, K]`` given ``h [K, K]``, the sum of x xᵀ over the
    calibration inputs x of the layer: ``(q, scale, offset)`` as :func:`quantize_weight` returns them.

    Columns in order (groups stay contiguous), in blocks of ``block`` columns with lazy updates: each
    column is rounded with its group's scale, and its error, divided by the diagonal of the upper Cholesky factor of
    H⁻¹, is spread over the columns not yet quantized. H gets ``damp`` times its mean diagonal added to the diagonal
    (dampening); an input that is always zero (H's diagonal 0) gets weight 0. A group's scale is chosen (mse, see
    :func:`group_scales`) from the updated weights when its first column comes; group 0: one scale per row, from the
    whole row before the first column. ``act_order``: the columns in order of decreasing H diagonal instead, every
    group's scale chosen (mse) from the weights before any column is quantized. ``symmetric=False``: scale and offset
    by :func:`group_affine` (mse) at the same points."""
    n, k = w.shape
    lo, hi = _levels(bits)
    g = group or k
    if group:
        block = max(group, block // group * group)  # a group never straddles two blocks
    W = w.detach().to(torch.float64).clone()
    H = h.detach().to(torch.float64).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Q = torch.zeros_like(W)

    def params(wg):  # (scale, offset) [rows, groups] float32 of the groups wg [rows, groups, g]; offset 0 if symmetric
        if symmetric:
            _, sc = group_scales(wg.to(torch.float32), bits, "mse", scale_dtype)
            return sc.squeeze(-1), torch.zeros_like(sc.squeeze(-1))
        _, sc, off = group_affine(wg.to(torch.float32), bits, "mse", scale_dtype)
        return sc.squeeze(-1), off.squeeze(-1)

    if not group or act_order:  # every scale before the first column
        scales, offsets = params(W.reshape(n, k // g, g))
    else:
        scales, offsets = (torch.zeros(n, k // g, dtype=torch.float32, device=w.device) for _ in range(2))
    s, o = scales[:, 0].to(torch.float64), offsets[:, 0].to(torch.float64)
    order = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(k)
    if act_order:
        W, H = W[:, order], H[order][:, order]
    hinv = _upper_cholesky_of_inverse(H, damp)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(n, i2 - i1, dtype=W.dtype, device=W.device), \
            hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if group and (act_order or col % group == 0):
                j = int(order[col]) // group
                if not act_order:
                    scales[:, j], offsets[:, j] = (v[:, 0] for v in params(W1[:, i:i + group].unsqueeze(1)))
                s, o = scales[:, j].to(torch.float64), offsets[:, j].to(torch.float64)
            x = W1[:, i]
            q = _round(x - o, s, lo, hi)
            Q[:, int(order[col])] = q
            err = (x - q * s - o) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ hinv[i1:i2, i2:]
    q = Q.to(torch.int8)
    return (q if bits == 8 else pack_int4(q)), scales.to(scale_dtype), None if symmetric else offsets.to(scale_dtype)


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
        w.inputs.append(layer.input)
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


class _Stop(Exception):
    """Raised by the last observer of a GPTQ stage: the rest of the forward is not needed."""


class _Hessian(nn.Module):
    """Identity that sums x xᵀ over the tokens of its input (float64); ``stop``: then ends the forward
    (:class:`_Stop`)."""

    def __init__(self, stop: bool):
        super().__init__()
        self.stop, self.sum, self.tokens = stop, None, 0

    def forward(self, x):
        flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        xtx = (flat.T @ flat).to(torch.float64)
        self.sum = xtx if self.sum is None else self.sum + xtx
        self.tokens += flat.shape[0]
        if self.stop:
            raise _Stop
        return x


class _UpTo(nn.Module):
    """``gm`` as forward_loop sees it (same signature and input spec), each call ending at a :class:`_Stop`."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm
        if hasattr(gm, "_in_spec"):
            self._in_spec = gm._in_spec

        def forward(*args, **kwargs):
            try:
                gm(*args, **kwargs)
            except _Stop:
                pass

        forward.__signature__ = inspect.signature(gm.forward)
        self.forward = forward


def _canonical(w: _Weight) -> torch.Tensor:
    return w.param.detach().t() if w.transposed else w.param.detach()


def _write(w: _Weight, quantized: tuple, bits: int, group: int) -> None:
    """Put the dequantized weight (``quantized``: q, scale, offset) into the float parameter, so the following
    calibration forwards compute with it."""
    q, scale, offset = quantized
    dq = DEQUANTIZE(q, scale, bits, group, w.param.dtype, offset)
    with torch.no_grad():
        w.param.copy_(dq.t() if w.transposed else dq)


def _gptq(gm: fx.GraphModule, cfg: QuantizeConfig, ctx: PassContext, weights: list[_Weight],
          scale_dtype: torch.dtype) -> tuple[dict, dict]:
    """``({id(param): (q, scale, offset)}, stats)`` of every weight under method gptq (QuantizeConfig): the weights of
    one linear layer each by :func:`gptq_weight`, stage by stage in graph order (a stage: the linears of one numbered
    block, or one layer outside blocks), each stage's XᵀX gathered by one forward over the calibration data that stops
    after the stage's last input, with every earlier weight already quantized; the others (embeddings, tied weights) by
    mse first. The float parameters are restored before returning."""
    from sparsec import progress
    from sparsec.calibration import all_reduce_sum
    from sparsec.passes.teal import block_of

    if ctx.forward_loop is None:
        raise UsageError("quantize: method=gptq needs calibration data: give forward_loop=fn in Python (or"
                         " --calib-data FILE on the command line), or use method=mse")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    own = [w for w in weights if len(w.linears) == 1 and not w.embeddings]
    originals = {id(w.param): w.param.detach().clone() for w in weights}
    done, tokens = {}, 0
    try:
        for w in weights:
            if w not in own:
                done[id(w.param)] = quantize_weight(_canonical(w), cfg.bits, cfg.group, scale_dtype, "mse",
                                                    cfg.symmetric)
                _write(w, done[id(w.param)], cfg.bits, cfg.group)
        stages: dict[str, list[_Weight]] = {}
        for w in sorted(own, key=lambda w: order[w.linears[0][0]]):
            stages.setdefault(block_of(w.module) or w.module, []).append(w)
        for stage in progress.iterate(list(stages.values()), "quantize: gptq", len(stages)):
            readers: dict[fx.Node, list[_Weight]] = {}
            for w in stage:
                readers.setdefault(w.inputs[0], []).append(w)
            xs = sorted(readers, key=order.get)
            observers = []
            for j, x in enumerate(xs):
                name = f"{HOLDER}_hessian{j}"
                gm.add_module(name, _Hessian(stop=j == len(xs) - 1))
                with gm.graph.inserting_after(x):
                    node = gm.graph.call_module(name, (x,))
                x.replace_all_uses_with(node, delete_user_cb=lambda u, node=node: u is not node)
                observers.append((node, name))
            gm.recompile()
            try:
                with torch.no_grad():
                    ctx.forward_loop(_UpTo(gm))
            finally:
                for node, _ in observers:
                    node.replace_all_uses_with(node.args[0])
                    gm.graph.erase_node(node)
                hessians = [gm.get_submodule(name) for _, name in observers]
                for _, name in observers:
                    gm.delete_submodule(name)
                gm.recompile()
            for x, hess in zip(xs, hessians):
                if hess.sum is None:
                    raise SparsecError(f"quantize: the calibration data never reached layer '{readers[x][0].module}':"
                                       " the forward_loop ran no batch through the model")
                all_reduce_sum(hess.sum)
                tokens = max(tokens, hess.tokens)
                for w in readers[x]:
                    done[id(w.param)] = gptq_weight(_canonical(w), hess.sum, cfg.bits, cfg.group, scale_dtype,
                                                    cfg.damp, act_order=cfg.act_order, symmetric=cfg.symmetric)
                    _write(w, done[id(w.param)], cfg.bits, cfg.group)
    finally:
        with torch.no_grad():
            for w in weights:
                w.param.copy_(originals[id(w.param)])
    return done, {"gptq_weights": len(own), "gptq_stages": len(stages), "calibration_tokens": tokens}


@register_pass("quantize", QuantizeConfig, needs_calibration="method=gptq",
               after=("rotate", "prune", "fold", "db-mlp"), before=("teal", "cats"),
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
    done, extra = _gptq(gm, cfg, ctx, weights, scale_dtype) if cfg.method == "gptq" else ({}, {})
    for w in weights:
        canonical = _canonical(w)
        q, scale, offset = done[id(w.param)] if done else quantize_weight(canonical, cfg.bits, cfg.group,
                                                                           scale_dtype, cfg.method, cfg.symmetric)
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
        on = None
        if offset is not None:
            holder.register_buffer(f"{buf}_offset", offset)
            with graph.inserting_after(sn):
                on = graph.get_attr(f"{holder_name}.{buf}_offset")
        for node in (qn, sn, on):
            if node is not None:
                _meta_from(node, w.linears[0][0] if w.linears else w.embeddings[0])
        if w.linears:
            with graph.inserting_after(on or sn):
                value = graph.call_function(DEQUANTIZE, (qn, sn, *args, *([on] if on else [])))
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
                go = [graph.call_function(_EMBEDDING, (on, emb.args[1], *rest))] if on else []
                value = graph.call_function(DEQUANTIZE, (gq, gs, *args, *go))
            for node in (gq, gs, *go, value):
                _meta_from(node, emb)
            emb.replace_all_uses_with(value)
            graph.erase_node(emb)
        dq = DEQUANTIZE(q, scale, *args, offset)
        err = float((dq.double() - canonical.double()).norm() / canonical.double().norm().clamp_min(1e-300))
        before = w.param.numel() * w.param.element_size()
        after = sum(t.numel() * t.element_size() for t in (q, scale, offset) if t is not None)
        totals["bytes_before"] += before
        totals["bytes_after"] += after
        method = cfg.method if cfg.method != "gptq" or (len(w.linears) == 1 and not w.embeddings) else "mse"
        entries.append({"module": w.module, "op": "quantize", "parameter": w.name, "bits": cfg.bits,
                        "group": cfg.group, "symmetric": cfg.symmetric, "method": method,
                        "shape": list(canonical.shape),
                        "uses": [module_path(n) for n in [*(la for la, _ in w.linears), *w.embeddings]],
                        "rel_error": round(err, 6), "bytes_before": before, "bytes_after": after})
    _drop_unused(gm, {id(w.param) for w in weights})
    graph.lint()
    gm.recompile()
    stats = {"bits": cfg.bits, "group": cfg.group, "symmetric": cfg.symmetric, "method": cfg.method, **extra,
             "weights_quantized": len(entries),
             **totals,
             "compression": round(totals["bytes_before"] / totals["bytes_after"], 4) if entries else None,
             "definition": _DEFINITION}
    return PassResult(gm, stats, entries, "no linear layer or embedding with a floating-point weight matched the"
                      " targets")
