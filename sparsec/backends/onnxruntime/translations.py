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
