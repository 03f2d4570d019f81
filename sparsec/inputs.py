"""Named model inputs: read an inputs file safely, check it against an input spec, feed a program by name.

An inputs file is a ``.npz`` (read with ``allow_pickle=False``) or a ``.safetensors`` file holding one array per
model input, keyed by the input's name (``sparsec inspect OUT/`` and the artifact's manifest.json list them). An
input spec is a list of ``{"name", "dtype", "shape"}`` with ints for fixed dims and ``{"symbol", "min", "max"}``
for dynamic ones (:func:`sparsec.artifact.input_spec`, or :func:`onnx_input_spec` for an ONNX session).
"""
from __future__ import annotations

import os
import zipfile
from typing import Any

import numpy as np

from sparsec.errors import SparsecError, UsageError, first_line

INPUT_FILE_TYPES = (".npz", ".safetensors")


def load_inputs_file(path: str) -> dict[str, np.ndarray]:
    """``{name: array}`` from a .npz or .safetensors file; never unpickles."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in INPUT_FILE_TYPES:
        raise UsageError(f"inputs file '{path}' must be .npz or .safetensors (a dict of input name -> array), not"
                         f" '{ext or '(no extension)'}'")
    if not os.path.isfile(path):
        raise SparsecError(f"inputs file '{path}' does not exist")
    if ext == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                if not hasattr(data, "files"):
                    raise SparsecError(f"inputs file '{path}' is a single .npy array, not a .npz dict of arrays;"
                                       " save it with numpy.savez(path, input_ids=...)")
                arrays = {k: data[k] for k in data.files}
        except SparsecError:
            raise
        except ValueError as exc:
            if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
                raise SparsecError(f"inputs file '{path}' holds pickled Python objects, which sparsec never loads"
                                   " (unpickling can run code); save plain numeric arrays") from None
            raise SparsecError(f"inputs file '{path}' is not a valid .npz file: {exc}") from None
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise SparsecError(f"inputs file '{path}' is not a valid .npz file ({type(exc).__name__}: {exc})"
                               ) from None
    else:
        try:
            from safetensors.torch import load_file

            tensors = load_file(path)
        except Exception as exc:
            raise SparsecError(f"inputs file '{path}' is not a valid safetensors file: {first_line(exc)}") from None
        arrays = {}
        for k, t in tensors.items():
            try:
                arrays[k] = t.numpy()
            except TypeError:
                raise SparsecError(f"inputs file '{path}': input '{k}' has dtype {str(t.dtype).split('.')[-1]},"
                                   " which numpy and ONNX Runtime inputs cannot hold; save it as float32") from None
    if not arrays:
        raise SparsecError(f"inputs file '{path}' holds no arrays")
    return arrays


def tensor_specs(spec: list[dict]) -> list[dict]:
    return [s for s in spec if "dtype" in s]


def friendly_dim_names(spec: list[dict]) -> dict[str, str]:
    """Symbol -> readable name of the dynamic dims: dim 0 'batch', dim 1 'seq', others 'dimN' (numbered when two
    independent symbols would get the same name)."""
    names: dict[str, str] = {}
    for s in tensor_specs(spec):
        for i, d in enumerate(s["shape"]):
            sym = None if isinstance(d, int) else d.get("symbol")
            if not sym or sym in names:
                continue
            base = {0: "batch", 1: "seq"}.get(i, f"dim{i}")
            name, k = base, 2
            while name in names.values():
                name, k = f"{base}_{k}", k + 1
            names[sym] = name
    return names


def _dims(s: dict, names: dict[str, str]) -> str:
    return ", ".join(str(d) if isinstance(d, int) else names.get(d.get("symbol"), d.get("symbol") or "?")
                     for d in s["shape"])


def describe_spec(spec: list[dict]) -> str:
    """'input_ids: int64[batch, seq], attention_mask: int64[batch_2, seq]'."""
    names = friendly_dim_names(spec)
    return ", ".join(f"{s['name']}: {s['dtype']}[{_dims(s, names)}]" for s in tensor_specs(spec))


def check_inputs(arrays: dict[str, Any], spec: list[dict], *, source: str, what: str = "the model",
                 hint: str = "") -> None:
    """Raise a one-line SparsecError when ``arrays`` do not fit ``spec``: names, dtypes, ranks, fixed dims,
    dims that share a symbol, and a symbol's upper bound; ``hint`` ends the message about a missing input."""
    specs = tensor_specs(spec)
    takes = f"{what} takes {describe_spec(spec)}"
    for s in specs:
        if s["name"] not in arrays:
            raise SparsecError(f"{source} has no input '{s['name']}'; {takes}{hint}")
    names = {s["name"] for s in specs}
    for k in arrays:
        if k not in names:
            raise SparsecError(f"{source} has an input '{k}' that {what} does not take; {takes}")
    seen: dict[str, tuple[int, str]] = {}
    friendly = friendly_dim_names(spec)
    for s in specs:
        a = arrays[s["name"]]
        dtype = _dtype_name(a)
        want = f"{s['dtype']}[{_dims(s, friendly)}]"
        if dtype != s["dtype"]:
            raise SparsecError(f"{source}: input '{s['name']}' is {dtype}; {what} takes {want} (convert it, e.g."
                               f" array.astype('{s['dtype']}'))")
        shape = tuple(a.shape)
        if len(shape) != len(s["shape"]):
            raise SparsecError(f"{source}: input '{s['name']}' has shape {list(shape)} (rank {len(shape)}); {what}"
                               f" takes {want} (rank {len(s['shape'])})")
        for i, (got, d) in enumerate(zip(shape, s["shape"])):
            if isinstance(d, int):
                if got != d:
                    raise SparsecError(f"{source}: input '{s['name']}' has shape {list(shape)}; dim {i} must be {d}"
                                       f" ({what} takes {want})")
                continue
            sym, hi = d.get("symbol"), d.get("max")
            label = friendly.get(sym, sym)
            if hi is not None and got > hi:
                raise SparsecError(f"{source}: input '{s['name']}' has shape {list(shape)}; dim {i} ({label}) is at"
                                   f" most {hi} for {what}")
            if sym:
                if sym in seen and seen[sym][0] != got:
                    other = seen[sym][1]
                    raise SparsecError(f"{source}: input '{s['name']}' has shape {list(shape)}; dim {i} ({label})"
                                       f" must equal that of '{other}' ({seen[sym][0]}); {takes}")
                seen.setdefault(sym, (got, s["name"]))


def _dtype_name(a) -> str:
    dt = getattr(a, "dtype", None)
    if dt is None:
        return type(a).__name__
    return str(dt).removeprefix("torch.")


_ORT_TYPES = {"float": "float32", "double": "float64", "float16": "float16", "bfloat16": "bfloat16",
              "int64": "int64", "int32": "int32", "int16": "int16", "int8": "int8", "uint8": "uint8",
              "bool": "bool", "uint16": "uint16", "uint32": "uint32", "uint64": "uint64"}


def onnx_input_spec(session) -> list[dict]:
    """The input spec of an ONNX Runtime session (symbolic dims carry no range)."""
    spec = []
    for i in session.get_inputs():
        t = i.type.removeprefix("tensor(").removesuffix(")")
        dims = [d if isinstance(d, int) else {"symbol": d if isinstance(d, str) else None, "min": None, "max": None}
                for d in i.shape]
        spec.append({"name": i.name, "dtype": _ORT_TYPES.get(t, t), "shape": dims})
    return spec


# ------------------------------------------------------------------------------------- programs by input name


def _ordered_example(program) -> tuple[list, Any]:
    """The program's example inputs flattened in the order of its input placeholders, and the input TreeSpec."""
    import torch.utils._pytree as pytree

    ex = getattr(program, "example_inputs", None)
    if ex is None:
        raise SparsecError("the program stores no example inputs; re-export it with torch 2.5 or newer")
    args, kwargs = ex
    in_spec = program.call_spec.in_spec
    try:
        kw_spec = in_spec.child(1) if hasattr(in_spec, "child") else in_spec.children_specs[1]
        keys = kw_spec.context
        kwargs = {k: kwargs[k] for k in keys}
    except (AttributeError, IndexError, KeyError, TypeError):
        pass
    leaves = pytree.tree_leaves((tuple(args), dict(kwargs)))
    return leaves, in_spec


def example_inputs(program) -> dict[str, Any]:
    """``{input name: tensor}`` of the program's example inputs (tensor inputs only)."""
    import torch

    leaves, _ = _ordered_example(program)
    names = list(program.graph_signature.user_inputs)
    return {n: v for n, v in zip(names, leaves) if isinstance(v, torch.Tensor)}


def run_program(program, named: dict[str, Any], module=None) -> list:
    """Run ``program`` (an ExportedProgram) on inputs given by name; returns its flattened outputs."""
    import torch
    import torch.utils._pytree as pytree

    leaves, in_spec = _ordered_example(program)
    names = list(program.graph_signature.user_inputs)
    if len(names) != len(leaves):
        raise SparsecError(f"the program's {len(names)} inputs do not match its {len(leaves)} example inputs")
    new = []
    for name, ex in zip(names, leaves):
        if isinstance(ex, torch.Tensor):
            v = named[name]
            new.append(v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v, copy=True)))
        else:
            new.append(ex)
    args, kwargs = pytree.tree_unflatten(new, in_spec)
    module = module if module is not None else program.module()
    with torch.no_grad():
        out = module(*args, **kwargs)
    return [o for o in pytree.tree_leaves(out)]


