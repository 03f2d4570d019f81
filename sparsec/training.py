"""Training a sparsec-transformed module: the per-step contract.

Passes that need work during training insert submodules into the graph module that follow one protocol:

- ``sparsec_after_step(self, step: int) -> None``: run by :func:`after_step` after every optimiser step
  (re-applying pruning masks, clipping zeroth biases, advancing mixing schedules).

A training loop calls ``sparsec.training.after_step(model, step)`` right after ``optimizer.step()``.
"""
from __future__ import annotations

from torch import nn


def after_step(model: nn.Module, step: int) -> None:
    """Run every sparsec training hook in ``model`` for optimiser step ``step`` (0-based, the step just taken)."""
    target = getattr(model, "module", model)  # DDP / FSDP wrappers keep the model in .module
    for m in target.modules():
        hook = getattr(m, "sparsec_after_step", None)
        if callable(hook):
            hook(step)
