"""Text generation, batch 1, 2 threads, fp32, greedy: sparsec's builds beside the dense peers, in one run.

    .venv/bin/python benchmarks/generate.py --models tinyllama,gemma --sparsities 0.5,0.4 --contexts 128,1024 \\
        --peers sparsec-tvm,sparsec-ort,sparsec-accelerate,sparsec-tvm-dense,ort-dense,hf,llamacpp-f32,\\
llamacpp-q8_0,llamacpp-q4_k_m --markdown benchmarks/results/generate.md

Rows (each in its own process, one at a time; protocol, models, prompts and timing as in ``benchmarks/peers.py``):
- ``sparsec-tvm``: ``sparsec compile`` of the teal artifact (``transform --kv-cache``): sparse kernels behind the
  thresholds, :class:`sparsec.backends.tvm.generate.TvmStepper`;
- ``sparsec-ort``: ``sparsec export --sparse-kernel auto`` of the same artifact, ONNX Runtime with the cache bound
  as OrtValues (:class:`sparsec.backends.onnxruntime.generate.OrtStepper`);
- ``sparsec-accelerate``: the artifact's program in torch with its linears on sparsec's TVM kernels
  (``sparsec.accelerate``), stepped by :class:`sparsec.generation.TorchStepper`;
- ``sparsec-tvm-dense`` / ``ort-dense``: the dense model (``transform --pass strip --kv-cache``) compiled with TVM /
  exported to ONNX (standard ops): sparsec's own dense builds;
- ``sparsec-tvm-q8`` / ``sparsec-tvm-q4`` (sparse, per sparsity) and ``sparsec-tvm-q8-dense`` /
  ``sparsec-tvm-q4-dense``: the same with the ``quantize`` pass first (``quantize{bits=8}``: int8 per output
  channel; ``quantize{bits=4 group=32 scale_dtype=float16}``: int4, an fp16 scale per 32 inputs as llama.cpp's
  Q4_0; every linear layer, the LM head and the embedding included), compiled with sparsec's quantized kernels:
  beside ``llamacpp-q8_0`` / ``llamacpp-q4_0``; ``sparsec-tvm-q4o`` / ``sparsec-tvm-q4o-dense``: int4 with offsets
  (``symmetric=false``: an fp16 scale and offset per 32 inputs, llama.cpp's Q4_1 / Q4_K idea), beside Q4_0 too;
  ``sparsec-tvm-q8r``: ``rotate`` first (Gemma's quality recipe: ``rotate,quantize{bits=8},teal``; issue 19's Gemma
  goal: >= 1.5x llama.cpp Q8_0); ``sparsec-tvm-q8ra``: the same with ``teal{scope=all}``, the LM head's input
  thresholded too (Gemma's tied 262144 x 640 head is three quarters of its int8 bytes); ``sparsec-tvm-q8ga``: that
  with Q8_0's own format (an fp16 scale per 32 inputs, ``quantize{bits=8 group=32 scale_dtype=float16}``);
- ``hf`` and ``llamacpp-*``: the dense peers of ``benchmarks/peers.py`` (HF ``generate``; llama.cpp on GGUFs written
  from the same weights).
sparsec rows time :func:`sparsec.generation.run_generation` (``ignore_eos``): prefill = the prompt's step (its first
token's logits), decode ms/token = the median step of a run, median of ``--reps`` runs after a warm-up run.
Artifacts, exports and builds are made once (in their own processes, before the timed one) and cached under
``$SPARSEC_CACHE/bench-generate``. Teal is calibrated on 8 windows of 256 tokens: Gemma on the built-in Wikipedia
text, the random-weight Llama on seeded random ids. Goals (issue 17) are printed per model, context and sparsity:
sparsec-tvm decode tokens/s over the fastest dense fp32 peer (hf, ort-dense, llamacpp-f32), prefill over that
peer's, peak RSS over sparsec-tvm-dense's; and (issue 19) sparsec-tvm-q8 over llamacpp-q8_0, sparsec-tvm-q4 over
llamacpp-q4_0.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import peers  # noqa: E402

HERE = pathlib.Path(__file__).resolve()
TUNE_ENV = "SPARSEC_BENCH_TUNE_SECONDS"
SPARSE_ROWS = ("sparsec-tvm", "sparsec-ort", "sparsec-accelerate", "sparsec-tvm-q8", "sparsec-tvm-q8r",
               "sparsec-tvm-q8ra", "sparsec-tvm-q8ga", "sparsec-tvm-q4", "sparsec-tvm-q4o")
DENSE_ROWS = ("sparsec-tvm-dense", "ort-dense", "sparsec-tvm-q8-dense", "sparsec-tvm-q4-dense",
              "sparsec-tvm-q4o-dense")
#: the quantize pass of a row whose name carries -q8 / -q4, and the weights column it shows
QUANTIZE = {"q8": ("quantize{bits=8}", "int8"), "q8r": ("rotate,quantize{bits=8}", "int8, rotated"),
            "q8ra": ("rotate,quantize{bits=8}", "int8, rotated, LM head sparse"),
            "q8ga": ("rotate,quantize{bits=8 group=32 scale_dtype=float16}",
                     "int8 g32, fp16 scales, rotated, LM head sparse"),
            "q4": ("quantize{bits=4 group=32 scale_dtype=float16}", "int4 g32, fp16 scales"),
            "q4o": ("quantize{bits=4 group=32 scale_dtype=float16 symmetric=false}",
                    "int4 g32, fp16 scales + offsets")}
#: issue 19's goals: a quantized sparse row over the llama.cpp peer of the same bits
QUANTIZED_GOALS = {"sparsec-tvm-q8": ("llamacpp-q8_0", {"tinyllama": 2.0, "gemma": 1.5}),
                   "sparsec-tvm-q8r": ("llamacpp-q8_0", {"gemma": 1.5}),
                   "sparsec-tvm-q8ra": ("llamacpp-q8_0", {"gemma": 1.5}),
                   "sparsec-tvm-q8ga": ("llamacpp-q8_0", {"gemma": 1.5}),
                   "sparsec-tvm-q4": ("llamacpp-q4_0", {"tinyllama": 1.6}),
                   "sparsec-tvm-q4o": ("llamacpp-q4_0", {"tinyllama": 1.6})}
DENSE_FP32_PEERS = ("hf", "ort-dense", "llamacpp-f32")
CALIB = dict(samples=8, seq_len=256)
MAX_CONTEXT = 2048


def _quantization(peer: str):
    """The (quantize spec, weights label) a sparsec row name carries (``sparsec-tvm-q8@0.5``), or None."""
    parts = peer.split("@")[0].split("-")
    return next((QUANTIZE[q] for q in QUANTIZE if q in parts), None)


def _pipeline(peer: str) -> str:
    """The pipeline of a sparsec row: its quantize pass (``-q8`` / ``-q4``) and the teal spec of its sparsity
    (``@0.5``); 'strip' (the dense capture) when neither."""
    passes = [_quantization(peer)[0]] if _quantization(peer) else []
    if "@" in peer:
        scope = " scope=all" if peer.split("@")[0].endswith(("-q8ra", "-q8ga")) else ""
        passes.append(f"teal{{sparsity={float(peer.split('@')[1])}{scope}}}")
    return ",".join(passes) or "strip"


def _store(path: pathlib.Path, pipeline: str, max_context: int) -> pathlib.Path:
    tag = pipeline.replace("{", "-").replace("}", "").replace("=", "").replace(" ", "").replace(",", "+")
    return peers.CACHE / "bench-generate" / f"{path.name}-{tag}-ctx{max_context}"


def _transform(path: str, pipeline: str, max_context: int, out: str) -> dict:
    import torch

    import sparsec

    calib = None
    if "teal" in pipeline and not (pathlib.Path(path) / "tokenizer.json").exists():
        vocab = json.loads((pathlib.Path(path) / "config.json").read_text())["vocab_size"]
        calib = out + ".calib.pt"
        pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
        torch.save(torch.randint(3, vocab, (CALIB["samples"], CALIB["seq_len"]),
                                 generator=torch.Generator().manual_seed(0)), calib)
    result = sparsec.transform(path, pipeline, kv_cache=True, max_context=max_context, calib_data=calib,
                               calib_samples=CALIB["samples"], seq_len=CALIB["seq_len"], measure=False)
    sparsec.save(result, out, force=True)
    return {}


def _export(artifact: str, out: str, sparse_kernel: str) -> dict:
    import sparsec

    sparsec.export_onnx(artifact, out, sparse_kernel=sparse_kernel, force=True)
    return {}


def _compile(artifact: str, out: str, tune_seconds: float = 0.0) -> dict:
    import sparsec

    sparsec.compile(artifact, out, threads=peers.THREADS, force=True, tune_seconds=tune_seconds)
    return {}


def prepared(peer: str, path: pathlib.Path, max_context: int) -> str:
    """The artifact / .onnx / build a sparsec row runs, made (each in its own process) if not cached; TVM builds
    with ``sparsec compile --tune-seconds`` of ``--tune-seconds`` (a build of their own when > 0; the rows' processes
    inherit it as ``$SPARSEC_BENCH_TUNE_SECONDS``)."""
    tune_seconds = float(os.environ.get(TUNE_ENV) or 0)
    pipeline = _pipeline(peer)
    art = _store(path, pipeline, max_context)
    if not (art / "manifest.json").exists():
        peers._child(sys.executable, "_transform", False, script=HERE, path=str(path), pipeline=pipeline,
                     max_context=max_context, out=str(art))
    kind = peer.split("@")[0]
    if kind in ("sparsec-ort", "ort-dense"):
        onnx = art.with_name(art.name + f"-{kind}.onnx")
        if not onnx.exists():
            peers._child(sys.executable, "_export", False, script=HERE, artifact=str(art), out=str(onnx),
                         sparse_kernel="auto" if kind == "sparsec-ort" else "none")
        return str(onnx)
    if kind.startswith("sparsec-tvm"):
        build = art.with_name(art.name + (f".tune{tune_seconds:g}.tvm" if tune_seconds else ".tvm"))
        if not (build / "manifest.json").exists():
            peers._child(sys.executable, "_compile", False, script=HERE, artifact=str(art), out=str(build),
                         tune_seconds=tune_seconds)
        return str(build)
    return str(art)


def _max_context(context: int, new_tokens: int) -> int:
    """The maximum context the row's artifact is captured for: 2048 (one artifact serves every row up to it)."""
    return max(context + new_tokens + 8, MAX_CONTEXT)


def _sparsec(peer: str, model: str, prompt: list[int], new_tokens: int, reps: int) -> dict:
    import torch

    import sparsec
    from sparsec.generation import TorchStepper, open_stepper, run_generation

    torch.set_num_threads(peers.THREADS)
    if peer.startswith("sparsec-accelerate"):
        art = sparsec.load_artifact(model)
        stepper = TorchStepper(sparsec.accelerate(art, threads=peers.THREADS), TorchStepper(art.program).layout)
        del art
    else:
        stepper, _ = open_stepper(model, threads=peers.THREADS)
    ids = torch.tensor([prompt])

    def run(n: int):
        g = run_generation(stepper, ids, max_new_tokens=n, ignore_eos=True)
        return g.prefill_ms, g.decode_ms, g.new_tokens.tolist()

    run(4)  # warm-up
    quantized = _quantization(peer)
    return dict(peers._summary([run(new_tokens) for _ in range(reps)]), weights=quantized[1] if quantized else "fp32",
                runtime=f"sparsec {sparsec.__version__} ({stepper.backend})")


def _sparsec_peer(peer: str, path: pathlib.Path, prompt, new_tokens: int, reps: int) -> dict:
    model = prepared(peer, path, _max_context(len(prompt), new_tokens))
    return peers._child(sys.executable, "_sparsec", False, script=HERE, peer=peer, model=model, prompt=list(prompt),
                        new_tokens=new_tokens, reps=reps)


def register(sparsities: list[float]) -> list[str]:
    """Add the sparsec rows to ``peers.PEERS`` (sparse rows once per sparsity, as ``NAME@S``); their names."""
    names = [f"{row}@{s}" for s in sparsities for row in SPARSE_ROWS] + list(DENSE_ROWS)
    for name in names:
        peers.PEERS[name] = lambda path, prompt, n, reps, name=name: _sparsec_peer(name, path, prompt, n, reps)
    return names


def goals(rows: list[dict]) -> list[str]:
    """Issue 17's goal lines: sparsec-tvm vs the fastest dense fp32 peer of the same model and context."""
    lines = []
    for r in rows:
        if not r["peer"].startswith("sparsec-tvm@"):
            continue
        same = [d for d in rows if (d["model"], d["context"]) == (r["model"], r["context"])]
        dense = [d for d in same if d["peer"] in DENSE_FP32_PEERS]
        tvm_dense = next((d for d in same if d["peer"] == "sparsec-tvm-dense"), None)
        if not dense:
            continue
        fastest = max(dense, key=lambda d: d["tokens_per_s"])
        quickest = min(dense, key=lambda d: d["prefill_ms"])
        text = (f"- {r['model']}, context {r['context']}, {r['peer']}: decode {r['tokens_per_s'] / fastest['tokens_per_s']:.2f}x"
                f" the fastest dense fp32 peer ({fastest['peer']}, {fastest['tokens_per_s']:.1f} tokens/s; goal >= 1.7x);"
                f" prefill {r['prefill_ms'] / quickest['prefill_ms']:.2f}x {quickest['peer']}'s (goal <= 1.05x)")
        if tvm_dense is not None:
            text += f"; peak RSS {r['peak_rss_mib'] / tvm_dense['peak_rss_mib']:.2f}x sparsec-tvm-dense's (goal <= 1.10x)"
        lines.append(text)
    for r in rows:
        peer, _, sparsity = r["peer"].partition("@")
        if peer not in QUANTIZED_GOALS:
            continue
        name, model_goals = QUANTIZED_GOALS[peer]
        goal = model_goals.get(r["model"])
        base = next((d for d in rows if (d["model"], d["context"], d["peer"]) == (r["model"], r["context"], name)),
                    None)
        if base is not None:
            lines.append(f"- {r['model']}, context {r['context']}, {r['peer']}: decode"
                         f" {r['tokens_per_s'] / base['tokens_per_s']:.2f}x {name} ({base['tokens_per_s']:.1f} tokens/s;"
                         + (f" issue 19's goal at teal 0.5: >= {goal}x)" if goal else " no goal for this model)"))
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    peers.add_run_arguments(p, "sparsec-tvm,sparsec-ort,sparsec-accelerate,sparsec-tvm-dense,ort-dense,hf,"
                               "llamacpp-f32,llamacpp-q8_0,llamacpp-q4_k_m")
    p.add_argument("--sparsities", default="0.5,0.4", help="teal sparsity of the sparse sparsec rows, each a row")
    p.add_argument("--tune-seconds", type=float, default=0.0, metavar="S",
                   help="sparsec's TVM builds with 'sparsec compile --tune-seconds S' (kernels not in the tuning"
                   " database measured on this CPU for about S seconds each)")
    p.add_argument("--prepare-only", action="store_true",
                   help="make the artifacts, exports, builds and GGUFs the rows need, then stop (nothing is timed)")
    args = p.parse_args(argv)
    os.environ[TUNE_ENV] = str(args.tune_seconds)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    register(sparsities)
    wanted = [f"{name}@{s}" if name in SPARSE_ROWS else name for name in args.peers.split(",")
              for s in (sparsities if name in SPARSE_ROWS else [None])]
    for model in args.models.split(","):  # artifacts, exports and builds first: the timed rows then run back to back
        path = peers.model_dir(model, args.llama_layers)
        for context in map(int, args.contexts.split(",")):
            new_tokens = args.new_tokens if context < 512 else args.long_new_tokens
            peers.prompt_ids(path, context)
            for peer in wanted:
                if peer.startswith("sparsec") or peer in DENSE_ROWS:
                    prepared(peer, path, _max_context(context, new_tokens))
                elif peer.startswith("llamacpp-"):
                    peers.gguf_file(path, peer.split("-", 1)[1].upper())
    if args.prepare_only:
        return
    cpu, rows = peers.run_rows(args, wanted)
    command = "python benchmarks/generate.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = peers.markdown(cpu, rows, command).replace(
        "# Dense CPU peers: text generation", "# Text generation: sparsec beside the dense CPU peers", 1)
    report += "\n## Goals (issues 17 and 19)\n\n" + "\n".join(goals(rows) or ["- (no sparsec-tvm row with a dense peer)"])
    report += (f"\n\nsparsec rows: teal calibrated on {CALIB['samples']} x {CALIB['seq_len']} tokens; timing as for"
               " the peers (median decode step of a run, median of the runs).\n")
    if args.markdown:
        pathlib.Path(args.markdown).write_text(report)
    print(report)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(peers._MARK + json.dumps(globals()[sys.argv[2]](**json.loads(sys.argv[3]))), flush=True)
    else:
        main()
