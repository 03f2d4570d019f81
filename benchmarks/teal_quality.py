"""Quality and calibration cost of teal (uniform, greedy) and cats on the real Gemma 3 270M and MiniLM.

    .venv/bin/python benchmarks/teal_quality.py [--parts cost,minilm,gemma,llamacpp] [--sparsities 0.25,0.4,0.5]
        [--methods uniform,greedy,greedy-normalized,cats,rotate-uniform,rotate-greedy,rotate-uniform-all]
        [--rotate rotate{...}]
        [--quantize "quantize{bits=8};quantize{bits=4 group=32 method=gptq}"]

- gemma: perplexity on 16 x 512 tokens of Wikipedia articles [:60] (gensim), calibration on articles [60:]
  (16 x 512 tokens, the default), at each sparsity for each method; sparsity 0 = the dense model. greedy searches
  once, at the highest sparsity, and looks the lower ones up in that table (greedy_table=DIR, as TEAL does);
  greedy-normalized scores its steps with greedy_error=normalized; rotate-METHOD runs the --rotate pass (default
  'rotate') before teal. Each --quantize spec (';'-separated) repeats every row on quantized weights (LM head and
  embedding included): the spec alone at sparsity 0, else after rotate and before teal / cats (the registered order).
  A spec with method=gptq calibrates on the same data as teal (--gptq-samples x 512 tokens of articles [60:], default
  16). --methods '' measures the --quantize rows alone; --skip-float leaves out the unquantized rows.
- llamacpp: the same perplexity of Gemma 3 270M in llama.cpp, written as GGUF F32 and quantized from it by llama.cpp
  (``--gguf-types``, default F32,Q8_0,Q4_0,Q4_K_M; benchmarks/peers.py builds llama-cpp-python and the files): what
  a CPU user gets at the same bits. Its F32 row checks the protocol (it should equal the torch dense row).
- cost: the teal pass calibrating Gemma 3 270M on 4 x 512 tokens vs the dense forward over the same tokens
  (interleaved repetitions, medians), and its peak RSS above the dense forward's (sampled every 5 ms).
- minilm: mean cosine of transformed vs dense sentence embeddings on 64 held-out Wikipedia sentences at 0.5.
Prints a markdown table per part.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time

import psutil
import torch


def _gemma_ids(samples: int, seq_len: int = 512):
    from transformers import AutoTokenizer

    from sparsec.calibration import heldout_text, tokenize_windows
    from sparsec.models import gemma3_270m_dir

    tok = AutoTokenizer.from_pretrained(str(gemma3_270m_dir()))
    return tokenize_windows(heldout_text(), tok, seq_len, samples)


def _spec(method: str, p: float, table: str = "search", rotate: str = "rotate", quantize: str = "") -> str:
    """The pass list of `method` at sparsity `p`; `quantize` (a quantize spec, '' = none) after rotate, before teal;
    a method ending in ``-all`` runs teal with scope=all (the LM head's input thresholded too)."""
    if method.startswith("rotate-"):
        return f"{rotate},{_spec(method[len('rotate-'):], p, table, quantize=quantize)}"
    q = f"{quantize}," if quantize else ""
    scope = " scope=all" if method.endswith("-all") else ""
    method = method.removesuffix("-all")
    if method == "cats":
        return f"{q}cats{{sparsity={p}}}"
    if method == "greedy-normalized":
        return f"{q}teal{{sparsity={p} allocation=greedy greedy_error=normalized greedy_table={table}{scope}}}"
    return f"{q}teal{{sparsity={p} allocation={method} greedy_table={table}{scope}}}"


def gemma(sparsities, methods, rotate: str, quantize=(), skip_float: bool = False, gptq_samples: int = 16) -> None:
    import sparsec
    from sparsec.evaluate import perplexity
    from sparsec.frontend import load_model

    loop = None

    def transformed(spec: str):
        nonlocal loop
        start = time.perf_counter()
        if "gptq" in spec and loop is None:  # quantize{method=gptq} calibrates on the teal / rotate default data
            from sparsec.calibration import make_forward_loop
            from sparsec.models import gemma3_270m_dir

            loop = make_forward_loop(None, tokenizer_dir=str(gemma3_270m_dir()), samples=gptq_samples, seq_len=512)
        result = sparsec.transform("builtin:gemma3-270m", spec, measure=False, heldout_samples=0,
                                   forward_loop=loop if "gptq" in spec else None)
        return result, time.perf_counter() - start  # seconds

    ids = _gemma_ids(16)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for qspec in [*([] if skip_float else [""]), *quantize]:
            if qspec:
                result, seconds = transformed(qspec)
                dense = perplexity(result.module(), ids)
                print(f"  {qspec}: ppl {dense:.2f}, transform {seconds:.0f} s", flush=True)
            else:
                dense = perplexity(load_model("builtin:gemma3-270m").module.eval(), ids)
            for method in methods:
                cells, table = {}, "search"
                for p in sorted(sparsities, reverse=True):  # greedy: the search at the highest, lookups below
                    result, seconds = transformed(_spec(method, p, table, rotate, qspec))
                    if "greedy" in method and table == "search":
                        table = os.path.join(tmp, f"greedy{len(rows)}")
                        sparsec.save(result, table)
                    cells[p] = f"{perplexity(result.module(), ids):.2f}"
                    print(f"  {qspec} {method} {p}: ppl {cells[p]}, transform {seconds:.0f} s", flush=True)
                label = f"{qspec} {method}".strip()
                rows.append(f"| {label} | {dense:.2f} | " + " | ".join(cells[p] for p in sparsities) + " |")
            if not methods:
                rows.append(f"| {qspec or 'float32'} | {dense:.2f} |" + " |" * len(sparsities))
    print("| weights, method | " + " | ".join(f"{p}" for p in [0.0, *sparsities]) + " |")
    print("|---|" + "---|" * (len(sparsities) + 1))
    print("\n".join(rows), flush=True)


class _PeakRSS:
    def __init__(self):
        self.proc, self.peak, self.stop = psutil.Process(), 0, False

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def cost(reps: int = 3) -> None:
    from sparsec import frontend
    from sparsec.calibration import token_forward_loop
    from sparsec.passes.base import PassContext
    from sparsec.passes.teal import TealConfig
    from sparsec.registry import get_pass

    ids = _gemma_ids(4)
    captured = frontend.capture(frontend.load_model("builtin:gemma3-270m"))
    loop = token_forward_loop(ids, batch_size=4)
    teal = get_pass("teal").fn
    dense_s, calib_s, dense_mem, calib_mem = [], [], [], []
    for _ in range(reps):  # interleaved
        gm = captured.program.module()
        with _PeakRSS() as m:
            start = time.perf_counter()
            loop(gm)
            dense_s.append(time.perf_counter() - start)
        dense_mem.append(m.peak - m.base)
        gm = captured.program.module()
        with _PeakRSS() as m:
            start = time.perf_counter()
            teal(gm, TealConfig(sparsity=0.5), PassContext(captured.args, captured.kwargs, loop))
            calib_s.append(time.perf_counter() - start)
        calib_mem.append(m.peak - m.base)
    d, c = statistics.median(dense_s), statistics.median(calib_s)
    extra = (statistics.median(calib_mem) - statistics.median(dense_mem)) / 2 ** 30
    print("| what (Gemma 3 270M, 4 x 512 tokens) | median s | ratio |\n|---|---|---|")
    print(f"| dense forward | {d:.2f} | 1.00 |\n| teal calibration (uniform, 0.5) | {c:.2f} | {c / d:.2f} |")
    print(f"\npeak RSS above the dense forward's: {extra:.3f} GiB ({reps} interleaved repetitions)", flush=True)


def minilm(methods, rotate: str) -> None:
    import sparsec
    from sparsec.data import wiki_sentences
    from sparsec.evaluate import embeddings
    from sparsec.frontend import load_model

    loaded = load_model("builtin:minilm")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(loaded.tokenizer_dir)
    sentences = wiki_sentences(64)  # articles [:60]: never used for calibration
    dense = embeddings(loaded.module.eval(), tok, sentences, 128)
    print("| MiniLM, sparsity 0.5 | mean cosine to dense |\n|---|---|")
    for method in [m for m in methods if m != "cats"]:  # MiniLM's MLP is not gated
        spec = _spec(method, 0.5, rotate=rotate)
        result = sparsec.transform("builtin:minilm", spec, measure=False, heldout_samples=0, seq_len=128)
        cos = torch.nn.functional.cosine_similarity(dense, embeddings(result.module(), tok, sentences, 128), dim=-1)
        print(f"| {spec} | {float(cos.mean()):.4f} |", flush=True)


def llamacpp(gguf_types) -> None:
    import peers

    ids = _gemma_ids(16)
    rows = []
    for gguf_type in gguf_types:
        r = peers.llamacpp_perplexity(peers.model_dir("gemma"), gguf_type, ids)
        print(f"  llama.cpp {gguf_type}: ppl {r['perplexity']:.2f} ({r['tokens']} tokens)", flush=True)
        rows.append(f"| {gguf_type} | {r['file_mb']:.0f} | {r['perplexity']:.2f} |")
    print(f"llama.cpp ({r['runtime']}), Gemma 3 270M, {ids.shape[0]} x {ids.shape[1]} tokens of articles [:60]")
    print("| GGUF type | file MB | perplexity |\n|---|---|---|")
    print("\n".join(rows), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="cost,minilm,gemma")
    ap.add_argument("--sparsities", default="0.25,0.4,0.5")
    ap.add_argument("--methods", default="uniform,greedy,cats")
    ap.add_argument("--rotate", default="rotate", help="the rotate pass of the rotate-* methods")
    ap.add_argument("--quantize", default="", help="';'-separated quantize specs to repeat the gemma rows with")
    ap.add_argument("--skip-float", action="store_true", help="gemma: only the --quantize rows, not the float ones")
    ap.add_argument("--gptq-samples", type=int, default=16,
                    help="gemma: 512-token windows of articles [60:] that method=gptq calibrates on")
    ap.add_argument("--gguf-types", default="F32,Q8_0,Q4_0,Q4_K_M", help="llamacpp: the GGUF types to measure")
    args = ap.parse_args()
    parts, methods = args.parts.split(","), [m for m in args.methods.split(",") if m]  # '' = the --quantize rows only
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {psutil.cpu_count()} CPUs")
    if "cost" in parts:
        cost()
    if "minilm" in parts:
        minilm(methods, args.rotate)
    if "gemma" in parts:
        gemma([float(p) for p in args.sparsities.split(",")], methods, args.rotate,
              [q.strip() for q in args.quantize.split(";") if q.strip()], args.skip_float, args.gptq_samples)
    if "llamacpp" in parts:
        llamacpp(args.gguf_types.split(","))


if __name__ == "__main__":
    main()
