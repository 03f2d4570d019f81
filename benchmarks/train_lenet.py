"""LeNet-5 on Fashion-MNIST: dense vs L1 vs Transformed-L1 activation regularisation (regularize pass).

Every run starts from the same initial weights and sees the same batches (Adam 1e-3, batch 128). The regularised
runs train the module from ``sparsec.transform(model, 'regularize{scope=all ...}')`` (taps on the four ReLU maps,
penalty = mean per map, summed) with ``loss = CE + sparsec.regularization_loss(model)``, then ``strip``.
Activation sparsity is DSTF's definition: zeros in the four ReLU maps (act1..act4) over the 10,000 test images,
element-weighted. Usage: ``python benchmarks/train_lenet.py [--epochs 2] [--out benchmarks/results/train_lenet.md]``
"""
from __future__ import annotations

import argparse
import pathlib
import platform
import sys
import time

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import sparsec  # noqa: E402
from benchmarks.lenet import LeNet5, fashion_mnist  # noqa: E402

RUNS = [("dense", None), ("L1, λ=0.05", "kind=l1 weight=0.05"), ("TL1 a=1, λ=0.2", "kind=tl1 a=1 weight=0.2")]


@torch.no_grad()
def evaluate(model: LeNet5, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, list[float]]:
    """(test accuracy, zeros in act1..act4 element-weighted, per-map zero fractions)."""
    counts = {}
    hooks = [getattr(model, name).register_forward_hook(
        lambda m, i, o, name=name: counts.setdefault(name, []).append(((o == 0).sum().item(), o.numel())))
        for name in ("act1", "act2", "act3", "act4")]
    correct = sum(int((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum()) for i in range(0, len(x), 1000))
    for h in hooks:
        h.remove()
    per_map = [sum(z for z, _ in v) / sum(n for _, n in v) for v in counts.values()]
    zeros = sum(z for v in counts.values() for z, _ in v)
    total = sum(n for v in counts.values() for _, n in v)
    return correct / len(x), zeros / total, per_map


def train(options: str | None, data, epochs: int) -> tuple[LeNet5, float]:
    xtr, ytr = data
    torch.manual_seed(0)
    model = LeNet5()
    net = model
    if options:
        result = sparsec.transform(model, f"regularize{{scope=all {options}}}", example_inputs=(xtr[:128],),
                                   measure=False)
        net = result.module()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        order = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr) - 127, 128):
            idx = order[i:i + 128]
            loss = nn.functional.cross_entropy(net(xtr[idx]), ytr[idx])
            if options:
                loss = loss + sparsec.regularization_loss(net)
            opt.zero_grad()
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - start
    if options:  # strip the taps, then read the trained weights back into a plain LeNet-5
        stripped = sparsec.transform(torch.export.export(net, (xtr[:128],)), "strip", example_inputs=(xtr[:128],),
                                     measure=False).module()
        model.load_state_dict({k: v for k, v in stripped.state_dict().items()}, strict=True)
    return model, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the machine is shared: one thread is faster than two contended ones
    train_data, (xte, yte) = fashion_mnist("train"), fashion_mnist("test")
    rows, dense = [], None
    for label, options in RUNS:
        model, seconds = train(options, train_data, args.epochs)
        acc, sparsity, per_map = evaluate(model.eval(), xte, yte)
        dense = dense or (acc, sparsity)
        rows.append(f"| {label} | {acc:.4f} | {acc - dense[0]:+.4f} | {sparsity:.3f} | {sparsity - dense[1]:+.3f} | "
                    + " / ".join(f"{p:.2f}" for p in per_map) + f" | {seconds:.0f} |")
        print(rows[-1], flush=True)
    table = "\n".join([
        f"# LeNet-5 on Fashion-MNIST: activation regularisation ({args.epochs} epochs)", "",
        f"`python benchmarks/train_lenet.py --epochs {args.epochs}`; torch {torch.__version__}, "
        f"{platform.machine()}, 2 CPU cores shared with other jobs (training seconds are indicative only). "
        "Same initial weights and batch order for every row; Adam 1e-3, batch 128; penalty = mean per ReLU map, "
        "summed over act1..act4. Sparsity: zeros in the four ReLU maps over the 10,000 test images "
        "(DSTF's definition, element-weighted). DSTF's anchor (LeNet-5 on MNIST, not Fashion-MNIST): +44.04% "
        "activation sparsity without accuracy loss.", "",
        "| run | test accuracy | Δ accuracy | activation sparsity | Δ sparsity | act1 / act2 / act3 / act4 | "
        "train s |", "|---|---|---|---|---|---|---|", *rows, ""])
    if args.out:
        pathlib.Path(args.out).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
