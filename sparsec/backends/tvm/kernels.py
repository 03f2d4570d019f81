"""sparsec's TIR kernels for ``y = x @ W.T`` on the CPU: activation-sparse and dense, one family.

Weights are packed once, at build time, by :func:`pack_weight` into column tiles: ``W [N, K]`` becomes
``Wp [NT, K, CT]`` (``CT`` a multiple of 16, zero columns pad the last tile), so tile ``j`` of row ``k`` is
``W[j*CT:(j+1)*CT, k]``, one contiguous ``CT``-element segment. There is one tile per thread (more when a tile
would exceed ``MAX_TILE`` columns): each task walks forward through one contiguous block of memory (``K * CT``
elements) and keeps its ``CT`` fp32 accumulators in L1. Wide tiles matter for sparsity: a skipped input row is a
gap of a whole ``CT``-element segment, so the hardware prefetcher streams the kept segments instead of fetching
half of the skipped ones (128-column tiles, with accumulators in registers, ran 1.3-1.5x slower at 50 % sparsity,
see benchmarks/results/kernels.md).

* **sparse** (:func:`linear_kernel` with ``sparse=True``): a serial compaction pass collects the indices and values of
  the inputs that survive (``x != 0``, or ``|x| > thr`` when the kernel fuses a threshold), padded to a multiple of
  ``R`` with index 0 and value 0; then every tile accumulates ``R`` surviving rows per pass over its accumulators
  (more rows per pass: fewer accumulator loads and stores, and more weight rows streaming at once).
  Zero inputs cost nothing but the compaction test: their weight segments are never read.
* **dense** (``sparse=False``): the same loop nest over every row (with the threshold applied, when fused).
* **1 < batch < GEMM_ROWS** (a few tokens): rows ``MB`` at a time with the *union* of their active inputs; every row
  of the block accumulates over that union (a row's inactive inputs contribute exact zeros), ``R`` union rows per
  pass over the ``MB`` rows' accumulators (each weight vector loaded once for ``MB * R`` FMAs). With independent masks
  the union fills quickly (at 50 % sparsity, 4 rows touch 94 % of the weights), so for ``M > 1`` this is the dense
  kernel's cost at worst, never more.
* **batch >= GEMM_ROWS** (a prefill): dense, as TEAL prefills: ``x'`` (thresholded, fp32) is made once, then each
  task copies a group of adjacent ``NR``-column panels of its tile contiguous (:func:`panel_group`; the packed
  layout strides 4 KiB and more between rows, which thrashes cache sets) and runs an ``MR x NR`` register-blocked
  micro-kernel over every ``MR`` rows, the last ``M % MR`` rows one at a time with ``SPLIT`` partial sums (no padded
  rows computed). On Zen 1 (AVX2, 2 x 128-bit FMA, 2 cores), 128 rows, against one panel per task and rows padded
  to ``MR`` (interleaved in one process): 0.88x / 0.94x / 0.91x the time for 2048 x 5632 / 5632 x 2048 /
  2048 x 2048 (78 GFLOP/s for 2048 x 5632), 0.98x for 2048 x 256; 0.99x at 512 rows.

Storage dtype: float32, float16 or bfloat16 (x, W, y all the same); accumulation is always float32.
"""
from __future__ import annotations

import math

import numpy as np

DTYPES = ("float32", "float16", "bfloat16")
VL = 16  # fp32 lanes per vector (AVX-512)
MAX_TILE = 8192  # output columns per tile at most: 32 KiB of fp32 accumulators
MB = 4  # rows of x per block when 1 < M < GEMM_ROWS
R = 8  # surviving input rows per accumulator pass (Zen 4, TinyLlama's layers at s = 0.5: 6-13 % faster than 4)
GEMM_ROWS = 16  # from this many rows of x on, the blocked GEMM (prefill)
MR = 6  # rows of x per GEMM micro-kernel (MR x NR fp32 accumulators)
SPLIT = 4  # the GEMM's last M % MR rows: partial sums over k per row (independent FMA chains)


def gemm_columns(ct: int) -> int:
    """NR, the output columns of the GEMM micro-kernel: two vectors of the host CPU (32 with AVX-512, 16 with AVX2:
    6 x 2 accumulators fill 12 of AVX2's 16 registers), a divisor of the tile width ``ct``."""
    from tvm.target.codegen import target_has_features

    from sparsec.backends.tvm.env import cpu_target

    nr = 32 if target_has_features("avx512f", cpu_target()) else 16
    return nr if ct % nr == 0 else VL


def panel_group(k: int, ct: int, nr: int) -> int:
    """GEMM panels per task: 4, 2 or 1, a divisor of a tile's ``ct // nr`` panels whose copies (``k x nr`` fp32 each)
    take at most 1.5 MiB. Copying several adjacent panels reads 128-256 contiguous bytes of each weight row instead
    of 64 (with the unpadded last rows: see the module docstring)."""
    return next(g for g in (4, 2, 1) if (ct // nr) % g == 0 and (g * k * nr * 4 <= 3 << 19 or g == 1))


def num_tiles(n: int, threads: int | None = None) -> int:
    """Column tiles for ``n`` outputs: a multiple of ``threads`` (default: TVM's pool size now), ``MAX_TILE`` wide
    at most, ``VL`` wide at least."""
    if threads is None:
        from sparsec.backends.tvm.env import num_threads

        threads = num_threads()
    return max(1, min(threads * math.ceil(n / (threads * MAX_TILE)), n // VL))


def tile_width(n: int, tiles: int) -> int:
    """Columns per tile when ``n`` outputs are split into ``tiles`` tiles (a multiple of ``VL``)."""
    return math.ceil(n / tiles / VL) * VL


def pack_weight(w, dtype: str | None = None, *, tiles: int | None = None):
    """``W [N, K]`` (torch tensor, nn.Linear layout) -> ``Wp [NT, K, CT]`` in ``dtype`` (default: w's).

    ``tiles``: NT (default :func:`num_tiles`); the kernel must be built with the same number.
    """
    import torch

    dtype = dtype or str(w.dtype).removeprefix("torch.")
    n, k = w.shape
    nt = tiles or num_tiles(n)
    ct = tile_width(n, nt)
    wt = torch.zeros(nt * ct, k, dtype=getattr(torch, dtype))
    wt[:n] = w.detach()
    return wt.reshape(nt, ct, k).permute(0, 2, 1).contiguous()


def kernel_name(kind: str, k: int, n: int, dtype: str) -> str:
    """The module-level name of the linear kernel of ``kind`` (dense, relu or threshold) for ``W [n, k]``."""
    return f"sparsec_linear_{kind}_{k}_{n}_{dtype}"


def linear_kernel(k: int, n: int, dtype: str = "float32", *, sparse: bool = True, threshold: bool = False,
                  tiles: int | None = None, rows_per_pass: int = R, group: int | None = None, splits: int = 1):
    """A PrimFunc ``(x [M, K], Wp [NT, K, CT], thr [1], bias [N], y [M, N])``, ``M`` symbolic.

    ``y = x' @ W.T + bias`` with ``x' = x * (|x| > thr)`` when ``threshold`` else ``x`` (pass zeros for no bias).
    ``sparse``: skip the weight rows of zero (or dropped) inputs. ``thr`` is ignored unless ``threshold``.
    The schedule (:mod:`sparsec.backends.tvm.tuning` chooses it per CPU): ``tiles``, NT, as given to
    :func:`pack_weight` (default :func:`num_tiles`); ``rows_per_pass``, the ``R`` surviving input rows accumulated
    per pass over the accumulators (1 < M < GEMM_ROWS too); ``group``, the GEMM's panels per task (default
    :func:`panel_group`); ``splits``, the tasks each tile's GEMV (M < GEMM_ROWS) is shared out to: task ``p`` of
    ``splits`` accumulates the ``p``-th share of the passes into its own accumulators, which are then summed (one
    tile split in two beats two half-width tiles when a tile's row segments are short: 5632 x 2048 fp16 on two
    threads, benchmarks/results/kernels.md).
    """
    from tvm.script import tirx as T

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {DTYPES}")
    if splits < 1:
        raise ValueError(f"splits must be at least 1, got {splits}")
    nt = tiles or num_tiles(n)
    ct = tile_width(n, nt)
    nv = ct // VL
    nr = gemm_columns(ct)
    group = group or panel_group(k, ct, nr)
    if (ct // nr) % group:
        raise ValueError(f"group {group} does not divide the {ct // nr} GEMM panels of a {ct}-column tile")
    R = rows_per_pass  # noqa: N806  (the module's default, renamed for this kernel)
    f32 = "float32"
    zero = T.cast(0, dtype)

    def keep(v, t):  # is input value v (storage dtype) nonzero after the (fused) threshold?
        return T.abs(v) > t if threshold else v != zero

    def take(v, t):  # does the kernel read the weight row of input value v?
        return keep(v, t) if sparse else T.bool(True)

    hit0 = 0 if sparse else 1
    ks = splits
    cw = math.ceil(ct / ks / VL) * VL  # columns each task sums in sum_parts

    @T.macro
    def sum_parts(accs, size, b, y, row, offset):
        """``y[row, c] = Σ_p accs[(j * ks + p) * size + offset + c] + b[c]``: the tile's ``ks`` tasks' partial sums
        (``size`` accumulators per task), the columns shared out between the tasks."""
        for task in T.parallel(nt * ks):
            j = task // ks
            for c in range(task % ks * cw, T.min(task % ks * cw + cw, ct)):
                if j * ct + c < n:
                    total = T.decl_buffer((1,), f32)
                    total[0] = T.float32(0)
                    for q in range(ks):
                        total[0] = total[0] + accs[(j * ks + q) * size + offset + c]
                    y[row, j * ct + c] = T.cast(total[0] + T.cast(b[j * ct + c], f32), dtype)

    gemm = gemm_macro(k, n, nt, ct, nr, group, dtype, keep, lambda w, s, j, i, c, vi: T.cast(w[j, i, c + vi], f32))

    @T.prim_func(private=True)
    def f(x_h: T.handle, wp: T.Buffer((nt, k, ct), dtype), thr: T.Buffer((1,), dtype), b: T.Buffer((n,), dtype),
          y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), dtype)
        y = T.match_buffer(y_h, (m, n), dtype)
        idx = T.decl_buffer((k + R,), "int32")
        xv = T.decl_buffer((MB * (k + R),), f32)
        cnt = T.decl_buffer((1,), "int32")
        if m == 1:
            cnt[0] = 0
            for i in range(k):  # branch-free: always write, advance only past a kept input
                idx[cnt[0]] = i
                xv[cnt[0]] = T.if_then_else(keep(x[0, i], thr[0]), T.cast(x[0, i], f32), T.float32(0))
                cnt[0] = cnt[0] + T.if_then_else(take(x[0, i], thr[0]), 1, 0)
            for r in range(R):
                idx[cnt[0] + r] = 0
                xv[cnt[0] + r] = T.float32(0)
            if ks > 1:
                accs = T.decl_buffer((nt * ks * ct,), f32)  # each task's accumulators, summed after
            for task in T.parallel(nt * ks):  # tile j, part p of its passes
                j = task // ks
                p = task % ks
                if ks == 1:
                    acc = T.decl_buffer((ct,), f32)  # (the task's own: 1-3 % faster than a view of a shared one)
                else:
                    acc = T.decl_buffer((ct,), f32, data=accs.data, elem_offset=task * ct)
                for vo in range(nv):
                    for vi in T.vectorized(VL):
                        acc[vo * VL + vi] = T.float32(0)
                for jb in range((cnt[0] + R - 1) // R * p // ks, (cnt[0] + R - 1) // R * (p + 1) // ks):
                    for vo in range(nv):
                        for r in T.unroll(R):
                            for vi in T.vectorized(VL):
                                acc[vo * VL + vi] = acc[vo * VL + vi] + T.cast(
                                    wp[j, idx[jb * R + r], vo * VL + vi], f32) * xv[jb * R + r]
                if ks == 1:
                    for c in range(ct):
                        if j * ct + c < n:
                            y[0, j * ct + c] = T.cast(acc[c] + T.cast(b[j * ct + c], f32), dtype)
            if ks > 1:
                sum_parts(accs, ct, b, y, 0, 0)
        else:
            if m < GEMM_ROWS:
                for mb in range((m + MB - 1) // MB):
                    cnt[0] = 0
                    for i in range(k):
                        hit = T.decl_buffer((1,), "int32")
                        hit[0] = hit0
                        for r in range(MB):
                            if mb * MB + r < m:
                                if take(x[mb * MB + r, i], thr[0]):
                                    hit[0] = 1
                        if hit[0] == 1:
                            idx[cnt[0]] = i
                            for r in range(MB):
                                xv[r * (k + R) + cnt[0]] = T.if_then_else(
                                    mb * MB + r < m and keep(x[T.min(mb * MB + r, m - 1), i], thr[0]),
                                    T.cast(x[T.min(mb * MB + r, m - 1), i], f32), T.float32(0))
                            cnt[0] = cnt[0] + 1
                    for q in range(R):  # pad to a multiple of R
                        idx[cnt[0] + q] = 0
                        for r in range(MB):
                            xv[r * (k + R) + cnt[0] + q] = T.float32(0)
                    if ks > 1:
                        accs = T.decl_buffer((nt * ks * MB * ct,), f32)  # each task's accumulators, summed after
                    for task in T.parallel(nt * ks):  # tile j, part p of its passes
                        j = task // ks
                        p = task % ks
                        if ks == 1:
                            acc = T.decl_buffer((MB * ct,), f32)
                        else:
                            acc = T.decl_buffer((MB * ct,), f32, data=accs.data, elem_offset=task * MB * ct)
                        for r in range(MB):
                            for vo in range(nv):
                                for vi in T.vectorized(VL):
                                    acc[r * ct + vo * VL + vi] = T.float32(0)
                        for qb in range((cnt[0] + R - 1) // R * p // ks, (cnt[0] + R - 1) // R * (p + 1) // ks):
                            for vo in range(nv):
                                for r in T.unroll(MB):
                                    for q in T.unroll(R):
                                        for vi in T.vectorized(VL):
                                            acc[r * ct + vo * VL + vi] = acc[r * ct + vo * VL + vi] + T.cast(
                                                wp[j, idx[qb * R + q], vo * VL + vi], f32) * xv[
                                                    r * (k + R) + qb * R + q]
                        if ks == 1:
                            for r in range(MB):
                                if mb * MB + r < m:
                                    for c in range(ct):
                                        if j * ct + c < n:
                                            y[mb * MB + r, j * ct + c] = T.cast(
                                                acc[r * ct + c] + T.cast(b[j * ct + c], f32), dtype)
                    if ks > 1:
                        for r in range(MB):
                            if mb * MB + r < m:
                                sum_parts(accs, MB * ct, b, y, mb * MB + r, r * ct)
            else:  # M >= GEMM_ROWS: a blocked GEMM on x' (dense: at these sizes the union of active inputs is all)
                gemm(x, wp, wp, thr, b, y, m)

    return f


def gemm_macro(k: int, n: int, nt: int, ct: int, nr: int, group: int, dtype: str, keep, load):
    """The family's GEMM (M >= GEMM_ROWS, the module docstring) as a TVMScript macro ``gemm(x, w, s, thr, b, y, m)``:
    ``x' = x`` where ``keep(x[r, i], thr[0])``, else 0, in fp32; then per task ``group`` panels of ``nr`` columns
    of tile ``j``, filled with ``load(w, s, j, i, c, vi)`` (the fp32 weight of row ``i``, column ``c + vi`` of tile
    ``j``; ``c`` a multiple of ``VL``, ``vi < VL``: how the weight format decodes), and the ``MR x nr`` micro-kernel.
    ``y [m, n] = x' @ W.T + b`` in ``dtype``."""
    from tvm.script import tirx as T

    f32 = "float32"

    @T.macro
    def gemm(x, w, s, thr, b, y, m):
        xs = T.decl_buffer((m * k,), f32)  # x' in fp32
        for r in T.parallel(m):
            for i in range(k):
                xs[r * k + i] = T.if_then_else(keep(x[r, i], thr[0]), T.cast(x[r, i], f32), T.float32(0))
        for task in T.parallel(nt * (ct // (nr * group))):  # GROUP NR-column panels of one tile per task
            j = task // (ct // (nr * group))
            c1 = task % (ct // (nr * group)) * (nr * group)
            # W[j, :, c1:c1+GROUP*NR] as GROUP contiguous [K, NR] panels (no 4 KiB strides), copied GROUP*NR
            # contiguous columns of a row at a time (the weights stream from memory once)
            panel = T.decl_buffer((group * k * nr,), f32)
            for i in range(k):
                for g in range(group):
                    for h in range(nr // VL):
                        for vi in T.vectorized(VL):
                            panel[(g * k + i) * nr + h * VL + vi] = load(w, s, j, i, c1 + g * nr + h * VL, vi)
            for g in range(group):
                c0 = c1 + g * nr
                for rb in range(m // MR):
                    acc = T.decl_buffer((MR * nr,), f32)  # MR x NR accumulators: registers
                    for r in T.unroll(MR):
                        for vi in T.vectorized(nr):
                            acc[r * nr + vi] = T.float32(0)
                    for i in range(k):
                        for r in T.unroll(MR):
                            for vi in T.vectorized(nr):
                                acc[r * nr + vi] = acc[r * nr + vi] + xs[(rb * MR + r) * k + i] * panel[
                                    (g * k + i) * nr + vi]
                    for r in range(MR):
                        for c in range(nr):
                            if j * ct + c0 + c < n:
                                y[rb * MR + r, j * ct + c0 + c] = T.cast(
                                    acc[r * nr + c] + T.cast(b[j * ct + c0 + c], f32), dtype)
                for r in range(m // MR * MR, m):  # the last M % MR rows, one at a time: SPLIT
                    acc1 = T.decl_buffer((SPLIT * nr,), f32)  # partial sums over k, independent FMA chains
                    for u in T.unroll(SPLIT):
                        for vi in T.vectorized(nr):
                            acc1[u * nr + vi] = T.float32(0)
                    for i in range(k // SPLIT):
                        for u in T.unroll(SPLIT):
                            for vi in T.vectorized(nr):
                                acc1[u * nr + vi] = acc1[u * nr + vi] + xs[r * k + i * SPLIT + u] * panel[
                                    (g * k + i * SPLIT + u) * nr + vi]
                    for i in range(k // SPLIT * SPLIT, k):
                        for vi in T.vectorized(nr):
                            acc1[vi] = acc1[vi] + xs[r * k + i] * panel[(g * k + i) * nr + vi]
                    for u in range(1, SPLIT):
                        for vi in T.vectorized(nr):
                            acc1[vi] = acc1[vi] + acc1[u * nr + vi]
                    for c in range(nr):
                        if j * ct + c0 + c < n:
                            y[r, j * ct + c0 + c] = T.cast(acc1[c] + T.cast(b[j * ct + c0 + c], f32), dtype)

    return gemm


def reference(x, w, thr: float | None = None, bias=None):
    """What the kernels compute, in numpy fp32 (``x [M, K]``, ``w [N, K]``), for tests."""
    x = np.asarray(x, np.float32)
    if thr is not None:
        x = x * (np.abs(x) > thr)
    y = x @ np.asarray(w, np.float32).T
    return y if bias is None else y + np.asarray(bias, np.float32)
