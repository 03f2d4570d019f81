"""Decode-step timing of the ONNX Runtime stepper (not a test): one cached artifact (teal 0.5) exported twice,
``--sparse-kernel auto`` and ``none``; per cache length, the median ms of a one-token step of each (their steps
interleaved), and the stepper's Python overhead per token (``step()`` minus ``run_with_iobinding``, ms).

    PYTHONPATH=. .venv/bin/python tests/backends/onnxruntime/bench_generate.py [--big] [--threads N] [--steps N]

``--big``: a random Llama with hidden 1024, intermediate 2816, 4 layers, 16 heads, vocab 32000 (else the zoo Llama).
"""
import argparse
import os
import statistics
import tempfile
import time

import torch

import sparsec
from sparsec.backends.onnxruntime.generate import OrtStepper
from sparsec.calibration import token_forward_loop
from tests.zoo import build

BIG = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
           num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048)


def exports(big: bool, folder: str) -> tuple[str, str, int]:
    """(sparse .onnx, dense .onnx, vocab) of the model after teal 0.5 with a KV cache."""
    import transformers as tf

    if big:
        torch.manual_seed(0)
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**BIG)).eval()
        ids = torch.randint(0, BIG["vocab_size"], (2, 12))
        example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    else:
        model, example = build("llama")
    vocab = model.config.vocab_size
    calib = token_forward_loop(torch.randint(0, vocab, (4, 128), generator=torch.Generator().manual_seed(2)))
    result = sparsec.transform(model, "teal{sparsity=0.5}", example_inputs=example, forward_loop=calib,
                               kv_cache=True, measure=False)
    art = f"{folder}/art"
    sparsec.save(result, art)
    paths = f"{folder}/sparse.onnx", f"{folder}/dense.onnx"
    info = sparsec.export_onnx(art, paths[0], sparse_kernel="auto").sparse_kernel
    print("auto kernels:", [e["kernel"] for e in info["layers"]])
    sparsec.export_onnx(art, paths[1], sparse_kernel="none")
    return *paths, vocab


def timed(stepper: OrtStepper) -> list[float]:
    """Wrap the stepper's session run; returns the list its run times (s) are appended to."""
    run, spent = stepper.session.run_with_iobinding, []

    def wrapper(binding, *args):
        start = time.perf_counter()
        run(binding, *args)
        spent.append(time.perf_counter() - start)

    stepper.session.run_with_iobinding = wrapper
    return spent


def decode(paths: dict[str, str], vocab: int, past: int, steps: int, threads: int | None) -> dict:
    """Per path: median ms of a one-token step after ``past`` cached tokens, and the median Python overhead (ms)."""
    steppers = {k: OrtStepper(p, threads=threads) for k, p in paths.items()}
    runs = {k: timed(s) for k, s in steppers.items()}
    prompt = torch.randint(0, vocab, (1, past), generator=torch.Generator().manual_seed(3))
    token = {k: torch.empty(1, 1, dtype=torch.long) for k in paths}
    for k, s in steppers.items():
        token[k][0, 0] = int(s.step(prompt).argmax())
        runs[k].clear()
    step_s: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(steps):
        for k, s in steppers.items():
            start = time.perf_counter()
            logits = s.step(token[k])
            step_s[k].append(time.perf_counter() - start)
            token[k][0, 0] = int(logits.argmax())
    return {k: {"step_ms": statistics.median(step_s[k]) * 1e3,
                "overhead_ms": statistics.median(a - b for a, b in zip(step_s[k], runs[k])) * 1e3} for k in paths}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--big", action="store_true")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--dir", help="keep the artifact and exports here (reused when there)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or tmp
        if args.dir and os.path.isfile(f"{folder}/dense.onnx"):
            vocab = BIG["vocab_size"] if args.big else 256
            sparse, dense = f"{folder}/sparse.onnx", f"{folder}/dense.onnx"
        else:
            sparse, dense, vocab = exports(args.big, folder)
        for past in (128, 1024):
            r = decode({"sparse": sparse, "dense": dense}, vocab, past, args.steps, args.threads)
            print(f"cache {past}: " + ", ".join(f"{k} {v['step_ms']:.3f} ms/token (python overhead"
                                                 f" {v['overhead_ms']:.3f} ms)" for k, v in r.items())
                  + f"; dense/sparse {r['dense']['step_ms'] / r['sparse']['step_ms']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
