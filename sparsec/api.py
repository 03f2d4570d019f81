"""The Python API; the CLI calls only these functions."""
from __future__ import annotations

import os
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
    generation: dict | None = None  # a cached program's {"eos_token_id", "max_context"} (sparsec.generation)
    output_names: list[str] | None = None  # as the model named its outputs (None: it named none)

    def module(self):
        """A runnable, trainable ``nn.Module`` (an fx.GraphModule) called as :mod:`sparsec.calling` describes:
        ``module(input_ids=ids)`` or ``module({"input_ids": ids})`` gives the outputs by name."""
        from sparsec.calling import calling_module

        return calling_module(self.program, self.output_names)


def transform(model: Any, spec: Any, *, example_inputs: Any = None, forward_loop: Callable | None = None,
              overrides: Iterable[str] = (), weights: str | None = None, unsafe_pickle: bool = False,
              trust_remote_code: bool = False, dynamic: bool = True, instruments: Iterable = (),
              measure: bool = True, calib_data: str | None = None, calib_samples: int = 16,
              seq_len: int | None = None, batch_size: int = 4, max_memory: int | str | None = None,
              heldout_loop: Callable | None = None, heldout_samples: int = 4, kv_cache: bool = False,
              max_context: int | None = None, strict: bool = False) -> TransformResult:
    """Capture ``model`` with torch.export and run the pipeline ``spec`` on it.

    ``model``: an ``nn.Module`` (with ``example_inputs``), an ``ExportedProgram``, or a path / spec string as on the
    command line. ``spec``: a text spec (``'relufy,teal{sparsity=0.5}'``), a recipe mapping, a Pipeline or pass
    configs. ``forward_loop(model)`` runs calibration data through ``model`` for passes that need it.
    ``measure``: run the example inputs through the dense and the transformed graph and record the effect
    (sparsity as defined in :mod:`sparsec.measure`, output similarity) in the report.
    Calibration data for passes that need it, when no ``forward_loop`` is given: ``calib_data`` (a .txt file
    tokenised with the model's tokenizer, or a .pt/.npy tensor of token ids), else the built-in Wikipedia text when
    the model has a tokenizer; ``calib_samples`` windows of ``seq_len`` tokens (default: 512, or the model's
    maximum), run in batches of ``batch_size`` (see :func:`sparsec.calibration.make_forward_loop`).
    After a calibrating pass the transformed model is measured on held-out data (``heldout_loop``, a forward_loop;
    default for a model with a tokenizer: ``heldout_samples`` windows of Wikipedia articles [:60]): per-layer
    ``heldout_sparsity`` and ``report['sparsity']`` under each definition of :mod:`sparsec.report`.
    ``max_memory`` (bytes or e.g. ``"8GiB"``; default: the memory available now): the run is refused before the
    passes start when its estimate (:mod:`sparsec.resources`) exceeds it.
    ``kv_cache``: capture a causal LM as a cached program for generation (:mod:`sparsec.kv_cache`), contexts up to
    ``max_context`` tokens; calibration and held-out loops then see it as an uncached model
    (:class:`sparsec.kv_cache.FullSequence`).
    A pass that changes nothing in the model prints a warning line naming what it looked for on stderr; ``strict``
    makes that an error (SparsecError).
    Progress (:mod:`sparsec.progress`): tqdm bars while stderr is a terminal, as llm-compressor shows calibration,
    and nothing otherwise; ``sparsec.progress.configure("lines" | "json" | "off")`` changes that.
    """
    from sparsec import frontend, progress
    from sparsec.instruments import default_instruments
    from sparsec.kv_cache import full_sequence_loop, program_layout
    from sparsec.pipeline import as_pipeline
    from sparsec.registry import get_pass

    from sparsec.resources import parse_memory

    pipeline = as_pipeline(spec).with_overrides(overrides)
    pipeline.validate_order()
    budget = None if max_memory is None else parse_memory(max_memory)
    need = [c.pass_name for c in pipeline.configs if get_pass(c.pass_name).calibrates(c)]
    if need and forward_loop is None and calib_data is None and not isinstance(model, (str, os.PathLike)):
        raise SparsecError(f"pass '{need[0]}' needs calibration data and none was given: pass --calib-data FILE on"
                           " the command line, or forward_loop=fn in Python")
    with progress.task("load"):
        loaded = frontend.load_model(model, example_inputs, weights=weights, unsafe_pickle=unsafe_pickle,
                                     trust_remote_code=trust_remote_code)
    if kv_cache and max_context is not None:  # calibration and held-out windows run through the cached program
        from sparsec.errors import UsageError

        if seq_len is not None and seq_len > max_context:
            raise UsageError(f"--seq-len {seq_len} is longer than --max-context {max_context} (calibration runs through"
                             " the cached program): lower --seq-len or raise --max-context")
        seq_len = seq_len or min(_calib_seq_len(loaded, None), max_context)
    calibrate = bool(need) and forward_loop is None
    if calibrate:
        with progress.task("calibration data"):
            forward_loop = _calibration_loop(need[0], loaded, calib_data, calib_samples, seq_len, batch_size)
    heldout_source = "heldout_loop"
    if need and heldout_loop is None and loaded.tokenizer_dir and heldout_samples > 0:
        heldout_loop, heldout_source = _heldout_loop(loaded, seq_len, heldout_samples, batch_size)
    with progress.task("capture"):
        captured = frontend.capture(loaded, dynamic=dynamic, kv_cache=kv_cache, max_context=max_context)
    own_loops = calibrate or heldout_source != "heldout_loop"
    if captured.batch is not None and batch_size > captured.batch and own_loops:
        progress.note(f"the captured program takes batch {captured.batch} only (the model fails on its example"
                      f" repeated to batch 2): calibrating in batches of {captured.batch} (--batch-size"
                      f" {captured.batch})")
        batch_size = captured.batch
        if calibrate:
            forward_loop = _calibration_loop(need[0], loaded, calib_data, calib_samples, seq_len, batch_size)
        if heldout_source != "heldout_loop":
            heldout_loop, heldout_source = _heldout_loop(loaded, seq_len, heldout_samples, batch_size)
    layout = program_layout(captured.program)
    if layout is not None:
        forward_loop, heldout_loop = (full_sequence_loop(f, layout) for f in (forward_loop, heldout_loop))
    _check_memory(captured.program, budget, calib=(calib_samples, _calib_seq_len(loaded, seq_len), batch_size)
                  if calibrate else None)
    gm = captured.program.module()
    report: dict = {"format": "sparsec-report", "version": 1, "pipeline": pipeline.canonical(), "passes": [],
                    "layers": []}
    if measure:
        from sparsec.measure import run_and_count_zeros

        dense_out, dense_stats = run_and_count_zeros(gm, captured.args, captured.kwargs)
    gm = run_pipeline(gm, pipeline, captured.args, captured.kwargs, forward_loop,
                      [*default_instruments(), *instruments], report, strict)
    if measure:
        from sparsec.measure import compare_outputs

        out, stats = run_and_count_zeros(gm, captured.args, captured.kwargs)
        report["effect"] = {"inputs": _describe_inputs(captured.args, captured.kwargs),
                            "dense": {k: v for k, v in dense_stats.items() if k != "layers"},
                            "transformed": {k: v for k, v in stats.items() if k != "layers"},
                            "output": compare_outputs(dense_out, out), "layers": stats["layers"]}
    if need and heldout_loop is not None:
        from sparsec.report import add_heldout

        with progress.task("held-out"):
            add_heldout(report, gm, heldout_loop, heldout_source)
    with progress.task("export"):
        program = frontend.reexport(gm, captured)
    source = {"model": loaded.source, "kind": loaded.kind}
    if loaded.tokenizer_dir:
        source["tokenizer"] = loaded.tokenizer_dir
    generation = None
    if layout is not None:
        generation = {"eos_token_id": _eos_token_id(loaded.module), "max_context": layout.max_context}
    return TransformResult(program, pipeline, report, source, captured.args, captured.kwargs, generation,
                           frontend.output_names(captured))


def _eos_token_id(module) -> int | list[int] | None:
    """The end-of-sequence token id(s) of a Hugging Face model: its generation config's, else its config's."""
    for cfg in (getattr(module, "generation_config", None), getattr(module, "config", None)):
        eos = getattr(cfg, "eos_token_id", None)
        if eos is not None:
            return eos
    return None


def _calibration_loop(pass_name: str, loaded, calib_data, samples: int, seq_len: int | None, batch_size: int):
    """forward_loop from --calib-data or the built-in text; fails before capture, saying how to give data."""
    from sparsec.calibration import make_forward_loop

    if calib_data is None and not loaded.tokenizer_dir:
        raise SparsecError(f"pass '{pass_name}' needs calibration data and none was given (the model has no"
                           " tokenizer for the built-in text): pass --calib-data FILE (.txt, or a .pt/.npy tensor of"
                           " token ids) on the command line, or forward_loop=fn in Python")
    config = getattr(loaded.module, "config", None)
    seq_len = _calib_seq_len(loaded, seq_len)
    first = next(iter([*loaded.args, *loaded.kwargs.values()]), None)
    try:
        return make_forward_loop(calib_data, tokenizer_dir=loaded.tokenizer_dir,
                                 vocab_size=getattr(config, "vocab_size", None), example_input=first,
                                 samples=samples, seq_len=seq_len, batch_size=batch_size)
    except SparsecError as exc:
        raise type(exc)(f"pass '{pass_name}' needs calibration data: {exc.message}") from None


def _heldout_loop(loaded, seq_len: int | None, samples: int, batch_size: int):
    from sparsec.calibration import _tokenizer, heldout_text, token_forward_loop, tokenize_windows

    ids = tokenize_windows(heldout_text(), _tokenizer(loaded.tokenizer_dir, "held-out text"),
                           _calib_seq_len(loaded, seq_len), samples)
    loop = token_forward_loop(ids, batch_size=batch_size, desc="held-out")
    return loop, f"Wikipedia articles [:60] (gensim), {ids.shape[0]} x {ids.shape[1]} tokens"


def _calib_seq_len(loaded, seq_len: int | None) -> int:
    """--seq-len, checked against the model's maximum positions; default 512, or that maximum when lower."""
    from sparsec.errors import UsageError

    config = getattr(loaded.module, "config", None)
    limit = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions")
                  if isinstance(getattr(config, k, None), int)), None)
    if seq_len is None:
        return min(512, limit) if limit else 512
    if limit and seq_len > limit:
        raise UsageError(f"--seq-len {seq_len} is longer than the model's maximum of {limit} positions")
    return seq_len


def _check_memory(program, budget: int | None, calib: tuple[int, int, int] | None) -> None:
    """Refuse the run before the passes start when its memory estimate exceeds the budget; ``calib``: (samples,
    seq_len, batch_size) of the calibration data, else the example inputs are the largest batch."""
    from sparsec.resources import check_memory

    if calib is None:
        check_memory(program, budget=budget)
        return
    samples, seq, batch = calib
    batch = min(batch, samples)
    check_memory(program, budget=budget, batch=batch, seq=seq, token_bytes=samples * seq * 8,
                 what=f"a calibration batch of {batch} x {seq} tokens")


def run_pipeline(gm, pipeline, args: tuple, kwargs: dict, forward_loop, instruments, report: dict,
                 strict: bool = False):
    """Run each pass in order under the instruments; fills ``report['passes']`` and ``report['layers']``. A pass that
    leaves the graph and the state unchanged gets a warning (:func:`sparsec.progress.warn`; ``strict``: a
    SparsecError)."""
    from sparsec import progress
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
        before = _fingerprint(gm)
        try:
            result = info.fn(gm, cfg, ctx)
        except SparsecError as exc:
            raise type(exc)(f"{where}: {exc.message}") from exc
        except Exception as exc:
            raise SparsecError(f"{where}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(result, PassResult):
            raise SparsecError(f"{where}: it returned {type(result).__name__}, not a PassResult")
        gm = result.gm
        if _fingerprint(gm) == before:
            message = f"{info.name}: {result.unchanged or 'nothing to change'}; model unchanged"
            if strict:
                raise SparsecError(f"{where}: {message} (strict)")
            progress.warn(message)
        record = {"name": info.name, "index": i, "options": cfg.options(), "stats": result.stats}
        for inst in instruments:
            inst.after_pass(info.name, i, gm, record)
        report["passes"].append(record)
        report["layers"].extend({"pass": info.name, **layer} for layer in result.layers)
    return gm


def _fingerprint(gm) -> tuple:
    """The graph's code and the names of its modules and state: what a pass that changes the model changes."""
    return gm.code, tuple(n for n, _ in gm.named_modules()), tuple(gm.state_dict())


def _describe_inputs(args: tuple, kwargs: dict) -> dict:
    import torch

    items = {**{f"arg{i}": a for i, a in enumerate(args)}, **kwargs}
    return {k: list(v.shape) for k, v in items.items() if isinstance(v, torch.Tensor)}


def save(result: TransformResult, out_dir: str, *, force: bool = False) -> str:
    """Write the artifact directory (model.pt2, recipe.yaml, manifest.json, report.json) atomically."""
    from sparsec.artifact import input_spec, tool_versions, write_artifact
    from sparsec.calling import program_output_names

    manifest = {"versions": tool_versions(), "pipeline": result.pipeline.canonical(), "source": result.source,
                "inputs": input_spec(result.program),
                "output_names": program_output_names(result.program, result.output_names)}
    if result.generation is not None:
        manifest["generation"] = result.generation
    from sparsec import progress

    with progress.task("save"):
        return write_artifact(out_dir, result.program, result.pipeline.to_yaml(), manifest, result.report,
                              force=force, tokenizer_dir=result.source.get("tokenizer"))


def load(path: str):
    """Load an artifact directory as a runnable, trainable module (checksums and format version are verified),
    called as :mod:`sparsec.calling` describes: ``module(input_ids=ids)["logits"]``."""
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


def export_onnx(artifact_or_result: Any, path: str, opset: int | None = None, verify: bool = False,
                inputs: Any = None, **options):
    """Export an artifact (directory or :class:`Artifact`) or a :class:`TransformResult` to ONNX at ``path``.

    Dynamic batch/sequence axes, ``sparsec::`` ops lowered to standard ONNX ops, atomic write; ``verify`` compares
    ONNX Runtime with torch on ``inputs`` (default: the example inputs). Options: ``external_data``, ``force``,
    ``rtol``, ``atol``, ``optimize``, ``sparse_kernel`` (none / auto / all / gather), ``quantized_matmul`` (nbits /
    standard). See
    :func:`sparsec.backends.onnxruntime.export_onnx`.
    """
    from sparsec import progress
    from sparsec.backends.onnxruntime import export_onnx as _export

    with progress.task("export onnx"):
        return _export(artifact_or_result, path, opset=opset, verify=verify, inputs=inputs, **options)


def run(model: str, inputs: Any = None) -> dict:
    """Run a ``.onnx`` file (ONNX Runtime) or an artifact directory (torch) on ``inputs`` (a .npz / .safetensors
    path or a dict name -> array; for an artifact, default: its example inputs), checked against the model's inputs
    (a missing ``attention_mask`` is ones, as :mod:`sparsec.calling` describes).

    Returns ``{"backend": "onnxruntime" | "torch" | "tvm", "outputs": {name: numpy array}}``, outputs named as the
    model names them.
    """
    model = os.fspath(model)
    if not os.path.isdir(model):
        from sparsec.backends.onnxruntime import run_onnx

        if inputs is None:
            raise SparsecError(f"running '{model}' needs inputs: --inputs FILE (.npz or .safetensors, one array per"
                               " model input)")
        return {"backend": "onnxruntime", "outputs": run_onnx(model, inputs)}
    from sparsec.backends.tvm.build import is_build_dir

    if is_build_dir(model):
        return _run_build(model, inputs)
    from sparsec.calling import complete_inputs, program_output_names
    from sparsec.inputs import example_inputs, load_inputs_file, run_program

    art = load_artifact(model)
    if inputs is None:
        source, arrays = "example inputs", {k: v.numpy() for k, v in example_inputs(art.program).items()}
    elif isinstance(inputs, (str, os.PathLike)):
        source, arrays = f"inputs file '{inputs}'", load_inputs_file(os.fspath(inputs))
    else:
        source, arrays = "inputs", dict(inputs)
    arrays = complete_inputs(arrays, art.manifest.get("inputs", []), source=source, what=f"artifact '{model}'",
                             hint="")
    outs = run_program(art.program, arrays)
    names = program_output_names(art.program, art.manifest.get("output_names"))
    return {"backend": "torch", "outputs": {n: o.detach().numpy() for n, o in zip(names, outs)}}


def _run_build(path: str, inputs: Any) -> dict:
    from sparsec.errors import UsageError
    from sparsec.inputs import load_inputs_file

    if inputs is None:
        raise UsageError(f"running the TVM build '{path}' needs inputs: --inputs FILE (.npz or .safetensors, one"
                         " array per model input)")
    arrays = load_inputs_file(os.fspath(inputs)) if isinstance(inputs, (str, os.PathLike)) else dict(inputs)
    return {"backend": "tvm", "outputs": load_compiled(path).run(arrays)}


def compile(artifact_or_result: Any, out_dir: str, *, target: str = "llvm", threads: int | None = None,
            sparse: bool = True, force: bool = False, tune_seconds: float | None = None) -> dict:
    """Compile an artifact (directory or :class:`Artifact`) or a :class:`TransformResult` with TVM into the build
    directory ``out_dir``: linear layers fed by sparse activations call sparsec's sparse kernels, the others its
    dense kernel (``sparse=False``: dense everywhere). ``threads``: TVM threads at run time (default: all CPUs).
    ``tune_seconds``: per kernel the tuning database does not hold for this CPU, seconds to measure its schedules
    here (:mod:`sparsec.backends.tvm.tuning`; 0: the database's schedule or the default; None:
    ``SPARSEC_TUNE_SECONDS``, else 2 s).
    Returns the build manifest. See :mod:`sparsec.backends.tvm.build`.
    """
    from sparsec.backends.tvm.build import compile_program

    facts = {}
    if isinstance(artifact_or_result, TransformResult):  # an artifact directory carries these itself
        program, source = artifact_or_result.program, None
        facts = {"generation": artifact_or_result.generation,
                 "tokenizer": artifact_or_result.source.get("tokenizer"),
                 "output_names": artifact_or_result.output_names}
    else:
        art = load_artifact(os.fspath(artifact_or_result)) if isinstance(artifact_or_result, (str, os.PathLike)) \
            else artifact_or_result
        program, source = art.program, art.path
        facts = {"output_names": art.manifest.get("output_names")}
    return compile_program(program, out_dir, target=target, threads=threads, sparse=sparse, source=source,
                           force=force, tune_seconds=tune_seconds, **facts)


def load_compiled(path: str, *, threads: int | None = None):
    """Load a TVM build directory written by :func:`compile`; call it as :mod:`sparsec.calling` describes:
    ``compiled(input_ids=ids)`` or ``compiled({"input_ids": ids})`` gives the outputs by name.

    Needs no torch model: the weights are in the build. See :class:`sparsec.backends.tvm.build.CompiledModel`.
    """
    from sparsec.backends.tvm.build import load_compiled as _load

    return _load(path, threads=threads)


def load_onnx(path: str, *, threads: int | None = None):
    """Load a ``.onnx`` file into ONNX Runtime; call it as :mod:`sparsec.calling` describes:
    ``model(input_ids=ids)`` or ``model({"input_ids": ids})`` gives the outputs by name.
    See :class:`sparsec.backends.onnxruntime.runtime.OnnxModel`."""
    from sparsec.backends.onnxruntime.runtime import OnnxModel

    return OnnxModel(os.fspath(path), threads=threads)


def accelerate(model: Any, *, threads: int | None = None, sparse: bool = True):
    """A plain-PyTorch ``nn.Module`` of a transformed model (a :class:`TransformResult`, an artifact directory or
    :class:`Artifact`, or an ExportedProgram) whose linear layers call sparsec's TVM kernels (custom op
    ``sparsec::tvm_linear``) as :func:`compile` would route them: sparse behind teal thresholds and relufy
    activations, dense elsewhere (``sparse=False``: dense everywhere). ``threads``: TVM's thread pool size.
    Inference only. See :mod:`sparsec.backends.tvm.torch_kernels`.
    """
    from sparsec.artifact import Artifact
    from sparsec.backends.tvm.torch_kernels import accelerate_program
    from sparsec.errors import UsageError

    if isinstance(model, (str, os.PathLike)):
        model = load_artifact(os.fspath(model))
    if isinstance(model, (TransformResult, Artifact)):
        model = model.program
    if not hasattr(model, "graph_signature"):
        raise UsageError(f"sparsec.accelerate takes a TransformResult, an artifact directory or Artifact, or an"
                         f" ExportedProgram, not {type(model).__name__}: transform the model first"
                         " (sparsec.transform(model, PIPELINE, example_inputs=...))")
    return accelerate_program(model, threads=threads, sparse=sparse)
