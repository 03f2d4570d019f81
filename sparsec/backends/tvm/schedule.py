"""The CPU pipeline of sparsec's TVM builds: TVM's, plus schedules for the ops sparsec does not lower itself.

sparsec lowers linears and attention to its own kernels (:mod:`.kernels`, :mod:`.attention`). TVM's CPU pipeline
(``relax.backend.cpu_generic``) legalizes the rest (norms, activations, rotary embeddings, residual adds,
transposes) to unscheduled loop nests: one thread, scalar, and ``exp`` a call to libm's scalar ``expf`` that LLVM
cannot vectorize. In a TinyLlama prefill of 128 tokens those ops took 4 % of the time, sigmoid alone 2 %. Here:

* **elementwise functions** (every block injective): producers inlined; the loops above the innermost one fused and
  split over the thread pool, the innermost vectorized. A function writing fewer than :data:`PARALLEL_MIN` elements
  (a decode step's 2048) runs its serial copy instead: waking the thread pool costs more than it saves there.
* **reductions with elementwise epilogues** (RMSNorm, softmax): TVM's dlight CPU ``Reduction`` rule, behind the same
  size test.
* **sigmoid, exp, tanh, SiLU and tanh-GELU** on float32 are legalized with :func:`exp_f32` (Cody-Waite range
  reduction and Cephes' ``expf`` polynomial: select, floor, multiply-add, all of which vectorize), tanh with Cephes'
  ``tanhf``. Their error against float64 is stated and tested in ``tests/backends/tvm/test_schedule.py``.
"""
from __future__ import annotations

import math

#: output elements from which an elementwise or reduction function splits its rows over the thread pool
PARALLEL_MIN = 16384

_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4  # Cody-Waite: ln 2 = hi + lo, hi exact in a few bits
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
_TANH_POLY = (-5.70498872745e-3, 2.06390887954e-2, -5.37397155531e-2, 1.33314422036e-1, -3.33332819422e-1)
_EXP_LO, _EXP_HI = -87.33654022216797, 88.72283935546875  # ln of float32's least normal and greatest values


def _horner(coefficients, z):
    acc = _f32(coefficients[0])
    for c in coefficients[1:]:
        acc = acc * z + _f32(c)
    return acc


def _f32(value: float):
    from tvm import tirx

    return tirx.const(value, "float32")


def exp_f32(x):
    """``e**x`` for a float32 PrimExpr: ``x = n ln2 + r`` (|r| <= ln2 / 2), Cephes' degree-5 polynomial for ``e**r``,
    and ``2**n`` built in the exponent bits. 0 below ln(FLT_MIN) (where the true value is subnormal), inf above
    ln(FLT_MAX), NaN for NaN."""
    from tvm import tirx

    # the repeated subexpressions are shared by TIR's and LLVM's common subexpression elimination
    xc = tirx.max(tirx.min(x, _f32(_EXP_HI)), _f32(_EXP_LO))
    n = tirx.floor(xc * _f32(1 / math.log(2)) + _f32(0.5))
    r = xc - n * _f32(_LN2_HI) - n * _f32(_LN2_LO)
    y = _horner(_EXP_POLY, r) * r * r + r + _f32(1)
    # 2**n in the exponent bits, as 2**(n-1) * 2 when n > 0: n spans [-126, 128], one past each end of the exponent
    above = n > _f32(0)
    bits = tirx.Cast("int32", n) + tirx.Select(above, tirx.const(126, "int32"), tirx.const(127, "int32"))
    scaled = y * tirx.reinterpret("float32", tirx.shift_left(bits, 23))
    out = tirx.Select(x < _f32(_EXP_LO), _f32(0), tirx.Select(above, scaled * _f32(2), scaled))
    return tirx.Select(tirx.isnan(x), x, tirx.Select(x > _f32(_EXP_HI), _f32(math.inf), out))


def sigmoid_f32(x):
    """``1 / (1 + e**-x)`` for a float32 PrimExpr."""
    return _f32(1) / (_f32(1) + exp_f32(-x))


def tanh_f32(x):
    """``tanh(x)`` for a float32 PrimExpr: Cephes' odd polynomial below |x| = 0.625, ``1 - 2 / (e**2|x| + 1)`` with
    the sign of x above."""
    from tvm import tirx

    ax, z = tirx.abs(x), x * x
    small = _horner(_TANH_POLY, z) * z * x + x
    large = _f32(1) - _f32(2) / (exp_f32(ax + ax) + _f32(1))
    return tirx.Select(ax < _f32(0.625), small, tirx.Select(x < _f32(0), _f32(-1), _f32(1)) * large)


def _elementwise_legalizer(name: str, fn):
    """A Relax legalization of a unary op: ``fn`` elementwise on float32 inputs, TVM's own on any other dtype."""
    from tvm import te
    from tvm.ir import Op

    default = Op.get(name).get_attr("FLegalize")

    def legalize(bb, call):
        x = call.args[0]
        if str(x.ty.dtype) != "float32":
            return default(bb, call)
        return bb.call_te(lambda t: te.compute(t.shape, lambda *i: fn(t(*i)), name=name.split(".")[-1]), x,
                          primfunc_name_hint=name.split(".")[-1])

    return legalize


def _legalize_map() -> dict:
    c = _f32
    return {
        "relax.exp": _elementwise_legalizer("relax.exp", exp_f32),
        "relax.sigmoid": _elementwise_legalizer("relax.sigmoid", sigmoid_f32),
        "relax.tanh": _elementwise_legalizer("relax.tanh", tanh_f32),
        "relax.nn.silu": _elementwise_legalizer("relax.nn.silu", lambda v: v * sigmoid_f32(v)),
        "relax.nn.gelu_tanh": _elementwise_legalizer(
            "relax.nn.gelu_tanh",
            lambda v: c(0.5) * v * (c(1) + tanh_f32(c(math.sqrt(2 / math.pi)) * v * (c(1) + c(0.044715) * v * v)))),
    }


def _output(func):
    """The buffer the last block of ``func`` writes (None when ``func`` has no blocks to schedule)."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    sch = s_tir.Schedule(func)
    blocks = normalize_prim_func(sch)
    if not blocks:
        return None
    writes = sch.get(blocks[-1].block_rv).writes
    return writes[0].source if writes else None


def _by_size(elements, parallel, serial):
    """``parallel``'s root block running ``parallel``'s body when ``elements >= PARALLEL_MIN``, else ``serial``'s."""
    from tvm import s_tir, tirx

    if isinstance(elements, (int, tirx.IntImm)):
        return parallel if int(elements) >= PARALLEL_MIN else serial
    proot, sroot = parallel.body.block, serial.body.block
    allocs = list(proot.alloc_buffers) + [b for b in sroot.alloc_buffers
                                          if not any(b.same_as(a) for a in proot.alloc_buffers)]
    root = s_tir.SBlock([], [], [], proot.name_hint, tirx.IfThenElse(elements >= PARALLEL_MIN, proot.body, sroot.body),
                        alloc_buffers=allocs)
    return parallel.with_body(s_tir.SBlockRealize([], True, root))


def _injective_schedule(func, lanes: int, parallel: bool):
    """``func`` with producers inlined, the innermost loop vectorized and (``parallel``) the loops above it fused and
    split over the thread pool; None when a block is not injective."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import get_extent
    from tvm.s_tir.dlight.base.common_schedules import try_inline

    sch = s_tir.Schedule(func)
    blocks = normalize_prim_func(sch)
    if not blocks or not all(b.is_injective() for b in blocks):
        return None
    for block in try_inline(sch, blocks):
        loops = sch.get_loops(block.block_rv)
        if not loops:
            continue
        extent = get_extent(sch, loops[-1])
        if isinstance(extent, int) and extent % lanes == 0 and extent > lanes:
            sch.vectorize(sch.split(loops[-1], factors=[None, lanes])[1])
        elif isinstance(extent, int) and extent == lanes:
            sch.vectorize(loops[-1])
        if parallel and len(loops) > 1:
            sch.parallel(sch.fuse(*loops[:-1]))
    return sch.mod["main"]


def _reduction_schedule(func, target):
    """``func`` scheduled by dlight's CPU Reduction rule (rows over the thread pool), or None when it does not apply."""
    from tvm.s_tir.dlight.cpu import Reduction

    sch = Reduction().apply(func, target, False)
    return None if sch is None else sch.mod["main"]


def schedule_func(func, target):
    """``func`` (an unscheduled PrimFunc) scheduled as the module docstring says, or None to leave it as it is."""
    from tvm.target.codegen import llvm_get_vector_width

    out = _output(func)
    if out is None:
        return None
    lanes = max(2, (llvm_get_vector_width(target) or 128) // out.dtype.bits)
    serial = _injective_schedule(func, lanes, parallel=False)
    if serial is not None:
        parallel = _injective_schedule(func, lanes, parallel=True)
    else:
        parallel, serial = _reduction_schedule(func, target), func
    if parallel is None:
        return None
    return _by_size(math.prod(out.shape), parallel, serial).with_attr("tirx.is_scheduled", True)


def _schedule_pass():
    """A module pass scheduling every unscheduled PrimFunc that :func:`schedule_func` knows how to."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="sparsec.ScheduleCPU")
    def run(mod, _ctx):
        target = tvm.target.Target.current(allow_none=False)
        updated = {}
        for gv, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc) and not func.attrs.get("tirx.is_scheduled", False):
                scheduled = schedule_func(func, target)
                if scheduled is not None:
                    updated[gv] = scheduled
        for gv, func in updated.items():
            mod[gv] = func
        return mod

    return run


def cpu_pipeline(target):
    """The Relax pipeline for ``target`` (an LLVM target): ``tvm.compile``'s default one for CPUs (no operator
    fusion: TVM's FuseTIR fails on these modules), with sparsec's legalizations of the transcendental ops and
    :func:`schedule_func` applied to every legalized function."""
    import tvm
    from tvm.relax import backend, transform as rt

    @tvm.transform.module_pass(opt_level=0, name="sparsec.CPUPipeline")
    def run(mod, _ctx):
        with target:
            return tvm.transform.Sequential([
                backend.DispatchSampling(), backend.DispatchSortScan(), rt.LegalizeOps(_legalize_map()),
                rt.RewriteDataflowReshape(), _schedule_pass(), rt.ToNonDataflow(), rt.RemovePurityChecking(),
                rt.CallTIRRewrite(), rt.StaticPlanBlockMemory(), rt.LowerAllocTensor(), rt.KillAfterLastUse(),
                rt.LowerRuntimeBuiltin(), rt.ComputePrimValue(), rt.VMShapeLower(), rt.AttachGlobalSymbol()])(mod)

    return run
