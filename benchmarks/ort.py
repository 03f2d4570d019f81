"""ONNX Runtime: sparsec's sparse path (SparseLinear custom op) vs dense ORT, batch-1 decode.

All in one run, ORT intra-op threads = 2, medians of interleaved repetitions:
1. the Llama MLP shapes (4096x11008 and 11008x4096 fp32, batch 1) at sparsity 0.5 and 0.9: dense ORT MatMul on the
   masked input vs SparseLinear on the raw input (random weights; each repetition takes the next of 4 inputs with
   that exact fraction of zeros at random positions, so the active weight rows change as in decoding);
2. the real Gemma 3 270M (builtin:gemma3-270m) after teal sparsity 0.5: time per token of a one-token forward
   (batch 1, sequence 1; artifacts are captured with use_cache=False, so no KV cache) of the standard-op export
   vs the `--sparse-kernel auto` export, and how many thresholded linears the measured choice gave SparseLinear.
Peak RSS of the process is printed at the end. Goals (issue 6): sparse beats dense at 0.5; >= 3x at 0.9.
Usage: python benchmarks/ort.py [--reps 31] [--skip-gemma]
"""
import argparse
import os
import resource
import statistics
import sys
import tempfile
import time

import numpy as np

THREADS = 2


def mlp_rows(reps: int) -> list[tuple]:
    from sparsec.backends.onnxruntime.sparse import time_linear

    rows = []
    for k, n in [(4096, 11008), (11008, 4096)]:
        for s in (0.5, 0.9):
            dense, sparse = time_linear(k, n, s, threads=THREADS, reps=reps)
            rows.append((f"{k}x{n}", s, dense, sparse))
            print(f"  {k}x{n} sparsity {s}: dense {dense * 1e3:.2f} ms, sparse {sparse * 1e3:.2f} ms,"
                  f" {dense / sparse:.2f}x", flush=True)
    return rows


def gemma_row(reps: int, workdir: str) -> dict:
    import torch

    import sparsec
    from sparsec.backends.onnxruntime import onnx_session

    t0 = time.perf_counter()
    result = sparsec.transform("builtin:gemma3-270m", "teal{sparsity=0.5 calib_rounds=1}", measure=False)
    print(f"  teal transform {time.perf_counter() - t0:.0f} s", flush=True)
    paths, infos = {}, {}
    for mode in ("none", "auto"):
        paths[mode] = os.path.join(workdir, f"gemma-{mode}.onnx")
        t0 = time.perf_counter()
        out = sparsec.export_onnx(result, paths[mode], sparse_kernel=mode, external_data=True)
        infos[mode] = out.sparse_kernel
        print(f"  export ({mode}) {time.perf_counter() - t0:.0f} s", flush=True)
    sessions = {m: onnx_session(p, threads=THREADS) for m, p in paths.items()}
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, 262144, (1, 1), generator=g).numpy() for _ in range(4)]
    names = [i.name for i in sessions["none"].get_inputs()]
    feeds = [{k: (t if k == "input_ids" else np.ones_like(t)) for k in names} for t in tokens]
    times = {m: [] for m in sessions}
    outs = {}
    for r in range(reps + 1):
        for m, s in sessions.items():
            t0 = time.perf_counter()
            outs[m] = s.run(None, feeds[r % len(feeds)])[0]
            if r:
                times[m].append(time.perf_counter() - t0)
    layers = infos["auto"]["layers"]
    return {"dense": statistics.median(times["none"]), "sparse": statistics.median(times["auto"]),
            "chosen": sum(e["kernel"] == "sparse" for e in layers), "layers": len(layers),
            "max_abs": float(np.abs(outs["none"] - outs["auto"]).max())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=31)
    ap.add_argument("--skip-gemma", action="store_true")
    args = ap.parse_args()
    from sparsec.backends.onnxruntime.kernels import library_path

    if library_path() is None:
        sys.exit("no C++ compiler: the sparse kernels cannot be built")
    print("Llama MLP shapes, batch 1 (dense ORT MatMul vs SparseLinear):", flush=True)
    rows = mlp_rows(args.reps)
    gemma = None
    if not args.skip_gemma:
        print("Gemma 3 270M, teal 0.5, one token:", flush=True)
        with tempfile.TemporaryDirectory() as d:
            gemma = gemma_row(args.reps, d)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    lines = ["| case | sparsity | dense ORT | sparse (sparsec) | speed-up | goal |", "|---|---|---|---|---|---|"]
    for shape, s, dense, sparse in rows:
        goal = "> 1x" if s == 0.5 else ">= 3x"
        lines.append(f"| Llama MLP {shape}, batch 1 | {s} | {dense * 1e3:.2f} ms | {sparse * 1e3:.2f} ms |"
                     f" {dense / sparse:.2f}x | {goal} |")
    if gemma:
        lines.append(f"| Gemma 3 270M, teal 0.5, per token (seq 1) | 0.5 | {gemma['dense'] * 1e3:.1f} ms |"
                     f" {gemma['sparse'] * 1e3:.1f} ms | {gemma['dense'] / gemma['sparse']:.2f}x | |")
    table = "\n".join(lines)
    print()
    print(table)
    if gemma:
        print(f"Gemma: SparseLinear chosen for {gemma['chosen']} of {gemma['layers']} thresholded linears;"
              f" max abs difference of the logits, sparse vs standard-op export: {gemma['max_abs']:.2g}")
    print(f"peak RSS: {peak / 2**30:.2f} GiB; ORT intra-op threads: {THREADS}; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
