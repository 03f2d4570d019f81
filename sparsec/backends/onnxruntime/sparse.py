"""The sparse path of the ONNX Runtime backend: faster formulations of thresholded linears for batch-1 decode.

In the exported graph a TEAL-thresholded linear is ``MatMul(Mul(x, Cast(Greater(Abs(x), t))), Wt)`` (+ ``Add(B)``)
with ``Wt`` a constant ``[K, N]``, or ``Gemm`` of the same (GPT-2's Conv1D: 2-D input, no transposes, bias as C).
Dense ONNX Runtime does all of that work whatever the sparsity. Two replacements read only the weight rows of the
active inputs:

- ``sparse``: sparsec's custom op ``ai.sparsec::SparseLinear`` (:mod:`.kernels`, needs a C++ compiler);
- ``gather``: standard ONNX ops only, ``If(Size(x) == K)`` (exactly one row, a decode token):
  ``MatMul(Gather(x, i), Gather(Wt, i))`` with ``i = NonZero(|x| > t)``; else the original dense MatMul. Any
  ONNX runtime runs it, for any batch and sequence length; the gathered rows are copied once per call.

``teal{prefill=half|dense}`` exports its mask as ``Or(Greater(Abs(x), t), Less(position, n))``: one row (S = 1) is
always thresholded, the other rows only by position. Such a linear takes SparseLinear only inside the same
``If(Size(x) == K)`` (else the original MatMul), and the gather reads the active rows off that exact mask.

A weight the ``quantize`` pass made (:mod:`sparsec.passes.quantize`) is no initializer but a constant subgraph:
``Transpose(sparsec::dequantize(q, scale))`` in standard ops (:mod:`.translations`) over int8 / uint8 and scale
initializers. By default the export makes such a linear ``com.microsoft.MatMulNBits`` first (:mod:`.nbits`): dense
compute on the packed weight, which the sparse kernels do not read; a thresholded one is listed with ``"kernel":
"matmulnbits"`` and left as it is. Exported with ``quantized_matmul="standard"``, it is replaced like any other, the
SparseLinear / Gather reading the float32 weight that subgraph computes; the file keeps the packed integers. ONNX
Runtime's constant folding (on by default) computes that weight once, when the session is created: in the session
the weight is float32, as it is for ORT's own dense MatMul of the same graph, so the sparse kernels lose no memory
saving that dense ORT keeps (with graph optimizations off every run dequantizes again, on either path). Reading only
the packed bytes of the active rows is the TVM backend's.

Per layer the choice is made by measurement: for each distinct (K, N, bias, sparsity) each formulation is timed
at batch 1 (one decode token) on random weights with that fraction of zero inputs, and the fastest is kept when it
beats dense ORT by :data:`MARGIN`. The sparsity of a layer is measured by running the torch program on its example
inputs. The choices are recorded in the model's ``metadata_props`` (``sparsec.sparse_kernel``).
"""
from __future__ import annotations

import ast
import json
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from sparsec.errors import SparsecError

#: ``--sparse-kernel`` choices: none = standard ops only; auto = per layer, the fastest as measured; all = SparseLinear
#: for every thresholded linear; gather = the standard-op gather formulation for every thresholded linear
MODES = ("none", "auto", "all", "gather")
#: the custom op is chosen only when it is at least this much faster than dense (timing noise)
MARGIN = 1.05
NO_COMPILER = ("--sparse-kernel all needs a C++ compiler (g++) to build the ONNX Runtime kernels; install g++ (or"
               " set CXX), or use --sparse-kernel gather or auto (standard ops only)")


@dataclass
class Linear:
    """One float32 ``MatMul(x, Wt) [+ B]`` (or ``Gemm``) with a constant 2-D ``Wt`` found in an ONNX graph (onnx_ir
    objects)."""

    matmul: Any
    add: Any  # the bias Add folded in, or None
    x: Any  # the MatMul's input (for a ThresholdedLinear: the input before thresholding)
    wt: Any
    bias: Any
    layer: str  # module path of the linear
    quantized: bool = False  # Wt is computed from packed integer initializers (a constant subgraph), not stored

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(d) for d in self.wt.shape)


@dataclass
class ThresholdedLinear(Linear):
    """One ``MatMul(x * (|x| > t), Wt) [+ B]``: a :class:`Linear` whose input is thresholded."""

    t: Any = None
    keep: Any = None  # the boolean mask |x| > t
    masked: str = ""  # name of the thresholded value (the torch node name of the sparsec::threshold call)
    prefill: bool = False  # the mask is teal's prefill rule (thresholds only one-row inputs in full)


def _const(value):
    from onnx_ir.convenience import get_const_tensor

    return get_const_tensor(value) if value is not None else None


#: the most nodes a constant weight subgraph may have (a dequantized weight takes about 15)
_MAX_WEIGHT_NODES = 64
_PACKED = ("INT8", "UINT8")


def weight_initializers(value) -> list | None:
    """The initializers a constant weight ``value`` is computed from (``[value]`` for an initializer, ``[]`` for a
    Constant), or None when it is not constant: constant means computed by at most :data:`_MAX_WEIGHT_NODES`
    deterministic standard-domain nodes of the main graph from initializers and Constants only (no graph input, no
    subgraph)."""
    import onnx_ir as ir

    seen, stack, found = set(), [value], []
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if v.is_graph_input():
            return None
        if v.is_initializer():
            if v.const_value is None:
                return None
            found.append(v)
            continue
        node = v.producer()
        if (node is None or node.domain not in ("", "ai.onnx") or len(seen) > _MAX_WEIGHT_NODES
                or node.op_type.startswith("Random") or node.op_type == "Multinomial"
                or any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())):
            return None
        if node.op_type == "Constant":
            continue
        stack.extend(node.inputs)
    return found


def constant_weight(value) -> tuple[bool, bool]:
    """(constant, quantized) of a weight ``value``: constant when it is an initializer / Constant or a constant
    subgraph (:func:`weight_initializers`); quantized when such a subgraph reads an int8 / uint8 initializer (the
    ``quantize`` pass's packed values, :mod:`.translations`)."""
    import onnx_ir as ir

    if _const(value) is not None:
        return True, False
    inits = weight_initializers(value)
    if inits is None:
        return False, False
    packed = tuple(getattr(ir.DataType, name) for name in _PACKED)
    return True, any(v.dtype in packed for v in inits)


def _producer(value, op_type: str):
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _layer(node) -> str:
    try:
        scopes = ast.literal_eval(node.metadata_props.get("pkg.torch.onnx.name_scopes", "[]"))
    except (ValueError, SyntaxError):
        scopes = []
    return scopes[-2] if len(scopes) >= 2 and scopes[-2] else node.name or "?"


def _threshold_of(masked):
    """(x, t, keep mask, prefill) when ``masked`` is ``Mul(x, Cast(keep))`` with keep ``Greater(Abs(x), t)``
    (sparsec::threshold) or ``Or(Greater(Abs(x), t), Less(position, n))`` (sparsec::threshold_prefill, prefill
    True), t a constant float32 scalar."""
    import onnx_ir as ir

    mul = _producer(masked, "Mul")
    if mul is None or len(mul.inputs) != 2:
        return None
    for x, mask in (mul.inputs, reversed(mul.inputs)):
        cast = _producer(mask, "Cast")
        keep = cast.inputs[0] if cast is not None else None
        either = _producer(keep, "Or")
        if either is not None and _producer(either.inputs[1], "Less") is None:
            continue
        greater = _producer(either.inputs[0] if either is not None else keep, "Greater")
        absolute = _producer(greater.inputs[0], "Abs") if greater is not None else None
        if absolute is None or absolute.inputs[0] is not x:
            continue
        t = greater.inputs[1]
        const = _const(t)
        if const is None or const.dtype != ir.DataType.FLOAT or const.size != 1:
            return None
        return x, t, keep, either is not None
    return None


def linears(model) -> list[Linear]:
    """Every float32 ``MatMul(x, Wt)`` (or plain ``Gemm``) with constant 2-D ``Wt`` in the main graph of ``model``
    (an initializer, or a constant subgraph: :func:`constant_weight`; a dequantized weight), with its bias: Gemm's C,
    or the one ``Add`` of a constant float32 ``[N]`` using the MatMul's output."""
    import onnx_ir as ir

    outputs = set(id(v) for v in model.graph.outputs)
    found = []
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Gemm" and (node.attributes.get_int("transA", 0) or node.attributes.get_int("transB", 0)
                                       or node.attributes.get_float("alpha", 1.0) != 1.0
                                       or node.attributes.get_float("beta", 1.0) != 1.0):
            continue
        x, wt, *c = node.inputs
        w = _const(wt)
        quantized = False
        if w is None:
            constant, quantized = constant_weight(wt)
            shape = list(wt.shape) if constant and wt.shape is not None else []
            if len(shape) != 2 or not all(isinstance(d, int) for d in shape):
                continue
            w = wt  # the value: its dtype and static shape
        if w.dtype != ir.DataType.FLOAT or len(w.shape) != 2 or x.dtype != ir.DataType.FLOAT:
            continue
        add = bias = None
        users = list(node.outputs[0].uses())
        if c and c[0] is not None:  # Gemm's C
            b = _const(c[0])
            if b is None or b.dtype != ir.DataType.FLOAT or list(b.shape) != [w.shape[1]]:
                continue
            bias = c[0]
        elif len(users) == 1 and id(node.outputs[0]) not in outputs:
            user = users[0].node
            if user.op_type == "Add" and user.domain in ("", "ai.onnx"):
                other = user.inputs[1] if user.inputs[0] is node.outputs[0] else user.inputs[0]
                b = _const(other)
                if b is not None and b.dtype == ir.DataType.FLOAT and list(b.shape) == [w.shape[1]]:
                    add, bias = user, other
        found.append(Linear(node, add, x, wt, bias, _layer(node), quantized))
    return found


def thresholded_linears(model) -> list[ThresholdedLinear]:
    """Every :func:`linears` entry whose input is ``x * (|x| > t)`` (``MatMul(x * (|x| > t), Wt)``)."""
    found = []
    for lin in linears(model):
        xt = _threshold_of(lin.x)
        if xt is not None:
            x, t, keep, prefill = xt
            found.append(ThresholdedLinear(lin.matmul, lin.add, x, lin.wt, lin.bias, lin.layer, lin.quantized, t,
                                           keep, lin.x.name, prefill))
    return found


def threshold_sparsity(program, inputs: dict | None = None) -> dict[str, float]:
    """``{node name: fraction of zeros}`` of every ``sparsec::threshold`` output of ``program`` (an ExportedProgram)
    run on ``inputs`` (default: its example inputs); for ``sparsec::threshold_prefill`` the fraction a thresholded
    token gets, ``|x| <= t`` over every token (a one-token decode step is thresholded in every mode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from sparsec.inputs import example_inputs, run_program
    from sparsec.ops import THRESHOLD, THRESHOLD_PREFILL

    names = [n.name for n in program.graph.nodes if n.op == "call_function"
             and n.target in (THRESHOLD, THRESHOLD_PREFILL)]
    zeros: list[float] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is THRESHOLD:
                zeros.append(float((out == 0).float().mean()))
            elif func is THRESHOLD_PREFILL:
                x, t = args[:2]
                zeros.append(float((x * (x.abs() > t) == 0).float().mean()))
            return out

    with Record():
        run_program(program, inputs if inputs is not None else example_inputs(program))
    if len(zeros) != len(names):
        return {}
    return dict(zip(names, zeros))


#: the formulations of a thresholded linear that :func:`time_linear` can time
KERNELS = ("dense", "sparse", "gather")


def _linear_model(k: int, n: int, bias: bool, kernel: str, rng, rows=(1,)) -> bytes:
    """A thresholded linear on input ``x`` of shape ``[*rows, k]`` (t = 0.5), as ``kernel``: ``dense`` = ORT's MatMul
    (+ Add) on the already-masked input (no thresholding work counted), ``sparse`` = one SparseLinear node,
    ``gather`` = the exported thresholded graph with the gather formulation put in by :func:`apply_sparse_kernels`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sparsec.backends.onnxruntime.kernels import DOMAIN

    inits = [numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32) * 0.02, "Wt"),
             numpy_helper.from_array(np.array(0.5, np.float32), "t")]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(n, dtype=np.float32), "B"))
    opsets = [helper.make_opsetid("", 18)]
    if kernel == "sparse":
        nodes = [helper.make_node("SparseLinear", ["x", "t", "Wt"] + (["B"] if bias else []), ["y"], domain=DOMAIN)]
        opsets.append(helper.make_opsetid(DOMAIN, 1))
    else:
        nodes = [helper.make_node("Abs", ["x"], ["ax"]), helper.make_node("Greater", ["ax", "t"], ["keep"]),
                 helper.make_node("Cast", ["keep"], ["keepf"], to=TensorProto.FLOAT),
                 helper.make_node("Mul", ["x", "keepf"], ["masked"])] if kernel == "gather" else []
        nodes.append(helper.make_node("MatMul", ["masked" if nodes else "x", "Wt"], ["xw" if bias else "y"]))
        if bias:
            nodes.append(helper.make_node("Add", ["xw", "B"], ["y"]))
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*rows, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*rows, n])], inits)
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10  # what ORT >= 1.20 reads
    if kernel == "gather":
        import onnx_ir as ir

        m = ir.from_proto(onnx.shape_inference.infer_shapes(model))  # the value types the match checks
        (tl,) = thresholded_linears(m)
        _replace_gather(m, tl)
        _drop_unused(m)
        model = ir.to_proto(m)
    return model.SerializeToString()


def decode_inputs(k: int, sparsity: float, count: int, rng) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` batch-1 inputs (x, x * (|x| > 0.5)) with exactly ``round(sparsity * k)`` elements of
    ``|x| <= 0.5``, at random positions (threshold t = 0.5, as in :func:`_linear_model`)."""
    out = []
    n_zero = int(round(sparsity * k))
    for _ in range(count):
        mag = rng.uniform(0.55, 3.0, k).astype(np.float32)
        mag[rng.permutation(k)[:n_zero]] = rng.uniform(0.0, 0.5, n_zero)
        x = (mag * rng.choice(np.array([-1.0, 1.0], np.float32), k))[None, :]
        out.append((x, x * (np.abs(x) > 0.5)))
    return out


def time_linear(k: int, n: int, sparsity: float, *, bias: bool = False, threads: int | None = None,
                reps: int = 15, kernels: tuple[str, ...] = ("dense", "sparse")) -> dict[str, float]:
    """Median seconds per batch-1 token of each of ``kernels`` (see :func:`_linear_model`; the same weights), the
    repetitions interleaved. ``dense`` runs on the masked input, the others on the raw input."""
    from sparsec.backends.onnxruntime.runtime import onnx_session

    rng = np.random.default_rng(0)
    weights_seed = int(rng.integers(1 << 31))
    sessions = {kind: onnx_session(_linear_model(k, n, bias, kind, np.random.default_rng(weights_seed)),
                                   threads=threads, custom_ops=kind == "sparse") for kind in kernels}
    pool = decode_inputs(k, sparsity, 4, rng)  # rotating inputs: the active weight rows change as in decoding
    times: dict[str, list[float]] = {kind: [] for kind in kernels}
    for r in range(reps + 1):
        x, masked = pool[r % len(pool)]
        for kind, session in sessions.items():
            feed = {"x": masked if kind == "dense" else x}
            t0 = time.perf_counter()
            session.run(None, feed)
            if r:  # the first round warms up
                times[kind].append(time.perf_counter() - t0)
    return {kind: float(np.median(ts)) for kind, ts in times.items()}


@lru_cache(maxsize=256)
def _choice(k: int, n: int, bias: bool, sparsity: float, threads: int | None,
            kernels: tuple[str, ...]) -> dict[str, float]:
    return time_linear(k, n, sparsity, bias=bias, threads=threads, kernels=kernels)


def apply_sparse_kernels(model, program, mode: str, *, threads: int | None = None) -> dict:
    """Replace thresholded linears of ``model`` (onnx_ir, in place) per ``mode`` (see :data:`MODES`).

    ``program``: the ExportedProgram the model came from (its example inputs give each layer's sparsity).
    Returns what is recorded in the metadata: ``{"mode", "library", "layers": [{layer, shape, sparsity, kernel,
    dense_us, sparse_us, gather_us}]}`` (``kernel``: dense, sparse or gather; the timings in auto mode only, on a
    float32 weight; ``"weight": "quantized"`` on a layer whose weight is dequantized from packed integers; kernel
    ``matmulnbits``: a thresholded linear already made ``com.microsoft.MatMulNBits``, left as it is)."""
    from sparsec.backends.onnxruntime.kernels import DOMAIN, compiler, library_path

    if mode not in MODES:
        raise SparsecError(f"sparse kernel mode '{mode}' is not one of {', '.join(MODES)}")
    info: dict = {"mode": mode, "layers": []}
    found = thresholded_linears(model) if mode != "none" else []
    packed = _thresholded_nbits(model) if mode != "none" else []
    if not found and not packed:
        return info
    sparsity = threshold_sparsity(program)
    for node, masked in packed:
        s = sparsity.get(masked)
        info["layers"].append({"layer": _layer(node), "shape": [node.attributes.get_int("K"),
                                                                 node.attributes.get_int("N")],
                               "sparsity": None if s is None else round(s, 4), "weight": "quantized",
                               "kernel": "matmulnbits"})
    if not found:
        return info
    candidates = ("sparse", "gather")
    if mode in ("auto", "all") and library_path() is None:
        if mode == "all":
            raise SparsecError(NO_COMPILER)
        info["note"] = "no C++ compiler found: SparseLinear left out, the standard-op gather timed alone"
        candidates = ("gather",)
    if "sparse" in candidates and mode != "gather":
        info["library"] = f"{DOMAIN} SparseLinear ({compiler()} -march=native)"
    for tl in found:
        k, n = tl.shape
        s = sparsity.get(tl.masked)
        entry = {"layer": tl.layer, "shape": [k, n], "sparsity": None if s is None else round(s, 4)}
        if tl.quantized:
            entry["weight"] = "quantized"  # read from its dequantizing subgraph (module docstring)
        if mode in ("all", "gather"):
            entry["kernel"] = "sparse" if mode == "all" else "gather"
        elif s is None:
            entry["kernel"] = "dense"
            entry["reason"] = "sparsity not measured"
        else:
            timed = _choice(k, n, tl.bias is not None, round(s, 2), threads, ("dense", *candidates))
            entry.update({f"{kind}_us": round(sec * 1e6, 1) for kind, sec in timed.items()})
            best = min(candidates, key=timed.get)
            entry["kernel"] = best if timed[best] * MARGIN < timed["dense"] else "dense"
        info["layers"].append(entry)
        if entry["kernel"] == "sparse":
            _replace_sparse(model, tl)
            model.opset_imports[DOMAIN] = 1
        elif entry["kernel"] == "gather":
            _replace_gather(model, tl)
    if any(e["kernel"] in ("sparse", "gather") for e in info["layers"]):
        _drop_unused(model)
    return info


def _thresholded_nbits(model) -> list[tuple]:
    """(node, name of its thresholded input) of every ``com.microsoft.MatMulNBits`` (:mod:`.nbits`) on a thresholded
    input."""
    return [(node, node.inputs[0].name) for node in model.graph if node.op_type == "MatMulNBits"
            and node.domain == "com.microsoft" and _threshold_of(node.inputs[0]) is not None]


def _drop_unused(model) -> None:
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)


def _replace_sparse(model, tl: ThresholdedLinear) -> None:
    import onnx_ir as ir

    from sparsec.backends.onnxruntime.kernels import DOMAIN

    inputs = [tl.x, tl.t, tl.wt] + ([tl.bias] if tl.bias is not None else [])
    node = ir.Node(DOMAIN, "SparseLinear", inputs, name=f"{tl.matmul.name}_sparse", num_outputs=1)
    if not tl.prefill:
        _swap(model, tl, [node])
        return
    one_row = _Builder(node.name)
    node.outputs[0].name = f"{node.name}_y"
    one_row.nodes.append(node)
    _swap(model, tl, _one_row_or_rows(tl, one_row, node.outputs[0]))


class _Builder:
    """Standard-op nodes named ``{prefix}_{i}`` (their outputs too), collected in ``nodes``."""

    def __init__(self, prefix: str):
        self.prefix, self.nodes = prefix, []

    def __call__(self, op_type: str, *inputs, **attributes):
        import onnx_ir as ir

        name = f"{self.prefix}_{op_type}_{len(self.nodes)}"
        node = ir.Node("", op_type, inputs, ir.convenience.convert_attributes(attributes), num_outputs=1, name=name)
        node.outputs[0].name = name
        self.nodes.append(node)
        return node.outputs[0]

    def const(self, values):
        import onnx_ir as ir

        return self("Constant", value=ir.tensor(np.asarray(values, np.int64)))


def _replace_gather(model, tl: ThresholdedLinear) -> None:
    """``If(Size(x) == K, then: gather of the active rows, else: the dense MatMul)`` in place of the linear."""
    n = tl.shape[1]
    prefix = f"{tl.matmul.name}_gather"
    one_row = _Builder(prefix)  # one token: y = x[i] @ Wt[i] with i = NonZero(|x| > t)
    active = one_row("Reshape", one_row("NonZero", one_row("Reshape", tl.keep, one_row.const([-1]))),
                     one_row.const([-1]))
    y = one_row("MatMul", one_row("Gather", one_row("Reshape", tl.x, one_row.const([-1])), active, axis=0),
                one_row("Gather", tl.wt, active, axis=0))
    if tl.bias is not None:
        y = one_row("Add", y, tl.bias)
    y = one_row("Reshape", y, one_row("Concat", one_row("Shape", tl.x, end=-1), one_row.const([n]), axis=0))
    _swap(model, tl, _one_row_or_rows(tl, one_row, y))


def _one_row_or_rows(tl: ThresholdedLinear, one_row: _Builder, y) -> list:
    """The nodes of ``If(Size(x) == K, then: one_row's nodes giving y, else: the original MatMul [+ Add])``."""
    import onnx_ir as ir

    prefix = one_row.prefix
    rows = _Builder(f"{prefix}_rows")  # several tokens: the original formulation
    y_rows = rows("MatMul", tl.matmul.inputs[0], tl.wt)
    if tl.bias is not None:
        y_rows = rows("Add", y_rows, tl.bias)
    outer = _Builder(prefix + "_if")
    cond = outer("Equal", outer("Size", tl.x), outer.const(tl.shape[0]))
    branches = {"then_branch": ir.Graph([], [y], nodes=one_row.nodes, name=f"{prefix}_one_row"),
                "else_branch": ir.Graph([], [y_rows], nodes=rows.nodes, name=f"{prefix}_rows")}
    node = ir.Node("", "If", [cond], [ir.AttrGraph(key, g) for key, g in branches.items()], num_outputs=1,
                   name=f"{prefix}_If")
    return [*outer.nodes, node]


def _swap(model, tl: Linear, nodes: list) -> None:
    """Put ``nodes`` (the last one's output replaces the linear's) before the MatMul; remove the MatMul (and Add)."""
    import onnx_ir as ir

    last = tl.add or tl.matmul
    old, new = last.outputs[0], nodes[-1].outputs[0]
    new.dtype, new.shape = old.dtype, old.shape
    for key in ("pkg.torch.onnx.name_scopes", "pkg.torch.onnx.class_hierarchy"):
        if key in tl.matmul.metadata_props:
            nodes[-1].metadata_props[key] = tl.matmul.metadata_props[key]
    model.graph.insert_before(tl.matmul, nodes)
    graph_outputs = model.graph.outputs
    if any(v is old for v in graph_outputs):
        graph_outputs[[i for i, v in enumerate(graph_outputs) if v is old][0]] = new
    ir.convenience.replace_all_uses_with(old, new)
    name = old.name
    for dead in ([tl.add] if tl.add is not None else []) + [tl.matmul]:
        model.graph.remove(dead, safe=True)
    new.name = name


def summary(info: dict) -> str:
    """One line on what :func:`apply_sparse_kernels` did, e.g. '12 of 14 thresholded linears use SparseLinear, 0 the
    standard-op gather (mode auto)', how many of those read a quantized weight and how many take MatMulNBits."""
    layers = info.get("layers", [])
    sparse, gather = (sum(1 for e in layers if e["kernel"] == kind) for kind in ("sparse", "gather"))
    line = (f"{sparse} of {len(layers)} thresholded linears use SparseLinear, {gather} the standard-op gather"
            f" (mode {info['mode']})")
    quantized = sum(1 for e in layers if e["kernel"] in ("sparse", "gather") and e.get("weight") == "quantized")
    if quantized:
        line += f"; {quantized} of them read a dequantized weight (float32 in the session, packed in the file)"
    nbits = sum(1 for e in layers if e["kernel"] == "matmulnbits")
    if nbits:
        line += (f"; {nbits} take com.microsoft.MatMulNBits on the packed weight instead (dense; export with"
                 " --quantized-matmul standard for the sparse kernels)")
    return line + (f"; {info['note']}" if info.get("note") else "")
