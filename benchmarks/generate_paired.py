"""Decode speed of two generators in alternating bursts: each peer in its own long-lived process, asked in turn.

    PYTHONPATH=. .venv/bin/python benchmarks/generate_paired.py --model tinyllama --context 128 \\
        --peers sparsec-tvm@0.5,llamacpp-f32 [--bursts 16] [--burst-steps 8] [--tune-seconds 3] [--json FILE]

``benchmarks/generate.py`` runs its rows one after another, each for 10-60 s; on a VM whose read speed moves
between states within minutes (the Zen 4 machine of benchmarks/results/generate.md: 50 or 73 ms/token for the same
build, minutes apart), a row's state decides its ratio. Here both peers load their model once (the same models,
artifacts, builds, GGUFs and prompt as generate.py's rows: ``sparsec-*`` rows of generate.py's names, ``llamacpp-*``
GGUFs), prefill the prompt and wait; the coordinator then asks each in turn (the order reversed every other burst)
for ``--burst-steps`` greedy decode steps, each step timed as generate.py times one (the step and its argmax). A
peer prefills again, untimed, when its next burst would go past the prompt plus ``--new-tokens`` (default 128 at a
context under 512, else 32). Reported: each peer's median step over all bursts, and the ratio of the two peers'
burst medians per pair of adjacent bursts (median, min, max), which a change of the machine's state moves less
than it moves either peer.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
import peers  # noqa: E402  (stdlib imports only: the peers' own Python runs this file too)

THREADS = peers.THREADS


def _sparsec_worker(model: str, prompt: list[int], limit: int):
    """``(prefill, step)`` callables of a sparsec build (``prefill()`` resets; ``step()`` decodes one token)."""
    import torch

    from sparsec.generation import open_stepper

    torch.set_num_threads(THREADS)
    stepper, _ = open_stepper(model, threads=THREADS)
    ids, step_in, state = torch.tensor([prompt]), torch.empty(1, 1, dtype=torch.long), {}

    def prefill():
        stepper.reset()
        state["token"] = int(stepper.step(ids).argmax())

    def step():
        step_in[0, 0] = state["token"]
        state["token"] = int(stepper.step(step_in).argmax())

    return prefill, step


def _llamacpp_worker(model: str, prompt: list[int], limit: int):
    llm, argmax = peers.llamacpp_model(model, limit)
    state = {}

    def prefill():
        llm.reset()
        llm.eval(prompt)
        state["token"] = argmax()

    def step():
        llm.eval([state["token"]])
        state["token"] = argmax()

    return prefill, step


def worker(kind: str, model: str, prompt: list[int], new_tokens: int) -> None:
    """Load, prefill, print ``ready``; then per line ``N`` on stdin decode N tokens and print their step times (ms,
    JSON), prefilling first (untimed) when they would go past the prompt plus ``new_tokens``."""
    make = _sparsec_worker if kind == "sparsec" else _llamacpp_worker
    prefill, step = make(model, prompt, len(prompt) + new_tokens)
    prefill()
    done = 0
    print("ready", flush=True)
    for line in sys.stdin:
        n = int(line)
        if done + n > new_tokens:
            prefill()
            done = 0
        times = []
        for _ in range(n):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        done += n
        print(json.dumps(times), flush=True)


def _start(peer: str, path, prompt, new_tokens: int) -> subprocess.Popen:
    """The worker process of ``peer``, loaded and prefilled (``ready`` read)."""
    import generate

    if peer.startswith("llamacpp-"):
        python, kind, model = peers.peers_python(), "llamacpp", peers.gguf_file(path, peer.split("-", 1)[1].upper())
    else:
        python, kind = sys.executable, "sparsec"
        model = generate.prepared(peer, path, generate._max_context(len(prompt), new_tokens))
    env = dict(peers.child_env(), PYTHONPATH=os.pathsep.join([str(HERE.parent.parent),
                                                               os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([str(python), str(HERE), "--worker", json.dumps(
        {"kind": kind, "model": str(model), "prompt": list(prompt), "new_tokens": new_tokens})],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"{peer}: the worker failed to start (exit {proc.wait()})")
    return proc


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tinyllama")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=0, help="decode steps per prefill (0: 128, or 32 from 512 on)")
    p.add_argument("--peers", default="sparsec-tvm@0.5,llamacpp-f32", help="two peers, generate.py's names")
    p.add_argument("--bursts", type=int, default=16, help="bursts per peer")
    p.add_argument("--burst-steps", type=int, default=8)
    p.add_argument("--tune-seconds", type=float, default=0.0, help="as generate.py's (which sparsec build)")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    import generate

    os.environ[generate.TUNE_ENV] = str(args.tune_seconds)
    names = args.peers.split(",")
    if len(names) != 2:
        p.error(f"--peers names two peers, got {len(names)}")
    new_tokens = args.new_tokens or (128 if args.context < 512 else 32)
    if new_tokens % args.burst_steps:
        p.error(f"--burst-steps {args.burst_steps} does not divide the {new_tokens} steps per prefill")
    path = peers.model_dir(args.model)
    prompt = peers.prompt_ids(path, args.context)
    cpu = peers.cpu_description()
    procs = {name: _start(name, path, prompt, new_tokens) for name in names}
    bursts = {name: [] for name in names}
    try:
        for b in range(args.bursts):
            for name in (names if b % 2 == 0 else names[::-1]):
                procs[name].stdin.write(f"{args.burst_steps}\n")
                procs[name].stdin.flush()
                bursts[name].append(json.loads(procs[name].stdout.readline()))
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
    medians = {name: [statistics.median(t) for t in bursts[name]] for name in names}
    a, b = names
    ratios = [y / x for x, y in zip(medians[a], medians[b])]  # b's step over a's: a's speed-up
    result = {"cpu": cpu, "model": args.model, "context": args.context, "burst_steps": args.burst_steps,
              "peers": {name: {"decode_ms": statistics.median([s for t in bursts[name] for s in t]),
                               "burst_medians_ms": medians[name]} for name in names},
              "speedup": {"of": a, "over": b, "median": statistics.median(ratios), "min": min(ratios),
                          "max": max(ratios), "per_burst": ratios}}
    print(f"{cpu['summary']}\n`python benchmarks/generate_paired.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
    for name in names:
        r = result["peers"][name]
        print(f"- {name}: decode {r['decode_ms']:.2f} ms/token (median of {args.bursts} bursts x {args.burst_steps}"
              f" steps; burst medians {min(medians[name]):.2f}-{max(medians[name]):.2f})")
    s = result["speedup"]
    print(f"- {a} over {b}, per pair of adjacent bursts: median {s['median']:.2f}x (min {s['min']:.2f}, max"
          f" {s['max']:.2f})")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(**json.loads(sys.argv[2]))
    else:
        main()
