"""The Python API; the CLI calls only these functions."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from sparsec.errors import SparsecError

_ORDINAL = {1: "st", 2: "nd", 3: "rd"}


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else _ORDINAL.get(n % 10, 'th')}"


@dataclass
class TransformResult:
    """A transformed model: the exported program, the pipeline that made it and its report."""

    program: Any  # torch.export.ExportedProgram
    pipeline: Any  # sparsec.pipeline.Pipeline
    report: dict
    source: dict
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def module(self):
        """A runnable ``nn.Module`` (an fx.GraphModule); trainable like any module."""
        return self.program.module()


def transform(model: Any, spec: Any, *, example_inputs: Any = None, forward_loop: Callable | None = None,
              overrides: Iterable[str] = (), weights: str | None = None, unsafe_pickle: bool = False,
              trust_remote_code: bool = False, dynamic: bool = True, instruments: Iterable = (),
              measure: bool = True) -> TransformResult:
    """Capture ``model`` with torch.export and run the pipeline ``spec`` on it.

    ``model``: an ``nn.Module`` (with ``example_inputs``), an ``ExportedProgram``, or a path / spec string as on the
    command line. ``spec``: a text spec (``'relufy,teal{sparsity=0.5}'``), a recipe mapping, a Pipeline or pass
    configs. ``forward_loop(model)`` runs calibration data through ``model`` for passes that need it.
    ``measure``: run the example inputs through the dense and the transformed graph and record the effect
    (sparsity as defined in :mod:`sparsec.measure`, output similarity) in the report.
    """
    from sparsec import frontend
    from sparsec.instruments import default_instruments
    from sparsec.pipeline import as_pipeline
    from sparsec.registry import get_pass

    pipeline = as_pipeline(spec).with_overrides(overrides)
    pipeline.validate_order()
    need = [n for n in pipeline.names if get_pass(n).needs_calibration]
    if need and forward_loop is None:
        raise SparsecError(f"pass '{need[0]}' needs calibration data and none was given: pass --calib-data FILE on"
                           " the command line, or forward_loop=fn in Python")
    loaded = frontend.load_model(model, example_inputs, weights=weights, unsafe_pickle=unsafe_pickle,
                                 trust_remote_code=trust_remote_code)
    captured = frontend.capture(loaded, dynamic=dynamic)
    gm = captured.program.module()
    report: dict = {"format": "sparsec-report", "version": 1, "pipeline": pipeline.canonical(), "passes": [],
                    "layers": []}
    if measure:
        from sparsec.measure import run_and_count_zeros

        dense_out, dense_stats = run_and_count_zeros(gm, captured.args, captured.kwargs)
    gm = run_pipeline(gm, pipeline, captured.args, captured.kwargs, forward_loop,
                      [*default_instruments(), *instruments], report)
    if measure:
        from sparsec.measure import compare_outputs

        out, stats = run_and_count_zeros(gm, captured.args, captured.kwargs)
        report["effect"] = {"inputs": _describe_inputs(captured.args, captured.kwargs),
                            "dense": {k: v for k, v in dense_stats.items() if k != "layers"},
                            "transformed": {k: v for k, v in stats.items() if k != "layers"},
                            "output": compare_outputs(dense_out, out), "layers": stats["layers"]}
    program = frontend.reexport(gm, captured)
    source = {"model": loaded.source, "kind": loaded.kind}
    if loaded.tokenizer_dir:
        source["tokenizer"] = loaded.tokenizer_dir
    return TransformResult(program, pipeline, report, source, captured.args, captured.kwargs)


def run_pipeline(gm, pipeline, args: tuple, kwargs: dict, forward_loop, instruments, report: dict):
    """Run each pass in order under the instruments; fills ``report['passes']`` and ``report['layers']``."""
    from sparsec.passes.base import PassContext, PassResult
    from sparsec.registry import get_pass

    names = pipeline.names
    for i, cfg in enumerate(pipeline.configs):
        info = get_pass(cfg.pass_name)
        where = f"pass '{info.name}' ({_ordinal(i + 1)} of {len(names)})"
        where += f" failed after {','.join(names[:i])}" if i else " failed"
        ctx = PassContext(args, kwargs, forward_loop, i, names[:i])
        for inst in instruments:
            inst.before_pass(info.name, i, gm)
        try:
            result = info.fn(gm, cfg, ctx)
        except SparsecError as exc:
            raise type(exc)(f"{where}: {exc.message}") from exc
        except Exception as exc:
            raise SparsecError(f"{where}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(result, PassResult):
            raise SparsecError(f"{where}: it returned {type(result).__name__}, not a PassResult")
        gm = result.gm
        record = {"name": info.name, "index": i, "options": cfg.options(), "stats": result.stats}
        for inst in instruments:
            inst.after_pass(info.name, i, gm, record)
        report["passes"].append(record)
        report["layers"].extend({"pass": info.name, **layer} for layer in result.layers)
    return gm


def _describe_inputs(args: tuple, kwargs: dict) -> dict:
    import torch

    items = {**{f"arg{i}": a for i, a in enumerate(args)}, **kwargs}
    return {k: list(v.shape) for k, v in items.items() if isinstance(v, torch.Tensor)}


def save(result: TransformResult, out_dir: str, *, force: bool = False) -> str:
    """Write the artifact directory (model.pt2, recipe.yaml, manifest.json, report.json) atomically."""
    from sparsec.artifact import input_spec, tool_versions, write_artifact

    manifest = {"versions": tool_versions(), "pipeline": result.pipeline.canonical(), "source": result.source,
                "inputs": input_spec(result.program)}
    return write_artifact(out_dir, result.program, result.pipeline.to_yaml(), manifest, result.report, force=force)


def load(path: str):
    """Load an artifact directory as a runnable module (checksums and format version are verified)."""
    return load_artifact(path).module()


def load_artifact(path: str, *, load_program: bool = True):
    """The artifact with its manifest, report and recipe (:class:`sparsec.artifact.Artifact`)."""
    from sparsec.artifact import read_artifact

    return read_artifact(path, load_program=load_program)


def list_passes():
    """Every registered pass (:class:`sparsec.registry.PassInfo`), sorted by name."""
    from sparsec.registry import list_passes as _list

    return _list()


def trace(model: Any, *, example_inputs: Any = None, weights: str | None = None, unsafe_pickle: bool = False,
          trust_remote_code: bool = False, dynamic: bool = True) -> dict:
    """Capture ``model`` and describe the graph: op counts, inputs, linear layers and activations by module path."""
    from collections import Counter

    from sparsec import frontend
    from sparsec.artifact import input_spec
    from sparsec.graph import module_path, op_name, weight_layers
    from sparsec.passes.relufy import find_activations

    loaded = frontend.load_model(model, example_inputs, weights=weights, unsafe_pickle=unsafe_pickle,
                                 trust_remote_code=trust_remote_code)
    captured = frontend.capture(loaded, dynamic=dynamic)
    gm = captured.program.module()
    ops = Counter(op_name(n.target) for n in gm.graph.nodes if n.op == "call_function")
    linears = []
    for layer in weight_layers(gm):
        val = layer.node.meta.get("val")
        inp = layer.input.meta.get("val")
        linears.append({"module": layer.module, "op": op_name(layer.node.target),
                        "in_features": int(inp.shape[-1]) if inp is not None and isinstance(inp.shape[-1], int)
                        else None,
                        "out_features": int(val.shape[-1]) if val is not None and isinstance(val.shape[-1], int)
                        else None,
                        "mlp_intermediate_input": layer.mlp_intermediate})
    acts = [{"module": module_path(a.output), "kind": a.kind, "nodes": len(a.nodes)} for a in find_activations(gm)]
    return {"model": loaded.source, "kind": loaded.kind, "nodes": len(gm.graph.nodes),
            "inputs": input_spec(captured.program), "ops": dict(ops.most_common()), "linears": linears,
            "activations": acts}
