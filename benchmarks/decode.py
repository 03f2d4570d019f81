"""Per-token decode latency, batch 1: sparsec TVM sparse build after teal 0.5 vs dense torch / ORT / TVM peers.

Models: (a) a Llama with TinyLlama-1.1B's shape (hidden 2048, 32 heads, 4 kv heads, intermediate 5632, vocab 32000;
random weights, seed 0) with ``--llama-layers`` of its 22 decoder layers (several counts: also
extrapolated linearly to 22), and (b) the real Gemma 3 270M
(builtin:gemma3-270m). Each is transformed with ``teal{sparsity=0.5}`` (calibration: Gemma on the built-in Wikipedia
text, the random Llama on seeded random token ids; ``--calib-samples`` windows of ``--seq-len`` tokens). Peers:
  * sparsec TVM sparse: ``sparsec.compile(teal result)``          (thresholds fused, dropped rows never read)
  * sparsec TVM dense:  ``sparsec.compile(teal result, sparse=False)`` (same program, every weight row read)
  * torch eager:        the Hugging Face model itself (dense, no pass)
  * ORT dense:          ``sparsec.export_onnx`` of the dense captured model (standard ops)
What is timed is a one-token forward: batch 1, sequence 1, no KV cache (sparsec captures with use_cache=False, so the
token attends to itself only): every weight is read once per token, as in decoding; the weights (>= 0.5 GB) are
much larger than the 32 MB L3, so no cache flush is needed between calls. Protocol (../shared/TVM.md §3.2):
2 threads everywhere (TVM_NUM_THREADS, torch.set_num_threads, ORT intra-op; OPENBLAS_NUM_THREADS=1), the torch and
TVM calls interleaved round-robin (order reversed every other round), ORT afterwards in its own block (its thread pool
spins after a call; its session is created only then, after the TVM dense build is released, so that at most three
copies of the weights are resident: 22 layers fit in 24 GB), each call on the next of 4 seeded tokens, medians.
Output agreement: max |logit diff| of the
TVM builds vs the teal program run by torch, of ORT vs torch eager (threshold ties can flip a decision, see
tests/backends/tvm/test_parity.py). Peak RSS of the process at the end.
Goal (issue 7): TinyLlama-shaped with teal 0.5 >= 1.5x faster per token than the fastest dense peer.
Usage: python benchmarks/decode.py [--models tinyllama,gemma] [--reps 21] [--llama-layers 1,4] [--calib-samples 4]
"""
import argparse
import gc
import os
import resource
import statistics
import tempfile
import time

THREADS = 2
PEERS = ("TVM sparse (teal 0.5)", "TVM dense (teal 0.5)", "torch eager (dense)", "ORT (dense)")


def median_ms(calls: dict, inputs: list, reps: int) -> dict:
    """Median milliseconds per call of each of ``calls`` (name -> fn(input)): ``reps`` + 1 rounds, the first a warm-up,
    the calls interleaved round-robin (order reversed every other round), round r on ``inputs[r % len(inputs)]``."""
    names, times = list(calls), {name: [] for name in calls}
    for r in range(reps + 1):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            calls[name](inputs[r % len(inputs)])
            if r:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) * 1e3 for name, v in times.items()}


def tinyllama(layers: int, vocab_size: int = 32000):
    """(HF model, example kwargs) of the TinyLlama-1.1B-shaped Llama with random weights (seed 0)."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=2048, num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4,
                         intermediate_size=5632, vocab_size=vocab_size, max_position_embeddings=2048)
    model = tf.LlamaForCausalLM(cfg).eval()
    model.config.use_cache = False
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def transform(name: str, args, layers: int | None):
    """(HF model, dense ExportedProgram, teal TransformResult) of model ``name``."""
    import torch

    import sparsec
    from sparsec import frontend
    from sparsec.calibration import token_forward_loop

    spec = "teal{sparsity=0.5}"
    if name == "gemma":
        loaded = frontend.load_model("builtin:gemma3-270m")
        result = sparsec.transform("builtin:gemma3-270m", spec, calib_samples=args.calib_samples,
                                   seq_len=args.seq_len, heldout_samples=0, measure=False)
    else:
        model, example = tinyllama(layers)
        loaded = frontend.load_model(model, example)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, model.config.vocab_size, (args.calib_samples, args.seq_len), generator=g)
        result = sparsec.transform(model, spec, example_inputs=example, forward_loop=token_forward_loop(ids),
                                   heldout_samples=0, measure=False)
    return loaded.module, frontend.capture(loaded).program, result


def bench_model(name: str, args, workdir: str, layers: int | None) -> dict:
    import numpy as np
    import torch

    import sparsec
    from sparsec.backends.onnxruntime import onnx_session

    t0 = time.perf_counter()
    model, dense_program, result = transform(name, args, layers)
    print(f"  capture + teal transform {time.perf_counter() - t0:.0f} s", flush=True)
    builds = {}
    for peer, sparse in ((PEERS[0], True), (PEERS[1], False)):
        t0 = time.perf_counter()
        builds[peer] = os.path.join(workdir, f"{name}-{'sparse' if sparse else 'dense'}")
        sparsec.compile(result, builds[peer], threads=THREADS, sparse=sparse)
        print(f"  compile {peer} {time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    onnx_path = os.path.join(workdir, f"{name}-dense.onnx")
    sparsec.export_onnx(dense_program, onnx_path, sparse_kernel="none", external_data=True)
    print(f"  ONNX export {time.perf_counter() - t0:.0f} s", flush=True)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    feeds = [{"input_ids": t, "attention_mask": torch.ones_like(t)}
             for t in (torch.randint(0, vocab, (1, 1), generator=g) for _ in range(4))]
    np_feeds = [{k: v.numpy() for k, v in f.items()} for f in feeds]
    with torch.no_grad():  # references on the first token, before the peers are loaded (memory: one copy at a time)
        ref = model(**feeds[0], use_cache=False).logits.numpy()
        teal_ref = result.module()(**feeds[0])
        teal_ref = (teal_ref[0] if isinstance(teal_ref, (tuple, list)) else teal_ref).numpy()
    del dense_program, result
    gc.collect()
    compiled = {peer: sparsec.load_compiled(path, threads=THREADS) for peer, path in builds.items()}
    calls = {PEERS[0]: lambda i: compiled[PEERS[0]](np_feeds[i])["output_0"],  # i: which of the 4 tokens
             PEERS[1]: lambda i: compiled[PEERS[1]](np_feeds[i])["output_0"],
             PEERS[2]: lambda i: model(**feeds[i], use_cache=False).logits}
    with torch.no_grad():
        ms = median_ms(calls, range(4), args.reps)
        diff = {p: np.abs(calls[p](0) - teal_ref).max() for p in PEERS[:2]}
        del calls, compiled  # ORT is loaded only now: one weight copy less held at any time
        gc.collect()
        session = onnx_session(onnx_path, threads=THREADS)
        names = [i.name for i in session.get_inputs()]
        ort = lambda i: session.run(None, {k: np_feeds[i][k] for k in names})[0]  # noqa: E731
        ms.update(median_ms({PEERS[3]: ort}, range(4), args.reps))
    diff.update({PEERS[3]: np.abs(ort(0) - ref).max(), "teal program vs dense torch": np.abs(teal_ref - ref).max()})
    params = sum(p.numel() for p in model.parameters())
    return {"ms": ms, "diff": diff, "params": params}


def table(label: str, r: dict) -> str:
    ms = r["ms"]
    dense = {p: ms[p] for p in PEERS[1:]}
    best = min(dense, key=dense.get)
    lines = [f"| {label}: one-token forward (batch 1, sequence 1, no KV cache), 2 threads | median ms per token |"
             f" speed-up of TVM sparse | max abs logit diff |", "|---|---|---|---|"]
    for p in PEERS:
        ref = "vs dense torch" if p == PEERS[3] else "vs teal program (torch)" if p.startswith("TVM") else "reference"
        d = f"{r['diff'][p]:.2g} ({ref})" if p in r["diff"] else ref
        lines.append(f"| {p} | {ms[p]:.1f} | {ms[p] / ms[PEERS[0]]:.2f}x | {d} |")
    lines.append(f"\nFastest dense peer: {best} ({dense[best]:.1f} ms); TVM sparse is {dense[best] / ms[PEERS[0]]:.2f}x"
                 f" faster. teal 0.5 program vs dense torch: max abs logit diff"
                 f" {r['diff']['teal program vs dense torch']:.2g} (what teal changes).")
    return "\n".join(lines)


def extrapolate(llama: dict) -> str:
    """Per-token time of the 22-layer TinyLlama shape, fitted as t(L) = a + b*L through the fewest and most layers
    measured (one token, no KV cache: the embedding, final norm and LM head once, then L identical layers)."""
    lo, hi = min(llama), max(llama)
    est = {}
    for p in PEERS:
        t_lo, t_hi = llama[lo]["ms"][p], llama[hi]["ms"][p]
        per_layer = (t_hi - t_lo) / (hi - lo)
        est[p] = (per_layer, t_lo + (22 - lo) * per_layer)
    dense = {p: est[p][1] for p in PEERS[1:]}
    best = min(dense, key=dense.get)
    lines = [f"| TinyLlama-1.1B shape, 22 layers, extrapolated from {lo} and {hi} layers | ms per layer |"
             " ms per token (22 layers) | speed-up of TVM sparse |", "|---|---|---|---|"]
    lines += [f"| {p} | {est[p][0]:.1f} | {est[p][1]:.0f} | {est[p][1] / est[PEERS[0]][1]:.2f}x |" for p in PEERS]
    lines.append(f"\nExtrapolated: fastest dense peer {best} ({dense[best]:.0f} ms per token); TVM sparse is"
                 f" {dense[best] / est[PEERS[0]][1]:.2f}x faster (goal: >= 1.5x).")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tinyllama,gemma")
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--llama-layers", default="1,4", help="decoder layer counts of the TinyLlama-shaped model, comma"
                    " separated (22 = TinyLlama: 4.4 GB fp32 per copy, three copies resident at most); with two or"
                    " more, the time per token is also extrapolated linearly to 22 layers")
    ap.add_argument("--calib-samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(THREADS)
    os.environ["OPENBLAS_NUM_THREADS"] = "1"  # OpenBLAS threads spin after a call and slow TVM's pool
    import torch

    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    layers = [int(v) for v in args.llama_layers.split(",")]
    runs = [("gemma", None) if name == "gemma" else ("tinyllama", n) for name in args.models.split(",")
            for n in (layers if name == "tinyllama" else [None])]
    tables, llama = [], {}
    for name, n in runs:
        label = ("Gemma 3 270M (builtin:gemma3-270m), fp32" if name == "gemma" else
                 f"TinyLlama-1.1B-shaped Llama, {n} of 22 layers, random weights, fp32")
        print(f"{label}:", flush=True)
        with tempfile.TemporaryDirectory() as d:
            r = bench_model(name, args, d, n)
        if name == "tinyllama":
            llama[n] = r
        tables.append(table(label, r) + f"\n{r['params'] / 1e6:.0f} M parameters.")
        print(tables[-1], flush=True)
    if len(llama) > 1:
        tables.append(extrapolate(llama))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux
    print()
    print("\n\n".join(tables))
    print(f"\nteal calibration: {args.calib_samples} windows of {args.seq_len} tokens; {args.reps} reps;"
          f" peak RSS: {peak:.2f} GiB; threads: {THREADS}; {os.cpu_count()} CPUs; load average at the end"
          f" {os.getloadavg()[0]:.1f}; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
