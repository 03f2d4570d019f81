"""The main job on an embedded default: relufy the real all-MiniLM-L6-v2 (shipped in a package) and measure it.

Runs the CLI exactly as a user would (`sparsec transform builtin:minilm --pass relufy -o out/minilm-relufy`), then
loads the artifact and measures, on 64 held-out Wikipedia sentences from gensim's package data:
  - MLP intermediate sparsity: fraction of exact zeros in the inputs of the 6 MLP down-projections (ProSparse's
    definition), dense vs transformed;
  - sentence-embedding similarity: cosine between the dense and the transformed model's mean-pooled embeddings.
Usage: python examples/demo.py [--pass SPEC] [-o DIR]
"""
import argparse
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pass", dest="spec", default="relufy", help="pipeline spec (default: relufy)")
    ap.add_argument("-o", "--output", default="out/minilm-relufy", help="artifact directory")
    args = ap.parse_args()

    cmd = [os.path.join(os.path.dirname(sys.executable), "sparsec"), "transform", "builtin:minilm",
           "--pass", args.spec, "-o", args.output, "--force"]
    print("$ " + " ".join(cmd[1:]).replace(cmd[1], "sparsec transform", 1), flush=True)
    subprocess.run(cmd, check=True)

    import torch
    import transformers
    from transformers import AutoModel, AutoTokenizer

    import sparsec
    from sparsec.data import wiki_sentences
    from sparsec.frontend import builtin_model_dir, capture, load_hf
    from sparsec.measure import run_and_count_zeros

    transformers.utils.logging.disable_progress_bar()
    path = builtin_model_dir("minilm")
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    sparse = sparsec.load(args.output)
    sentences = wiki_sentences(64, start_article=60)
    enc = tok(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    mask = enc["attention_mask"].unsqueeze(-1).float()

    def embed(hidden):
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    with torch.no_grad():
        e_dense = embed(dense(**inputs).last_hidden_state)
    _, dense_stats = run_and_count_zeros(capture(load_hf(path)).program.module(), (), inputs)
    out, stats = run_and_count_zeros(sparse, (), inputs)
    e_sparse = embed(out[0])
    cos = (e_dense * e_sparse).sum(-1)
    print(f"\nheld-out evaluation: {len(sentences)} Wikipedia sentences (gensim package data),"
          f" {int(enc['attention_mask'].sum())} tokens")
    print(f"  MLP intermediate sparsity (zeros in the inputs of {stats['mlp_layers']} down-projections,"
          f" padding included): {dense_stats['mlp_intermediate_sparsity']:.1%} dense ->"
          f" {stats['mlp_intermediate_sparsity']:.1%}")
    print(f"  linear-input sparsity (all {stats['weight_layers']} weight layers, element-weighted):"
          f" {dense_stats['linear_input_sparsity']:.1%} dense -> {stats['linear_input_sparsity']:.1%}")
    print(f"  sentence-embedding cosine vs dense: mean {cos.mean():.4f}, min {cos.min():.4f}")
    print("  (a relufied model needs fine-tuning to recover quality; relufy only rewrites the graph)")
    print(f"\nartifact: {args.output}  (inspect it: sparsec inspect {args.output})")


if __name__ == "__main__":
    main()
