"""Would integer dot products (llama.cpp's Q4_0 way) make sparsec's int4 sparse GEMV faster on this CPU?

A probe, not a sparsec kernel: sparsec's group-wise int4 decode kernel (:mod:`sparsec.backends.tvm.quantized`:
each kept input's 4-bit weights converted to fp32 and multiplied in fp32) against a TIR variant with llama.cpp's
numerics: the kept inputs of each 32-input group quantized to int8 (scale max|x| / 127, round half to even), four
kept rows at a time interleaved in registers (one byte shuffle) and summed with AVX-512 VNNI ``vpdpbusd`` into int32,
scaled per group. Same packed weights, the same compaction of kept inputs, one column tile, the kept rows split
between the threads by groups. Timed interleaved (medians), with the caches flushed before each call (as in decode,
where every layer's weights come from memory) or not (weights in cache: the arithmetic alone).

Needs an x86 CPU with AVX512-VNNI. Usage: ``python benchmarks/int4_vnni_probe.py [--shape 4096x11008] [--threads 2]``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time


def vnni_kernel(k: int, n: int, group: int, tasks: int):
    """``(x [1, K], Wq [1, K, N / 2], S [1, G, N], y [1, N])``: ``y = Σ_g d_g S[g] Σ_k xq_k q_k`` over the kept
    inputs, ``xq = round(x / d_g)``, ``d_g = max|x| / 127`` over group g's inputs."""
    from tvm.script import tirx as T

    ng, f32 = k // group, "float32"
    perm = [16 * r + i for i in range(16) for r in range(4)]  # byte i of row r -> lane i, byte r
    cap = k + ng * 4
    nib = T.Broadcast(T.uint32(0x0F0F0F0F), 16)

    def dot(acc, a, b):
        return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, a, b)

    @T.prim_func(private=True)
    def f(x: T.Buffer((1, k), f32), wq: T.Buffer((1, k, n // 2), "uint8"), s: T.Buffer((1, ng, n), f32),
          y: T.Buffer((1, n), f32)):
        T.func_attr({"tirx.noalias": True})
        idx = T.decl_buffer((cap,), "int32")
        xq = T.decl_buffer((cap,), "int8")
        start = T.decl_buffer((ng + 1,), "int32")
        dx = T.decl_buffer((ng,), f32)
        qsum = T.decl_buffer((ng,), "int32")
        cnt = T.decl_buffer((1,), "int32")
        amax = T.decl_buffer((1,), f32)
        cnt[0] = 0
        for g in range(ng):
            start[g] = cnt[0]
            amax[0] = T.float32(0)
            for i in range(group):
                amax[0] = T.max(amax[0], T.abs(x[0, g * group + i]))
            dx[g] = amax[0] / T.float32(127)
            qsum[g] = 0
            for i in range(group):  # branch-free compaction, as sparsec's kernel
                idx[cnt[0]] = g * group + i
                xq[cnt[0]] = T.cast(T.nearbyint(T.if_then_else(
                    amax[0] > T.float32(0), x[0, g * group + i] * (T.float32(127) / amax[0]), T.float32(0))), "int8")
                qsum[g] = qsum[g] + T.cast(xq[cnt[0]], "int32")
                cnt[0] = cnt[0] + T.if_then_else(x[0, g * group + i] != T.float32(0), 1, 0)
            for r in range(3):  # to a multiple of 4 rows: the group's last row with value 0
                if (cnt[0] - start[g]) % 4 != 0:
                    idx[cnt[0]] = idx[cnt[0] - 1]
                    xq[cnt[0]] = T.int8(0)
                    cnt[0] = cnt[0] + 1
        start[ng] = cnt[0]
        accs = T.decl_buffer((tasks * n,), f32)
        for task in T.parallel(tasks):
            acc = T.decl_buffer((n,), f32, data=accs.data, elem_offset=task * n)
            for c in T.vectorized(n):
                acc[c] = T.float32(0)
            for g in range(ng * task // tasks, ng * (task + 1) // tasks):
                if start[g + 1] > start[g]:
                    for vb in range(n // 32):
                        u = T.decl_buffer((32,), "int32")
                        u[T.Ramp(0, 1, 32)] = T.Broadcast(T.int32(0), 32)
                        for qd in range((start[g + 1] - start[g]) // 4):
                            e = start[g] + qd * 4
                            v = T.reinterpret("uint32x16", T.Shuffle(
                                [wq[0, idx[e + r], T.Ramp(vb * 16, 1, 16)] for r in range(4)], perm))
                            xb = T.reinterpret("int8x64", T.Broadcast(T.reinterpret("int32", xq.vload([e], "int8x4")),
                                                                      16))
                            u[T.Ramp(0, 1, 16)] = dot(u[T.Ramp(0, 1, 16)], T.reinterpret("int8x64", v & nib), xb)
                            u[T.Ramp(16, 1, 16)] = dot(u[T.Ramp(16, 1, 16)], T.reinterpret(
                                "int8x64", T.shift_right(v, T.Broadcast(T.uint32(4), 16)) & nib), xb)
                        for vi in T.vectorized(32):  # stored values are q + 8
                            acc[vb * 32 + vi] = acc[vb * 32 + vi] + s[0, g, vb * 32 + vi] * dx[g] * T.cast(
                                u[vi] - 8 * qsum[g], f32)
        for c in range(n):
            total = T.decl_buffer((1,), f32)
            total[0] = T.float32(0)
            for t in range(tasks):
                total[0] = total[0] + accs[t * n + c]
            y[0, c] = total[0]
    return f


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="4096x11008", help="KxN")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=21)
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import numpy as np
    import torch

    from sparsec.backends.tvm.env import cpu_target, host_cpu, import_tvm
    from sparsec.backends.tvm.quantized import pack_quantized, quantized_linear_kernel
    from sparsec.backends.tvm.tuning import eviction_bytes
    from sparsec.ops import DEQUANTIZE
    from sparsec.passes.quantize import quantize_weight

    tvm = import_tvm(args.threads)
    k, n = (int(v) for v in args.shape.split("x"))
    group = 32

    def build(func):
        return tvm.compile(func.with_attr("global_symbol", "main"), cpu_target())["main"]

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    q, scale, _ = quantize_weight(w, 4, group, torch.float32, symmetric=True)
    wq, s = pack_quantized(q, scale, 4, tiles=1)
    wd = DEQUANTIZE(q, scale, 4, group, torch.float32).double()  # the weights sparsec's numerics are defined by
    vnni = build(vnni_kernel(k, n, group, args.threads))
    fp = build(quantized_linear_kernel(k, n, 4, group, tiles=1))
    thr, bias, y = torch.zeros(1), torch.zeros(n), torch.empty(1, n)

    def make_input(sparsity):
        x = torch.randn(1, k, generator=gen)
        x[torch.rand(1, k, generator=gen) < sparsity] = 0
        return x

    x = make_input(0.5)  # numerics: each kernel against its own float64 reference
    xg = x.double().reshape(-1, group)
    d = xg.abs().amax(1, keepdim=True) / 127
    xr = (torch.round(xg / torch.where(d > 0, d, 1)) * d).reshape(1, k)
    vnni(x, wq, s, y)
    err_vnni = ((y.double() - xr @ wd.T).abs().max() / (xr @ wd.T).abs().max()).item()
    fp(x, wq, s, thr, bias, y)
    err_fp = ((y.double() - x.double() @ wd.T).abs().max() / (x.double() @ wd.T).abs().max()).item()
    shift = ((xr - x.double()) @ wd.T).abs().max().item() / (x.double() @ wd.T).abs().max().item()
    flush = np.ones(eviction_bytes() // 8)  # twice the last-level cache, >= 96 MB
    sparsities = (0.0, 0.5, 0.9)
    xs = {sp: [make_input(sp) for _ in range(8)] for sp in sparsities}
    calls = {(name, sp, cold): fn for sp in sparsities for cold in (True, False)
             for name, fn in (("fp32", lambda x: fp(x, wq, s, thr, bias, y)), ("vnni", lambda x: vnni(x, wq, s, y)))}
    times = {key: [] for key in calls}
    for r in range(args.rounds):
        for key in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
            _, sp, cold = key
            x = xs[sp][r % 8]
            if cold:
                flush.sum()
            else:
                calls[key](x)
            t = time.perf_counter()
            calls[key](x)
            times[key].append(time.perf_counter() - t)
    ms = {key: statistics.median(v) * 1e3 for key, v in times.items()}
    print(f"CPU: {host_cpu()}; {args.threads} threads; {k}x{n} int4 g32, fp32 scales; {args.rounds} rounds")
    print(f"numerics (max |err| / max |y|): fp32 kernel {err_fp:.1e} vs x; VNNI {err_vnni:.1e} vs its int8 x, whose"
          f" rounding moves y by {shift:.1e}")
    print("| caches | s | fp32 kernel ms | VNNI ms | fp32 / VNNI |\n|---|---|---|---|---|")
    for cold in (True, False):
        for sp in sparsities:
            a, b = ms[("fp32", sp, cold)], ms[("vnni", sp, cold)]
            print(f"| {'flushed' if cold else 'warm'} | {sp:g} | {a:.3f} | {b:.3f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
