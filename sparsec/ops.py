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
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["threshold", "THRESHOLD", "threshold_prefill", "THRESHOLD_PREFILL"]


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

import sparsec.training  # noqa: E402,F401  defines sparsec::regularize (training taps) a program may contain
