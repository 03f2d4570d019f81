"""Lower a sparsec program (``torch.export``) to a Relax module whose linear layers call sparsec's TIR kernels.

``aten.linear`` is kept through decomposition and converted by :func:`_convert_linear`: its weight (and bias) are
evaluated at build time (parameters, or constant expressions of them such as a pruning mask product), packed into
column tiles (:func:`sparsec.backends.tvm.kernels.pack_weight`) and baked in as constants, so nothing is transposed
at run time. The kernel is chosen from the op that produces the linear's input:

* ``sparsec::threshold(x, t)``: the sparse kernel with the threshold fused (the thresholded tensor is never made);
* ``sparsec::threshold_prefill(x, t, mode)`` (teal's prefill=half/dense): computed on its own (the token rule reads
  the symbolic length), then the sparse kernel skipping its zeros, so a one-token step still takes the sparse GEMV;
* an op whose output is mostly zeros (relu, relufy's fatrelu ``where(x >= t, x, 0)``, relu², a mask product):
  the sparse kernel, skipping zero inputs;
* anything else: the dense kernel of the same family.

Linear layers that read one input the same way (q/k/v, gate/up: :func:`sibling_linears`) are one kernel call over
their weights concatenated, each taking its slice of the output: one compaction of the kept inputs and rows two to
three times longer instead of two or three short calls (Zen 4, int8, s = 0.5, caches flushed: Gemma 3 270M's q/k/v
67 -> 43 µs, gate/up 88 -> 71 µs; TinyLlama's 160 -> 110 µs and 358 -> 314 µs).

``aten.scaled_dot_product_attention`` (kept through decomposition on the CPU) calls the scheduled attention kernel
of :mod:`sparsec.backends.tvm.attention` on the un-repeated key/value heads. Every other op goes through TVM's own
``from_exported_program`` converters.
"""
from __future__ import annotations

import numpy as np

from sparsec.errors import SparsecError, UsageError

#: ATen ops whose output is zero wherever the input is at most a threshold (relufy's outputs).
_ZERO_MAKERS = {"aten.relu.default", "aten.where.ScalarOther", "aten.where.self", "sparsec.threshold_prefill.default"}
#: Ops that keep their first input's zeros (relu², a mask product).
_ZERO_KEEPERS = {"aten.pow.Tensor_Scalar", "aten.mul.Tensor"}


_VIEWS = {"aten.view.default", "aten.reshape.default", "aten._unsafe_view.default"}


def input_kind(node) -> str:
    """'threshold', 'sparse' or 'dense': what produces the linear input ``node``.

    'threshold': ``node`` is a ``sparsec::threshold`` (fused into the kernel); 'sparse': its value is mostly zeros
    (a relufy activation, or a threshold seen through a reshape); 'dense': anything else.
    """
    from sparsec.ops import THRESHOLD

    if getattr(node, "op", None) != "call_function":
        return "dense"
    if node.target is THRESHOLD:
        return "threshold"
    name = str(node.target)
    if name in _ZERO_MAKERS:
        return "sparse"
    if (name in _ZERO_KEEPERS or name in _VIEWS) and input_kind(node.args[0]) != "dense":
        return "sparse"
    return "dense"


#: The linear layers the kernels replace: ``linear(x, W[N, K], b)``, ``addmm(b, x, W[K, N])`` (GPT-2's Conv1D) and
#: ``mm`` / ``matmul(x, W[K, N])`` by a constant matrix (rotate's ``x @ Q``); a product of two run-time tensors
#: (attention's) is not one.
LINEAR_OPS = {"aten.linear.default", "aten.addmm.default", "aten.mm.default", "aten.matmul.default"}


def linear_operands(node, consts):
    """``(x node, W [N, K] or None, bias node or None)`` of a linear layer (one of :data:`LINEAR_OPS`); W is its
    build-time value (``consts``: :class:`Constants`), None when it depends on the model inputs."""
    if str(node.target) == "aten.addmm.default":
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            from sparsec.graph import module_path

            raise SparsecError(f"addmm in '{module_path(node)}' has alpha/beta other than 1, which sparsec's TVM"
                               " kernels do not compute: use the ONNX backend (sparsec export OUT/ --to onnx)")
        b_node, x_node, w_node = node.args[:3]
        w = consts.get(w_node)
        return x_node, w.T if w is not None else None, b_node
    if str(node.target) in ("aten.mm.default", "aten.matmul.default"):
        w = consts.get(node.args[1])
        return node.args[0], w.T if w is not None and w.dim() == 2 else None, None
    w = consts.get(node.args[1])
    return node.args[0], w, node.args[2] if len(node.args) > 2 else None


_TRANSPOSES = {"aten.t.default", "aten.permute.default", "aten.transpose.int"}
_LINEARS = {"aten.linear.default", "aten.addmm.default", "aten.mm.default"}


def dequantized_weight(node):
    """The ``sparsec::dequantize`` node (the ``quantize`` pass) that computes the weight of linear layer ``node``:
    ``linear(x, dequantize(q, s))``, or through a transpose ``addmm(b, x, t(dequantize(q, s)))`` /
    ``mm(x, t(dequantize(q, s)))`` (GPT-2's Conv1D); None when the weight is anything else or ``q`` / ``s`` (/ the
    offset) are not tensors of the model (parameters, buffers or constants)."""
    from sparsec.graph import dequantize_tensors, is_dequantize

    name = str(node.target)
    w = node.args[2] if name == "aten.addmm.default" else node.args[1]
    if name != "aten.linear.default":
        if getattr(w, "op", None) != "call_function" or str(w.target) not in _TRANSPOSES:
            return None
        w = w.args[0]
    if not is_dequantize(w) or any(getattr(a, "op", None) != "placeholder" for a in dequantize_tensors(w)
                                     if a is not None):
        return None
    return w


def _decompose(program, keep_sdpa: bool = False):
    """``program`` in core ATen with ``aten.linear`` (and with ``keep_sdpa``, ``aten.scaled_dot_product_attention``)
    kept. Views become reshapes first: torch cannot decompose some views of dynamic-shape transposes (GPT-2's
    attention output), and a reshape is a view wherever one is possible."""
    import copy
    import warnings

    import torch

    with warnings.catch_warnings():  # torch's own pytree pickling: "isinstance(treespec, LeafSpec) is deprecated"
        warnings.simplefilter("ignore", FutureWarning)
        shared = [*program.state_dict.values(), *program.constants.values()]  # the graph is copied, not the weights
        program = copy.deepcopy(program, memo={id(t): t for t in shared})
        for node in program.graph.nodes:
            if node.op == "call_function" and node.target is torch.ops.aten.view.default:
                node.target = torch.ops.aten.reshape.default
        program.graph_module.recompile()
        table = torch.export.default_decompositions()
        del table[torch.ops.aten.linear.default]
        if keep_sdpa:
            table.pop(torch.ops.aten.scaled_dot_product_attention.default, None)
        program = program.run_decompositions(table)
    _one_cache_length(program)
    return program


def _one_cache_length(program) -> None:
    """Give the past tensors of a cached program one length symbol. Their export shares one Dim, but torch gives each
    input its own symbol (equal by its input checks), so TVM sees unrelated lengths: the decomposed attention of a
    CUDA build adds scores ``[.., P_keys + S]`` to a mask ``[.., P_values + S]`` and its shape is lost."""
    import sympy

    from sparsec.kv_cache import PAST

    lengths = [n.meta["val"].shape[2].node for n in program.graph.nodes if n.op == "placeholder" and PAST.match(n.name)]
    for length in lengths[1:]:
        if isinstance(length.expr, sympy.Symbol) and length.expr != lengths[0].expr:
            length.shape_env._set_replacement(length.expr, lengths[0].expr, "sparsec: one cache length")


_COPIES = {*_VIEWS, "aten.clone.default"}


def repeated_kv(node) -> tuple:
    """``(source node, G)`` when ``node`` is grouped-query attention's key/value head repeat, ``reshape(expand(
    unsqueeze(x, 2), [B, Hk, G, T, D]), [B, Hk * G, T, D])`` (Hugging Face's ``repeat_kv``), else ``(node, 1)``."""
    inner = node
    while getattr(inner, "op", None) == "call_function" and str(inner.target) in _COPIES:
        inner = inner.args[0]
    if (getattr(inner, "op", None) == "call_function" and str(inner.target) == "aten.expand.default"
            and str(getattr(inner.args[0], "target", "")) == "aten.unsqueeze.default"
            and inner.args[0].args[1] == 2 and len(inner.args[1]) == 5 and isinstance(inner.args[1][2], int)
            and inner is not node):
        return inner.args[0].args[0], inner.args[1][2]
    return node, 1


class Constants:
    """Build-time values of graph nodes that depend only on parameters, buffers and constants."""

    def __init__(self, program):
        sig = program.graph_signature
        self.sources = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
                        **getattr(sig, "inputs_to_lifted_tensor_constants", {})}
        self.values = {**program.state_dict, **program.constants}
        self.memo = {}

    def get(self, node):
        """The tensor value of ``node``, or None when it depends on a user input."""
        import torch
        import torch.fx as fx

        if not isinstance(node, fx.Node):
            return node
        if node in self.memo:
            return self.memo[node]
        value = None
        if node.op == "placeholder" and node.name in self.sources:
            value = self.values.get(self.sources[node.name])
        elif node.op == "call_function":
            args = [self.get(a) if isinstance(a, fx.Node) else a for a in node.args]
            if all(a is not None for a, raw in zip(args, node.args) if isinstance(raw, fx.Node)):
                with torch.no_grad():
                    value = node.target(*args, **node.kwargs)
        self.memo[node] = value
        return value


def _gather_packed(ids, wq, s, *, rows: int, bits: int, group: int, dtype: str, offsets: bool):
    """TE: the dequantized rows ``ids`` (wrapped into ``[0, rows)``, as the build's other lookups) of a quantized
    table read from its linear kernel's packed layout (:func:`~sparsec.backends.tvm.quantized.pack_quantized`:
    row ``r`` of the table is column ``r % CT`` of tile ``r // CT``; with ``offsets`` a group's scale and offset in
    rows ``2g``, ``2g + 1`` of ``s``)."""
    from tvm import te, tirx

    k, ct = int(wq.shape[1]), int(s.shape[2])
    size = group or k

    def value(*i):
        *lead, c = i
        r = tirx.floormod(ids[tuple(lead)].astype("int64"), rows)
        t, p = r // ct, r % ct
        if bits == 8:
            v = wq[t, c, p].astype("float32")
        else:  # each 32-column block in 16 bytes: column i in byte i's low nibble, column 16 + i in its high one
            shift = (p // 16 % 2 * 4).astype("uint8")
            v = (tirx.shift_right(wq[t, c, p // 32 * 16 + p % 16], shift) & tirx.const(15, "uint8")).astype(
                "float32") - tirx.const(8.0, "float32")
        if offsets:
            return (v * s[t, c // size * 2, p].astype("float32") + s[t, c // size * 2 + 1, p].astype(
                "float32")).astype(dtype)
        return (v * s[t, c // size, p].astype("float32")).astype(dtype)

    return te.compute([*ids.shape, k], value, name="dequantize_rows")


def quantized_operands(node, consts):
    """``(x node, bias tensor or None, dequantize node)`` of a linear layer with quantized weights
    (:func:`dequantized_weight`)."""
    if str(node.target) == "aten.addmm.default":
        b_node, x_node = node.args[:2]
    else:
        x_node, b_node = node.args[0], node.args[2] if len(node.args) > 2 else None
    return x_node, consts.get(b_node) if b_node is not None else None, dequantized_weight(node)


def sibling_linears(program, consts, sparse: bool) -> dict:
    """Linear layers that read the same input the same way, to be computed by one kernel over their weights
    concatenated: ``{node name: [nodes]}`` for groups of two or more (q/k/v, gate/up). The same way: the same input
    node (a relufy activation, or a dense tensor), or thresholds of the same tensor at the same value (teal's uniform
    allocation observes a shared input once); constant weights of one format (float dtype, or the quantize pass's
    bits, group, scale dtype and offsets) not shared with another op (a tied embedding's table)."""
    from sparsec.graph import dequantize_tensors

    groups: dict = {}
    for node in program.graph.nodes:
        if str(node.target) not in _LINEARS:
            continue
        x_node, _, dq = quantized_operands(node, consts)
        if dq is not None:
            q, scale = consts.get(dq.args[0]), consts.get(dq.args[1])
            offset = dequantize_tensors(dq)[2]
            if any(len(t.users) > 1 for t in dequantize_tensors(dq) if t is not None) or len(dq.users) > 1:
                continue  # a tied table: its packed copy is shared with the embedding
            weight_format = ("int", int(dq.args[2]), int(dq.args[3]), str(scale.dtype), offset is not None,
                             int(q.shape[1]))
        else:
            x_node, w, _ = linear_operands(node, consts)
            if w is None or w.dim() != 2:
                continue
            weight_format = ("float", str(w.dtype), int(w.shape[1]))
        kind = input_kind(x_node) if sparse else "dense"
        source = (x_node.args[0], float(consts.get(x_node.args[1]))) if kind == "threshold" else (x_node, None)
        groups.setdefault((source, kind, weight_format), []).append(node)
    return {node.name: members for members in groups.values() if len(members) > 1 for node in members}


def to_relax(program, *, sparse: bool = True, target: str = "llvm", schedule=None):
    """The Relax IRModule of ``program`` (an ExportedProgram) with sparsec's kernels in its linear layers.

    ``sparse=False`` uses the dense kernel for every linear layer (the "sparsec TVM dense" baseline).
    ``target='cuda'``: the GPU kernels (:mod:`sparsec.backends.tvm.cuda`, float and quantized), which skip zero inputs
    in every layer.
    ``schedule``: a :class:`sparsec.backends.tvm.tuning.Scheduler` giving the CPU kernels' schedule arguments
    (``schedule(k, n, dtype, kind)``; a quantized kernel's: ``schedule.quantized(...)``); default: the kernels' own
    defaults.
    """
    import operator
    from functools import partial

    import torch
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from sparsec.backends.tvm.cuda import (cuda_linear_kernel, cuda_quantized_kernel, pack_quantized_cuda,
                                           pack_weight_cuda)
    from sparsec.backends.tvm.kernels import kernel_name, linear_kernel, pack_weight
    from sparsec.backends.tvm.quantized import pack_quantized, quantized_kernel_name, quantized_linear_kernel
    from sparsec.graph import dequantize_tensors, module_path

    program = _decompose(program, keep_sdpa=target == "llvm")
    consts = Constants(program)
    funcs = {}
    packs = {}  # (q, s, offset) placeholders -> the packed constants, shared by a tied LM head and its embedding
    linear_weights = {dequantize_tensors(dq) for node in program.graph.nodes if str(node.target) in _LINEARS
                      for dq in [dequantized_weight(node)] if dq is not None} if target == "llvm" else set()

    siblings = sibling_linears(program, consts, sparse) if target == "llvm" else {}
    fused = {}  # sibling node name -> its slice of the fused call's output

    def packed(tensors, bits, group):
        """The kernels' packed ``(Wq, S)`` constants of quantized weight ``tensors`` (q, scale, offset nodes), made
        once."""
        if tensors not in packs:
            q, s, o = (None if t is None else consts.get(t) for t in tensors)
            if target == "cuda":
                made = pack_quantized_cuda(q, s, bits, group, offset=o)
            else:
                made = pack_quantized(q, s, bits, offset=o)
            packs[tensors] = [relax.const(t.numpy()) for t in made]
        return packs[tensors]

    def linear_call(importer, x_node, bias, n, k, kind, name, make_kernel, weights):
        """Emit ``call_tir(kernel, [x as [M, K], *weights, thr, bias]) -> [M, N]``, reshaped to x's leading dims;
        ``make_kernel(dtype)`` builds the kernel ``name`` once; ``weights(dtype)``: its packed weight constants;
        ``bias``: a tensor, or None."""
        x = importer.env[x_node.args[0] if kind == "threshold" else x_node]
        thr = float(consts.get(x_node.args[1])) if kind == "threshold" else 0.0
        dtype = str(x.ty.dtype)
        b = bias if bias is not None else torch.zeros(n)
        bb = importer.block_builder
        if name(dtype) not in funcs:
            funcs[name(dtype)] = bb.add_func(make_kernel(dtype), name(dtype))
        lead = list(x.ty.shape)[:-1]
        m = 1
        for d in lead:
            m = m * d
        x2 = bb.emit(relax.op.reshape(x, [m, k]))
        args = [x2, *weights(dtype), relax.const(_np(torch.tensor([thr]), dtype), dtype),
                relax.const(_np(b, dtype), dtype)]
        y = bb.emit(relax.call_tir(funcs[name(dtype)], args, out_ty=relax.TensorType([m, n], dtype)))
        return bb.emit(relax.op.reshape(y, [*lead, n]))

    def convert_quantized_linear(node, importer, dq):  # the packed integers and scales go into the kernel
        x_node, bias, _ = quantized_operands(node, consts)
        tensors = dequantize_tensors(dq)
        bits, group = int(dq.args[2]), int(dq.args[3])
        return quantized_linear(importer, x_node, bias, consts.get(dq.args[0]), consts.get(dq.args[1]),
                                tensors[2] is not None, bits, group, packed(tensors, bits, group))

    def quantized_linear(importer, x_node, bias, q, scale, offsets, bits, group, weights):
        """The kernel call of quantized weights ``q`` [N, K * bits / 8], ``scale``, packed as ``weights``."""
        n, k = int(q.shape[0]), int(q.shape[1]) * (8 // bits)
        kind = input_kind(x_node) if sparse else "dense"
        scales = str(scale.dtype).removeprefix("torch.")

        def make_kernel(dtype):
            if target == "cuda":
                return cuda_quantized_kernel(k, n, bits, group, dtype, threshold=kind == "threshold",
                                             scale_dtype=scales, offsets=offsets)
            args = schedule.quantized(k, n, bits, group, scales, offsets, dtype, kind) if schedule is not None else {}
            return quantized_linear_kernel(k, n, bits, group, dtype, sparse=kind != "dense",
                                           threshold=kind == "threshold", scale_dtype=scales, offsets=offsets, **args)

        return linear_call(importer, x_node, bias, n, k, kind,
                           lambda dtype: quantized_kernel_name(kind, k, n, bits, group, dtype, scales, offsets),
                           make_kernel, lambda dtype: weights)

    def convert_siblings(members, importer):
        """One kernel call for the linear layers ``members`` (:func:`sibling_linears`) over their weights and biases
        concatenated; each member's output is its slice of the columns."""
        quantized = dequantized_weight(members[0]) is not None
        if quantized:
            operands = [quantized_operands(m, consts) for m in members]
            tensors = [dequantize_tensors(dq) for _, _, dq in operands]
            q, scale, offset = (None if tensors[0][i] is None else torch.cat([consts.get(t[i]) for t in tensors])
                                for i in range(3))
            sizes = [int(consts.get(t[0]).shape[0]) for t in tensors]
            biases = [b for _, b, _ in operands]
        else:
            operands = [linear_operands(m, consts) for m in members]
            sizes = [int(w.shape[0]) for _, w, _ in operands]
            biases = [consts.get(b) if b is not None else None for _, _, b in operands]
        bias = None if all(b is None for b in biases) else torch.cat(
            [b if b is not None else torch.zeros(size) for b, size in zip(biases, sizes)])
        if quantized:
            bits, group = int(operands[0][2].args[2]), int(operands[0][2].args[3])
            weights = [relax.const(t.numpy()) for t in pack_quantized(q, scale, bits, offset=offset)]
            y = quantized_linear(importer, operands[0][0], bias, q, scale, offset is not None, bits, group, weights)
        else:
            y = float_linear(importer, operands[0][0], torch.cat([w for _, w, _ in operands]), bias)
        axis, start = len(y.ty.shape) - 1, 0
        for member, size in zip(members, sizes):
            fused[member.name] = importer.block_builder.emit(relax.op.strided_slice(y, [axis], [start],
                                                                                    [start + size]))
            start += size

    def convert_linear(node, importer):
        if node.name in siblings:
            if node.name not in fused:
                convert_siblings(siblings[node.name], importer)
            return fused[node.name]
        dq = dequantized_weight(node)
        if dq is not None:
            return convert_quantized_linear(node, importer, dq)
        x_node, w, b_node = linear_operands(node, consts)
        if w is None and str(node.target) == "aten.mm.default":  # a product of two run-time tensors
            return importer._binary_op(partial(relax.op.linear_algebra.matmul, out_dtype="float32"), operator.matmul)(
                node)
        if w is None:
            raise SparsecError(f"linear layer '{module_path(node)}' has a weight computed from the model inputs;"
                               " the TVM backend needs constant weights: use the ONNX backend (sparsec export --to"
                               " onnx)")
        return float_linear(importer, x_node, w, consts.get(b_node) if b_node is not None else None)

    def float_linear(importer, x_node, w, bias):
        """The kernel call of the float weight ``w`` [N, K] (a tensor) and ``bias`` (a tensor or None)."""
        n, k = (int(d) for d in w.shape)
        kind = input_kind(x_node) if sparse else "dense"

        def make_kernel(dtype):
            if target == "cuda":
                return cuda_linear_kernel(k, n, dtype, threshold=kind == "threshold")
            args = schedule(k, n, dtype, kind) if schedule is not None else {}
            return linear_kernel(k, n, dtype, sparse=kind != "dense", threshold=kind == "threshold", **args)

        def weights(dtype):
            if target == "cuda":
                packed = pack_weight_cuda(w, dtype)
            else:
                packed = pack_weight(w, dtype, tiles=(schedule(k, n, dtype, kind) if schedule else {}).get("tiles"))
            return [relax.const(_np(packed, dtype), dtype)]

        return linear_call(importer, x_node, bias, n, k, kind, lambda dtype: kernel_name(kind, k, n, dtype),
                           make_kernel, weights)

    def convert_dequantize(node, importer):  # a dequantized tensor used otherwise (an embedding's gathered rows)
        from tvm import te, tirx

        bits, group, dtype = int(node.args[2]), int(node.args[3]), str(node.args[4]).removeprefix("torch.")
        gathered = [t for t in dequantize_tensors(node) if t is not None]  # q's, scale's (, offset's) rows
        tied = all(str(getattr(a, "target", "")) == "aten.embedding.default" and a.args[1] is gathered[0].args[1]
                   for a in gathered)
        tables = (*(a.args[0] for a in gathered), None)[:3] if tied else None
        if tied and tables in linear_weights:  # gather from the LM head's packed weights: one copy of the table
            return importer.block_builder.emit_te(_gather_packed, importer.env[gathered[0].args[1]],
                                                  *packed(tables, bits, group), bits=bits, group=group, dtype=dtype,
                                                  rows=int(consts.get(tables[0]).shape[0]),
                                                  offsets=tables[2] is not None)

        def compute(q, s, o=None):
            k = q.shape[-1] * (8 // bits)
            size = group or k

            def value(*i):
                *lead, c = i
                if bits == 8:
                    v = q[(*lead, c)].astype("float32")
                else:
                    shift = (c % 2 * 4).astype("uint8")
                    v = (tirx.shift_right(q[(*lead, c // 2)], shift) & tirx.const(15, "uint8")).astype(
                        "float32") - tirx.const(8.0, "float32")
                v = v * s[(*lead, c // size)].astype("float32")
                return (v if o is None else v + o[(*lead, c // size)].astype("float32")).astype(dtype)

            return te.compute([*q.shape[:-1], k], value, name="dequantize")

        return importer.block_builder.emit_te(compute, *(importer.env[t] for t in gathered))

    def convert_threshold(node, importer):  # a threshold whose output also feeds non-linear ops
        x = importer.env[node.args[0]]
        t = relax.const(float(consts.get(node.args[1])), str(x.ty.dtype))
        return importer.block_builder.emit(
            relax.op.where(relax.op.greater(relax.op.abs(x), t), x, relax.const(0, str(x.ty.dtype))))

    def convert_threshold_prefill(node, importer):  # the threshold on the token positions its mode selects
        from tvm import te, tirx

        from sparsec.ops import dense_tokens

        x = importer.env[node.args[0]]
        dtype = str(x.ty.dtype)
        t, mode = tirx.const(float(consts.get(node.args[1])), dtype), node.args[2]

        def compute(v):
            n = dense_tokens(v.shape[-2], mode, tirx.min)
            return te.compute(v.shape, lambda *i: tirx.Select(tirx.any(tirx.abs(v[i]) > t, i[-2] < n), v[i],
                                                              tirx.const(0, dtype)), name="threshold_prefill")

        return importer.block_builder.emit_te(compute, x)

    def convert_slice(node, importer):  # slice(x, dim, start, end[, step]), a symbolic end torch proved in bounds
        dim, start, end = (list(node.args[1:4]) + [None] * 3)[:3]
        step = node.args[4] if len(node.args) > 4 else 1
        if (not isinstance(end, torch.fx.Node) or not isinstance(start, int) or not isinstance(step, int)
                or str(node.meta["val"].shape[dim]) != str(end.meta["val"] - start)):
            return importer._slice(node)
        # e.g. BERT's position_ids[:, :seq] of a [1, 512] buffer: TVM's shape is min(seq, 512) and later reshapes
        # fail on it; torch's shape says the slice is seq - start long (seq <= 512 is one of the export's guards)
        return importer.block_builder.emit(relax.op.strided_slice(
            importer.env[node.args[0]], [dim], [start], [importer.env[end]], [step], assume_inbound=True))

    def convert_cat(node, importer):
        # torch skips legacy empty 1-D inputs (a fresh DynamicCache's), TVM rejects them
        tensors = [t for t in node.args[0] if not (t.meta["val"].dim() == 1 and t.meta["val"].shape[0] == 0)]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if len(tensors) == 1:
            return importer.env[tensors[0]]
        xs, bb = [importer.env[t] for t in tensors], importer.block_builder
        rank = len(xs[0].ty.shape)
        dim = dim % rank if rank else dim
        if (target == "llvm" and len(xs) == 2 and rank == 4 and dim == 2 and str(xs[0].ty.dtype) == str(xs[1].ty.dtype)
                and all(isinstance(x.ty.shape[d], tvm.tirx.IntImm) for x in xs for d in (1, 3))
                and any(not isinstance(x.ty.shape[2], tvm.tirx.IntImm) for x in xs)):
            return cache_append(bb, xs)  # the KV cache's cat(past, new, dim=2) [B, H, T, D]: a scheduled copy
        return bb.emit(relax.op.concat(xs, axis=dim))

    def cache_append(bb, xs):
        from sparsec.backends.tvm.attention import cache_append_kernel

        dtype = str(xs[0].ty.dtype)
        (batch, heads, past, dim), new = xs[0].ty.shape, xs[1].ty.shape[2]
        key = f"sparsec_cache_append_{int(heads)}_{int(dim)}_{dtype}"
        if key not in funcs:
            funcs[key] = bb.add_func(cache_append_kernel(int(heads), int(dim), dtype), key)
        return bb.emit(relax.call_tir(funcs[key], xs, out_ty=relax.TensorType([batch, heads, past + new, dim], dtype)))

    def convert_sdpa(node, importer):  # sparsec's scheduled attention kernel (sparsec.backends.tvm.attention)
        from sparsec.backends.tvm.attention import attention_kernel

        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        args = dict(zip(names, node.args), **node.kwargs)
        (k_node, group), (v_node, group_v) = repeated_kv(args["key"]), repeated_kv(args["value"])
        if group != group_v:
            (k_node, group), (v_node, group_v) = (args["key"], 1), (args["value"], 1)
        q, k, v = (importer.env[n] for n in (args["query"], k_node, v_node))
        if (len(q.ty.shape) != 4 or args.get("dropout_p", 0.0) != 0.0
                or not all(isinstance(d, tvm.tirx.IntImm) for x in (q, k, v) for d in (x.ty.shape[1], x.ty.shape[3]))):
            return importer._scaled_dot_product_attention(node)
        heads, dim = int(q.ty.shape[1]), int(q.ty.shape[3])
        kv_heads, value_dim = int(k.ty.shape[1]), int(v.ty.shape[3])
        dtype, bb = str(q.ty.dtype), importer.block_builder
        batch, seq, length = q.ty.shape[0], q.ty.shape[2], k.ty.shape[2]
        mask, mask_heads, kind = args.get("attn_mask"), 1, None
        if mask is None:
            m = relax.const(np.zeros(1, bool), "bool")
        else:
            m = importer.env[mask]
            kind = "bool" if str(m.ty.dtype) == "bool" else "float"
            shape = [1] * (4 - len(m.ty.shape)) + list(m.ty.shape)
            if isinstance(shape[1], tvm.tirx.IntImm) and int(shape[1]) == heads > 1:
                mask_heads = heads
            if kind == "float" and str(m.ty.dtype) != dtype:
                m = bb.emit(relax.op.astype(m, dtype))
            m = bb.emit(relax.op.broadcast_to(relax.op.reshape(m, shape), [batch, mask_heads, seq, length]))
        scale = args.get("scale")
        key = (f"sparsec_attention_{heads}_{kv_heads}_{dim}_{value_dim}_{dtype}_{kind}{mask_heads}"
               f"_{'causal' if args.get('is_causal') else 'full'}_{scale}")
        if key not in funcs:
            funcs[key] = bb.add_func(attention_kernel(heads, kv_heads, dim, value_dim, dtype, scale=scale, mask=kind,
                                                      mask_heads=mask_heads, causal=bool(args.get("is_causal"))),
                                     key.replace(".", "p").replace("-", "m"))
        return bb.emit(relax.call_tir(funcs[key], [q, k, v, m],
                                      out_ty=relax.TensorType([batch, heads, seq, value_dim], dtype)))

    try:
        mod = from_exported_program(program, run_ep_decomposition=False, custom_convert_map={
            "linear.default": convert_linear, "addmm.default": convert_linear, "mm.default": convert_linear,
            "threshold.default": convert_threshold, "dequantize.default": convert_dequantize,
            "threshold_prefill.default": convert_threshold_prefill, "slice.Tensor": convert_slice,
            "cat.default": convert_cat, "scaled_dot_product_attention.default": convert_sdpa})
    except SparsecError:
        raise
    except Exception as exc:
        raise _unsupported(program, exc) from None
    # memory is planned for the shapes of each call: with the export's upper bounds (batch 1024, a cached program's
    # context) TVM would plan every buffer at its largest size, e.g. a [B, H, S, T] attention mask of terabytes
    mod["main"] = mod["main"].without_attr("tir_var_upper_bound")
    return relax.transform.DeadCodeElimination()(_wrapped_takes(mod))


def _wrapped_takes(mod):
    """``mod`` with every Relax ``take`` (embedding lookups, index ops) in TVM's ``wrap`` mode: the importer's default
    ``fast`` mode reads outside the table for an index out of range (a token id >= the vocabulary size crashed the
    process) and for a negative one, which torch allows in index ops. Wrapped, a negative index counts from the end
    as in torch, and one past the end reads row ``index mod size`` instead of crashing (torch raises an
    IndexError). Costs a modulo per index."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class Wrap(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.take" and call.attrs.mode == "fast":
                axis = call.attrs.axis
                return self.builder_.normalize(relax.op.take(call.args[0], call.args[1],
                                                             None if axis is None else int(axis), "wrap"))
            return call

    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            mod[gv] = Wrap().visit_expr(func)
    return mod


def _np(t, dtype: str) -> np.ndarray:
    """``t`` in ``dtype`` as a numpy array; bfloat16 as its uint16 bit pattern (numpy has no bfloat16)."""
    import torch

    t = t.detach().to(getattr(torch, dtype)).contiguous()
    return t.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else t.numpy()


def _unsupported(program, exc: Exception) -> SparsecError:
    """A one-line error for an op the importer cannot convert, naming the op and the module it is in."""
    import re

    from sparsec.errors import first_line
    from sparsec.graph import module_path

    text = first_line(exc)
    names = re.findall(r"'([\w.]+)'", text) if "Unsupported" in text else []
    for node in program.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "__name__", None) in names:
            where = module_path(node) or "the model's own forward"
            return UsageError(f"the TVM backend cannot compile op '{node.target}' (in {where}); TVM's importer does"
                              " not support it: use the ONNX backend (sparsec export OUT/ --to onnx) or remove the op")
    return SparsecError(f"the TVM importer failed: {type(exc).__name__}: {text}; try the ONNX backend (sparsec"
                        " export OUT/ --to onnx)")
