"""Front-end costs: `sparsec --help` start-up, and torch.export capture of the real Gemma 3 270M.

Prints a table measured in this one run: `sparsec --help` wall time (median of 7 runs in fresh processes), the
model load time, capture time, and peak RSS above the loaded model during capture (psutil sampling every 5 ms);
then the rest of a `relufy` transform (pass, re-export, save). Goals (issue 2): help < 0.5 s; capture < 15 s and
< 3 GB above the loaded model.
Usage: python benchmarks/capture.py [--model builtin:gemma3-270m]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil


class PeakRSS:
    """Samples this process's resident set size in a thread; ``peak`` is the largest sample (bytes)."""

    def __init__(self, interval=0.005):
        self.proc, self.interval, self.peak, self._stop = psutil.Process(), interval, 0, threading.Event()

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def help_time(runs=7) -> float:
    exe = os.path.join(os.path.dirname(sys.executable), "sparsec")
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([exe, "--help"], check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:gemma3-270m")
    args = ap.parse_args()
    import torch

    from sparsec import api, frontend
    from sparsec.frontend import builtin_model_dir

    rows = [("sparsec --help (median of 7)", f"{help_time():.3f} s", "< 0.5 s")]
    if args.model.startswith("builtin:"):
        builtin_model_dir(args.model.split(":", 1)[1])  # one-time conversion, not part of the measurement
    proc = psutil.Process()
    t = time.perf_counter()
    loaded = frontend.load_model(args.model)
    load_s = time.perf_counter() - t
    base = proc.memory_info().rss
    with PeakRSS() as mem:
        t = time.perf_counter()
        captured = frontend.capture(loaded)
        capture_s = time.perf_counter() - t
    nodes = len(captured.program.graph.nodes)
    rows += [(f"load {args.model}", f"{load_s:.1f} s", ""),
             ("RSS of the loaded model", f"{base / 2**30:.2f} GiB", ""),
             (f"capture (torch.export, dynamic batch/seq; {nodes} nodes)", f"{capture_s:.1f} s", "< 15 s"),
             ("peak RSS above the loaded model during capture", f"{(mem.peak - base) / 2**30:.2f} GiB", "< 3 GB")]
    with PeakRSS() as mem, tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        result = api.transform(captured.program, "relufy", measure=False)
        transform_s = time.perf_counter() - t
        t = time.perf_counter()
        api.save(result, os.path.join(tmp, "out"))
        save_s = time.perf_counter() - t
    stats = result.report["passes"][0]["stats"]
    rows += [(f"relufy + re-export ({stats['replaced']} activations replaced)", f"{transform_s:.1f} s", ""),
             ("save artifact (model.pt2 + manifest with sha256)", f"{save_s:.1f} s", ""),
             ("peak RSS above the loaded model, transform + save", f"{(mem.peak - base) / 2**30:.2f} GiB", "")]
    print(f"\nsparsec front-end costs — torch {torch.__version__}, {os.cpu_count()} CPUs,"
          f" {torch.get_num_threads()} torch threads\n")
    print("| measurement | value | goal |\n|---|---|---|")
    for name, value, goal in rows:
        print(f"| {name} | {value} | {goal} |")


if __name__ == "__main__":
    main()
