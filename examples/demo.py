"""The main job on an embedded default: make the real Gemma 3 270M (shipped in a package) sparse, compile it, generate.

Runs the command line as a user would:
  1. sparsec transform builtin:gemma3-270m --pass strip --kv-cache          the dense model, captured with a KV cache
  2. sparsec transform builtin:gemma3-270m --pass "rotate,teal{sparsity=0.5}" --kv-cache
                                                                            TEAL at 50% of the linear inputs' entries
  3. sparsec compile OUT -o BUILD (both)                                   TVM, sparse kernels behind the thresholds
  4. sparsec generate BUILD --prompt PROMPT (both)                          a paragraph from each, tokens/s
  5. sparsec eval SPARSE --ppl HELDOUT                                      perplexity, dense vs sparse, held-out text
Artifacts and builds go under --output (default out/). Each step prints its command and how long it took.
Usage: python examples/demo.py [-o DIR] [--sparsity 0.5] [--new-tokens 64]
"""
import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "The history of the printing press begins"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default="out", help="directory for the artifacts and builds")
    ap.add_argument("--sparsity", type=float, default=0.5, help="teal's target sparsity")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens to generate")
    ap.add_argument("--max-context", type=int, default=512, help="longest context the builds accept")
    args = ap.parse_args()
    sparsec = os.path.join(os.path.dirname(sys.executable), "sparsec")
    out = args.output
    steps = 7
    step = [0]

    def run(title: str, *cmd: str, capture: bool = False) -> str:
        step[0] += 1
        shown = " ".join(c if " " not in c and "{" not in c else repr(c) for c in cmd)
        print(f"[{step[0]}/{steps}] {title}\n      $ sparsec {shown}", flush=True)
        start = time.perf_counter()
        done = subprocess.run([sparsec, *cmd], check=True, text=True,
                              stdout=subprocess.PIPE if capture else None)
        print(f"      ({time.perf_counter() - start:.0f} s)", flush=True)
        return done.stdout if capture else ""

    common = ["--kv-cache", "--max-context", str(args.max_context), "--force"]
    dense, sparse = f"{out}/gemma-dense", f"{out}/gemma-teal"
    recipe = f"rotate,teal{{sparsity={args.sparsity}}}"
    run("capture the dense Gemma 3 270M with a KV cache", "transform", "builtin:gemma3-270m", "--pass", "strip",
        "-o", dense, *common)
    run(f"sparsify: {recipe} (calibration on Wikipedia text)", "transform", "builtin:gemma3-270m", "--pass", recipe,
        "--calib-samples", "8", "--seq-len", "256", "-o", sparse, *common)
    for art in (dense, sparse):
        run(f"compile {art} with TVM", "compile", art, "-o", f"{art}.tvm", "--threads", str(os.cpu_count() or 1),
            "--force")
    texts = {}
    for name, art in (("dense", dense), ("sparse", sparse)):
        doc = run(f"generate {args.new_tokens} tokens with the {name} build", "generate", f"{art}.tvm", "--prompt",
                  PROMPT, "--max-new-tokens", str(args.new_tokens), "--ignore-eos", "--json", capture=True)
        texts[name] = json.loads(doc)
    from sparsec.calibration import heldout_text

    heldout = f"{out}/heldout.txt"
    with open(heldout, "w", encoding="utf-8") as f:
        f.write(heldout_text())
    ppl = json.loads(run("perplexity on held-out Wikipedia text (4 windows of 256 tokens)", "eval", sparse, "--ppl",
                         heldout, "--seq-len", "256", "--samples", "4", "--json", capture=True))

    print(f"\nprompt: {PROMPT!r}")
    for name, doc in texts.items():
        print(f"\n--- {name} ({doc['backend']}, {doc['tokens_per_s']:.1f} tokens/s, prefill {doc['prefill_ms']:.0f} ms"
              f" for {doc['prompt_tokens']} tokens)\n{PROMPT}{doc['text']}")
    speedup = texts["sparse"]["tokens_per_s"] / texts["dense"]["tokens_per_s"]
    print(f"\ndecode speed: sparse {texts['sparse']['tokens_per_s']:.1f} tokens/s vs dense"
          f" {texts['dense']['tokens_per_s']:.1f} ({speedup:.2f}x); the dense 262144x640 LM head is 63% of the weight"
          " bytes read per token and stays dense")
    print(f"perplexity ({ppl['samples']} x {ppl['seq_len']} held-out tokens): dense {ppl['dense']:.2f},"
          f" sparse {ppl['transformed']:.2f}")
    print(f"\nartifacts: {dense}, {sparse}   builds: {dense}.tvm, {sparse}.tvm")
    print(f"try: sparsec generate {sparse}.tvm --prompt 'Your text' --stream")


if __name__ == "__main__":
    main()
