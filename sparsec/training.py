"""Training a sparsec-transformed module: the regularisation loss and the per-step contract.

A loop over a transformed module (``result.module()`` or ``sparsec.load(...)``, an ordinary trainable nn.Module)::

    loss = task_loss + sparsec.regularization_loss(model, step=step)
    loss.backward(); optimizer.step()
    sparsec.training.after_step(model, step)

Passes that need work during training insert holder submodules into the graph module that follow one protocol:

- ``sparsec_after_step(self, step: int) -> None``: run by :func:`after_step` after every optimiser step
  (re-applying pruning masks, clipping zeroth biases, advancing mixing schedules).
- ``sparsec_strip(self, gm: fx.GraphModule) -> None``: run by the ``strip`` pass before export; it removes the
  holder's training-only parts from ``gm`` (e.g. folds pruning masks into the weights).
- ``sparsec_restore(self, owner: nn.Module, name: str) -> None`` (optional): run once when
  :func:`restore_holders` gives the holder its class back (``owner.<name>`` is the holder); it rebuilds what
  torch.export does not keep (e.g. the pruned weights, found through ``owner``'s graph).

``torch.export`` keeps a holder's parameters and buffers but not its class: the module of a (re-)exported program
has a plain ``nn.Module`` at the holder's path. A holder class therefore keeps all its state in parameters and
buffers and registers itself with :func:`register_holder`; :func:`restore_holders` (called by :func:`after_step`
and the ``strip`` pass) gives every submodule named ``sparsec_NAME`` or ``sparsec_NAME_<k>`` its class back.

Penalties (the ``regularize`` pass) are taps ``sparsec::regularize(x, slot, ...)`` in the graph: an identity whose
options are constant arguments and which keeps the tensor it last saw (with its autograd history) on ``slot``, a
0-d buffer; :func:`regularization_loss` sums the scheduled penalties of those tensors.
"""
from __future__ import annotations

import math
import re

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

from sparsec.errors import SparsecError, UsageError

_LAST = "_sparsec_last"  # attribute of a tap's slot buffer: (tensor of the last forward, options)
_HOLDERS: dict[str, type[nn.Module]] = {}


@torch.library.custom_op("sparsec::regularize", mutates_args=())
def regularize_tap(x: Tensor, slot: Tensor, kind: str, a: float, normalize: bool, schedule: str, weight: float,
                   warmup_steps: int, peaks: list[float], ends: list[int]) -> Tensor:
    """Identity (a copy of ``x``) that records ``x`` on ``slot`` for :func:`regularization_loss`."""
    _record(x.detach(), slot, kind, a, normalize, schedule, weight, warmup_steps, peaks, ends)
    return x.clone()


@regularize_tap.register_fake
def _regularize_fake(x, slot, kind, a, normalize, schedule, weight, warmup_steps, peaks, ends):
    return torch.empty_like(x)


def _record(x: Tensor, slot: Tensor, *options) -> None:
    if not is_fake(x):  # nothing to keep while torch.export traces
        setattr(slot, _LAST, (x, options))


def _setup_context(ctx, inputs, output):
    _record(*inputs)  # the input itself, with its autograd history, so the penalty's gradient reaches the model


regularize_tap.register_autograd(lambda ctx, grad: (grad,) + (None,) * 9, setup_context=_setup_context)

#: The OpOverload that appears in graphs (``torch.ops.sparsec.regularize.default``).
REGULARIZE = torch.ops.sparsec.regularize.default


def schedule_weight(schedule: str, weight: float, step: int, *, warmup_steps: int = 0, peaks=(), ends=()) -> float:
    """The penalty factor λ at optimiser step ``step`` (METHODS.md §4).

    constant: ``weight``; linear: ``weight · min(step / warmup_steps, 1)``; progressive (ProSparse Algorithm 1):
    ``weight · λ(step)`` with ``λ = peaks[0]`` up to ``ends[0]``, then in stage i (``ends[i-1] < step <= ends[i]``)
    ``λ = peaks[i-1] + η (peaks[i] - peaks[i-1])``, ``η = (sin(-π/2 + π (step - ends[i-1]) / (ends[i] - ends[i-1]))
    + 1) / 2``, and ``peaks[-1]`` after the last end step.
    """
    if schedule == "constant":
        return weight
    if schedule == "linear":
        return weight * (min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0)
    if step <= ends[0]:
        return weight * peaks[0]
    for i in range(1, len(ends)):
        if step <= ends[i]:
            eta = (math.sin(-math.pi / 2 + math.pi * (step - ends[i - 1]) / (ends[i] - ends[i - 1])) + 1) / 2
            return weight * (peaks[i - 1] + eta * (peaks[i] - peaks[i - 1]))
    return weight * peaks[-1]


def penalty(x: Tensor, kind: str, a: float = 1.0, normalize: bool = True) -> Tensor:
    """L1 ``Σ|x|`` or Transformed L1 ``Σ (a+1)|x| / (a+|x|)`` (DSTF), divided by ``x.numel()`` when ``normalize``."""
    ax = x.abs()
    total = ax.sum() if kind == "l1" else ((a + 1) * ax / (a + ax)).sum()
    return total / x.numel() if normalize else total


def _taps(model: nn.Module) -> list[Tensor]:
    return [b for name, b in model.named_buffers() if re.search(r"(^|\.)sparsec_regularize(_\d+)?\.", name)]


def regularization_loss(model: nn.Module, *, step: int | None = None) -> Tensor:
    """Σ over the model's regularize taps of λ(step) · penalty(tensor of the last forward pass): a scalar tensor.

    Its gradient reaches the parameters when the forward pass ran with autograd on. ``step`` (the optimiser step,
    0-based) is needed by the linear and progressive schedules. Under DDP each rank adds the penalty of its own
    shard; with ``normalize=true`` (mean per element) DDP's gradient averaging equals the penalty of the global batch.
    """
    taps = _taps(model)
    if not taps:
        raise UsageError("regularization_loss: the model has no regularize taps; transform it with the 'regularize'"
                         " pass first (e.g. --pass 'relufy,regularize{kind=l1 weight=1e-3}')")
    total = None
    for slot in taps:
        last = getattr(slot, _LAST, None)
        if last is None:
            raise SparsecError("regularization_loss called before any forward pass: run the model on a batch"
                               " first, then add regularization_loss(model, step=step) to the loss")
        x, (kind, a, normalize, schedule, weight, warmup_steps, peaks, ends) = last
        if step is None and schedule != "constant":
            raise UsageError(f"regularization_loss: the {schedule} schedule needs the optimiser step:"
                             " regularization_loss(model, step=step)")
        lam = schedule_weight(schedule, weight, step or 0, warmup_steps=warmup_steps, peaks=peaks, ends=ends)
        term = lam * penalty(x, kind, a, normalize)
        total = term if total is None else total + term
    return total


def register_holder(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: ``cls.holder_name`` (e.g. ``'sparsec_db_mlp'``) names the holder's submodule."""
    _HOLDERS[cls.holder_name] = cls
    return cls


def restore_holders(model: nn.Module) -> None:
    """Give submodules named ``sparsec_NAME`` / ``sparsec_NAME_<k>`` of a registered holder class their class back."""
    from sparsec.registry import list_passes

    list_passes()  # imports the passes, which register their holder classes
    for name, module in model.named_modules():
        base = re.sub(r"_\d+$", "", name.rsplit(".", 1)[-1])
        cls = _HOLDERS.get(base)
        if cls is not None and type(module) is nn.Module:
            module.__class__ = cls
            if hasattr(cls, "sparsec_restore"):
                owner, _, attr = name.rpartition(".")
                module.sparsec_restore(model.get_submodule(owner), attr)


def after_step(model: nn.Module, step: int) -> None:
    """Run every sparsec training hook in ``model`` for optimiser step ``step`` (0-based, the step just taken)."""
    target = getattr(model, "module", model)  # DDP / FSDP wrappers keep the model in .module
    restore_holders(target)
    with torch.no_grad():
        for m in target.modules():
            hook = getattr(m, "sparsec_after_step", None)
            if callable(hook):
                hook(step)


def trainable(module: nn.Module) -> nn.Module:
    """Let ``.train()`` / ``.eval()`` be called on the module of an exported program (torch raises by default).

    The captured graph does not change with the mode: dropout stays as it was captured (off, in eval mode).
    """
    for name in ("train", "eval"):
        module.__dict__.pop(name, None)
    return module


def _hf_callback_class():
    from transformers import TrainerCallback

    class SparsecTrainerCallback(TrainerCallback):
        """Runs :func:`after_step` after every optimiser step of a ``transformers.Trainer`` (and lets it call
        ``model.train()`` on an exported module, see :func:`trainable`).

        The loss term: override ``Trainer.compute_loss`` to add ``regularization_loss(model, step=state.global_step)``.
        """

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            trainable(model)  # the Trainer calls model.train()

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            after_step(model, state.global_step)  # global_step is incremented after this event

    return SparsecTrainerCallback


def _lightning_callback_class():
    try:
        from lightning.pytorch import Callback
    except ImportError:
        from pytorch_lightning import Callback

    class SparsecLightningCallback(Callback):
        """Runs :func:`after_step` after every training batch (one optimiser step without gradient accumulation)."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            after_step(pl_module, trainer.global_step - 1)  # global_step counts the steps already taken

    return SparsecLightningCallback


_LAZY = {"SparsecTrainerCallback": _hf_callback_class, "SparsecLightningCallback": _lightning_callback_class}


def __getattr__(name: str):
    """The callback classes, defined on first use so that transformers / Lightning are imported only then."""
    if name in _LAZY:
        cls = _LAZY[name]()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module 'sparsec.training' has no attribute '{name}'")
