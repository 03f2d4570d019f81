"""sparsec's custom operators (``torch.library``, namespace ``sparsec::``).

``sparsec::threshold(Tensor x, Tensor t) -> Tensor`` computes ``x * (|x| > t)``: TEAL's magnitude threshold
(METHODS.md §2), ``t`` a 0-d tensor (a buffer of the rewritten module). Elements with ``|x| <= t`` become zero;
the others pass through unchanged, bit for bit. With ``t < 0`` nothing is zeroed (``|x| > t`` holds for every
number; NaN stays NaN), and ``t = 0`` zeroes only what is already zero, so both reproduce ``x`` exactly.

The op has a fake (meta) kernel, so graphs containing it export with ``torch.export``, save, load and re-export,
and an autograd formula (the straight mask: ``dx = dy * (|x| > t)``, no gradient for ``t``), so a thresholded
model fine-tunes. Importing this module registers the op; :mod:`sparsec.artifact` imports it before loading a
``model.pt2`` that may contain it (``torch.export.load`` needs the op registered).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["threshold", "THRESHOLD"]


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

import sparsec.training  # noqa: E402,F401  defines sparsec::regularize (training taps) a program may contain
