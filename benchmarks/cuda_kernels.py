"""Batch-1 linear layers on an NVIDIA GPU: sparsec's CUDA sparse kernels against cuBLAS, at several input sparsities.

Two steps, so the GPU machine needs neither TVM's compiler nor LLVM:
  build  (any machine with nvcc): generates every kernel variant (:mod:`sparsec.backends.tvm.cuda`, sm_90 by
         default), compiles them into one library ``DIR/kernels.so`` and writes ``DIR/manifest.json``.
  run    (the GPU machine; TVM's runtime libraries, ``TVM_USE_RUNTIME_LIB=1``): for each weight shape (K inputs x N
         outputs) and format, packs random weights (``quantize_weight``'s round-to-nearest for int8 / int4), checks
         one call against a float64 reference, then times
           * sparsec CUDA sparse at sparsity 0 / .5 / .9 (exactly round(s*K) zeros at random positions), for each
             schedule built (split-K factor x unroll; the table keeps the fastest at s = .5 and lists all of them
             below it);
           * cuBLAS ``F.linear`` fp32 (TF32 off) and fp16, x [1, K] @ W[N, K]^T.
         Timing: each variant's calls are captured in a CUDA graph (TVM's launches go to the capturing stream through
         ``tvm_ffi.use_torch_stream``) cycling through 8 inputs and enough weight copies that they are >= 4x the L2
         (so each call reads its weights from HBM), replayed 10 times between CUDA events; per-call time = median
         replay / calls. The bound is the weight bytes without padding (weights + scales (+ offsets)) x (1 - s) over
         the read bandwidth measured at the start (``torch.sum`` over 4 GiB).
Formats: float32, float16, int8 (per output channel, fp32 scales), int4g32s16 (a fp16 scale per 32 inputs),
int4g32s16o (and a fp16 offset per group: ``quantize{symmetric=false}``); names as in benchmarks/kernels.py.
Usage: python benchmarks/cuda_kernels.py build --out DIR [--shapes 4096x11008,...] [--formats ...] [--splits 64,128]
       [--unrolls 1,4]
       python benchmarks/cuda_kernels.py run --lib DIR [--markdown FILE] [--json FILE]
"""
import argparse
import ctypes
import glob
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SHAPES = "4096x11008,11008x4096,2048x5632,5632x2048,640x2048,2048x640"
FORMATS = "float32,float16,int8,int4g32s16,int4g32s16o"
SPARSITIES = (0.0, 0.5, 0.9)
L2_MULTIPLE = 4  # weight copies cycled through per graph: at least this many L2s of bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="step", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", required=True)
    b.add_argument("--shapes", default=SHAPES)
    b.add_argument("--formats", default=FORMATS)
    b.add_argument("--splits", default="64,128,256", help="split-K factors to build (blocks along K)")
    b.add_argument("--unrolls", default="1,4",
                   help="unroll factors: rows whose weights a thread loads before using any")
    b.add_argument("--arch", default="sm_90")
    r = sub.add_parser("run")
    r.add_argument("--lib", required=True)
    r.add_argument("--markdown", metavar="FILE")
    r.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    (build if args.step == "build" else run)(args)


def schedule_name(splits, unroll):
    return f"ks{splits}u{unroll}"


def build(args):
    import tvm

    from benchmarks.kernels import quantized_format
    from sparsec.backends.tvm.cuda import cuda_linear_kernel, cuda_quantized_kernel, cuda_target

    funcs, manifest = {}, []
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        for fmt in args.formats.split(","):
            for splits, unroll in itertools.product(*(map(int, a.split(",")) for a in (args.splits, args.unrolls))):
                q = quantized_format(fmt)
                if q is None:
                    f = cuda_linear_kernel(k, n, fmt, threshold=True, splits=splits, unroll=unroll)
                else:
                    bits, group, scales, offsets = q
                    f = cuda_quantized_kernel(k, n, bits, group, threshold=True, scale_dtype=scales, offsets=offsets,
                                              splits=splits, unroll=unroll)
                name = f"k{k}_n{n}_{fmt}_{schedule_name(splits, unroll)}"
                funcs[name] = f.with_attr("global_symbol", name)
                manifest.append(dict(name=name, k=k, n=n, format=fmt, splits=splits, unroll=unroll))
    t0 = time.perf_counter()
    lib = tvm.compile(tvm.IRModule(funcs), cuda_target(args.arch))
    os.makedirs(args.out, exist_ok=True)
    lib.export_library(os.path.join(args.out, "kernels.so"))
    with open(os.path.join(args.out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(dict(arch=args.arch, kernels=manifest), f, indent=1)
    print(f"{len(funcs)} kernels for {args.arch} in {time.perf_counter() - t0:.0f} s -> {args.out}")


def _load_runtime(arch):
    """TVM's runtime (no compiler) with its CUDA module loader; libcudart from the CUDA toolkit or a pip wheel. A
    library holds its kernels as CUDA source, compiled when loaded: here by nvcc for ``arch`` (TVM's own callback
    needs the compiler's target registry)."""
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    for pattern in ("/usr/local/cuda*/lib64/libcudart.so.13*", *(os.path.join(p, "nvidia/cu13/lib/libcudart.so.13*")
                                                                  for p in sys.path)):
        found = sorted(glob.glob(pattern))
        if found:
            ctypes.CDLL(found[0], mode=ctypes.RTLD_GLOBAL)
            break
    import tvm

    ctypes.CDLL(os.path.join(os.path.dirname(tvm.__file__), "lib", "libtvm_runtime_cuda.so"), mode=ctypes.RTLD_GLOBAL)
    import tvm.support.nvcc  # noqa: F401  registers TVM's callback, replaced below
    import tvm_ffi

    def compile_cuda(code):
        with tempfile.TemporaryDirectory() as tmp:
            src, out = os.path.join(tmp, "kernels.cu"), os.path.join(tmp, "kernels.cubin")
            with open(src, "w", encoding="utf-8") as f:
                f.write(code)
            subprocess.run(["nvcc", "-cubin", "-O3", f"-arch={arch}", "-o", out, src], check=True)
            with open(out, "rb") as f:
                return f.read()

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)
    return tvm


def _weights(torch, k, n, fmt, g):
    """``(pack, dequantized fp64 weights [N, K], bytes, x dtype)`` for random weights in format ``fmt``: ``pack(
    splits=, unroll=)`` -> the kernel's weight operands on the GPU; bytes: the weights' (+ scales', offsets') without
    padding."""
    from benchmarks.kernels import quantized_format
    from sparsec.backends.tvm.cuda import pack_quantized_cuda, pack_weight_cuda
    from sparsec.ops import DEQUANTIZE
    from sparsec.passes.quantize import quantize_weight

    w = torch.randn(n, k, generator=g) / k ** 0.5
    q = quantized_format(fmt)
    if q is None:
        w = w.to(getattr(torch, fmt))
        return (lambda **schedule: [pack_weight_cuda(w, **schedule).cuda()]), w.double(), _nbytes([w]), fmt
    bits, group, scales, offsets = q
    if offsets:
        w += 0.02  # off-centre weights, so the offsets' term is not ~0
    qw, s, o = quantize_weight(w, bits, group, getattr(torch, scales), symmetric=not offsets)
    return (lambda **schedule: [t.cuda() for t in pack_quantized_cuda(qw, s, bits, group, offset=o, **schedule)],
            DEQUANTIZE(qw, s, bits, group, torch.float32, o).double(), _nbytes([qw, s, o]), "float32")


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _inputs(torch, k, s, dtype, count, g):
    """``count`` inputs [1, K] on the GPU, each with exactly round(s*K) zeros (benchmarks/kernels.py's)."""
    from benchmarks.kernels import _input

    return [_input(torch, k, s, getattr(torch, dtype), g).cuda() for _ in range(count)]


def _graph_time(torch, tvm_ffi, calls, replays=10):
    """Median per-call µs of ``calls`` (thunks) captured in one CUDA graph, replayed ``replays`` times."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), tvm_ffi.use_torch_stream():
        for c in calls[:2]:  # warm-up on the capturing stream: module load, workspace pool
            c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with tvm_ffi.use_torch_stream(torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local")):
            for c in calls:
                c()
    except RuntimeError as exc:  # fall back to timing the launches from Python (launch-bound for small layers)
        print(f"CUDA graph capture failed ({str(exc).splitlines()[0]}): timing a Python loop", flush=True)
        graph = None
    times = []
    for _ in range(replays + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if graph is None:
            for c in calls:
                c()
        else:
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times[2:])


def _copies(nbytes, l2):
    return max(1, min(512, -(-L2_MULTIPLE * l2 // nbytes)))


def run(args):
    with open(os.path.join(args.lib, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    tvm = _load_runtime(manifest["arch"])
    import torch
    import tvm_ffi

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    lib = tvm.runtime.load_module(os.path.join(args.lib, "kernels.so"))
    props = torch.cuda.get_device_properties(0)
    l2 = props.L2_cache_size
    blob = torch.ones(1 << 30, device="cuda")  # 4 GiB
    blob.sum()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reads = []
    for _ in range(10):
        start.record()
        blob.sum()
        end.record()
        end.synchronize()
        reads.append(blob.numel() * 4 / (start.elapsed_time(end) * 1e-3))
    bandwidth = statistics.median(reads)
    del blob
    head = (f"GPU: {props.name}, {props.multi_processor_count} SMs, L2 {l2 >> 20} MiB, {props.total_memory >> 30} GiB;"
            f" driver CUDA {torch.version.cuda}, torch {torch.__version__}, kernels built for {manifest['arch']};"
            f" read bandwidth (torch.sum over 4 GiB) {bandwidth / 1e9:.0f} GB/s")
    print(head, flush=True)
    g = torch.Generator().manual_seed(0)
    by_layer = {}
    for entry in manifest["kernels"]:
        by_layer.setdefault((entry["k"], entry["n"], entry["format"]), []).append(entry)
    rows, peers = [], {}
    for (k, n, fmt), entries in by_layer.items():
        pack, weight, nbytes, xdtype = _weights(torch, k, n, fmt, g)
        weight = weight.cuda()
        bias = torch.randn(n, generator=g).to(getattr(torch, xdtype)).cuda()
        thr = torch.zeros(1, dtype=getattr(torch, xdtype), device="cuda")
        row = dict(k=k, n=n, format=fmt, bytes=nbytes, variants={})
        for entry in entries:
            kernel = lib[entry["name"]]
            schedule = dict(splits=entry["splits"], unroll=entry["unroll"])
            ops = pack(**schedule)
            copies = [ops] + [[t.clone() for t in ops] for _ in range(_copies(_nbytes(ops), l2) - 1)]
            x = _inputs(torch, k, 0.5, xdtype, 1, g)[0]
            y = torch.full((1, n), float("nan"), dtype=getattr(torch, xdtype), device="cuda")
            kernel(x, *ops, thr, bias, y)
            want = x.double() @ weight.T + bias.double()
            err = float((y.double() - want).abs().max() / want.abs().max())
            times = {}
            for s in SPARSITIES:
                xs = _inputs(torch, k, s, xdtype, 8, g)
                ys = [torch.empty(1, n, dtype=y.dtype, device="cuda") for _ in xs]
                calls = [lambda i=i: kernel(xs[i % 8], *copies[i % len(copies)], thr, bias, ys[i % 8])
                         for i in range(max(64, len(copies)))]
                times[s] = _graph_time(torch, tvm_ffi, calls)
            row["variants"][schedule_name(**schedule)] = dict(us=times, rel_err=err)
            print(f"{k}x{n} {fmt} {schedule_name(**schedule)}: " + ", ".join(
                f"s={s} {t:.1f} us" for s, t in times.items()) + f"; max |err| / max |y| {err:.1e}", flush=True)
            del copies, ops
        rows.append(row)
        for dtype in ("float32", "float16"):
            if (k, n, dtype) not in peers:
                td = getattr(torch, dtype)
                w = (torch.randn(n, k, generator=g) / k ** 0.5).to(td).cuda()
                ws = [w] + [w.clone() for _ in range(_copies(_nbytes([w]), l2) - 1)]
                xs = _inputs(torch, k, 0.0, dtype, 8, g)
                calls = [lambda i=i: torch.nn.functional.linear(xs[i % 8], ws[i % len(ws)])
                         for i in range(max(64, len(ws)))]
                peers[(k, n, dtype)] = _graph_time(torch, tvm_ffi, calls)
                del ws
    text = "\n".join([head, "", table(rows, peers, bandwidth), "", table_schedules(rows)])
    print("\n" + text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(head=head, bandwidth=bandwidth, rows=rows,
                           peers={f"{k}x{n} {d}": t for (k, n, d), t in peers.items()}), f, indent=1)


def _best(row):
    return min(row["variants"], key=lambda ks: row["variants"][ks]["us"][0.5])


def table(rows, peers, bandwidth):
    lines = ["| K x N | format | schedule | s=0 µs | s=.5 µs | s=.9 µs | bound s=.5 µs | of bound | vs cuBLAS fp32 /"
             " fp16 (s=.5) | s=.5 vs own s=0 | max rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ks = _best(r)
        us, err = r["variants"][ks]["us"], r["variants"][ks]["rel_err"]
        bound = r["bytes"] * 0.5 / bandwidth * 1e6
        f32, f16 = peers[(r["k"], r["n"], "float32")], peers[(r["k"], r["n"], "float16")]
        lines.append(f"| {r['k']}x{r['n']} | {r['format']} | {ks} | {us[0.0]:.1f} | {us[0.5]:.1f} | {us[0.9]:.1f} |"
                     f" {bound:.1f} | {bound / us[0.5]:.0%} | {f32 / us[0.5]:.2f}x / {f16 / us[0.5]:.2f}x |"
                     f" {us[0.0] / us[0.5]:.2f}x | {err:.1e} |")
    shapes = sorted({(r["k"], r["n"]) for r in rows}, key=lambda s: -s[0] * s[1])
    lines += ["", "cuBLAS (torch F.linear, x [1, K]): " + "; ".join(
        f"{k}x{n} fp32 {peers[(k, n, 'float32')]:.1f} µs, fp16 {peers[(k, n, 'float16')]:.1f} µs" for k, n in shapes)]
    return "\n".join(lines)


def table_schedules(rows):
    names = list(dict.fromkeys(name for r in rows for name in r["variants"]))
    lines = ["µs at s = .5 by schedule (ks: split-K blocks, u: rows a thread loads at once):", "",
             "| K x N | format | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for r in rows:
        lines.append(f"| {r['k']}x{r['n']} | {r['format']} | " + " | ".join(
            f"{r['variants'][s]['us'][0.5]:.1f}" if s in r["variants"] else "-" for s in names) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
