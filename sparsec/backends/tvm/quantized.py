"""sparsec's TIR kernels for linear layers with quantized weights: ``y = x' @ dequantize(q, scale).T + b``.

The quantize pass's weights (:mod:`sparsec.passes.quantize`, ``sparsec::dequantize`` in :mod:`sparsec.ops`): int8
or int4 values ``q [N, K]`` and fp scales per group of ``gs`` inputs (``G = K / gs`` groups; per output channel:
one group of ``K``). :func:`pack_quantized` lays them out in the column tiles of the float kernels
(:mod:`sparsec.backends.tvm.kernels`), so that a skipped input row skips its bytes:

* int8: ``Wq [NT, K, CT]`` int8, row ``k`` of tile ``j`` the ``CT`` values of columns ``j*CT ...``;
* int4: ``Wq [NT, K, CT / 2]`` uint8, each 32-column block of a row in 16 bytes: byte ``i`` holds column ``i`` in its
  low nibble and column ``16 + i`` in its high one, as ``value + 8`` (one load, two 16-lane vectors: ``& 15`` and
  ``>> 4``);
* scales ``S [NT, G, CT]`` in the pass's scale dtype (fp32 or fp16: widened in registers, exactly); with offsets
  (``quantize{symmetric=false}``: ``w = q * scale + offset``) ``S [NT, 2G, CT]``, group ``g``'s scales in row ``2g``
  and its offsets in row ``2g + 1`` (read together).

**Decode** (M = 1, sparse): the compaction pass of the float kernels, per group: the surviving inputs of each group are
listed together and their sum ``Σx`` is kept. Group-wise, each tile takes a group's surviving rows ``R`` per pass and
the last ``count % R`` in one more pass, as chunks of 16, 8, ..., 1 rows (padding them to R instead did up to R - 1 rows
of useless work per group: 10-25 % slower at s = 0.5-0.9; a pass per chunk, 7-12 % slower at s = 0.5 on Zen 5); a pass
sums, per block of columns, its rows' products ``u = Σ_r q[k_r, c] x[k_r]`` in registers (each value converted to fp32
there) and adds ``S[g, c] * (u - 8 Σ_r x)`` (int4's stored + 8; 0 for int8), and with offsets ``O[g, c] Σ_r x``, to the
accumulators: one read of the accumulators and scales per pass. (Summing a whole group into a tile-wide buffer first and
scaling it once per group, the earlier design, costs two more passes over that buffer per group: on a 2-core Zen 5,
4096x11008 int4 g32 fp16 scales, 1.04 -> 0.78 ms at s = 0.5, 0.63 -> 0.38 at s = 0.9.) With one group (per channel) the
rows are padded to a multiple of ``R`` with the last surviving row and value 0, summed straight into the accumulators,
and the scale is applied once at the end.

While a pass computes, it prefetches the same block of the next R compacted rows (software prefetch: a kept row
is a short read at an unpredictable address, which the hardware prefetchers only follow once it has begun; Zen 5,
5632x2048 at s = 0.5, 61 interleaved rounds: int8 0.205 -> 0.148 ms, int4 g32 fp16 scales 0.218 -> 0.160), and
group-wise the same block of the next group's scales (each group's pass starts a new row of ``S``; Zen 4, int4 g32,
4096x11008 / 11008x4096 / 2048x5632, 31 interleaved rounds: s = 0.9 20-28 % faster, s = 0.5 1-19 %, fp32 scales
gaining most). Prefetching fewer rows in a tail pass, more rows, or rows further ahead all measured slower.

Default schedule (measured on a 2-core Zen 4, 4096x11008 / 11008x4096 / 640x2048 / 2048x640 / 640x262144, s = 0.5):
tiles as wide as possible (up to ``MAX_TILE`` columns: a kept row is one long contiguous read, which the hardware
prefetchers follow; narrower tiles measured 1.3-2x slower), the kept rows of a single tile
split between the threads (``splits``), and ``R`` = 16 rows per pass for group-wise layers (about the survivors of a
32-input group at s = 0.5; R = 8 measured 1.4x slower, R = 32 within 3 % on Zen 5) and 8 per channel.

**Prefill** (M > 1): the float kernels' GEMM (:func:`~sparsec.backends.tvm.kernels.gemm_macro`), its panel copy
dequantizing (``q * S``) into fp32 once per call; then the same register-blocked micro-kernel.

Numerics: the same products as ``linear(x', dequantize(q, S))`` summed in fp32 in another order (and for int4 with
the offset factored out of each pass's sum), so equal to the torch reference up to fp32 rounding.
"""
from __future__ import annotations

import math

from sparsec.backends.tvm.kernels import DTYPES, VL, gemm_columns, gemm_macro, panel_group

MAX_TILE = 16384  # output columns per tile at most (TVM vectorizes a tile's zeroing: under 32768 lanes)
BITS = (8, 4)


def align(bits: int) -> int:
    """Tile widths are multiples of this many columns: ``VL`` for int8, a 32-column block (16 bytes) for int4."""
    return VL if bits == 8 else 2 * VL


def _threads(threads: int | None) -> int:
    if threads is None:
        from sparsec.backends.tvm.env import num_threads

        return num_threads()
    return threads


def num_tiles(n: int, bits: int, threads: int | None = None) -> int:
    """Column tiles for ``n`` outputs: one when ``n`` fits in ``MAX_TILE`` columns, else a multiple of ``threads``
    (default: TVM's pool size) of at most ``MAX_TILE`` columns each."""
    if n <= MAX_TILE:
        return 1
    threads = _threads(threads)
    return max(1, min(threads * math.ceil(n / (threads * MAX_TILE)), n // align(bits)))


def num_splits(tiles: int, threads: int | None = None) -> int:
    """Tasks per tile in decode: the threads a tile would leave idle (``threads // tiles``, at least 1)."""
    return max(1, _threads(threads) // tiles)


def tile_width(n: int, tiles: int, bits: int) -> int:
    a = align(bits)
    return math.ceil(n / tiles / a) * a


def pack_quantized(q, scale, bits: int, *, offset=None, tiles: int | None = None):
    """``(Wq, S)`` (module docstring) from the quantize pass's ``q`` (int8 ``[N, K]``, or for 4 bits uint8
    ``[N, K / 2]``), ``scale [N, G]`` and ``offset [N, G]`` (or None); ``tiles``: NT (default :func:`num_tiles`), the
    kernel's too."""
    import torch

    from sparsec.ops import unpack_int4

    values = q if bits == 8 else unpack_int4(q)
    n, k = values.shape
    nt = tiles or num_tiles(n, bits)
    ct = tile_width(n, nt, bits)
    w = torch.zeros(nt * ct, k, dtype=torch.int8)
    w[:n] = values
    w = w.reshape(nt, ct, k).permute(0, 2, 1)  # [NT, K, CT]
    if bits == 4:
        u = (w.to(torch.int16) + 8).to(torch.uint8).reshape(nt, k, ct // 32, 2, 16)
        w = (u[:, :, :, 0] | (u[:, :, :, 1] << 4)).reshape(nt, k, ct // 2)
    if offset is not None:  # [N, G] x 2 -> [N, 2G]: each group's scale, then its offset
        scale = torch.stack([scale, offset], dim=-1).flatten(-2)
    s = torch.zeros(nt * ct, scale.shape[1], dtype=scale.dtype)
    s[:n] = scale
    return w.contiguous(), s.reshape(nt, ct, -1).permute(0, 2, 1).contiguous()


def quantized_linear_kernel(k: int, n: int, bits: int, group: int, dtype: str = "float32", *, sparse: bool = True,
                            threshold: bool = False, tiles: int | None = None, rows_per_pass: int | None = None,
                            splits: int | None = None, scale_dtype: str = "float32", offsets: bool = False):
    """A PrimFunc ``(x [M, K], Wq, S [NT, G, CT], thr [1], bias [N], y [M, N])``, ``M`` symbolic, computing
    ``y = x' @ dequantize(q, S).T + bias``, ``x' = x * (|x| > thr)`` when ``threshold`` else ``x``. ``group``: inputs
    per scale (0: per output channel). ``sparse``: skip the weight rows of zero (or dropped) inputs in decode.
    Schedule (defaults: module docstring): ``tiles`` (NT, as given to :func:`pack_quantized`), ``rows_per_pass`` (R),
    ``splits`` (the decode's kept rows split between that many tasks per tile: per channel its passes, group-wise its
    groups; each task sums into its own accumulators, added up at the end). ``scale_dtype``: float32 or float16.
    ``offsets``: the weights have offsets (``S`` holds scale and offset rows, :func:`pack_quantized`)."""
    from tvm.script import tirx as T

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {DTYPES}")
    if bits not in BITS:
        raise ValueError(f"bits {bits} is not one of {BITS}")
    gs = group or k
    if k % gs:
        raise ValueError(f"group {group} does not divide K={k}")
    ng = k // gs  # noqa: N806
    nt = tiles or num_tiles(n, bits)
    ct = tile_width(n, nt, bits)
    nr = gemm_columns(ct)
    R = rows_per_pass or (16 if group else 8)  # noqa: N806
    ks = splits or num_splits(nt)
    if ng > 1 and (R & (R - 1) or R > 32):
        raise ValueError(f"rows_per_pass {R} of a group-wise kernel is not a power of two up to 32")
    f32 = "float32"
    zero = T.cast(0, dtype)
    offset = T.float32(8 if bits == 4 else 0)
    wtype, wcols = ("int8", ct) if bits == 8 else ("uint8", ct // 2)
    so = 2 if offsets else 1  # rows of S per group

    def off(s, j, g, c):  # the fp32 offset of group g, column c of tile j (only with offsets)
        return T.cast(s[j, g * so + 1, c], f32)

    def keep(v, t):
        return T.abs(v) > t if threshold else v != zero

    def take(v, t):
        return keep(v, t) if sparse else T.bool(True)

    def load(w, s, j, i, c, vi):  # the fp32 weight of row i, column c + vi of tile j (c a multiple of VL)
        if bits == 8:
            v = T.cast(w[j, i, c + vi], f32) * T.cast(s[j, i // gs * so, c + vi], f32)
        else:
            nibble = T.shift_right(w[j, i, c // 32 * 16 + vi], T.cast(c // 16 % 2 * 4, "uint8")) & T.uint8(15)
            v = (T.cast(nibble, f32) - T.float32(8)) * T.cast(s[j, i // gs * so, c + vi], f32)
        return v + off(s, j, i // gs, c + vi) if offsets else v

    gemm = gemm_macro(k, n, nt, ct, nr, panel_group(k, ct, nr), dtype, keep, load)

    bw = VL if bits == 8 else 32  # columns per block: a vector of int8 values, 16 bytes of int4 ones

    def add_rows(count: int):
        """``u[c] += Σ_r q[idx[e + r], vb * bw + c] x'[e + r]`` over ``count`` compacted rows from entry ``e``."""
        @T.macro
        def body(wq, idx, xv, u, j, vb, e):
            for r in T.unroll(count):
                if bits == 8:
                    for vi in T.vectorized(VL):
                        u[vi] = u[vi] + T.cast(wq[j, idx[e + r], vb * VL + vi], f32) * xv[e + r]
                else:
                    for vi in T.vectorized(VL):
                        u[vi] = u[vi] + T.cast(wq[j, idx[e + r], vb * VL + vi] & T.uint8(15), f32) * xv[e + r]
                        u[VL + vi] = u[VL + vi] + T.cast(
                            T.shift_right(wq[j, idx[e + r], vb * VL + vi], T.uint8(4)), f32) * xv[e + r]
        return body

    chunks = [c for c in (16, 8, 4, 2, 1) if c < R]  # a tail of fewer than R rows: these many rows or none
    adds = {c: add_rows(c) for c in {R, *chunks}}

    def add_tail(sizes):
        """``add_rows`` of a tail of ``count`` < R rows: a chunk of ``sizes[0]`` rows where ``count`` has that bit
        (after the larger chunks' rows), then the smaller chunks; None without sizes (R = 1: no tail)."""
        if not sizes:
            return None
        size, rest = sizes[0], add_tail(sizes[1:])
        done = (R - 1) & ~(2 * size - 1)  # the bits of count above this chunk's: the rows the larger chunks took

        @T.macro
        def body(wq, idx, xv, u, j, vb, e, count):
            if count & size != 0:
                adds[size](wq, idx, xv, u, j, vb, e + (count & done))
            if rest is not None:
                rest(wq, idx, xv, u, j, vb, e, count)
        return body

    tail = add_tail(chunks)

    @T.macro
    def prefetch_rows(wq, idx, j, vb, e):
        """Ask for block ``vb`` of the next pass's R rows (from entry ``e``) while this pass computes: a kept row is
        a short read at an unpredictable address, which the hardware prefetchers only follow once it has begun."""
        for r in T.unroll(R):
            T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(
                wq[j, idx[T.min(e + r, k + ng * R - 1)], vb * VL]), T.int32(0), T.int32(3), T.int32(1)))

    @T.macro
    def summed_pass(wq, idx, xv, acc, j, e):
        """Per channel: ``acc[c] += Σ_r q[idx[e + r], c] x'[e + r]`` over R compacted rows from entry ``e``."""
        u = T.decl_buffer((bw,), f32)
        for vb in range(ct // bw):
            prefetch_rows(wq, idx, j, vb, e + R)
            for vi in T.vectorized(bw):
                u[vi] = acc[vb * bw + vi]
            adds[R](wq, idx, xv, u, j, vb, e)
            for vi in T.vectorized(bw):
                acc[vb * bw + vi] = u[vi]

    @T.macro
    def scale_block(s, acc, u, j, g, vb, xs):
        if offsets:
            for vi in T.vectorized(bw):
                acc[vb * bw + vi] = acc[vb * bw + vi] + T.cast(s[j, g * so, vb * bw + vi], f32) * (
                    u[vi] - offset * xs) + off(s, j, g, vb * bw + vi) * xs
        else:
            for vi in T.vectorized(bw):
                acc[vb * bw + vi] = acc[vb * bw + vi] + T.cast(s[j, g, vb * bw + vi], f32) * (u[vi] - offset * xs)

    s_bytes = 2 if scale_dtype == "float16" else 4

    @T.macro
    def prefetch_scales(s, j, g, vb):
        """Ask for block ``vb`` of the next group's scales (and offsets), one request per 64-byte line: the pass
        over group g + 1 starts a new row of ``S`` each time, a stream the hardware prefetchers would pick up late."""
        for line in T.unroll(max(1, bw * s_bytes * so // 64)):
            T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(
                s[j, T.min(g + 1, ng - 1) * so + line * 64 // (bw * s_bytes), vb * bw + line * 64 // s_bytes % bw]),
                T.int32(0), T.int32(3), T.int32(1)))

    @T.macro
    def scaled_pass(wq, s, idx, xv, acc, j, g, e, count):
        """Group-wise: ``acc[c] += S[g, c] * (Σ_r q[idx[e + r], c] x'[e + r] - offset Σ_r x'[e + r]) (+ O[g, c] Σ_r
        x'[e + r])`` over ``count``
        (R, or fewer: then in chunks of 16, 8, ..., 1 rows) compacted rows of group ``g`` from entry ``e``, tile
        ``j``: the rows' sum of each block of columns stays in registers and is scaled once per pass."""
        xs = T.decl_buffer((1,), f32)
        xs[0] = T.float32(0)
        for r in range(count):
            xs[0] = xs[0] + xv[e + r]
        u = T.decl_buffer((bw,), f32)
        if count == R:
            for vb in range(ct // bw):
                prefetch_rows(wq, idx, j, vb, e + R)
                prefetch_scales(s, j, g, vb)
                for vi in T.vectorized(bw):
                    u[vi] = T.float32(0)
                adds[R](wq, idx, xv, u, j, vb, e)
                scale_block(s, acc, u, j, g, vb, xs[0])
        else:
            for vb in range(ct // bw):
                prefetch_rows(wq, idx, j, vb, e + count)
                prefetch_scales(s, j, g, vb)
                for vi in T.vectorized(bw):
                    u[vi] = T.float32(0)
                if tail is not None:  # R = 1 has no tail
                    tail(wq, idx, xv, u, j, vb, e, count)
                scale_block(s, acc, u, j, g, vb, xs[0])


    @T.prim_func(private=True)
    def f(x_h: T.handle, wq: T.Buffer((nt, k, wcols), wtype), s: T.Buffer((nt, ng * so, ct), scale_dtype),
          thr: T.Buffer((1,), dtype), b: T.Buffer((n,), dtype), y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), dtype)
        y = T.match_buffer(y_h, (m, n), dtype)
        if m == 1:
            idx = T.decl_buffer((k + ng * R,), "int32")
            xv = T.decl_buffer((k + ng * R,), f32)
            start = T.decl_buffer((ng + 1,), "int32")  # each group's first entry in idx / xv
            xsum = T.decl_buffer((ng,), f32)  # Σ x' over each group
            cnt = T.decl_buffer((1,), "int32")
            cnt[0] = 0
            for g in range(ng):
                start[g] = cnt[0]
                xsum[g] = T.float32(0)
                for ii in range(gs):  # branch-free: always write, advance only past a kept input
                    idx[cnt[0]] = g * gs + ii
                    xv[cnt[0]] = T.if_then_else(keep(x[0, g * gs + ii], thr[0]), T.cast(x[0, g * gs + ii], f32),
                                                T.float32(0))
                    xsum[g] = xsum[g] + xv[cnt[0]]
                    cnt[0] = cnt[0] + T.if_then_else(take(x[0, g * gs + ii], thr[0]), 1, 0)
                pad = T.decl_buffer((1,), "int32")  # per channel: up to a multiple of R (group-wise: tail passes)
                pad[0] = (R - (cnt[0] - start[g]) % R) % R if ng == 1 else 0
                for r in range(R):  # pad with the group's last row (in cache) and value 0
                    if r < pad[0]:
                        idx[cnt[0] + r] = idx[cnt[0] - 1]
                        xv[cnt[0] + r] = T.float32(0)
                cnt[0] = cnt[0] + pad[0]
            start[ng] = cnt[0]
            accs = T.decl_buffer((nt * ks * ct,), f32)  # each task's accumulators
            for task in T.parallel(nt * ks):  # tile j, part p of the groups (per channel: of the row passes)
                j = task // ks
                p = task % ks
                acc = T.decl_buffer((ct,), f32, data=accs.data, elem_offset=task * ct)
                for c in T.vectorized(ct):
                    acc[c] = T.float32(0)
                for g in range(ng * p // ks if ng > 1 else 0, ng * (p + 1) // ks if ng > 1 else 1):
                    passes = T.decl_buffer((2,), "int32")  # this task's passes of R entries in group g
                    passes[0] = (start[g + 1] - start[g]) // R * p // ks if ng == 1 else 0
                    passes[1] = (start[g + 1] - start[g]) // R * (p + 1) // ks if ng == 1 else (
                        start[g + 1] - start[g]) // R
                    if ng == 1:
                        for jb in range(passes[0], passes[1]):
                            summed_pass(wq, idx, xv, acc, j, start[g] + jb * R)
                    else:
                        for jb in range(passes[0], passes[1]):
                            scaled_pass(wq, s, idx, xv, acc, j, g, start[g] + jb * R, R)
                        if (start[g + 1] - start[g]) % R != 0:  # the group's last rows: one pass
                            scaled_pass(wq, s, idx, xv, acc, j, g, start[g + 1] - (start[g + 1] - start[g]) % R,
                                        (start[g + 1] - start[g]) % R)
            for task in T.parallel(nt):  # the parts' sums, scaled (per channel), plus the bias
                for c in range(ct):
                    if task * ct + c < n:
                        total = T.decl_buffer((1,), f32)
                        total[0] = T.float32(0)
                        for q in range(ks):
                            total[0] = total[0] + accs[(task * ks + q) * ct + c]
                        if ng > 1:
                            y[0, task * ct + c] = T.cast(total[0] + T.cast(b[task * ct + c], f32), dtype)
                        elif offsets:
                            y[0, task * ct + c] = T.cast(T.cast(s[task, 0, c], f32) * (total[0] - offset * xsum[0])
                                                         + off(s, task, 0, c) * xsum[0] + T.cast(b[task * ct + c], f32),
                                                         dtype)
                        else:
                            y[0, task * ct + c] = T.cast(T.cast(s[task, 0, c], f32) * (total[0] - offset * xsum[0])
                                                         + T.cast(b[task * ct + c], f32), dtype)
        else:  # a prefill (or a few rows): the GEMM, dequantizing each panel once
            gemm(x, wq, s, thr, b, y, m)

    return f


def format_name(bits: int, group: int, scale_dtype: str = "float32", offsets: bool = False) -> str:
    """The weight format's name: ``int{bits}g{group}``, ``s16`` for fp16 scales (``int4g32s16``), ``o`` for offsets
    (``int4g32s16o``)."""
    return f"int{bits}g{group}" + ("s16" if scale_dtype == "float16" else "") + ("o" if offsets else "")


def quantized_kernel_name(kind: str, k: int, n: int, bits: int, group: int, dtype: str,
                          scale_dtype: str = "float32", offsets: bool = False) -> str:
    """The module-level name of the quantized linear kernel of ``kind`` (dense, sparse or threshold)."""
    return f"sparsec_linear_{format_name(bits, group, scale_dtype, offsets)}_{kind}_{k}_{n}_{dtype}"
