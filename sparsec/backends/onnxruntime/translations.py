"""Translations of sparsec custom ops (``torch.library``, namespace ``sparsec::``) to standard ONNX ops.

One table for every custom op: :data:`TRANSLATIONS` maps the qualified op name (``'sparsec::threshold'``) to a
factory returning an onnxscript-traceable function (``onnxscript.opset18`` ops on its inputs), which
``torch.onnx.export(custom_translation_table=...)`` uses for every overload of the op. Standard ops only, so any
ONNX runtime runs the exported model. Add an op with::

    @register_translation("sparsec::my_op")
    def _my_op():
        from onnxscript import opset18 as op

        def my_op(x, t):
            return op.Mul(x, op.CastLike(op.Greater(op.Abs(x), op.CastLike(t, x)), x))
        return my_op

``sparsec.ops`` is imported first; other ops not defined in this process are skipped.
"""
from __future__ import annotations

from typing import Callable

#: qualified torch op name -> factory returning its ONNX translation (an onnxscript-traceable function)
TRANSLATIONS: dict[str, Callable[[], Callable]] = {}


def register_translation(op_name: str) -> Callable:
    """Decorator registering ``factory`` as the ONNX translation of ``op_name`` ('namespace::name')."""
    if "::" not in op_name:
        raise ValueError(f"op name must be 'namespace::name', not {op_name!r}")

    def deco(factory: Callable[[], Callable]) -> Callable[[], Callable]:
        TRANSLATIONS[op_name] = factory
        return factory

    return deco


def op_packet(op_name: str):
    """The ``torch.ops`` overload packet of 'namespace::name', or None when no such op is defined."""
    import torch

    ns, _, name = op_name.partition("::")
    try:
        return getattr(getattr(torch.ops, ns), name)
    except (AttributeError, RuntimeError):
        return None


def translation_table() -> dict:
    """``{OpOverload: onnxscript function}`` for every registered op defined in this process."""
    try:
        import sparsec.ops  # noqa: F401  defines the sparsec:: ops
    except ImportError:
        pass
    table = {}
    for op_name, factory in TRANSLATIONS.items():
        packet = op_packet(op_name)
        if packet is None:
            continue
        fn = factory()
        for overload in packet.overloads():
            table[getattr(packet, overload)] = fn
    return table


def has_translation(target) -> bool:
    """True when ``target`` (an OpOverload) is in :data:`TRANSLATIONS`."""
    name = getattr(target, "name", None)
    qualified = name() if callable(name) else ""
    return qualified.split(".", 1)[0] in TRANSLATIONS


@register_translation("sparsec::threshold")
def _threshold():
    """``x * (|x| > t)`` as Abs/Greater/Cast/Mul (bit-exact with the torch kernel, NaN propagates like torch)."""
    from onnxscript import opset18 as op

    def threshold(x, t):
        keep = op.Greater(op.Abs(x), op.CastLike(t, x))
        return op.Mul(x, op.CastLike(keep, x))

    return threshold


@register_translation("sparsec::threshold_prefill")
def _threshold_prefill():
    """``x * (|x| > t)`` on the token positions ``mode`` thresholds (:mod:`sparsec.ops`), from x's symbolic S:
    keep = ``Or(Greater(Abs(x), t), Less(Range(0, S)[:, None], n))`` with n = ``S // 2`` (half) or ``S * Min(S - 1,
    1)`` (dense). The sparse path (:mod:`.sparse`) recognises the ``Or`` and replaces such a linear only for one row."""
    from onnxscript import opset18 as op

    def threshold_prefill(x, t, mode: str):
        s = op.Squeeze(op.Shape(x, start=-2, end=-1))
        zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
        n = op.Div(s, op.Constant(value_int=2)) if mode == "half" else op.Mul(s, op.Min(op.Sub(s, one), one))
        dense_row = op.Less(op.Unsqueeze(op.Range(zero, s, one), op.Constant(value_ints=[1])), n)
        keep = op.Or(op.Greater(op.Abs(x), op.CastLike(t, x)), dense_row)
        return op.Mul(x, op.CastLike(keep, x))

    return threshold_prefill


@register_translation("sparsec::dequantize")
def _dequantize():
    """``float32(q) * float32(scale) (+ float32(offset))`` per group along the last axis, cast to ``dtype``
    (:mod:`sparsec.ops`), in standard opset-18 ops; bit-identical with the torch kernel (exact integer values, one
    float32 multiply (and add) per weight, then the same rounding cast). 4 bits: ``BitwiseAnd(q, 15)`` (even k) and
    ``BitShift(q, 4)`` (odd k) interleaved by ``Concat`` / ``Reshape``, minus 8. A group of ``group`` weights shares a
    scale through a ``Reshape`` to ``[..., K / group, group]`` (the scale ``Unsqueeze``d to ``[..., K / group, 1]``) and
    back. Leading dimensions may be anything, dynamic too: a constant weight ``[N, K]`` or gathered embedding rows ``[B,
    S, K]``; every target shape is built from ``Shape``s (no -1, so an empty leading dimension reshapes too).

    A weight dequantized from initializers is a constant subgraph; :func:`.export.keep_packed` keeps the exporter's
    optimizer from folding it into a float32 initializer (the .onnx file stores the packed integers)."""
    from onnxscript import opset18 as op

    def dequantize(q, scale, bits: int, group: int, dtype: int, offset=None):
        leading = op.Shape(q, end=-1)
        last = op.Shape(q, start=-1)  # K (8 bits) or K / 2 (4 bits)
        if bits == 4:
            axis = op.Constant(value_ints=[-1])
            low = op.BitwiseAnd(q, op.Constant(value=_uint8(15)))
            high = op.BitShift(q, op.Constant(value=_uint8(4)), direction="RIGHT")
            pairs = op.Concat(op.Unsqueeze(low, axis), op.Unsqueeze(high, axis), axis=-1)  # [..., K / 2, 2]
            last = op.Mul(last, op.Constant(value_ints=[2]))
            values = op.Reshape(op.Sub(op.Cast(pairs, to=1), op.Constant(value_float=8.0)),
                                op.Concat(leading, last, axis=0))
        else:
            values = op.Cast(q, to=1)  # FLOAT
        s = op.Cast(scale, to=1)
        o = None if offset is None else op.Cast(offset, to=1)
        if group:
            grouped = op.Reshape(values, op.Concat(leading, op.Shape(scale, start=-1),
                                                   op.Constant(value_ints=[group]), axis=0))
            w = op.Mul(grouped, op.Unsqueeze(s, op.Constant(value_ints=[-1])))
            if o is not None:
                w = op.Add(w, op.Unsqueeze(o, op.Constant(value_ints=[-1])))
            w = op.Reshape(w, op.Concat(leading, last, axis=0))
        else:
            w = op.Mul(values, s)  # s [..., 1] broadcasts over each row
            if o is not None:
                w = op.Add(w, o)
        return op.Cast(w, to=dtype)

    return dequantize


def _uint8(value: int):
    import numpy as np
    import onnx_ir as ir

    return ir.tensor(np.array(value, np.uint8))
