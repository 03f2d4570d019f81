"""What ``sparsec.load_compiled(BUILD)(inputs)`` costs over the bare VM call, in one process.

For each shape, a one-layer model ``Linear(K, N)`` after ``teal{sparsity=0.5 scope=all}`` is compiled; then, round-robin
(interleaved repetitions, medians): the bare VM call on a prepared TVM tensor, ``compiled({"input": x})`` with a torch
tensor and with a numpy array, one token (``x [1, K]``). Reported: each median, and the median of the paired
differences call - bare (the overhead); also the floor any wrapper pays, the bare call with the input and output
converted through DLPack (``from_dlpack`` of the torch tensor in, torch's ``from_dlpack`` of the output out). Two
regimes: a layer whose weights stay in the caches (Gemma 3 270M's
640x2048) and one whose 90 MB of weights flush them (4096x11008): after such a call every Python object and every
line of code the wrapper touches comes from memory, so the same wrapper costs several times more there.

    .venv/bin/python benchmarks/call_overhead.py --shapes 640x2048,4096x11008 --out benchmarks/results/call_overhead.md
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import peers  # noqa: E402


def measure(k: int, n: int, reps: int) -> dict:
    import numpy as np
    import torch

    import sparsec

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(k, n)).eval()

    def loop(m):
        for _ in range(4):
            m(torch.randn(8, k))

    result = sparsec.transform(model, "teal{sparsity=0.5 scope=all}", example_inputs=(torch.randn(2, k),),
                               forward_loop=loop, measure=False)
    with tempfile.TemporaryDirectory() as tmp:
        sparsec.compile(result, f"{tmp}/build")
        compiled = sparsec.load_compiled(f"{tmp}/build")
    import tvm

    x = torch.randn(1, k)
    xn = x.numpy().copy()
    bare_input = tvm.runtime.from_dlpack(x.clone())
    main, params = compiled.vm["main"], compiled.params
    from torch.utils.dlpack import from_dlpack

    def converted():
        [from_dlpack(o.__dlpack__()) for o in main(tvm.runtime.from_dlpack(x), *params)]

    calls = {"bare VM call": lambda: main(bare_input, *params), "DLPack in and out": converted,
             "torch input": lambda: compiled({"input": x}), "numpy input": lambda: compiled({"input": xn})}
    for f in calls.values():
        f()
    times = {name: [] for name in calls}
    for _ in range(reps):
        for name, f in calls.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    bare = times["bare VM call"]
    return {"shape": f"{k}x{n}", "MB": k * n * 4 / 1e6,
            **{name: statistics.median(v) * 1e6 for name, v in times.items()},
            **{f"{name} overhead": statistics.median(a - b for a, b in zip(v, bare)) * 1e6
               for name, v in times.items() if name != "bare VM call"}}


def main(argv=None) -> None:
    from sparsec.backends.tvm.env import import_tvm

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="640x2048,4096x11008", help="KxN, comma-separated")
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--out", help="write the markdown table here too")
    args = p.parse_args(argv)
    import_tvm()
    rows = [measure(*map(int, s.split("x")), args.reps) for s in args.shapes.split(",")]
    lines = [f"CPU: {peers.cpu_description()['summary']}.", "",
             "| W (K×N, fp32 MB) | bare VM call µs | + DLPack in and out µs | torch input µs | overhead µs"
             " | numpy input µs | overhead µs |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} ({r['MB']:.0f}) | {r['bare VM call']:.0f} |"
                     f" {r['DLPack in and out overhead']:.0f} | {r['torch input']:.0f} |"
                     f" {r['torch input overhead']:.0f} | {r['numpy input']:.0f} | {r['numpy input overhead']:.0f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("# load_compiled(BUILD)(inputs) against the bare VM call\n\n`" +
                    "python benchmarks/call_overhead.py --shapes " + args.shapes + "`\n\n" + text + "\n")


if __name__ == "__main__":
    main()
