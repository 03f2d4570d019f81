"""The activation-sparse linear kernels for NVIDIA GPUs (TVM CUDA codegen), and what a CUDA build and run need.

Layout: ``Wt [Kp, Np]`` (``W.T`` padded with zero rows/columns to the tiling, packed once at build time). Grid
``(Np / (TX*V), KS)``: block ``(bx, ks)`` owns ``TX*V`` output columns and ``Kp / KS`` input rows (KS, the split-K
factor: :func:`default_splits` unless given; rows padded to whole blocks); each thread keeps ``V`` fp32 accumulators
and reads one 16-byte vector of a weight row per active input, so a zero input's row is never fetched (the test is
uniform across the block: no divergence). A thread takes its rows ``unroll`` at a time: it reads their inputs, then
issues the loads of the kept rows (zeros for the others), then accumulates, so up to ``unroll`` loads are in flight
(``unroll`` = 1: one row at a time, the measured default; benchmarks/results/cuda-kernels.md). The split-K partials go
to a ``[KS, Np]`` scratch buffer that a second kernel sums (no atomics) and adds the bias. Rows of ``x`` (tokens) are
processed one after another. With ``gpu=False`` the same index arithmetic runs as serial loops on the CPU, which is
how the numerics are checked on machines without a GPU.

Quantized weights (the ``quantize`` pass's int8 / int4, per channel or groups of ``G`` inputs) keep the same grid with
``QTX`` = 32 threads of ``QV`` = 8 columns a block: ``Wq [Kp, Np]`` int8, or for int4 ``[Kp, Np / 2]`` uint8 (columns
``2c`` and ``2c + 1`` in the low and high nibble of byte ``c``, stored + 8), so a thread reads 8 (int8) or 4 (int4)
bytes of a kept row (staged ``unroll`` rows at a time, as above) and dequantizes them in registers; scales
``S [Kp / G, Np]`` (``[1, Np]`` per channel), or with offsets (``quantize{symmetric=false}``:
``w = q * scale + offset``) ``S [2 Kp / G, Np]`` (``[2, Np]``), group ``g``'s scales in row ``2g`` and its offsets in
row ``2g + 1``. A block's ``Kp / KS`` rows are whole groups: each group's rows are summed in registers and scaled
once, only when the group kept an input (a group of zero inputs reads neither its weights nor its scales); with
offsets that adds ``S[2g, c] Σ q x' + S[2g + 1, c] Σ x'``, the sums over the group's kept inputs. Per channel the
scale multiplies the summed partials once, in the second kernel; with offsets each block scales its own rows as one
group instead (``S[0, c] Σ q x' + S[1, c] Σ x'``).
"""
from __future__ import annotations

import ctypes.util
import math
import shutil

from sparsec.errors import SparsecError

TX = 64  # threads per block along N
QV = 8  # output columns per thread of the quantized kernel
QTX = 32  # its threads per block along N: 256 columns a block (a wider block pads N = 640 to 1024)


def lanes(dtype: str) -> int:
    """Elements per 16-byte load."""
    return 4 if dtype == "float32" else 8


def default_splits(k: int, n: int, columns: int) -> int:
    """Blocks along K (split-K) for a layer of K inputs and N outputs whose blocks own ``columns`` outputs each: of
    64, 128 and 256, the nearest to about 3072 blocks in all, at most one per 16 inputs (but >= 64). On an H200
    (benchmarks/results/cuda-kernels.md) this was 2.4 % slower than the best of the three on average over 30 layers
    and formats, 13 % at worst."""
    want = 3072 / math.ceil(n / columns)
    splits = min((64, 128, 256), key=lambda s: abs(math.log(s / want)))
    return min(splits, max(64, 2 ** int(math.log2(max(1, k // 16)))))


def split_rows(k: int, splits: int, unit: int) -> tuple[int, int]:
    """(blocks along K, rows per block): about ``splits`` blocks whose rows are a multiple of ``unit``, covering K
    with less than one block of padding."""
    rows = math.ceil(math.ceil(k / splits) / unit) * unit
    return math.ceil(k / rows), rows


def padded(k: int, n: int, dtype: str, splits: int | None = None, unroll: int = 1) -> tuple[int, int, int]:
    """(KS, Kp, Np) of the float kernel: about ``splits`` blocks along K (default :func:`default_splits`) of rows a
    multiple of ``unroll`` (:func:`split_rows`), N rounded up to a multiple of TX * lanes."""
    step = TX * lanes(dtype)
    blocks, rows = split_rows(k, splits or default_splits(k, n, step), unroll)
    return blocks, blocks * rows, math.ceil(n / step) * step


def pack_weight_cuda(w, dtype: str | None = None, splits: int | None = None, unroll: int = 1):
    """``W [N, K]`` (torch) -> ``Wt [Kp, Np]`` in ``dtype`` (default: w's), zero-padded for the kernel with
    ``splits`` and ``unroll``."""
    import torch

    dtype = dtype or str(w.dtype).removeprefix("torch.")
    n, k = w.shape
    _, kp, np_ = padded(k, n, dtype, splits, unroll)
    wt = torch.zeros(kp, np_, dtype=getattr(torch, dtype))
    wt[:k, :n] = w.detach().T
    return wt


def _sum_splits(n: int, np_: int, splits: int, dtype: str, bind, scale):
    """The second kernel, a macro ``(part, s, b, y, row)``: ``y[row, c] = scale(s, c) * Σ_ks part[ks, c] + b[c]``."""
    from tvm.script import tirx as T

    f32 = "float32"

    @T.macro
    def sum_splits(part, s, b, y, row):
        for b2 in bind(np_ // 256, thread="blockIdx.x"):
            for t2 in bind(256, thread="threadIdx.x"):
                total = T.decl_buffer((1,), f32, scope="local")
                total[0] = T.float32(0)
                for ks in range(splits):
                    total[0] = total[0] + part[ks, b2 * 256 + t2]
                if b2 * 256 + t2 < n:
                    y[row, b2 * 256 + t2] = T.cast(scale(s, b2 * 256 + t2) * total[0]
                                                   + T.cast(b[T.min(b2 * 256 + t2, n - 1)], f32), dtype)

    return sum_splits


def cuda_linear_kernel(k: int, n: int, dtype: str = "float32", *, threshold: bool = False, gpu: bool = True,
                       splits: int | None = None, unroll: int = 1):
    """A PrimFunc ``(x [M, K], Wt [Kp, Np], thr [1], bias [N], y [M, N])``: ``y = x' @ W.T + bias`` with
    ``x' = x * (|x| > thr)`` when ``threshold`` else ``x``, skipping the weight rows of zero ``x'`` entries;
    about ``splits`` blocks along K, each thread's loop over its rows unrolled ``unroll`` times (``Wt`` from
    :func:`pack_weight_cuda` with the same ``splits`` and ``unroll``)."""
    from tvm.script import tirx as T

    v = lanes(dtype)
    splits, kp, np_ = padded(k, n, dtype, splits, unroll)
    nbx, kb = np_ // (TX * v), kp // splits
    f32 = "float32"
    zero = T.cast(0, dtype)
    bind = T.thread_binding if gpu else (lambda extent, thread=None: T.serial(extent))

    def active(xi, t):
        return T.abs(xi) > t if threshold else xi != zero

    sum_splits = _sum_splits(n, np_, splits, dtype, bind, lambda s, c: T.float32(1))

    @T.prim_func(private=True)
    def f(x_h: T.handle, wt: T.Buffer((kp, np_), dtype), thr: T.Buffer((1,), dtype), b: T.Buffer((n,), dtype),
          y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), dtype)
        y = T.match_buffer(y_h, (m, n), dtype)
        part = T.alloc_buffer((splits, np_), f32)
        for row in range(m):
            for bx in bind(nbx, thread="blockIdx.x"):
                for ks in bind(splits, thread="blockIdx.y"):
                    for tx in bind(TX, thread="threadIdx.x"):
                        acc = T.decl_buffer((v,), f32, scope="local")
                        xa = T.decl_buffer((unroll,), f32, scope="local")  # x' of the next `unroll` rows
                        wv = T.decl_buffer((unroll * v,), dtype, scope="local")  # their weights (0: skipped)
                        for j in T.unroll(v):
                            acc[j] = T.float32(0)
                        for io in range(kb // unroll):
                            i0 = ks * kb + io * unroll
                            for iu in T.unroll(unroll):
                                xi = T.if_then_else(i0 + iu < k, x[row, T.min(i0 + iu, k - 1)], zero)
                                xa[iu] = T.if_then_else(active(xi, thr[0]), T.cast(xi, f32), T.float32(0))
                            for iu in T.unroll(unroll):  # every kept row's load in flight before the first use
                                if xa[iu] != T.float32(0):
                                    for j in T.vectorized(v):
                                        wv[iu * v + j] = wt[i0 + iu, (bx * TX + tx) * v + j]
                                else:
                                    for j in T.vectorized(v):
                                        wv[iu * v + j] = zero
                            for iu in T.unroll(unroll):
                                for j in T.unroll(v):
                                    acc[j] = acc[j] + T.cast(wv[iu * v + j], f32) * xa[iu]
                        for j in T.unroll(v):
                            part[ks, (bx * TX + tx) * v + j] = acc[j]
            sum_splits(part, b, b, y, row)

    return f.with_attr("tirx.is_scheduled", True) if gpu else f


def quantized_split(k: int, n: int, group: int, splits: int | None = None, unroll: int = 1) -> tuple[int, int]:
    """(blocks along K, rows per block) of the quantized kernel, about ``splits`` blocks (default
    :func:`default_splits`; :func:`split_rows`): a block's rows are whole groups of ``group`` (per channel: a multiple
    of ``unroll``)."""
    return split_rows(k, splits or default_splits(k, n, QTX * QV), group or unroll)


def pack_quantized_cuda(q, scale, bits: int, group: int, offset=None, splits: int | None = None, unroll: int = 1):
    """``(Wq, S)`` (module docstring) from the quantize pass's ``q`` (int8 ``[N, K]``, or for 4 bits uint8
    ``[N, K / 2]``), ``scale [N, G]`` and ``offset [N, G]`` (or None: then ``S`` holds no offset rows), zero-padded to
    the grid of the kernel with ``splits`` and ``unroll``."""
    import torch

    from sparsec.ops import unpack_int4

    values = q if bits == 8 else unpack_int4(q)
    n, k = values.shape
    splits, rows = quantized_split(k, n, group, splits, unroll)
    kp, np_ = splits * rows, math.ceil(n / (QTX * QV)) * QTX * QV
    w = torch.zeros(kp, np_, dtype=torch.int8)
    w[:k, :n] = values.T
    if bits == 4:
        u = (w.to(torch.int16) + 8).to(torch.uint8).reshape(kp, np_ // 2, 2)
        w = u[..., 0] | (u[..., 1] << 4)
    ng = kp // group if group else 1
    if offset is None:
        s = torch.zeros(ng, np_, dtype=scale.dtype)
        s[:scale.shape[1], :n] = scale.T
    else:  # group g's scales in row 2g, its offsets in row 2g + 1
        s = torch.zeros(ng, 2, np_, dtype=scale.dtype)
        s[:scale.shape[1], 0, :n] = scale.T
        s[:offset.shape[1], 1, :n] = offset.T
        s = s.reshape(2 * ng, np_)
    return w.contiguous(), s


def cuda_quantized_kernel(k: int, n: int, bits: int, group: int, dtype: str = "float32", *, threshold: bool = False,
                          scale_dtype: str = "float32", offsets: bool = False, gpu: bool = True,
                          splits: int | None = None, unroll: int = 1):
    """A PrimFunc ``(x [M, K], Wq, S, thr [1], bias [N], y [M, N])`` (``Wq``, ``S`` from :func:`pack_quantized_cuda`):
    ``y = x' @ dequantize(q, S).T + bias`` with ``x' = x * (|x| > thr)`` when ``threshold`` else ``x``, skipping the
    weight rows of zero ``x'`` entries (and the scales of groups without a kept one); fp32 accumulation. ``offsets``:
    the weights have offsets (``S`` holds scale and offset rows: :func:`pack_quantized_cuda` with ``offset``);
    about ``splits`` blocks along K, each thread's loop over a group's rows unrolled ``unroll`` times (a divisor of
    the group; pack with the same ``splits`` and ``unroll``)."""
    from tvm.script import tirx as T

    splits, rows = quantized_split(k, n, group, splits, unroll)
    kp, np_ = splits * rows, math.ceil(n / (QTX * QV)) * QTX * QV
    gs = group or rows  # rows summed before a scale (per channel: a block's rows)
    if gs % unroll:
        raise ValueError(f"unroll {unroll} does not divide the group of {gs} rows")
    grouped = group > 0
    ng = kp // group if group else 1
    so = 2 if offsets else 1  # rows of S per group
    early = grouped or offsets  # the first kernel scales (else per channel: the second one, the summed partials)
    wtype, wcols = ("int8", np_) if bits == 8 else ("uint8", np_ // 2)
    nbx = np_ // (QTX * QV)
    f32 = "float32"
    zero = T.cast(0, dtype)
    bind = T.thread_binding if gpu else (lambda extent, thread=None: T.serial(extent))

    def active(xi, t):
        return T.abs(xi) > t if threshold else xi != zero

    wb = QV * bits // 8  # bytes of a thread's columns in one row, loaded 4 at a time

    def value(wv, iu, j):  # the integer weight of staged row iu, column j, as fp32
        if bits == 8:
            return T.cast(wv[iu * wb + j], f32)
        return T.cast(T.shift_right(wv[iu * wb + j // 2], T.cast(j % 2 * 4, "uint8")) & T.uint8(15),
                      f32) - T.float32(8)

    sum_splits = _sum_splits(n, np_, splits, dtype, bind,  # per channel: the scale multiplies the summed partials
                             (lambda s, c: T.float32(1)) if early else (lambda s, c: T.cast(s[0, c], f32)))

    def scale(s, ks, gi, c, r=0):  # block ks's group gi's scale (r = 0) or offset (r = 1) of column c, as fp32
        return T.cast(s[((ks * rows) // gs + gi if grouped else 0) * so + r, c], f32)

    @T.prim_func(private=True)
    def f(x_h: T.handle, wq: T.Buffer((kp, wcols), wtype), s: T.Buffer((ng * so, np_), scale_dtype),
          thr: T.Buffer((1,), dtype), b: T.Buffer((n,), dtype), y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), dtype)
        y = T.match_buffer(y_h, (m, n), dtype)
        part = T.alloc_buffer((splits, np_), f32)
        for row in range(m):
            for bx in bind(nbx, thread="blockIdx.x"):
                for ks in bind(splits, thread="blockIdx.y"):
                    for tx in bind(QTX, thread="threadIdx.x"):
                        acc = T.decl_buffer((QV,), f32, scope="local")
                        u = T.decl_buffer((QV,), f32, scope="local")
                        hit = T.decl_buffer((1,), "int32", scope="local")
                        xa = T.decl_buffer((unroll,), f32, scope="local")  # x' of the next `unroll` rows
                        wv = T.decl_buffer((unroll * wb,), wtype, scope="local")  # their weight bytes
                        if offsets:
                            xs = T.decl_buffer((1,), f32, scope="local")  # Σ x' over the group's kept inputs
                        for j in T.unroll(QV):
                            acc[j] = T.float32(0)
                        for gi in range(rows // gs):
                            hit[0] = 0
                            if offsets:
                                xs[0] = T.float32(0)
                            for j in T.unroll(QV):
                                u[j] = T.float32(0)
                            for io in range(gs // unroll):
                                i0 = ks * rows + gi * gs + io * unroll
                                for iu in T.unroll(unroll):
                                    xi = T.if_then_else(i0 + iu < k, x[row, T.min(i0 + iu, k - 1)], zero)
                                    xa[iu] = T.if_then_else(active(xi, thr[0]), T.cast(xi, f32), T.float32(0))
                                for iu in T.unroll(unroll):  # every kept row's load in flight before the first use
                                    if xa[iu] != T.float32(0):
                                        hit[0] = 1
                                        for jo in T.unroll(wb // 4):
                                            for ji in T.vectorized(4):
                                                wv[iu * wb + jo * 4 + ji] = wq[i0 + iu, (bx * QTX + tx) * wb + jo * 4
                                                                               + ji]
                                    else:
                                        for jo in T.unroll(wb // 4):
                                            for ji in T.vectorized(4):
                                                wv[iu * wb + jo * 4 + ji] = T.cast(0, wtype)
                                for iu in T.unroll(unroll):
                                    if offsets:
                                        xs[0] = xs[0] + xa[iu]
                                    for j in T.unroll(QV):
                                        u[j] = u[j] + value(wv, iu, j) * xa[iu]
                            if hit[0] == 1:
                                if offsets:  # S[g] Σ q x' + O[g] Σ x' (per channel: group 0, in every block)
                                    for j in T.unroll(QV):
                                        acc[j] = acc[j] + u[j] * scale(s, ks, gi, (bx * QTX + tx) * QV + j) + scale(
                                            s, ks, gi, (bx * QTX + tx) * QV + j, 1) * xs[0]
                                else:
                                    for j in T.unroll(QV):
                                        acc[j] = acc[j] + u[j] * (scale(s, ks, gi, (bx * QTX + tx) * QV + j)
                                                                  if grouped else T.float32(1))
                        for j in T.unroll(QV):
                            part[ks, (bx * QTX + tx) * QV + j] = acc[j]
            sum_splits(part, s, b, y, row)

    return f.with_attr("tirx.is_scheduled", True) if gpu else f


def cuda_target(arch: str = "sm_90"):
    """The TVM CUDA target for ``arch`` (given explicitly: without it TVM guesses sm_50, which nvcc 13 rejects)."""
    from sparsec.backends.tvm.env import import_tvm

    return import_tvm().target.Target({"kind": "cuda", "arch": arch})


def cuda_pipeline(target):
    """The Relax pipeline for a CUDA ``target``: ``tvm.compile``'s default one for CUDA without operator fusion (TVM's
    FuseTIR fails on a cached program's module, as on the CPU: :func:`sparsec.backends.tvm.schedule.cpu_pipeline`);
    dlight schedules every legalized operator."""
    import tvm
    from tvm.relax import backend, transform as rt
    from tvm.s_tir import dlight as dl

    @tvm.transform.module_pass(opt_level=0, name="sparsec.CUDAPipeline")
    def run(mod, _ctx):
        with target:
            return tvm.transform.Sequential([
                backend.DispatchSampling(), backend.DispatchSortScan(), rt.LegalizeOps(), rt.AnnotateTIROpPattern(),
                rt.FoldConstant(), dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                                           dl.gpu.GeneralReduction(), dl.gpu.Fallback()),
                rt.RewriteDataflowReshape(), rt.ToNonDataflow(), rt.RemovePurityChecking(), rt.CallTIRRewrite(),
                rt.StaticPlanBlockMemory(), rt.RewriteCUDAGraph(), rt.LowerAllocTensor(), rt.KillAfterLastUse(),
                rt.LowerRuntimeBuiltin(), rt.ComputePrimValue(), rt.VMShapeLower(), rt.AttachGlobalSymbol()])(mod)

    return run


def require_nvcc() -> str:
    """The path of nvcc; building for CUDA compiles the generated source with it, to catch errors at build time."""
    path = shutil.which("nvcc")
    if path is None:
        raise SparsecError("--target cuda needs the CUDA compiler nvcc, which is not on PATH: install the CUDA"
                           " toolkit (or add its bin/ directory to PATH), or use --target llvm")
    return path


def require_gpu() -> None:
    """Running a CUDA build needs the NVIDIA driver library and a visible GPU; say which one is missing."""
    if ctypes.util.find_library("cuda") is None:
        raise SparsecError("running a CUDA build needs the NVIDIA driver (libcuda.so.1 was not found): run it on a"
                           " machine with an NVIDIA GPU and driver, or compile with --target llvm for this CPU")
    from sparsec.backends.tvm.env import import_tvm

    if not import_tvm().cuda(0).exist:
        raise SparsecError("running a CUDA build needs an NVIDIA GPU, and the driver sees none (tvm.cuda(0) does"
                           " not exist): check nvidia-smi and CUDA_VISIBLE_DEVICES, or compile with --target llvm")


def cuda_sources(module) -> list[str]:
    """The CUDA C sources inside a compiled module (they nest: VM executable -> host -> cuda)."""
    from tvm.runtime.executable import Executable

    module = module.mod if isinstance(module, Executable) else module
    found = [module.inspect_source("cuda")] if module.kind == "cuda" else []
    for sub in module.imports:
        found += cuda_sources(sub)
    return found


def nvcc_compile(source: str, arch: str = "sm_90") -> bytes:
    """Compile CUDA ``source`` with nvcc to a cubin for ``arch`` (no GPU needed)."""
    from tvm.support import nvcc

    require_nvcc()
    with cuda_target(arch):  # compile_cuda reads Target.current() even with arch given
        return bytes(nvcc.compile_cuda(source, target_format="cubin", arch=arch, compiler="nvcc"))
