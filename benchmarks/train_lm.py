"""A small Llama-style LM trained from scratch on Wikipedia text: ReLU vs jsrelu,db-mlp; constant vs progressive L1.

Byte-level (vocab 256) LlamaForCausalLM (hidden 128, 2 layers, MLP 512, ReLU) on the gensim Wikipedia articles
(sparsec.data; articles 10+ for training, 0-9 for validation). Every run starts from the same initial weights
and sees the same batches (AdamW 3e-3, batch 8 × 64 bytes). Runs: vanilla ReLU; ``jsrelu,db-mlp{mode=scratch}``
(J-SquaredReLU + zeroth biases + restricted RMSNorm, after_step every step); ReLU + ``regularize`` L1 on the MLP
intermediate with a constant λ, and with ProSparse's progressive schedule reaching the same final λ.
MLP activation sparsity: zeros in the MLP intermediate (input of each down projection, ProSparse's definition),
measured by sparsec.measure on the validation batches after ``strip``.
Usage: ``python benchmarks/train_lm.py [--steps 300] [--out benchmarks/results/train_lm.md]``
"""
from __future__ import annotations

import argparse
import math
import pathlib
import platform
import sys
import time

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import sparsec  # noqa: E402
from sparsec.data import wiki_articles  # noqa: E402
from sparsec.measure import run_and_count_zeros  # noqa: E402
from sparsec.training import after_step, regularization_loss  # noqa: E402

SEQ, BATCH = 64, 8


def runs(steps: int) -> list[tuple[str, str | None]]:
    q = steps // 4
    return [("ReLU (vanilla)", None),
            ("jsrelu,db-mlp (scratch)", "jsrelu,db-mlp{mode=scratch positions=64}"),
            ("ReLU + L1 constant λ=1", "regularize{weight=1}"),
            ("ReLU + L1 progressive → λ=1", f"regularize{{weight=1 schedule=progressive peaks={{0.1,0.5,1}}"
                                           f" ends={{{q},{2 * q},{3 * q}}}}}")]


def data() -> tuple[torch.Tensor, torch.Tensor]:
    arts = wiki_articles()
    enc = lambda texts: torch.tensor(list("\n\n".join(texts).encode("utf-8", "replace")), dtype=torch.long)
    return enc(t for _, t in arts[10:]), enc(t for _, t in arts[:10])


def build():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ, hidden_act="relu",
                      use_cache=False)
    return LlamaForCausalLM(cfg)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))


def train(spec: str | None, train_ids: torch.Tensor, steps: int) -> tuple[nn.Module, float]:
    model = build()
    example = {"input_ids": train_ids[:SEQ].unsqueeze(0).repeat(BATCH, 1)}
    # every run trains the captured graph module, so all four see the same code path
    result = sparsec.transform(model, spec or "strip", example_inputs=example, measure=False)
    net = result.module()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    for step in range(steps):
        offsets = torch.randint(0, len(train_ids) - SEQ, (BATCH,), generator=gen)
        ids = torch.stack([train_ids[o:o + SEQ] for o in offsets])
        loss = lm_loss(net(input_ids=ids)[0], ids)
        if spec and "regularize" in spec:
            loss = loss + regularization_loss(net, step=step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        after_step(net, step)
    seconds = time.perf_counter() - start
    stripped = sparsec.transform(torch.export.export(net, (), example, strict=False), "strip",
                                 example_inputs=example, measure=False).module()
    return stripped, seconds


@torch.no_grad()
def evaluate(net: nn.Module, val_ids: torch.Tensor) -> tuple[float, float]:
    n = (len(val_ids) - 1) // SEQ
    windows = val_ids[: n * SEQ].view(n, SEQ)[:64]
    losses, zeros = [], []
    for i in range(0, len(windows), BATCH):
        ids = windows[i:i + BATCH]
        out, stats = run_and_count_zeros(net, (), {"input_ids": ids})
        losses.append(lm_loss(out[0], ids).item())
        zeros.append(stats["mlp_intermediate_sparsity"])
    return sum(losses) / len(losses), sum(zeros) / len(zeros)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the machine is shared: one thread is faster than two contended ones
    train_ids, val_ids = data()
    rows = []
    for label, spec in runs(args.steps):
        net, seconds = train(spec, train_ids, args.steps)
        loss, sparsity = evaluate(net, val_ids)
        rows.append(f"| {label} | `{spec or '-'}` | {loss:.3f} | {loss / math.log(2):.3f} | {sparsity:.3f} |"
                    f" {seconds:.0f} |")
        print(rows[-1], flush=True)
    table = "\n".join([
        f"# Small Llama-style LM from scratch on Wikipedia bytes ({args.steps} steps)", "",
        f"`python benchmarks/train_lm.py --steps {args.steps}`; torch {torch.__version__}, {platform.machine()}, "
        "2 CPU cores shared with other jobs (training seconds are indicative only). Byte-level Llama (hidden 128, 2 "
        "layers, MLP 512, ReLU), AdamW 3e-3, batch 8 × 64 bytes, same initial weights and batches for every "
        "row. Validation: 64 windows of 64 bytes from articles 0-9 of the gensim Wikipedia text. MLP activation "
        "sparsity: zeros in the MLP intermediate (input of each down projection; ProSparse's definition).", "",
        "| run | pipeline | val loss (nats/byte) | bits/byte | MLP activation sparsity | train s |",
        "|---|---|---|---|---|---|", *rows, ""])
    if args.out:
        pathlib.Path(args.out).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
