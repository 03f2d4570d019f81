"""teal's prefill policy in TVM builds: prefill=all / half / dense vs the dense build, one token and a prompt.

Model: a Llama with TinyLlama-1.1B's block shape (hidden 2048, 32 heads, 4 kv heads, intermediate 5632) and
``--layers`` decoder layers, vocabulary 256 (so the dense LM head does not hide the blocks; random weights, seed 0),
transformed once per mode with ``teal{sparsity=0.5 prefill=MODE}`` on the same seeded random token ids (the thresholds
are the same in every mode). Builds (``sparsec.compile``, 2 threads):
  * TVM dense:     the prefill=all program with ``sparse=False`` (every weight row read)
  * prefill=all:   sparsec::threshold fused into the sparse kernel
  * prefill=half / dense: sparsec::threshold_prefill computed by its own op, then the zero-skipping sparse kernel
Timed: a forward of batch 1 at ``--tokens`` lengths (1 = a decode step; no KV cache), the builds interleaved
round-robin (order reversed every other round), each call on the next of 4 seeded inputs, ``--reps`` rounds after a
warm-up round, medians. Output agreement: max |logit diff| of each build vs its torch program on the first input.
Peak RSS of the process at the end.
Usage: python benchmarks/teal_prefill.py [--layers 1] [--tokens 1,32] [--reps 21]
"""
import argparse
import os
import resource
import tempfile
import time

THREADS = 2
BUILDS = ("TVM dense", "prefill=all", "prefill=half", "prefill=dense")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--tokens", default="1,32")
    ap.add_argument("--reps", type=int, default=21)
    args = ap.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(THREADS))
    import numpy as np
    import torch

    import sparsec
    from decode import median_ms, tinyllama  # benchmarks/decode.py: the TinyLlama-shaped model, timing
    from sparsec.calibration import token_forward_loop

    torch.set_num_threads(THREADS)
    model, example = tinyllama(args.layers, vocab_size=256)
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))
    programs, compiled = {}, {}
    with tempfile.TemporaryDirectory() as work:
        for name in BUILDS[1:]:
            t0 = time.perf_counter()
            result = sparsec.transform(model, f"teal{{sparsity=0.5 {name}}}", example_inputs=example,
                                       forward_loop=token_forward_loop(ids), heldout_samples=0, measure=False)
            programs[name] = result.program
            builds = [(name, True)] + ([("TVM dense", False)] if name == "prefill=all" else [])
            for build, sparse in builds:
                path = os.path.join(work, build.replace("=", "-").replace(" ", "-"))
                sparsec.compile(result, path, threads=THREADS, sparse=sparse)
                compiled[build] = sparsec.load_compiled(path, threads=THREADS)
            print(f"  {name}: transform + compile {time.perf_counter() - t0:.0f} s", flush=True)
        programs["TVM dense"] = programs["prefill=all"]
        g = torch.Generator().manual_seed(0)
        rows = []
        for tokens in (int(t) for t in args.tokens.split(",")):
            feeds = [{"input_ids": t, "attention_mask": torch.ones_like(t)}
                     for t in (torch.randint(0, 256, (1, tokens), generator=g) for _ in range(4))]
            np_feeds = [{k: v.numpy() for k, v in f.items()} for f in feeds]
            ms = median_ms({b: compiled[b] for b in BUILDS}, np_feeds, args.reps)
            with torch.no_grad():
                diff = {b: float(np.abs(compiled[b](np_feeds[0])["output_0"]
                                        - programs[b].module()(**feeds[0])[0].numpy()).max()) for b in BUILDS}
            rows.append((tokens, ms, diff))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("\n| tokens | build | median ms | speed-up vs TVM dense | max abs logit diff vs its torch program |")
    print("|---|---|---|---|---|")
    for tokens, ms, diff in rows:
        for b in BUILDS:
            print(f"| {tokens} | {b} | {ms[b]:.1f} | {ms['TVM dense'] / ms[b]:.2f}x | {diff[b]:.2g} |")
    print(f"\nTinyLlama-shaped Llama, {args.layers} layer(s), vocabulary 256, teal 0.5, batch 1, {THREADS} threads,"
          f" {args.reps} interleaved rounds; peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    main()
