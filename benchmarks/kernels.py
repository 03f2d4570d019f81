"""Batch-1 linear layers on the CPU: sparsec's TVM sparse kernel against dense peers, at several input sparsities.

For each weight shape (K inputs x N outputs) and weight format, one process run measures
  * sparsec TVM sparse  (``sparsec.backends.tvm.kernels``, zero inputs skipped) at sparsity 0 / .25 / .5 / .75 / .9
  * sparsec TVM dense   (the same kernel family, every row read)
  * torch ``F.linear``  (x [1, K], W [N, K])
  * ONNX Runtime MatMul (x [1, K] @ W^T [K, N] as an initializer; fp32 only: ORT's CPU MatMul has no fp16/bf16)
  * "read W": the faster of ``torch.sum`` and a TVM streaming-read kernel (one contiguous chunk per thread, 8
    independent vector accumulators) over a tensor with as many bytes as W: the machine's read bandwidth now
For a quantized format (``int8``: per output channel, ``int8g32`` / ``int4g32``: a scale per 32 inputs, fp32, or
fp16 with ``s16``: ``int4g32s16``; ``o``: an offset per group too, ``int4g32s16o``, ``quantize{symmetric=false}``;
ORT's MatMulNBits takes fp32 scales (and zero points) of the same values; the ``quantize`` pass's round-to-nearest
weights, sparsec's quantized kernels of :mod:`sparsec.backends.tvm.quantized`)
the dense peers are the same-bit TVM dense kernel (every row read) and ONNX Runtime's ``MatMulNBits`` (group-wise
formats; 4 bits, or 8 where this ORT has it), "read W" reads as many bytes as the packed weights and scales, and
the ``torch F.linear`` column is the float32 layer's (the cost of not quantizing).
and reports medians. Protocol (../shared/TVM.md §3.2): TVM and torch calls are interleaved round-robin (the order
reversed every other round), each call gets a fresh x with exactly round(s*K) zeros at random positions, and an
array of twice the last-level cache (96 MB at least) is read before every timed call so W is never in the cache.
ORT runs afterwards in its own block of calls, since its spinning thread pool would slow the others. The bound at
sparsity s is (1 - s) x "read W" time.
Threads: 2 unless --threads (TVM_NUM_THREADS, torch.set_num_threads, ORT intra_op_num_threads).
Float kernels take the schedule ``sparsec compile --tune-seconds S`` would give them (``--tune-seconds``: the tuning
database's entry for this CPU, else measured for about S seconds and recorded there; 0, the default: the database
or the default schedule), the sparse kernel as a ReLU-fed layer's, the dense one as a dense layer's.
Usage: python benchmarks/kernels.py [--rounds 31] [--threads 2] [--shapes 4096x11008,11008x4096]
       [--dtypes float32,float16,bfloat16,int8,int4g32] [--tune-seconds S] [--markdown FILE]
"""
import argparse
import os
import pathlib
import resource
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import peers  # noqa: E402

SPARSITIES = (0.0, 0.25, 0.5, 0.75, 0.9)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default="4096x11008,11008x4096")
    ap.add_argument("--dtypes", default="float32,float16,bfloat16", help="weight formats: float32, float16, bfloat16,"
                    " int8, int8gG, int4gG (G inputs per scale)")
    ap.add_argument("--tune-seconds", type=float, default=0.0, metavar="S",
                    help="float kernels' schedules as sparsec compile --tune-seconds S chooses them")
    ap.add_argument("--markdown", metavar="FILE", help="also write the tables to FILE")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    os.environ["OPENBLAS_NUM_THREADS"] = "1"  # OpenBLAS threads spin after a call and slow TVM's pool
    import numpy as np
    import torch

    from sparsec.backends.tvm.env import cpu_target, host_cpu, import_tvm, num_threads
    from sparsec.backends.tvm.tuning import Scheduler, eviction_bytes

    cpu = peers.cpu_description()["summary"]  # before the run: its read bandwidth of an idle machine

    tvm = import_tvm(args.threads)
    torch.set_num_threads(args.threads)
    scheduler = Scheduler(args.tune_seconds, args.threads)
    target = cpu_target()
    flush = np.ones(eviction_bytes() // 8)  # twice the last-level cache, >= 96 MB
    rows, lines = [], []
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        for dtype in args.dtypes.split(","):
            rows.append(bench_one(tvm, target, np, torch, flush, k, n, dtype, args.rounds, args.threads,
                                  scheduler))
            r = rows[-1]
            print(f"{k}x{n} {dtype}: " + ", ".join(f"{name} {ms:.2f}" for name, ms in r["ms"].items()), flush=True)
    head = (f"CPU: {cpu}; LLVM CPU {host_cpu()}, TVM threads {num_threads()}, torch threads"
            f" {torch.get_num_threads()}; {args.rounds} rounds; peak RSS"
            f" {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    schedules = "; ".join(f"{name}: rows_per_pass {c['rows_per_pass']}, tiles_per_thread {c['tiles_per_thread']},"
                          f" splits {c.get('splits')} ({c['source']})" for name, c in scheduler.chosen.items())
    lines += [head, "", f"Float kernels' schedules: {schedules or '-'}", "", table_ms(rows), "", table_speedup(rows)]
    text = "\n".join(lines)
    print("\n" + text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(text + "\n")


def quantized_format(dtype):
    """``(bits, group, scale dtype, offsets)`` of a quantized weight format name (``int8``, ``int4g32``; ``s16``: fp16
    scales, ``int4g32s16``; ``o``: offsets, ``int4g32s16o``), None for a float dtype."""
    import re

    match = re.fullmatch(r"int([48])(?:g(\d+))?(s16)?(o)?", dtype)
    return (int(match[1]), int(match[2] or 0), "float16" if match[3] else "float32", bool(match[4])) if match else None


def _kernels(tvm, target, torch, w, dtype, scheduler):
    """``((sparse kernel, its weight operands), (dense kernel, its operands), x dtype)`` for weights ``w`` (fp32
    [N, K]) in format ``dtype``; float kernels with ``scheduler``'s schedules (see the module docstring)."""
    from sparsec.backends.tvm.kernels import linear_kernel, pack_weight
    from sparsec.backends.tvm.quantized import pack_quantized, quantized_linear_kernel
    from sparsec.passes.quantize import quantize_weight

    def build(func):
        return tvm.compile(func.with_attr("global_symbol", "main"), target)["main"]

    n, k = w.shape
    fmt = quantized_format(dtype)
    if fmt is None:
        wt = w.to(getattr(torch, dtype))
        kernels = []
        for sparse, kind in ((True, "sparse"), (False, "dense")):
            args = scheduler(k, n, dtype, kind)
            kernels.append((build(linear_kernel(k, n, dtype, sparse=sparse, **args)),
                            [pack_weight(wt, tiles=args["tiles"])]))
        return *kernels, dtype
    bits, group, scales, offsets = fmt
    q, scale, offset = quantize_weight(w, bits, group, getattr(torch, scales), symmetric=not offsets)
    operands = list(pack_quantized(q, scale, bits, offset=offset))
    return *((build(quantized_linear_kernel(k, n, bits, group, sparse=s, scale_dtype=scales, offsets=offsets)),
              operands) for s in (True, False)), "float32"


def bench_one(tvm, target, np, torch, flush, k, n, dtype, rounds, threads, scheduler):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    (sparse, operands), (dense, dense_operands), xdtype = _kernels(tvm, target, torch, w, dtype, scheduler)
    td = getattr(torch, xdtype)
    w = w.to(td)
    bias, thr = torch.zeros(n, dtype=td), torch.zeros(1, dtype=td)
    y = torch.empty(1, n, dtype=td)
    nbytes = sum(t.numel() * t.element_size() for t in operands)
    blob = torch.ones(nbytes // 4)  # as many bytes as the packed weights, read as fp32
    read = tvm.compile(_read_kernel(blob.numel(), threads).with_attr("global_symbol", "main"), target)["main"]
    part = torch.empty(threads * 128)
    xs = {s: [_input(torch, k, s, td, g) for _ in range(16)] for s in SPARSITIES}
    calls = {f"sparse@{s:g}": (s, lambda x: sparse(x, *operands, thr, bias, y)) for s in SPARSITIES}
    calls.update({"tvm dense": (0.0, lambda x: dense(x, *dense_operands, thr, bias, y)),
                  "torch F.linear": (0.0, lambda x: torch.nn.functional.linear(x, w)),
                  "torch sum": (0.0, lambda x: blob.sum()), "tvm read": (0.0, lambda x: read(blob, part))})
    times = {name: [] for name in calls}
    with torch.no_grad():
        for r in range(rounds):
            order = list(calls) if r % 2 == 0 else list(calls)[::-1]
            for name in order:
                s, fn = calls[name]
                x = xs[s][r % len(xs[s])]
                flush.sum()
                t = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t)
    ms = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    ms["read W"] = min(ms.pop("torch sum"), ms.pop("tvm read"))
    if dtype == "float32":
        ms["ORT MatMul"] = _ort(np, flush, _matmul(np, w), xs[0.0], rounds, threads)
    elif quantized_format(dtype) and quantized_format(dtype)[1]:
        bits, group, _, offsets = quantized_format(dtype)
        node = _matmul_nbits(np, torch, w, bits, group, offsets)
        if node is not None:
            ms["ORT MatMul"] = _ort(np, flush, node, xs[0.0], rounds, threads)
    return {"k": k, "n": n, "dtype": dtype, "mb": nbytes / 1e6, "ms": ms}


def _read_kernel(numel, threads):
    """``part[c*128:(c+1)*128]`` = partial sums of chunk ``c`` of ``blob`` (fp32): a pure streaming read."""
    from tvm.script import tirx as T

    chunk = numel // threads // 128

    @T.prim_func(private=True)
    def f(blob: T.Buffer((numel,), "float32"), part: T.Buffer((threads * 128,), "float32")):
        T.func_attr({"tirx.noalias": True})
        for c in T.parallel(threads):
            acc = T.decl_buffer((128,), "float32")
            for v in T.vectorized(128):
                acc[v] = T.float32(0)
            for i in range(chunk):
                for u in T.unroll(8):
                    for v in T.vectorized(16):
                        acc[u * 16 + v] = acc[u * 16 + v] + blob[(c * chunk + i) * 128 + u * 16 + v]
            for v in range(128):
                part[c * 128 + v] = acc[v]

    return f


def _input(torch, k, s, td, g):
    x = torch.randn(1, k, generator=g)
    x[0, torch.randperm(k, generator=g)[:round(s * k)]] = 0
    return x.to(td)


def _matmul(np, w):
    """``([node], initializers, N, K)``: ONNX MatMul of x by W^T."""
    from onnx import helper, numpy_helper

    return ([helper.make_node("MatMul", ["x", "wt"], ["y"])],
            [numpy_helper.from_array(np.ascontiguousarray(w.float().numpy().T), "wt")], *w.shape)


def _matmul_nbits(np, torch, w, bits, group, offsets=False):
    """``com.microsoft.MatMulNBits`` of the same round-to-nearest weights (zero point 2^(bits-1), ORT's default: the
    ``quantize`` pass's symmetric values + 2^(bits-1); with ``offsets``, plus the offsets' term as the export writes
    it: x's group sums times the transposed offsets), or None when this ONNX Runtime has no such kernel."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from sparsec.backends.onnxruntime.nbits import pack
    from sparsec.passes.quantize import quantize_weight

    if bits == 8 and tuple(int(v) for v in ort.__version__.split(".")[:2]) < (1, 20):
        return None
    n, k = w.shape
    q, scale, offset = quantize_weight(w.float(), bits, group, torch.float32, symmetric=not offsets)
    blob, scales = pack(q.numpy(), scale.numpy(), bits, group, group)  # the export's packing (int4: q as it is)
    inits = [numpy_helper.from_array(blob, "wq"), numpy_helper.from_array(scales, "scales")]
    nodes = [helper.make_node("MatMulNBits", ["x", "wq", "scales"], ["y0" if offsets else "y"], domain="com.microsoft",
                              K=k, N=n, bits=bits, block_size=group)]
    if offsets:
        inits += [numpy_helper.from_array(np.array([1, k // group, group], dtype=np.int64), "groups"),
                  numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes"),
                  numpy_helper.from_array(np.ascontiguousarray(offset.numpy().T), "offsets_t")]
        nodes += [helper.make_node("Reshape", ["x", "groups"], ["xg"]),
                  helper.make_node("ReduceSum", ["xg", "axes"], ["xs"], keepdims=0),
                  helper.make_node("MatMul", ["xs", "offsets_t"], ["yo"]), helper.make_node("Add", ["y0", "yo"], ["y"])]
    return nodes, inits, n, k


def _ort(np, flush, graph_node, xs, rounds, threads):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    nodes, initializers, n, k = graph_node
    graph = helper.make_graph(nodes, "gemv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(
        "com.microsoft", 1)])
    model.ir_version = 10  # ORT rejects the IR version onnx's helper writes
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feeds = [x.float().numpy() for x in xs]
    times = []
    for r in range(rounds):
        flush.sum()
        t = time.perf_counter()
        sess.run(None, {"x": feeds[r % len(feeds)]})
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def table_ms(rows):
    head = ("| W (K×N format, MB) | torch F.linear (fp32) | ORT MatMul (MatMulNBits) | TVM dense | read W | sparsec sparse at s = "
            + " / ".join(f"{s:g}" for s in SPARSITIES) + " | bound at s=0.5 |")
    out = [head, "|" + "---|" * 7]
    for r in rows:
        ms = r["ms"]
        ort = f"{ms['ORT MatMul']:.2f}" if "ORT MatMul" in ms else "–"
        sp = " / ".join(f"{ms[f'sparse@{s:g}']:.2f}" for s in SPARSITIES)
        read = f"{ms['read W']:.2f} ({r['mb'] / ms['read W']:.1f} GB/s)"
        out.append(f"| {r['k']}×{r['n']} {r['dtype']} ({r['mb']:.0f}) | {ms['torch F.linear']:.2f} | {ort} |"
                   f" {ms['tvm dense']:.2f} | {read} | {sp} | {0.5 * ms['read W']:.2f} |")
    return "Median ms per call:\n\n" + "\n".join(out)


def table_speedup(rows):
    out = ["| W | fastest dense | speedup at s = " + " / ".join(f"{s:g}" for s in SPARSITIES)
           + " | s=0.5: time / bound |", "|---|---|---|---|"]
    for r in rows:
        ms = r["ms"]
        same_bits = ("ORT MatMul", "tvm dense") if quantized_format(r["dtype"]) else (
            "torch F.linear", "ORT MatMul", "tvm dense")
        peers = {k: v for k, v in ms.items() if k in same_bits}
        best = min(peers, key=peers.get)
        sp = " / ".join(f"{peers[best] / ms[f'sparse@{s:g}']:.2f}" for s in SPARSITIES)
        out.append(f"| {r['k']}×{r['n']} {r['dtype']} | {peers[best]:.2f} ms ({best}) | {sp} |"
                   f" {ms['sparse@0.5'] / (0.5 * ms['read W']):.2f} |")
    return ("Speedup of sparsec sparse over the fastest dense peer of the same run (ideal 1/(1-s) = 1 / 1.33 / 2 / 4"
            " / 10; a quantized format's peers are of the same bits), and the sparse time at s=0.5 over the bandwidth"
            " bound of the packed bytes (1.00 = at the bound):\n\n"
            + "\n".join(out))


if __name__ == "__main__":
    sys.exit(main())
