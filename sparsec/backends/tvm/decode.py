"""The ``decode`` function of a cached build: ``main`` with the KV cache updated in place.

``main`` (the cached program as captured) returns fresh present tensors every step: ``cat(past, new)`` copies the
whole cache, and each step's outputs are new allocations one token longer than the last, whose first touch costs a
page fault per 4 KiB (measured: a 1 MiB append took 0.06 ms into an existing buffer, 0.43 ms into a fresh one).
``decode`` takes the cache as buffers of a fixed capacity ``C`` and the number of cached positions ``P``:

    decode(input_ids[B, S], logits_to_keep[K], cache_keys_0[B, Hk, C, Dk], ..., cache_values_0[B, Hv, C, Dv], ...,
           past_length: Shape([P, ...]), *weights) -> (logits[B, K, V],)

Each ``sparsec_cache_append`` of ``main`` becomes an in-place write of the new positions ``P .. P+S-1``
(:func:`~sparsec.backends.tvm.attention.cache_write_kernel`) and each attention over a present tensor the capacity
variant of its kernel, reading the first ``P + S`` positions; everything else (masks, positions) is ``main``'s own
code, with the cache length taken from ``past_length`` (one value per symbol of the past lengths: one, as the
lowering names them all alike; a module lowered otherwise may have several). The
caller owns the buffers and grows them (:class:`sparsec.backends.tvm.generate.TvmStepper`). :func:`add_decode`
leaves the module unchanged when ``main`` uses a past or present tensor in any other way.
"""
from __future__ import annotations

import json

from sparsec.kv_cache import PAST

DECODE = "decode"


def add_decode(mod) -> tuple:
    """``(mod, lengths)``: ``mod`` with the ``decode`` function added beside the lifted ``main`` (its user inputs
    first, ``num_input`` of them, then the weights) and the number of values its ``past_length`` shape takes; ``(mod,
    None)`` unchanged when ``main`` is not a cached program whose cache appends and attention sparsec lowered."""
    import tvm
    from tvm import relax, tirx

    from sparsec.backends.tvm.attention import ATTENTION_ATTR, attention_kernel, cache_write_kernel

    main = relax.utils.copy_with_new_vars(mod["main"])  # a Relax variable is bound in one function only
    n_in = int(main.attrs["num_input"])
    params = list(main.params)
    past = [p for p in params[:n_in] if PAST.match(p.name)]
    if not past or any(not isinstance(p.ty.shape[2], tirx.Var) for p in past):
        return mod, None
    bindings = [b for block in main.body.blocks for b in block.bindings]
    names = {gv: str(gv.name_hint) for gv in mod.functions}

    def tir_call(value):  # the callee's name of a call_tir, else None
        if isinstance(value, relax.Call) and value.op.same_as(tvm.ir.Op.get("relax.call_tir")):
            return names.get(value.args[0])
        return None

    appends, attention = {}, {}
    for b in bindings:
        name = tir_call(b.value) or ""
        args = list(b.value.args[1].fields) if name else []
        if name.startswith("sparsec_cache_append") and args[0] in past:
            appends[b.var] = args[0]
        elif name.startswith("sparsec_attention") and (args[1] in appends or args[2] in appends):
            if not (args[1] in appends and args[2] in appends):
                return mod, None
            attention[b.var] = name
    if sorted(p.name for p in appends.values()) != sorted(p.name for p in past):
        return mod, None
    result = main.body.body
    out = next((b for b in bindings if b.var.same_as(result)), None)
    if out is None or not isinstance(out.value, relax.Tuple):
        return mod, None
    for b in bindings:  # a past or present tensor read anywhere else: no decode function
        if b.var in appends or b.var in attention or b.var.same_as(out.var):
            continue
        used = relax.analysis.free_vars(b.value)
        if any(v in appends or v in past for v in used):
            return mod, None

    lengths = list(dict.fromkeys(p.ty.shape[2] for p in past))  # the past-length symbols, in input order
    capacity = tirx.Var("capacity", "int64")
    caches = {p: relax.Var(p.name.replace("past_", "cache_"), relax.TensorType(
        [p.ty.shape[0], p.ty.shape[1], capacity, p.ty.shape[3]], str(p.ty.dtype))) for p in past}
    length_param = relax.Var("past_length", relax.ShapeType(lengths))
    new_params = [caches.get(p, p) for p in params]
    new_params.insert(n_in, length_param)

    kernels = {}

    def kernel(key, make):
        if key not in kernels:
            kernels[key] = make()
        return kernels[key]

    @relax.expr_functor.mutator
    class Decode(relax.PyExprMutator):
        def visit_var_binding_(self, binding):
            value, var = binding.value, binding.var
            if var in appends:
                src = appends[var]
                cache = caches[src]
                heads, dim, dtype = int(src.ty.shape[1]), int(src.ty.shape[3]), str(src.ty.dtype)
                gv = kernel(f"sparsec_cache_write_{heads}_{dim}_{dtype}",
                            lambda: self.builder_.add_func(cache_write_kernel(heads, dim, dtype),
                                                           f"sparsec_cache_write_{heads}_{dim}_{dtype}"))
                new = self.visit_expr(value.args[1].fields[1])
                call = relax.call_tir_inplace(gv, [cache, new, relax.prim_value(src.ty.shape[2])], 0, cache.ty)
            elif var in attention:
                name = attention[var]
                q, k, v, m = value.args[1].fields
                options = json.loads(str(mod[name].attrs[ATTENTION_ATTR]))
                gv = kernel(name, lambda: self.builder_.add_func(attention_kernel(**options, capacity=True),
                                                                 name + "_capacity"))
                total = k.ty.shape[2]  # P + S: the present's length in main
                call = relax.call_tir(gv, [self.visit_expr(q), self.get_var_remap(k), self.get_var_remap(v),
                                           self.visit_expr(m), relax.prim_value(total)], value.ty_args[0])
            elif var.same_as(out.var):  # main's (logits, presents...): decode returns (logits,)
                call = relax.Tuple([self.visit_expr(value.fields[0])])
            else:
                return super().visit_var_binding_(binding)
            emit = self.builder_.emit if isinstance(var, relax.DataflowVar) else self.builder_.emit_output
            self.set_var_remap(var, emit(call, var.name))

    rewriter = Decode(mod)
    for p in past:
        rewriter.set_var_remap(p, caches[p])
    decode = relax.Function(new_params, rewriter.visit_expr(main.body), None, main.is_pure, main.attrs)
    mod = rewriter.builder_.get()
    mod[DECODE] = decode.with_attr("num_input", n_in + 1).with_attr("global_symbol", DECODE)
    return relax.transform.DeadCodeElimination([DECODE, "main"])(mod), len(lengths)
