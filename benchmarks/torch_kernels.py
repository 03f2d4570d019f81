"""Per-token latency in plain PyTorch: ``sparsec.accelerate`` (sparsec's TVM kernels in the linear layers) vs eager.

Model: the TinyLlama-1.1B-shaped Llama of benchmarks/decode.py (hidden 2048, intermediate 5632, vocab 32000, random
weights) with ``--llama-layers`` decoder layers, transformed with ``teal{sparsity=0.5}`` (calibration on seeded
random token ids, ``--calib-samples`` windows of ``--seq-len`` tokens). Peers, all called from torch:
  * torch eager (dense):        the Hugging Face model itself (no pass)
  * torch teal program:         ``result.module()``, the teal program as torch runs it (thresholds as torch ops)
  * accelerate (teal 0.5):      ``sparsec.accelerate(result)``: every linear on sparsec's TVM kernel, thresholds fused
  * accelerate dense:           ``sparsec.accelerate(result, sparse=False)``: the same kernels reading every row
  * TVM build (teal 0.5):       ``sparsec.compile(result)``, the whole program in TVM (the reference of decode.py)
What is timed: a one-token forward (batch 1, sequence 1, no KV cache), as in benchmarks/decode.py. Protocol: 2 threads
everywhere (TVM_NUM_THREADS, torch.set_num_threads; OPENBLAS_NUM_THREADS=1), all peers interleaved round-robin in one
process (order reversed every other round), each call on the next of 4 seeded tokens, one warm-up round, medians.
Output agreement: max |logit diff| of each peer vs the teal program (the dense model: what teal changes). Peak RSS.
With ``--linear-shapes``, also single linears (``bench_linear``): what the op costs over calling the kernel directly.
Usage: python benchmarks/torch_kernels.py [--llama-layers 1,2] [--reps 21] [--calib-samples 4] [--no-build]
       [--linear-shapes 4096x11008,11008x4096]
"""
import argparse
import os
import resource
import tempfile
import time

THREADS = 2
PEERS = ("accelerate (teal 0.5)", "accelerate dense (teal 0.5)", "torch teal program", "torch eager (dense)",
         "TVM build (teal 0.5)")


def bench(layers: int, args, workdir: str) -> dict:
    import numpy as np
    import torch

    import sparsec
    from decode import median_ms, transform  # benchmarks/decode.py: the TinyLlama-shaped model, teal, timing

    t0 = time.perf_counter()
    model, dense_program, result = transform("tinyllama", args, layers)
    del dense_program
    print(f"  capture + teal transform {time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    modules = {PEERS[0]: sparsec.accelerate(result, threads=THREADS),
               PEERS[1]: sparsec.accelerate(result, threads=THREADS, sparse=False),
               PEERS[2]: result.module()}
    print(f"  accelerate (both) {time.perf_counter() - t0:.1f} s", flush=True)
    peers = list(PEERS[:4])
    compiled = None
    if not args.no_build:
        t0 = time.perf_counter()
        sparsec.compile(result, os.path.join(workdir, "build"), threads=THREADS)
        compiled = sparsec.load_compiled(os.path.join(workdir, "build"), threads=THREADS)
        peers.append(PEERS[4])
        print(f"  TVM build {time.perf_counter() - t0:.0f} s", flush=True)

    def logits(out):
        return out[0] if isinstance(out, (tuple, list)) else out

    calls = {p: (lambda f, m=m: logits(m(**f))) for p, m in modules.items()}
    calls[PEERS[3]] = lambda f: model(**f, use_cache=False).logits
    if compiled is not None:
        calls[PEERS[4]] = lambda f: torch.from_numpy(compiled({k: v.numpy() for k, v in f.items()})["output_0"])
    g = torch.Generator().manual_seed(0)
    feeds = [{"input_ids": t, "attention_mask": torch.ones_like(t)}
             for t in (torch.randint(0, model.config.vocab_size, (1, 1), generator=g) for _ in range(4))]
    with torch.no_grad():
        ms = median_ms({p: calls[p] for p in peers}, feeds, args.reps)
        ref = calls[PEERS[2]](feeds[0])
        diff = {p: float(np.abs((calls[p](feeds[0]) - ref).numpy()).max()) for p in peers if p != PEERS[2]}
    return {"ms": ms, "diff": diff,
            "params": sum(p.numel() for p in model.parameters())}


def table(layers: int, r: dict) -> str:
    ms, acc = r["ms"], r["ms"][PEERS[0]]
    lines = [f"| TinyLlama-1.1B shape, {layers} of 22 layers, fp32, one token, 2 threads | median ms per token |"
             " time / accelerate | max abs logit diff vs the teal program |", "|---|---|---|---|"]
    for p, t in ms.items():
        d = "reference" if p == PEERS[2] else f"{r['diff'][p]:.2g}" + (" (what teal changes)" if p == PEERS[3] else "")
        lines.append(f"| {p} | {t:.1f} | {t / acc:.2f}x | {d} |")
    lines.append(f"\naccelerate (teal 0.5) is {ms[PEERS[3]] / acc:.2f}x faster than torch eager (dense) and"
                 f" {ms[PEERS[2]] / acc:.2f}x faster than the teal program in torch;"
                 f" {r['params'] / 1e6:.0f} M parameters.")
    return "\n".join(lines)


def bench_linear(k: int, n: int, reps: int) -> dict:
    """One Llama MLP linear at batch 1 with a TEAL threshold dropping half of x: torch (threshold + F.linear),
    ``sparsec::tvm_linear`` called from torch, and the same compiled kernel called directly with preallocated
    tensors (what the op adds: dispatch, the output allocation, DLPack hand-over). Medians in ms."""
    import torch
    import torch.nn.functional as F
    from decode import median_ms

    from sparsec.backends.tvm.kernels import num_tiles, pack_weight
    from sparsec.backends.tvm.torch_kernels import linear_kernel_fn
    from sparsec.ops import threshold

    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    wp, bias = pack_weight(w, tiles=num_tiles(n, THREADS)), torch.zeros(n)
    xs = [torch.randn(1, k, generator=g) for _ in range(8)]
    t = torch.tensor(0.6745)  # the median of |N(0, 1)|: about half of each x dropped
    kernel = linear_kernel_fn(k, n, "float32", "threshold", wp.shape[0])
    y, thr = torch.empty(1, n), t.reshape(1)
    calls = {"torch threshold + F.linear": lambda x: F.linear(threshold(x, t), w),
             "sparsec::tvm_linear (from torch)": lambda x: torch.ops.sparsec.tvm_linear(x, wp, bias, t, "threshold"),
             "the kernel called directly": lambda x: kernel(x, wp, thr, bias, y)}
    with torch.no_grad():
        ms = median_ms(calls, xs, reps)
        want = F.linear(threshold(xs[0], t), w)
        diff = float((calls["sparsec::tvm_linear (from torch)"](xs[0]) - want).abs().max())
    return {"ms": ms, "diff": diff}


def linear_table(shape: str, r: dict) -> str:
    ms, op = r["ms"], r["ms"]["sparsec::tvm_linear (from torch)"]
    lines = [f"| W {shape} fp32, batch 1, threshold dropping ~50 % | median ms | time / op |", "|---|---|---|"]
    lines += [f"| {c} | {t:.2f} | {t / op:.2f}x |" for c, t in ms.items()]
    lines.append(f"\nop vs torch: max abs diff {r['diff']:.2g}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-layers", default="1,2", help="decoder layer counts, comma separated")
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--calib-samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--no-build", action="store_true", help="leave out the whole-program TVM build")
    ap.add_argument("--linear-shapes", default="", help="also time single Llama MLP linears, e.g. 4096x11008,11008x4096"
                    " (K inputs x N outputs); --llama-layers '' for these alone")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(THREADS)
    os.environ["OPENBLAS_NUM_THREADS"] = "1"  # OpenBLAS threads spin after a call and slow TVM's pool
    import torch

    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    tables = []
    for shape in filter(None, args.linear_shapes.split(",")):
        k, n = (int(v) for v in shape.split("x"))
        tables.append(linear_table(shape, bench_linear(k, n, args.reps)))
        print(tables[-1], flush=True)
    for layers in (int(v) for v in filter(None, args.llama_layers.split(","))):
        print(f"TinyLlama shape, {layers} layers:", flush=True)
        with tempfile.TemporaryDirectory() as d:
            tables.append(table(layers, bench(layers, args, d)))
        print(tables[-1], flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux
    print()
    print("\n\n".join(tables))
    calib = f"teal calibration: {args.calib_samples} windows of {args.seq_len} tokens; " if args.llama_layers else ""
    print(f"\n{calib}{args.reps} reps; peak RSS:"
          f" {peak:.2f} GiB; threads: {THREADS}; {os.cpu_count()} CPUs; load average at the end"
          f" {os.getloadavg()[0]:.1f}; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
