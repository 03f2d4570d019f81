"""sparsec's custom operators (``torch.library``, namespace ``sparsec::``).

``sparsec::threshold(Tensor x, Tensor t) -> Tensor`` computes ``x * (|x| > t)``: TEAL's magnitude threshold
(METHODS.md §2), ``t`` a 0-d tensor (a buffer of the rewritten module). Elements with ``|x| <= t`` become zero;
the others pass through unchanged, bit for bit. With ``t < 0`` nothing is zeroed (``|x| > t`` holds for every
number; NaN stays NaN), and ``t = 0`` zeroes only what is already zero, so both reproduce ``x`` exactly.

The op has a fake (meta) kernel, so graphs containing it export with ``torch.export``, save, load and re-export,
and an autograd formula (the straight mask: ``dx = dy * (|x| > t)``, no gradient for ``t``), so a thresholded
model fine-tunes. Importing this module registers the op; :mod:`sparsec.artifact` imports it before loading a
``model.pt2`` that may contain it (``torch.export.load`` needs the op registered).

``sparsec::threshold_prefill(Tensor x, Tensor t, str mode) -> Tensor`` is TEAL's prefill policy (``teal{prefill=…}``):
the threshold on some token positions only. The token axis is ``x``'s second-to-last (``[batch, S, hidden]``):

* ``half``: positions ``< S // 2`` pass unchanged, the rest are thresholded (TEAL's quality path; S = 1 is
  thresholded);
* ``dense``: nothing is thresholded when ``S > 1``, the token is when ``S = 1`` (TEAL's speed path: dense prefill,
  sparse decode).

One op rather than aten ops around ``sparsec::threshold``: the rule depends on the symbolic S of an exported program,
which a backend reads off the tensor it lowers (ONNX: Shape/Range/Less/Or, TVM: the token index of a TE compute),
and a backend that matches ``sparsec::threshold`` to fuse it into a sparse kernel never mistakes this op for it.
Thresholded positions compute exactly ``x * (|x| > t)``, passed ones are ``x`` bit for bit. Same fake kernel and
straight-mask gradient as ``sparsec::threshold``.

``sparsec::dequantize(Tensor q, Tensor scale, int bits, int group, ScalarType dtype, Tensor? offset=None) -> Tensor`` is
the weight of a layer the ``quantize`` pass quantized: ``w[..., k] = float32(q[..., k]) * float32(scale[..., k //
group])`` (``group 0``: ``scale[..., 0]``, one scale per row, i.e. per output channel of a linear weight ``[N, K]``),
plus ``float32(offset[..., k // group])`` when given (asymmetric quantization: ``offset`` has the shape and dtype of
``scale``), cast to ``dtype``. ``bits=8``: ``q`` is int8 ``[..., K]``. ``bits=4``: ``q`` is uint8 ``[..., K / 2]``, two
values per byte, the even ``k`` in the low nibble, each stored as ``value + 8`` (ONNX Runtime's ``MatMulNBits`` layout
with its default zero point 8). A linear layer computes ``linear(x, dequantize(q, s, ...), b)``; an embedding gathers
rows of ``q`` and ``scale`` first and dequantizes only those (:mod:`sparsec.passes.quantize`). No gradient: quantized
weights are frozen.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["threshold", "THRESHOLD", "threshold_prefill", "THRESHOLD_PREFILL", "dequantize", "DEQUANTIZE"]


@torch.library.custom_op("sparsec::threshold", mutates_args=())
def threshold(x: Tensor, t: Tensor) -> Tensor:
    """``x * (|x| > t)``: zero the elements whose magnitude is at most ``t`` (a 0-d tensor)."""
    return x * (x.abs() > t)


@threshold.register_fake
def _threshold_fake(x: Tensor, t: Tensor) -> Tensor:
    torch._check(t.dim() == 0, lambda: f"sparsec::threshold: t must be a 0-d tensor, got shape {tuple(t.shape)}")
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, t = inputs
    ctx.save_for_backward(x, t)


def _backward(ctx, grad):
    x, t = ctx.saved_tensors
    return grad * (x.abs() > t), None


threshold.register_autograd(_backward, setup_context=_setup_context)

#: The OpOverload that appears in exported graphs (``torch.ops.sparsec.threshold.default``).
THRESHOLD = torch.ops.sparsec.threshold.default

#: ``teal{prefill=…}`` modes that :func:`threshold_prefill` takes (``all`` is plain :func:`threshold`).
PREFILL_MODES = ("half", "dense")


def dense_tokens(s, mode: str, minimum=min):
    """How many leading token positions of an input with ``s`` tokens pass unthresholded under ``mode``: ``s // 2``
    (half) or ``s * min(s - 1, 1)`` (dense: s when s > 1, else 0). ``s`` may be symbolic (a TVM PrimExpr with
    ``minimum=tirx.min``)."""
    return s // 2 if mode == "half" else s * minimum(s - 1, 1)


def _keep(x: Tensor, t: Tensor, mode: str) -> Tensor:
    keep = x.abs() > t
    n = dense_tokens(x.shape[-2], mode)
    if n:
        keep[..., :n, :] = True
    return keep


def _check_prefill_args(x: Tensor, t: Tensor, mode: str) -> None:
    torch._check(t.dim() == 0, lambda: "sparsec::threshold_prefill: t must be a 0-d tensor, got shape"
                 f" {tuple(t.shape)}")
    torch._check(x.dim() >= 2, lambda: "sparsec::threshold_prefill: x needs a token axis (its second-to-last),"
                 f" got shape {tuple(x.shape)}")
    torch._check(mode in PREFILL_MODES, lambda: f"sparsec::threshold_prefill: mode must be one of {PREFILL_MODES},"
                 f" got {mode!r}")


@torch.library.custom_op("sparsec::threshold_prefill", mutates_args=())
def threshold_prefill(x: Tensor, t: Tensor, mode: str) -> Tensor:
    """``x * (|x| > t)`` on the token positions ``mode`` thresholds, ``x`` on the others (module docstring)."""
    _check_prefill_args(x, t, mode)
    return x * _keep(x, t, mode)


@threshold_prefill.register_fake
def _threshold_prefill_fake(x: Tensor, t: Tensor, mode: str) -> Tensor:
    _check_prefill_args(x, t, mode)
    return torch.empty_like(x)


def _prefill_setup_context(ctx, inputs, output):
    x, t, mode = inputs
    ctx.save_for_backward(x, t)
    ctx.mode = mode


def _prefill_backward(ctx, grad):
    x, t = ctx.saved_tensors
    return grad * _keep(x, t, ctx.mode), None, None


threshold_prefill.register_autograd(_prefill_backward, setup_context=_prefill_setup_context)

#: ``torch.ops.sparsec.threshold_prefill.default``
THRESHOLD_PREFILL = torch.ops.sparsec.threshold_prefill.default

#: weight bits ``sparsec::dequantize`` takes
QUANT_BITS = (8, 4)


def unpack_int4(q: Tensor) -> Tensor:
    """uint8 ``[..., K / 2]`` (two values per byte, even k low, stored + 8) -> int8 ``[..., K]`` in [-8, 7]."""
    pairs = torch.stack([q & 15, q >> 4], dim=-1).to(torch.int8) - 8
    return pairs.reshape(*q.shape[:-1], q.shape[-1] * 2)


def pack_int4(v: Tensor) -> Tensor:
    """int8 ``[..., K]`` in [-8, 7], K even -> uint8 ``[..., K / 2]`` (the inverse of :func:`unpack_int4`)."""
    u = (v.to(torch.int16) + 8).to(torch.uint8).reshape(*v.shape[:-1], v.shape[-1] // 2, 2)
    return u[..., 0] | (u[..., 1] << 4)


def _check_dequantize_args(q: Tensor, scale: Tensor, bits: int, group: int, offset: Tensor | None = None) -> int:
    """K, the dequantized last dimension, after checking the arguments of ``sparsec::dequantize``."""
    torch._check(offset is None or (offset.shape == scale.shape and offset.dtype == scale.dtype),
                 lambda: f"sparsec::dequantize: offset must have scale's shape and dtype, got {tuple(offset.shape)}"
                 f" {offset.dtype} for scale {tuple(scale.shape)} {scale.dtype}")
    torch._check(bits in QUANT_BITS, lambda: f"sparsec::dequantize: bits must be one of {QUANT_BITS}, got {bits}")
    torch._check(q.dtype == (torch.int8 if bits == 8 else torch.uint8),
                 lambda: f"sparsec::dequantize: {bits}-bit values are stored as {'int8' if bits == 8 else 'uint8'},"
                 f" got {q.dtype}")
    k = q.shape[-1] * (8 // bits)
    torch._check(scale.dim() == q.dim() and group >= 0,
                 lambda: f"sparsec::dequantize: scale must have q's rank and group must be >= 0, got scale shape"
                 f" {tuple(scale.shape)} for q {tuple(q.shape)}, group {group}")
    torch._check(scale.shape[-1] == (k // group if group else 1),
                 lambda: f"sparsec::dequantize: {k} values in groups of {group} need"
                 f" {k // group if group else 1} scales per row, got {scale.shape[-1]}")
    return k


@torch.library.custom_op("sparsec::dequantize", mutates_args=())
def dequantize(q: Tensor, scale: Tensor, bits: int, group: int, dtype: torch.dtype,
               offset: Tensor | None = None) -> Tensor:
    """``float32(q) * float32(scale) (+ float32(offset))`` per group of ``group`` values along the last dimension,
    as ``dtype``."""
    _check_dequantize_args(q, scale, bits, group, offset)
    v = (q if bits == 8 else unpack_int4(q)).to(torch.float32)
    s = scale.to(torch.float32)
    if group:
        v = v.unflatten(-1, (-1, group)) * s.unsqueeze(-1)
        v = (v if offset is None else v + offset.to(torch.float32).unsqueeze(-1)).flatten(-2)
    else:
        v = v * s if offset is None else v * s + offset.to(torch.float32)
    return v.to(dtype)


@dequantize.register_fake
def _dequantize_fake(q: Tensor, scale: Tensor, bits: int, group: int, dtype: torch.dtype,
                     offset: Tensor | None = None) -> Tensor:
    k = _check_dequantize_args(q, scale, bits, group, offset)
    return q.new_empty((*q.shape[:-1], k), dtype=dtype)


#: ``torch.ops.sparsec.dequantize.default``
DEQUANTIZE = torch.ops.sparsec.dequantize.default

import sparsec.training  # noqa: E402,F401  defines sparsec::regularize (training taps) a program may contain
