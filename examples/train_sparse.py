"""Train for activation sparsity: transform → train → strip → save → export to ONNX.

LeNet-5 on Fashion-MNIST (Debian's dataset-fashion-mnist): Transformed-L1 penalties on the four ReLU maps (DSTF),
a plain training loop with ``sparsec.regularization_loss`` and ``sparsec.training.after_step``, then ``strip`` removes
the penalty taps, and the artifact is saved and exported to ONNX (verified against torch).
Usage: ``python examples/train_sparse.py [--train-images 10000] [--epochs 1] [-o out/lenet-tl1]``
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import sparsec  # noqa: E402
from benchmarks.lenet import LeNet5, fashion_mnist  # noqa: E402
from benchmarks.train_lenet import evaluate  # noqa: E402
from sparsec.training import after_step  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-images", type=int, default=10_000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("-o", "--out", default="out/lenet-tl1")
    args = ap.parse_args()
    torch.manual_seed(0)
    x, y = fashion_mnist("train", args.train_images)
    xte, yte = fashion_mnist("test")
    example = (x[:64],)

    # 1. transform: taps on every ReLU map (scope=all), Transformed L1 with a = 1, λ = 0.1
    result = sparsec.transform(LeNet5(), "regularize{scope=all kind=tl1 a=1 weight=0.1}", example_inputs=example)
    model = result.module()  # an ordinary trainable nn.Module

    # 2. train: task loss + scheduled penalty; after_step runs the per-step hooks of the passes
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    step = 0
    for epoch in range(args.epochs):
        for i in torch.randperm(len(x)).split(64):
            task = nn.functional.cross_entropy(model(x[i]), y[i])
            penalty = sparsec.regularization_loss(model, step=step)
            opt.zero_grad()
            (task + penalty).backward()
            opt.step()
            after_step(model, step)
            step += 1
        print(f"epoch {epoch}: task loss {task.item():.3f}, penalty {penalty.item():.4f}")

    # 3. strip the training-only parts, 4. save the artifact, 5. export to ONNX and verify against torch
    stripped = sparsec.transform(torch.export.export(model, example), "strip", example_inputs=example)
    sparsec.save(stripped, args.out, force=True)
    sparsec.export_onnx(args.out, f"{args.out}/model.onnx", verify=True, force=True)
    plain = LeNet5()
    plain.load_state_dict(sparsec.load(args.out).state_dict())
    acc, sparsity, per_map = evaluate(plain.eval(), xte, yte)
    print(f"saved {args.out} and {args.out}/model.onnx; test accuracy {acc:.4f}, zeros in the ReLU maps"
          f" {sparsity:.3f} ({' / '.join(f'{p:.2f}' for p in per_map)})")


if __name__ == "__main__":
    main()
