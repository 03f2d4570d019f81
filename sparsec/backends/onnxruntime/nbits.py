"""Quantized linears as ONNX Runtime's weight-only ``com.microsoft.MatMulNBits`` (``quantized_matmul="nbits"``).

The ``quantize`` pass's ``linear(x, sparsec::dequantize(q, scale, bits, group))`` exports as ``MatMul(x, Wt)`` (+
``Add`` of a bias, or GPT-2's ``Gemm``) with ``Wt`` the transposed dequantizing subgraph over the q and scale
initializers (:mod:`.translations`), which ONNX Runtime folds into a float32 weight when the session is created.
:func:`apply_matmul_nbits` puts ``MatMulNBits(x, B, scales, , , bias)`` (bias: input 5) in its place, so the session
holds the packed weight and any ONNX Runtime with the contrib ops (CPU, CUDA, DirectML, WebGPU) runs it:

- ``B``: uint8 ``[N, K / block, block * bits / 8]``, initializer ``{q}_nbits``; 4 bits: q's bytes as they are (even
  k in the low nibble, value + 8: MatMulNBits's layout with its default zero point 8); 8 bits: q + 128 (its default
  zero point 128). q itself stays only where an embedding still gathers it (a tied LM head's table: stored twice);
- ``scales``: float32 ``[N * K / block]`` (float16 scales cast, exactly), each group's scale repeated over its
  blocks;
- weights with offsets (``quantize{symmetric=false}``: ``w = q * scale + offset``): MatMulNBits of ``q * scale``
  plus the offsets' share ``Σ_g(x) @ offsetᵀ`` in standard ops (``ReduceSum`` of x's groups, a ``MatMul`` by the
  float32 ``[K / group, N]`` transposed offsets, ``Add``): MatMulNBits's float zero points (``8 - offset / scale``)
  would compute the same, but ONNX Runtime 1.32's CPU has no fast kernel for them (4096x11008: 106 ms against 2.8 ms
  without, benchmarks/kernels.py), while integer zero points cannot hold these offsets;
- ``block_size``: the largest of :data:`BLOCKS` (ONNX Runtime's fast CPU block sizes) dividing the group (K with
  one scale per row); the same weights, bit for bit. When none divides, the layer keeps the standard ops;
- ``accuracy_level`` 0: float32 compute; outputs match torch within float32 summation order (1e-4).

A linear is taken when its weight subgraph reads the q and scale of a ``sparsec::dequantize`` of the torch program
with float32 output whose every use is a linear layer's weight (``aten.linear``, or ``addmm`` / ``mm`` through
``aten.t``), and nothing but small (<= 16 elements) constants besides; float32 activations only. Embeddings (Gather
of dequantized rows) keep the standard ops. ONNX Runtime 1.32's CPU has a float32-compute kernel for 4 bits; for 8
bits it has one only with int8 activations (``accuracy_level`` 4, not used: about 1e-2 relative error), so at level 0
it dequantizes the whole weight in every call: correct, but measured 15-35x slower than the float32 MatMul of a
4096-wide layer. So only 4-bit linears are taken (:data:`BITS`); 8-bit ones keep the standard ops, which the session
folds into float32 weights (float32 speed and memory; :func:`pack` still writes the 8-bit form, for benchmarks).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparsec.backends.onnxruntime.sparse import _drop_unused, _swap, linears, weight_initializers

#: ``quantized_matmul`` choices: nbits = MatMulNBits wherever it applies; standard = standard ONNX ops only
MODES = ("nbits", "standard")
#: ONNX domain of ONNX Runtime's contrib ops
DOMAIN = "com.microsoft"
#: the weight bits made MatMulNBits; 8-bit layers keep the standard ops (folded to float32 weights when the session
#: starts), since ORT's 8-bit float32-compute kernel is 15-35x slower than float32 MatMul (module docstring)
BITS = (4,)
#: block sizes with ONNX Runtime's fast CPU kernels (MLAS), the largest first
BLOCKS = (256, 128, 64, 32, 16)
#: the most elements a constant beside q and scale may have in a weight subgraph (shapes, scalars)
_SMALL = 16


@dataclass(frozen=True)
class QuantizedWeight:
    """The ``sparsec::dequantize`` of a linear layer's weight: q's initializer is the key, ``scale`` the scale's,
    ``offset`` the offset's (None without)."""

    scale: str
    bits: int
    group: int
    offset: str | None = None


def block_size(group: int, k: int) -> int | None:
    """The MatMulNBits block of weights quantized in groups of ``group`` (0: one per row of ``k``), or None."""
    return next((b for b in BLOCKS if (group or k) % b == 0), None)


def pack(q: np.ndarray, scale: np.ndarray, bits: int, group: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """``(B, scales)`` of MatMulNBits computing ``dequantize(q, scale, bits, group)`` (:mod:`sparsec.ops`) in blocks
    of ``block`` (a divisor of the group): B uint8 ``[N, K / block, block * bits / 8]``, scales float32
    ``[N * K / block]``."""
    n = q.shape[0]
    k = q.shape[1] * 8 // bits
    data = q.view(np.uint8) ^ 0x80 if bits == 8 else q  # int8 v -> uint8 v + 128
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(n, k // block, block * bits // 8)
    scales = np.repeat(scale.astype(np.float32), (group or k) // block, axis=1).reshape(-1)
    return b, scales


def quantized_weights(program) -> dict[str, QuantizedWeight]:
    """``{q's name: QuantizedWeight}`` of every ``sparsec::dequantize`` of ``program`` (an ExportedProgram) of a
    buffer / constant q and scale with float32 output used only as linear layers' weights (module docstring); names
    as the ONNX initializers have them (the state-dict names)."""
    import torch

    from sparsec.graph import dequantize_tensors
    from sparsec.ops import DEQUANTIZE

    sig = program.graph_signature
    names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    found = {}
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target is not DEQUANTIZE:
            continue
        (q, scale, offset), (bits, group, dtype) = dequantize_tensors(node), node.args[2:5]
        if (dtype == torch.float32 and node.users and all(_weight_use(u, node) for u in node.users)
                and all(getattr(t, "name", None) in names for t in (q, scale, offset) if t is not None)):
            found[names[q.name]] = QuantizedWeight(names[scale.name], bits, group,
                                                   names[offset.name] if offset is not None else None)
    return found


def _weight_use(user, value) -> bool:
    """True when ``user`` reads ``value`` only as a linear layer's weight: ``linear(x, W)``, or ``t(W)`` read only as
    ``addmm(b, x, W.t())`` / ``mm(x, W.t())``."""
    import torch

    aten = torch.ops.aten
    if user.target is aten.linear.default:
        return user.args[1] is value and value not in (user.args[0], *user.args[2:])
    if user.target is aten.t.default:
        return bool(user.users) and all(
            (u.target is aten.addmm.default and u.args[2] is user and user not in u.args[:2])
            or (u.target is aten.mm.default and u.args[1] is user and u.args[0] is not user) for u in user.users)
    return False


def apply_matmul_nbits(model, program) -> dict:
    """Replace the quantized linears of ``model`` (onnx_ir, in place) by MatMulNBits (module docstring).

    ``program``: the ExportedProgram the model came from. Returns what the metadata records: ``{"mode": "nbits",
    "matmulnbits": count, "blocks": {block_size: count}, "standard": [{"layer", "reason"}]}`` (``standard``: the
    quantized linears left in standard ops)."""
    import onnx_ir as ir

    weights = quantized_weights(program)
    info: dict = {"mode": "nbits", "matmulnbits": 0, "blocks": {}, "standard": []}
    made: dict[str, tuple] = {}  # q's name -> (B, scales) initializers
    for lin in linears(model):
        if not lin.quantized:
            continue
        reads = weight_initializers(lin.wt) or []
        qs = [v for v in reads if v.name in weights]
        w = weights[qs[0].name] if len(qs) == 1 else None
        scale = model.graph.initializers.get(w.scale) if w else None
        offset = model.graph.initializers.get(w.offset) if w and w.offset else None
        k, n = lin.shape
        if (w is None or scale is None or scale not in reads or (w.offset and offset not in reads)
                or any(v.const_value.size > _SMALL for v in reads if v not in (qs[0], scale, offset))
                or list(qs[0].shape) != [n, k * w.bits // 8]
                or list(scale.shape) != [n, k // w.group if w.group else 1]):
            info["standard"].append({"layer": lin.layer, "reason": "its weight is not one dequantize of a linear"})
            continue
        if w.bits not in BITS:
            info["standard"].append({"layer": lin.layer, "reason": f"{w.bits}-bit weights keep the standard ops"})
            continue
        block = block_size(w.group, k)
        if block is None:
            info["standard"].append({"layer": lin.layer, "reason": f"no block of {', '.join(map(str, BLOCKS))}"
                                     f" divides its {'group of ' + str(w.group) if w.group else str(k) + ' inputs'}"})
            continue
        if offset is not None and lin.x.shape is None:
            info["standard"].append({"layer": lin.layer, "reason": "its input's rank is unknown (offsets need it)"})
            continue
        q = qs[0]
        if q.name not in made:
            b, s = pack(q.const_value.numpy(), scale.const_value.numpy(), w.bits, w.group, block)
            made[q.name] = tuple(_initializer(model, f"{v.name}_nbits", a) for v, a in ((q, b), (scale, s)))
            if offset is not None:  # [N, G] -> float32 [G, N]
                made[q.name] += (_initializer(model, f"{offset.name}_t", np.ascontiguousarray(
                    offset.const_value.numpy().astype(np.float32).T)),)
        b, s, *offsets_t = made[q.name]
        inputs = [lin.x, b, s] + ([None, None, lin.bias] if lin.bias is not None else [])
        attributes = ir.convenience.convert_attributes(dict(K=k, N=n, bits=w.bits, block_size=block,
                                                            accuracy_level=0))
        nodes = [ir.Node(DOMAIN, "MatMulNBits", inputs, attributes, name=f"{lin.matmul.name}_nbits", num_outputs=1)]
        if offsets_t:
            nodes += _offset_term(model, lin, nodes[0].outputs[0], offsets_t[0], w.group or k)
        _swap(model, lin, nodes)
        info["matmulnbits"] += 1
        info["blocks"][str(block)] = info["blocks"].get(str(block), 0) + 1
    if info["matmulnbits"]:
        model.opset_imports[DOMAIN] = 1
        _drop_unused(model)  # the dequantizing subgraphs, and q / scale where nothing else reads them
    return info


def _offset_term(model, lin, y, offsets_t, group: int) -> list:
    """Nodes adding ``Σ_g(x) @ offsets_t`` to ``y`` (the MatMulNBits output): x ``[..., K]`` reshaped to ``[...,
    K / group, group]``, summed over its last axis, times the transposed offsets ``[K / group, N]``."""
    import onnx_ir as ir

    k = lin.shape[0]
    name = lin.matmul.name
    lead = len(lin.x.shape) - 1
    shape = _initializer(model, f"{name}_groups_shape", np.array([0] * lead + [k // group, group], dtype=np.int64))
    axes = _initializer(model, f"{name}_groups_axes", np.array([-1], dtype=np.int64))
    grouped = ir.Node("", "Reshape", [lin.x, shape], name=f"{name}_groups", num_outputs=1)
    sums = ir.Node("", "ReduceSum", [grouped.outputs[0], axes], ir.convenience.convert_attributes(dict(keepdims=0)),
                   name=f"{name}_group_sums", num_outputs=1)
    term = ir.Node("", "MatMul", [sums.outputs[0], offsets_t], name=f"{name}_offset_matmul", num_outputs=1)
    total = ir.Node("", "Add", [y, term.outputs[0]], name=f"{name}_with_offsets", num_outputs=1)
    return [grouped, sums, term, total]


def _initializer(model, name: str, array: np.ndarray):
    import onnx_ir as ir

    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    model.graph.register_initializer(value)
    return value


def summary(info: dict) -> str:
    """One line on what :func:`apply_matmul_nbits` did, e.g. '15 quantized linears use com.microsoft.MatMulNBits
    (block 32: 15), 0 keep standard ops'."""
    if info.get("mode") != "nbits":
        return "quantized linears keep standard ops (their weight folded to float32 when a session starts)"
    blocks = ", ".join(f"block {b}: {c}" for b, c in sorted(info["blocks"].items(), key=lambda bc: -int(bc[0])))
    line = f"{info['matmulnbits']} quantized linears use {DOMAIN}.MatMulNBits" + (f" ({blocks})" if blocks else "")
    kept = info["standard"]
    return line + f", {len(kept)} keep standard ops" + (f" (e.g. {kept[0]['layer']}: {kept[0]['reason']})"
                                                          if kept else "")
