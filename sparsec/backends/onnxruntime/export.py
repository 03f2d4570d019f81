"""Export a sparsec artifact (its ExportedProgram) to ONNX with ``torch.onnx.export(..., dynamo=True)``.

- dynamic axes stay dynamic: the program's symbolic dims become named ONNX dims (``batch``, ``seq``);
- ``sparsec::`` custom ops are lowered through :mod:`.translations`; any other op with no ONNX translation fails
  before anything is written, naming the op and the module it sits in;
- weights go to external data (``model.onnx.data`` beside the model) above 1 GB or when asked;
- the file is written atomically (a temporary directory beside it, then a rename): a failed export leaves nothing;
- ``metadata_props`` record the sparsec and torch versions, the canonical pipeline, the artifact fingerprint;
- a cached program (:mod:`sparsec.kv_cache`) keeps its names: inputs ``input_ids``, ``logits_to_keep``,
  ``past_keys_{i}``, ``past_values_{i}``, outputs ``logits``, ``present_keys_{i}``, ``present_values_{i}``, dims
  ``batch``, ``seq``, ``kept``, ``past`` (``past`` may be 0: a prefill); ``metadata_props["sparsec.generation"]``
  holds its generation facts (JSON: ``eos_token_id``, ``max_context`` in tokens), and the artifact's tokenizer is
  copied to ``NAME.tokenizer/`` beside ``NAME.onnx`` (:func:`tokenizer_path`), in the same atomic write;
- ``sparse_kernel`` (``auto`` / ``all`` / ``gather``) replaces thresholded linears by sparsec's ONNX Runtime custom
  op or a standard-op gather of the active weight rows, where measured faster (:mod:`.sparse`); the per-layer
  choices go to ``metadata_props``;
- a quantized program's linears become ONNX Runtime's ``com.microsoft.MatMulNBits`` on the packed weights
  (``quantized_matmul="nbits"``, the default; :mod:`.nbits`) or stay standard ops (``"standard"``), recorded in
  ``metadata_props["sparsec.quantized_matmul"]``; before the sparse path, which then leaves them as they are.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from sparsec.backends.onnxruntime.sparse import NO_COMPILER
from sparsec.errors import SparsecError, UsageError, first_line

#: above this many bytes of weights the model is saved with external data
EXTERNAL_DATA_THRESHOLD = 1 << 30
#: namespaces whose ops torch's ONNX exporter translates (or decomposes) itself
_BUILTIN_NAMESPACES = {"aten", "prims", "quantized_decomposed", "_operator", "torchvision"}


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote."""

    path: str
    opset: int
    external_data: bool
    files: list[str]
    inputs: list[dict]
    outputs: list[dict]
    weight_bytes: int
    seconds: float
    metadata: dict = field(default_factory=dict)
    verification: dict | None = None
    sparse_kernel: dict | None = None
    quantized_matmul: dict | None = None
    notes: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class VerificationError(SparsecError):
    """ONNX Runtime's outputs differ from the torch reference beyond tolerance; ``.result`` holds the export."""

    def __init__(self, message: str, result: OnnxExport):
        super().__init__(message)
        self.result = result


def _resolve(source: Any) -> tuple[Any, dict]:
    """(ExportedProgram, facts for metadata) from a TransformResult, an Artifact, an artifact path or a program."""
    import torch

    from sparsec.artifact import TOKENIZER_DIR, Artifact, read_artifact

    if isinstance(source, (str, os.PathLike)):
        source = read_artifact(str(source))
    if isinstance(source, Artifact):
        m = source.manifest
        tokenizer = os.path.join(source.path, TOKENIZER_DIR)
        return source.program, {"pipeline": m.get("pipeline", ""), "fingerprint": m.get("fingerprint", ""),
                                "source": str((m.get("source") or {}).get("model", "")), "artifact": source.path,
                                "generation": m.get("generation"), "output_names": m.get("output_names"),
                                "tokenizer": tokenizer if os.path.isdir(tokenizer) else None}
    if isinstance(source, torch.export.ExportedProgram):
        return source, {}
    program = getattr(source, "program", None)
    if isinstance(program, torch.export.ExportedProgram):  # TransformResult
        pipeline = getattr(source, "pipeline", None)
        origin = getattr(source, "source", None) or {}
        return program, {"pipeline": pipeline.canonical() if hasattr(pipeline, "canonical") else "",
                         "source": str(origin.get("model", "")), "generation": getattr(source, "generation", None),
                         "output_names": getattr(source, "output_names", None),
                         "tokenizer": origin.get("tokenizer")}
    raise UsageError(f"cannot export a {type(source).__name__} to ONNX; give a TransformResult, an artifact"
                     " directory (or Artifact), or an ExportedProgram")


def check_output_file(path: str, force: bool) -> None:
    """Refuse an existing output file without ``force``, and a directory always."""
    if os.path.isdir(path):
        raise SparsecError(f"output '{path}' is a directory; -o takes the .onnx file to write, e.g. -o model.onnx")
    if os.path.lexists(path) and not force:
        raise SparsecError(f"output '{path}' already exists; pass --force to replace it, or choose another -o")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise SparsecError(f"cannot write '{path}': '{parent}' is not a directory")


def tokenizer_path(onnx_path: str) -> str:
    """Where the tokenizer of a cached export lives: ``NAME.tokenizer/`` beside ``NAME.onnx``."""
    return os.path.splitext(os.fspath(onnx_path))[0] + ".tokenizer"


def cached_dim_names(spec: list[dict]) -> dict[str, str]:
    """Symbol -> ONNX dim name of a cached program's inputs: ``batch``, ``seq`` (tokens of the step), ``kept``
    (positions whose logits are computed) and ``past`` (cache length; every layer's, one name)."""
    where = {"input_ids": {0: "batch", 1: "seq"}, "logits_to_keep": {0: "kept"}}
    names: dict[str, str] = {}
    for s in spec:
        wanted = where.get(s["name"], {0: "batch", 2: "past"} if s["name"].startswith("past_") else {})
        for i, d in enumerate(s.get("shape", [])):
            if isinstance(d, dict) and d.get("symbol") and i in wanted:
                names.setdefault(d["symbol"], wanted[i])
    return names


def unsupported_ops(program, table: dict) -> list[tuple[str, str, str]]:
    """(op, module path, node name) of every op no ONNX translation is known for (custom namespaces only: torch's
    exporter translates or decomposes aten ops itself)."""
    import torch

    from sparsec.graph import module_path
    from sparsec.backends.onnxruntime.translations import has_translation

    registered = None
    out = []
    for node in program.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if target.namespace in _BUILTIN_NAMESPACES or target in table or has_translation(target):
            continue
        registered = registered or _torch_registry_check()  # built only when a custom op is there (it is slow)
        if registered(target):
            continue
        out.append((target.name().split(".", 1)[0], module_path(node), node.name))
    return out


def _torch_registry_check():
    """``is_registered(op)`` of torch's ONNX registry (a private API: always False when it is not there)."""
    try:
        from torch.onnx._internal.exporter._registration import ONNXRegistry

        registry = ONNXRegistry.from_torch_lib()
        return registry.is_registered
    except Exception:
        return lambda target: False


def has_quantized_weights(program) -> bool:
    """True when ``program`` computes a weight with ``sparsec::dequantize`` (the ``quantize`` pass)."""
    from sparsec.ops import DEQUANTIZE

    return any(n.op == "call_function" and n.target is DEQUANTIZE for n in program.graph.nodes)


def keep_packed(node) -> bool | None:
    """``should_fold`` of onnxscript's constant folding: False (keep the node) when it reads a packed integer weight
    (an int8 / uint8 initializer) or a quantization scale (an initializer of the ``quantize`` pass's holder), except
    ``Shape`` / ``Size``; None (the default rules) otherwise. Without it the exporter folds ``sparsec::dequantize`` of
    a small weight into a float32 initializer: a .onnx file as large as the unquantized one."""
    import onnx_ir as ir

    from sparsec.passes.quantize import HOLDER

    if node.op_type in ("Shape", "Size") and node.domain in ("", "ai.onnx"):
        return None
    for v in node.inputs:
        if v is not None and v.is_initializer() and (v.dtype in (ir.DataType.INT8, ir.DataType.UINT8)
                                                     or (v.name or "").startswith(HOLDER)):
            return False
    return None


def optimize_keeping_packed(model) -> None:
    """What ``torch.onnx.export(optimize=True)`` does (onnxscript's ``optimize_ir``, then its ONNX fusions), with
    :func:`keep_packed` deciding the folding of quantized weights."""
    import onnxscript

    onnxscript.optimizer.optimize_ir(model, should_fold=keep_packed)
    fusions = getattr(onnxscript.rewriter, "onnx_fusions", None)
    if fusions is not None and hasattr(fusions, "fuse"):
        fusions.fuse(model)


def _no_translation_message(op: str, module: str, node: str) -> str:
    where = f"in module '{module}'" if module else "in the model's own forward"
    return (f"op '{op}' ({where}, node '{node}') has no ONNX translation; register one with"
            f" sparsec.backends.onnxruntime.register_translation('{op}') (standard ONNX ops), or transform the model"
            " without the pass that adds it")


@contextlib.contextmanager
def _quiet():
    """Keep the exporter's progress prints, warnings and log lines off stdout/stderr (data and one-line errors)."""
    sink = io.StringIO()
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield sink
    finally:
        logging.disable(previous)


def _exporter_cause(exc: BaseException) -> str:
    """The useful line of a torch.onnx exporter error (its 'Exception summary'), else its first line."""
    text = str(exc)
    found = re.findall(r"<class '[\w.]+\.(\w+)'>: (.+)", text)
    if found:
        name, msg = found[0]
        return f"{name}: {msg.strip()}"
    for cause in (exc.__cause__, exc.__context__):
        if cause is not None:
            return f"{type(cause).__name__}: {first_line(cause)}"
    return f"{type(exc).__name__}: {first_line(exc)}"


def _rename_dims(model, names: dict[str, str]) -> None:
    import onnx_ir as ir

    if not names:
        return
    pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in sorted(names, key=len, reverse=True)) + r")\b")

    def fix(value):
        shape = value.shape
        if shape is None:
            return
        dims = [ir.SymbolicDim(pattern.sub(lambda m: names[m.group(1)], d.value))
                if isinstance(d, ir.SymbolicDim) and d.value else d for d in shape]
        value.shape = ir.Shape(dims)

    graph = model.graph
    for v in [*graph.inputs, *graph.outputs]:
        fix(v)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for v in node.outputs:
            fix(v)


def _weight_bytes(model) -> int:
    total = 0
    for init in model.graph.initializers.values():
        cv = init.const_value
        if cv is not None:
            total += int(cv.nbytes)
    return total


def _value_info(v) -> dict:
    dims = [d if isinstance(d, int) else str(getattr(d, "value", d)) for d in (v.shape or [])]
    try:
        dtype = str(v.dtype.numpy())
    except Exception:
        dtype = str(v.dtype).lower() if v.dtype is not None else None
    return {"name": v.name, "dtype": dtype, "shape": dims}


def export_onnx(source: Any, path: str, opset: int | None = None, verify: bool = False, inputs: Any = None, *,
                external_data: bool | None = None, force: bool = False, rtol: float = 1e-4, atol: float = 1e-4,
                optimize: bool = True, sparse_kernel: str = "none", quantized_matmul: str = "nbits") -> OnnxExport:
    """Export ``source`` (a TransformResult, an artifact directory / Artifact, or an ExportedProgram) to ONNX.

    ``opset``: ONNX opset (default: the exporter's). ``external_data``: weights in ``PATH.data`` (default: when
    they exceed 1 GB). ``verify``: run ONNX Runtime on ``inputs`` (None: the program's example inputs, plus a
    shorter sequence; or a .npz / .safetensors file, or a dict of arrays) and compare with the torch program;
    raises :class:`VerificationError` beyond ``rtol`` / ``atol`` (the model stays written). ``force`` replaces an
    existing file. ``sparse_kernel``: ``none`` (standard ONNX ops as exported), ``auto`` (per thresholded linear, the
    fastest at batch 1 as measured: sparsec's custom op, the standard-op gather of active weight rows, or dense),
    ``all`` (the custom op everywhere) or ``gather`` (the standard-op gather everywhere); see :mod:`.sparse`.
    ``quantized_matmul`` (a program of the ``quantize`` pass): ``nbits`` (its linears as ``com.microsoft.MatMulNBits``
    where that applies, see :mod:`.nbits`) or ``standard`` (standard ops: ONNX Runtime folds the float32 weights).
    """
    import torch

    import sparsec
    from sparsec.artifact import _TMP_MARK, cleanup_stale_temporaries, input_spec
    from sparsec.backends.onnxruntime.nbits import MODES as NBITS_MODES
    from sparsec.backends.onnxruntime.sparse import MODES
    from sparsec.backends.onnxruntime.translations import translation_table
    from sparsec.calling import program_output_names
    from sparsec.inputs import friendly_dim_names
    from sparsec.kv_cache import cache_layout

    if opset is not None and (not isinstance(opset, int) or isinstance(opset, bool) or opset < 7):
        raise UsageError(f"opset must be an integer >= 7 (ONNX opset version), not {opset!r}")
    if opset is not None:
        import onnx

        if opset > onnx.defs.onnx_opset_version():
            raise UsageError(f"opset {opset} is newer than this onnx package knows (at most"
                             f" {onnx.defs.onnx_opset_version()})")
    if sparse_kernel not in MODES:
        raise UsageError(f"sparse kernel '{sparse_kernel}' is not one of {', '.join(MODES)} (none: standard ONNX"
                         " ops; auto: per layer the fastest as measured; all: sparsec's custom op wherever it"
                         " applies; gather: the standard-op gather wherever it applies)")
    if quantized_matmul not in NBITS_MODES:
        raise UsageError(f"quantized matmul '{quantized_matmul}' is not one of {', '.join(NBITS_MODES)} (nbits: ONNX"
                         " Runtime's com.microsoft.MatMulNBits on the packed weights; standard: standard ONNX ops)")
    if sparse_kernel == "all":
        from sparsec.backends.onnxruntime.kernels import compiler

        if compiler() is None:  # before the (slow) export
            raise SparsecError(NO_COMPILER)
    path = os.fspath(path)
    check_output_file(path, force)
    program, facts = _resolve(source)
    spec = input_spec(program)
    layout = cache_layout(spec)
    tokenizer = facts.get("tokenizer") if layout is not None else None
    if tokenizer and os.path.lexists(tokenizer_path(path)) and not force:
        raise SparsecError(f"'{tokenizer_path(path)}' (the tokenizer written beside '{path}') already exists; pass"
                           " --force to replace it, or choose another -o")
    table = translation_table()
    if verify and isinstance(inputs, (str, os.PathLike)):  # a bad inputs file fails before the (slow) export
        from sparsec.inputs import check_inputs, load_inputs_file

        inputs = os.fspath(inputs)
        check_inputs(load_inputs_file(inputs), spec, source=f"inputs file '{inputs}'",
                     what="the artifact")
    missing = unsupported_ops(program, table)
    if missing:
        raise SparsecError(_no_translation_message(*missing[0]))
    from sparsec.graph import module_path

    start = time.perf_counter()
    names = program_output_names(program, facts.get("output_names"))
    quantized = has_quantized_weights(program)
    try:
        packed = optimize and quantized  # optimized here, keeping the weights packed
        with _quiet():
            onnx_program = torch.onnx.export(program, (), None, dynamo=True, opset_version=opset,
                                             custom_translation_table=table or None,
                                             optimize=optimize and not packed, output_names=names, verbose=False,
                                             report=False)
            if packed:
                optimize_keeping_packed(onnx_program.model)
    except Exception as exc:
        cause = _exporter_cause(exc)
        op = re.search(r"No ONNX function found for <OpOverload\(op='([\w.]+)', overload='(\w+)'\)>", str(exc))
        if op:
            ns, _, name = op.group(1).partition(".")
            qualified = f"{ns}::{name}"
            where = [(qualified, module_path(n), n.name) for n in program.graph.nodes
                     if n.op == "call_function" and getattr(n.target, "name", None)
                     and callable(n.target.name) and n.target.name().split(".", 1)[0] == qualified]
            raise SparsecError(_no_translation_message(*(where[0] if where else (qualified, "", "?")))) from exc
        hint = f" (opset {opset} may be too old for torch.onnx; try --opset 18 or newer)" if opset else ""
        raise SparsecError(f"ONNX export failed: {cause[:400]}{hint} (--debug shows the full trace)") from exc

    model = onnx_program.model
    _rename_dims(model, cached_dim_names(spec) if layout else friendly_dim_names(spec))
    opset_used = int(model.opset_imports.get("", opset or 0))
    metadata = {"sparsec.version": sparsec.__version__, "sparsec.pipeline": facts.get("pipeline", ""),
                "sparsec.fingerprint": facts.get("fingerprint", ""), "sparsec.source": facts.get("source", ""),
                "torch.version": torch.__version__, "onnx.opset": str(opset_used),
                "exporter": f"torch.onnx.export(dynamo=True) {torch.__version__}"}
    if layout is not None:
        metadata["sparsec.generation"] = json.dumps({"max_context": layout.max_context,
                                                     **(facts.get("generation") or {})})
    nbits_info = None
    if quantized:
        from sparsec.backends.onnxruntime.nbits import apply_matmul_nbits

        nbits_info = apply_matmul_nbits(model, program) if quantized_matmul == "nbits" else {"mode": "standard"}
        metadata["sparsec.quantized_matmul"] = json.dumps(nbits_info)
    sparse_info = None
    if sparse_kernel != "none":
        from sparsec.backends.onnxruntime.sparse import apply_sparse_kernels

        sparse_info = apply_sparse_kernels(model, program, sparse_kernel)
        metadata["sparsec.sparse_kernel"] = json.dumps(sparse_info)
    for k, v in metadata.items():
        model.metadata_props[k] = str(v)
    model.producer_name, model.producer_version = "sparsec", sparsec.__version__
    weight_bytes = _weight_bytes(model)
    use_external = bool(external_data) if external_data is not None else weight_bytes > EXTERNAL_DATA_THRESHOLD

    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    cleanup_stale_temporaries(parent)
    base = os.path.basename(path)
    tmp = tempfile.mkdtemp(prefix=f".{base}{_TMP_MARK}", dir=parent, suffix=f"-{os.getpid()}")
    files = []
    try:
        with _quiet():
            onnx_program.save(os.path.join(tmp, base), external_data=use_external)
        written = sorted(os.listdir(tmp), key=lambda f: f == base)  # the .onnx file last: it marks completion
        if base not in written:
            raise SparsecError(f"ONNX export wrote no '{base}'")
        stale = path + ".data"
        tok_dst = tokenizer_path(os.path.join(parent, base))
        if tokenizer:
            from sparsec.artifact import copy_tokenizer

            tok_tmp = os.path.join(tmp, "tokenizer")
            if copy_tokenizer(tokenizer, tok_tmp):
                if os.path.lexists(tok_dst):  # --force: the old export's tokenizer goes with the temporary
                    os.replace(tok_dst, os.path.join(tmp, "old-tokenizer"))
                os.replace(tok_tmp, tok_dst)
                files.append(tok_dst)
        if force and tok_dst not in files and os.path.isdir(tok_dst):
            shutil.rmtree(tok_dst)  # the old export's tokenizer; the new model has none
        for f in written:
            dst = os.path.join(parent, f)
            _fsync_file(os.path.join(tmp, f))
            os.replace(os.path.join(tmp, f), dst)
            files.append(dst)
        if force and stale not in files and os.path.isfile(stale):
            os.remove(stale)  # the old export's weights; the new model holds its own
    except BaseException:
        for f in files:  # a failure between renames: take back what was moved into place
            with contextlib.suppress(OSError):
                shutil.rmtree(f) if os.path.isdir(f) else os.remove(f)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    result = OnnxExport(path=path, opset=opset_used, external_data=use_external, files=files,
                        inputs=[_value_info(v) for v in model.graph.inputs],
                        outputs=[_value_info(v) for v in model.graph.outputs], weight_bytes=weight_bytes,
                        seconds=round(time.perf_counter() - start, 3), metadata=metadata, sparse_kernel=sparse_info,
                        quantized_matmul=nbits_info)
    if opset is not None and opset_used != opset:
        result.notes.append(f"opset {opset} was requested; torch.onnx produced opset {opset_used} (its minimum)")
    if verify:
        from sparsec.backends.onnxruntime.runtime import verify_onnx

        result.verification = verify_onnx(path, program, inputs, rtol=rtol, atol=atol)
        if not result.verification["ok"]:
            raise VerificationError(verification_failure(result.verification, path), result)
    return result


def verification_failure(v: dict, path: str) -> str:
    worst = max(v["runs"], key=lambda r: (not r["ok"], r["max_abs"]))
    ties = worst.get("ties")
    if ties and ties["not_ties"]:
        name = ties["not_ties"][0]
        d = ties["thresholds"][name]
        where = f"threshold '{d['module']}' (node {name})" if d["module"] else f"threshold node {name}"
        return (f"ONNX Runtime decides {d['count']} activations at {where} unlike torch, up to {d['distance']:.3g}"
                f" (relative) from t={d['t']:.4g}, beyond a tie ({ties['tie']:g}), on {worst['inputs']} (max abs err"
                f" {worst['max_abs']:.3g}); '{path}' was written: its threshold does not compute |x| > t as torch does,"
                " inspect it")
    n = ties["decisions"] if ties else 0
    also = ("" if not ties else " (ONNX Runtime's threshold decisions are torch's)" if not n else
            f" even with ONNX Runtime's own threshold decisions ({n} differ{'s' * (n == 1)} from torch's, all ties)")
    errors = ties or worst
    return (f"ONNX Runtime output differs from the torch reference beyond rtol={v['rtol']:g}, atol={v['atol']:g} on"
            f" {worst['inputs']}{also} (max abs err {errors['max_abs']:.3g}, max rel err {errors['max_rel']:.3g});"
            f" '{path}' was written: inspect it, or loosen --rtol/--atol")


def _fsync_file(p: str) -> None:
    with open(p, "rb") as f:
        os.fsync(f.fileno())
