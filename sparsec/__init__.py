"""sparsec: a compiler for activation sparsity in PyTorch models.

The public API is small: :func:`transform`, :func:`save`, :func:`load`, :func:`list_passes`, :func:`trace`, the
pass config classes (e.g. ``RelufyConfig``) and :class:`SparsecError`. Importing ``sparsec`` does not import torch;
the functions do, when called.
"""
from sparsec.errors import SparsecError

__version__ = "0.1.0"

_API = {"transform", "save", "load", "load_artifact", "list_passes", "trace", "TransformResult", "export_onnx", "run",
        "compile", "load_compiled", "load_onnx", "accelerate", "generate"}
_CONFIGS = {"RelufyConfig": "sparsec.passes.relufy", "TealConfig": "sparsec.passes.teal",
            "CatsConfig": "sparsec.passes.cats", "RotateConfig": "sparsec.passes.rotate",
            "RegularizeConfig": "sparsec.passes.regularize", "JSReLUConfig": "sparsec.passes.jsrelu",
            "DBMLPConfig": "sparsec.passes.db_mlp", "StripConfig": "sparsec.passes.strip",
            "PruneConfig": "sparsec.passes.prune", "FoldConfig": "sparsec.passes.fold"}

__all__ = sorted(_API | set(_CONFIGS) | {"SparsecError", "__version__", "regularization_loss"})


def __getattr__(name: str):
    import importlib

    if name == "generate":
        return importlib.import_module("sparsec.generation").generate
    if name in _API:
        return getattr(importlib.import_module("sparsec.api"), name)
    if name == "regularization_loss":
        return importlib.import_module("sparsec.training").regularization_loss
    if name in _CONFIGS:
        return getattr(importlib.import_module(_CONFIGS[name]), name)
    raise AttributeError(f"module 'sparsec' has no attribute '{name}'")
