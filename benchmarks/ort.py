"""ONNX Runtime: sparsec's sparse formulations vs dense ORT, batch-1 decode.

All in one run, ORT intra-op threads = 2, medians of interleaved repetitions:
1. the Llama MLP shapes (4096x11008 and 11008x4096 fp32, batch 1) at sparsity 0.5 and 0.9: dense ORT MatMul on the
   masked input vs SparseLinear (custom op) on the raw input vs the standard-op gather formulation on the raw input
   (its thresholding included; random weights; each repetition takes the next of 4 inputs with that exact fraction
   of zeros at random positions, so the active weight rows change as in decoding);
2. the real Gemma 3 270M (builtin:gemma3-270m): time per token of a one-token forward (batch 1, sequence 1, all
   18 blocks and the 262144x640 LM head; artifacts are captured with use_cache=False, so there is no KV cache and
   the token attends to itself only) of the dense model's ONNX vs the model after teal sparsity 0.5 exported with
   `--sparse-kernel none`, `auto` and `gather`, and which kernel the measured choice gave each thresholded linear.
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
KERNELS = ("dense", "sparse", "gather")


def mlp_rows(reps: int) -> list[tuple]:
    from sparsec.backends.onnxruntime.sparse import time_linear

    rows = []
    for k, n in [(4096, 11008), (11008, 4096)]:
        for s in (0.5, 0.9):
            timed = time_linear(k, n, s, threads=THREADS, reps=reps, kernels=KERNELS)
            rows.append((f"{k}x{n}", s, timed))
            print(f"  {k}x{n} sparsity {s}: " + ", ".join(f"{kind} {t * 1e3:.2f} ms" for kind, t in timed.items()),
                  flush=True)
    return rows


def gemma_rows(reps: int, workdir: str) -> dict:
    import torch

    import sparsec
    from sparsec import frontend
    from sparsec.backends.onnxruntime import onnx_session

    t0 = time.perf_counter()
    dense_program = frontend.capture(frontend.load_model("builtin:gemma3-270m")).program
    result = sparsec.transform("builtin:gemma3-270m", "teal{sparsity=0.5}", calib_samples=8, heldout_samples=0,
                               measure=False)
    print(f"  capture and teal transform {time.perf_counter() - t0:.0f} s", flush=True)
    exports = {"dense model": (dense_program, "none"), "teal none": (result, "none"),
               "teal auto": (result, "auto"), "teal gather": (result, "gather")}
    paths, infos = {}, {}
    for name, (source, mode) in exports.items():
        paths[name] = os.path.join(workdir, name.replace(" ", "-") + ".onnx")
        t0 = time.perf_counter()
        infos[name] = sparsec.export_onnx(source, paths[name], sparse_kernel=mode, external_data=True).sparse_kernel
        print(f"  export {name} {time.perf_counter() - t0:.0f} s", flush=True)
    sessions = {name: onnx_session(p, threads=THREADS) for name, p in paths.items()}
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, 262144, (1, 1), generator=g).numpy() for _ in range(4)]
    names = [i.name for i in sessions["teal none"].get_inputs()]
    feeds = [{k: (t if k == "input_ids" else np.ones_like(t)) for k in names} for t in tokens]
    times = {name: [] for name in sessions}
    outs = {}
    for r in range(reps + 1):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            outs[name] = s.run(None, feeds[r % len(feeds)])[0]
            if r:
                times[name].append(time.perf_counter() - t0)
    layers = infos["teal auto"]["layers"]
    return {"ms": {name: statistics.median(ts) * 1e3 for name, ts in times.items()},
            "auto": {kind: sum(e["kernel"] == kind for e in layers) for kind in KERNELS}, "layers": len(layers),
            "max_abs": {name: float(np.abs(outs[name] - outs["teal none"]).max())
                        for name in ("teal auto", "teal gather")}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=31)
    ap.add_argument("--skip-gemma", action="store_true")
    args = ap.parse_args()
    from sparsec.backends.onnxruntime.kernels import library_path

    if library_path() is None:
        sys.exit("no C++ compiler: the sparse kernels cannot be built")
    start = time.perf_counter()
    print("Llama MLP shapes, batch 1 (dense ORT MatMul vs SparseLinear vs standard-op gather):", flush=True)
    rows = mlp_rows(args.reps)
    gemma = None
    if not args.skip_gemma:
        print("Gemma 3 270M, one-token forward:", flush=True)
        with tempfile.TemporaryDirectory() as d:
            gemma = gemma_rows(args.reps, d)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    lines = ["| Llama MLP, batch 1, fp32 | sparsity | dense ORT | SparseLinear | speed-up | standard-op gather |"
             " speed-up | goal |", "|---|---|---|---|---|---|---|---|"]
    for shape, s, t in rows:
        goal = "> 1x" if s == 0.5 else ">= 3x"
        lines.append(f"| {shape} | {s} | {t['dense'] * 1e3:.2f} ms | {t['sparse'] * 1e3:.2f} ms |"
                     f" {t['dense'] / t['sparse']:.2f}x | {t['gather'] * 1e3:.2f} ms | {t['dense'] / t['gather']:.2f}x"
                     f" | {goal} |")
    if gemma:
        ms = gemma["ms"]
        auto = gemma["auto"]
        lines += ["", "| Gemma 3 270M, one-token forward, batch 1 | ms per token | vs dense model |", "|---|---|---|"]
        labels = {"dense model": "dense model (no pass), standard ops",
                  "teal none": "teal 0.5, `--sparse-kernel none` (thresholds as standard ops)",
                  "teal auto": f"teal 0.5, `--sparse-kernel auto` ({auto['sparse']} SparseLinear, {auto['gather']}"
                               f" gather, {auto['dense']} dense of {gemma['layers']})",
                  "teal gather": "teal 0.5, `--sparse-kernel gather` (standard ops only)"}
        for name, label in labels.items():
            lines.append(f"| {label} | {ms[name]:.1f} | {ms['dense model'] / ms[name]:.2f}x |")
    table = "\n".join(lines)
    print()
    print(table)
    if gemma:
        print("Gemma: max abs difference of the logits vs the teal `none` export: "
              + ", ".join(f"{name} {v:.2g}" for name, v in gemma["max_abs"].items()))
    print(f"peak RSS: {peak / 2**30:.2f} GiB; ORT intra-op threads: {THREADS}; {os.cpu_count()} CPUs;"
          f" {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
