"""One calling convention for every runnable sparsec model: the torch module (``sparsec.load``,
``TransformResult.module()``), a TVM build (``sparsec.load_compiled``), an ONNX model (``sparsec.load_onnx``) and
``sparsec run``.

Inputs go by keyword, ``model(input_ids=ids)``, or in one dict, ``model({"input_ids": ids})``: torch tensors or
numpy arrays, checked against the model's inputs (a one-line :class:`SparsecError` names a missing or unknown one).
A missing ``attention_mask`` defaults to ones of ``input_ids``' shape, as Hugging Face models default it.

Outputs come back as :class:`Outputs`: a dict in the model's order, named as the model names them (``logits``,
``last_hidden_state``; a cached program's ``logits``, ``present_keys_<i>``, ``present_values_<i>``; ``output_<i>``
only when the model names none), also indexable by position (``out[0]``); torch tensors for torch inputs, numpy
arrays for numpy inputs. (The torch module called with positional tensors returns the program's own outputs.)
"""
from __future__ import annotations

import weakref
from typing import Any, Mapping

import numpy as np

from sparsec.errors import UsageError

#: Appended to the error that names a missing input.
HOW_TO_PASS = " (pass each by keyword, or all in one dict)"
#: module -> the names of its outputs, for a module captured again (:func:`sparsec.frontend.output_names`)
OUTPUT_NAMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Outputs(dict):
    """A model's outputs by name, in the model's order; ``out[i]`` is the i-th, ``out.name`` the one named so."""

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):
            return list(self.values())[key]
        if key not in self and isinstance(key, str) and key.startswith("output_") and key[7:].isdigit():
            return list(self.values())[int(key[7:])]  # the positional names of sparsec before 0.2
        return super().__getitem__(key)

    def __getattr__(self, name: str):
        try:
            return self[name]
        except (KeyError, IndexError):
            raise AttributeError(name) from None

    def to_tuple(self) -> tuple:
        """The outputs in order (as Hugging Face's ``ModelOutput.to_tuple``)."""
        return tuple(self.values())


def positional_names(n: int) -> list[str]:
    """``output_0 .. output_<n-1>``: the names of outputs a model does not name."""
    return [f"output_{i}" for i in range(n)]


def program_output_names(program, names: list[str] | None = None) -> list[str]:
    """The output names of ``program`` (an ExportedProgram): ``names`` (as captured from the model) when they fit,
    else a cached program's names, else :func:`positional_names`."""
    from sparsec.kv_cache import cached_output_names, program_layout

    n = len(program.graph_signature.user_outputs)
    if names and len(names) == n:
        return list(names)
    layout = program_layout(program)
    if layout is not None and 1 + 2 * layout.layers == n:
        return cached_output_names(layout.layers)
    return positional_names(n)


def captured_output_names(out: Any) -> list[str] | None:
    """The names of a model's output: the keys of a Hugging Face ``ModelOutput`` (or any mapping) whose values are
    all tensors; None for a tensor or a tuple."""
    if isinstance(out, Mapping) and out:
        import torch

        if all(isinstance(v, torch.Tensor) for v in out.values()):
            return [str(k) for k in out.keys()]
    return None


def named_inputs(args: tuple, kwargs: dict) -> dict:
    """The inputs of a call given by keyword or as one dict, as one dict."""
    if not args:
        return dict(kwargs)
    if len(args) == 1 and isinstance(args[0], Mapping):
        if kwargs:
            raise UsageError("pass the inputs by keyword or in one dict, not both")
        return dict(args[0])
    raise UsageError("pass the inputs by keyword, model(input_ids=...), or in one dict, model({'input_ids': ...})")


def complete_inputs(named: dict, spec: list[dict], *, source: str = "the call", what: str = "the model",
                    hint: str = HOW_TO_PASS) -> dict:
    """``named`` with a missing ``attention_mask`` defaulted to ones of ``input_ids``' shape (in the dtype the model
    takes), checked against the input ``spec`` (:func:`sparsec.inputs.check_inputs`)."""
    from sparsec.inputs import check_inputs

    dtypes = {s["name"]: s["dtype"] for s in spec if "dtype" in s}
    ids = named.get("input_ids")
    if "attention_mask" in dtypes and "attention_mask" not in named and ids is not None and hasattr(ids, "shape"):
        if isinstance(ids, np.ndarray):
            named = {**named, "attention_mask": np.ones(ids.shape, dtype=dtypes["attention_mask"])}
        else:
            import torch

            mask = torch.ones(tuple(ids.shape), dtype=getattr(torch, dtypes["attention_mask"]), device=ids.device)
            named = {**named, "attention_mask": mask}
    check_inputs(named, spec, source=source, what=what, hint=hint)
    return named


def as_numpy(value) -> np.ndarray:
    """A numpy array of a tensor or array-like (a copy only where needed)."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def as_array(value):
    """A torch tensor (detached) or numpy array as it is; anything else array-like as a numpy array."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):
        return value.detach()
    return np.asarray(value)


def gave_numpy(named: dict) -> bool:
    """Whether the caller passed numpy arrays (then outputs come back as numpy)."""
    return any(isinstance(v, np.ndarray) for v in named.values())


def outputs(values, names: list[str], *, numpy: bool) -> Outputs:
    """:class:`Outputs` of ``values`` (torch tensors or numpy arrays) under ``names``, as numpy or torch."""
    if numpy:
        return Outputs(zip(names, (as_numpy(v) for v in values)))
    import torch

    return Outputs(zip(names, (v if isinstance(v, torch.Tensor) else torch.from_numpy(as_numpy(v))
                               for v in values)))


def calling_module(program, output_names: list[str] | None = None):
    """``program.module()`` (an ExportedProgram's module) that follows this convention and accepts ``.train()`` /
    ``.eval()`` (:func:`sparsec.training.trainable`). Positional tensors still call the program as captured."""
    import torch
    import torch.utils._pytree as pytree

    from sparsec.artifact import input_spec
    from sparsec.inputs import _ordered_example
    from sparsec.training import trainable

    module = trainable(program.module())
    spec = input_spec(program)
    names = program_output_names(program, output_names)
    placeholders = list(program.graph_signature.user_inputs)
    example, in_spec = _ordered_example(program)
    constants = [None if isinstance(v, torch.Tensor) else v for v in example]  # non-tensor inputs stay as captured
    calls: list[bool | None] = []  # per call in progress: did it pass numpy arrays (None: positional tensors)?

    def before(mod, args, kwargs):
        if args and not (len(args) == 1 and isinstance(args[0], Mapping)):
            calls.append(None)  # positional tensors: the program's own calling convention
            return None
        named = complete_inputs(named_inputs(args, kwargs), spec)
        calls.append(gave_numpy(named))
        leaves = [c if p not in named else named[p] if isinstance(named[p], torch.Tensor)
                  else torch.from_numpy(np.asarray(named[p])) for p, c in zip(placeholders, constants)]
        return pytree.tree_unflatten(leaves, in_spec)

    def after(mod, args, kwargs, out):
        numpy = calls.pop() if calls else None
        return None if numpy is None else outputs(pytree.tree_leaves(out), names, numpy=numpy)

    module.register_forward_pre_hook(before, with_kwargs=True, prepend=True)  # before torch's own input check
    module.register_forward_hook(after, with_kwargs=True)
    OUTPUT_NAMES[module] = names
    return module


def _flatten(out: Outputs):
    return list(out.values()), list(out.keys())


def _unflatten(values, names) -> Outputs:
    return Outputs(zip(names, values))


def _register_pytree() -> None:
    import torch.utils._pytree as pytree

    pytree.register_pytree_node(Outputs, _flatten, _unflatten, serialized_type_name="sparsec.calling.Outputs")


try:  # Outputs pass through torch.export (a transformed module captured again) as a pytree node
    import torch  # noqa: F401

    _register_pytree()
except ImportError:  # numpy-only callers (an ONNX or TVM run) need no torch
    pass
