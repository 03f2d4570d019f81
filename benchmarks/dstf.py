"""DSTF dual sparse training (recipes/dstf.yaml) on LeNet-5 and a small ResNet, Fashion-MNIST, CPU.

For each model: train dense (DSTF step 1), then the variants below from that same dense model, each run through
sparsec (transform → train the transformed module → finish pipeline) with the same fine-tuning epochs, batches and
learning-rate schedule (Adam, cosine decay from the model's lr to 0 over all fine-tuning steps):

- dense:       plain fine-tuning (no passes);
- prune only:  the recipe without the Transformed-L1 activation regulariser (weight L1, then |w| < tau pruning);
- TL1 only:    the recipe without weight L1 and pruning (Transformed L1 on the ReLU maps);
- DSTF:        the whole recipe (weight L1 → threshold pruning → TL1 fine-tuning with the masks fixed).

Each sparse variant runs at every strength factor of --strengths, which multiplies the recipe's pruning threshold
tau and its TL1 weight λ (TAU:LAMBDA: two factors; a factor that leaves a variant unchanged is not run again),
giving an accuracy / FLOPs-removed curve per method (the dense fine-tuned model is the curve's strength-0 point).
At equal accuracy: for each DSTF point, the FLOPs each single method removes at the DSTF point's accuracy,
interpolated linearly along its curve (on the segment of the highest strength that brackets it).

Printed per variant, on the 10,000 test images: accuracy; weight sparsity (zeros in conv / linear weights);
activation sparsity (zeros in the ReLU maps that feed conv / linear layers, element-weighted; DSTF's definition);
and DSTF's metric, the multiplications removed: a product w·a of a conv / linear layer is skipped when w = 0 or
a = 0 (the input image counts as an activation), counted exactly over the test images and given as a fraction of
the dense model's multiplications. Also the part removed by weight zeros alone and by activation zeros alone.

    .venv/bin/python benchmarks/dstf.py [--models lenet,resnet] [--strengths 1,2,2:1,2:0.5] [--out benchmarks/results/dstf.md]
"""
from __future__ import annotations

import argparse
import copy
import math
import pathlib
import sys
import time

import torch
import torch.nn.functional as F
import yaml
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import sparsec  # noqa: E402
from benchmarks.lenet import LeNet5, fashion_mnist  # noqa: E402
from sparsec.training import after_step, regularization_loss  # noqa: E402

RECIPE = pathlib.Path(__file__).resolve().parent.parent / "recipes" / "dstf.yaml"


class Block(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus the shortcut (1×1 conv-BN when the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))) + self.short(x))


class ResNet8(nn.Module):
    """A small ResNet for 32×32 grey images: stem, three basic blocks (width w, 2w, 4w), average pool, linear."""

    def __init__(self, width: int = 8, num_classes: int = 10):
        super().__init__()
        self.stem, self.bn, self.act = nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        self.layer1, self.layer2 = Block(width, width, 1), Block(width, 2 * width, 2)
        self.layer3 = Block(2 * width, 4 * width, 2)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.act(self.bn(self.stem(x))))))
        return self.fc(x.mean((2, 3)))


#: Per model: the network, training images, dense epochs, learning rate and recipe overrides.
MODELS = {
    "lenet": dict(build=LeNet5, train=20000, dense_epochs=3, lr=2e-3, overrides=[]),
    "resnet": dict(build=ResNet8, train=3000, dense_epochs=6, lr=2e-3, overrides=[]),
}
BATCH = 128


def load_stages(path: pathlib.Path) -> list[dict]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))["stages"]


def variant(stages: list[dict], name: str, strength: tuple[float, float] = (1.0, 1.0)) -> list[dict]:
    """The stages of a variant: the recipe with some passes left out (see the module docstring), its pruning
    threshold tau and its activation TL1 weight multiplied by the two factors of ``strength``."""
    def keep(p: dict) -> bool:
        (pass_name, opts), = p.items()
        target = (opts or {}).get("target")
        if name == "dense":
            return False
        if name == "prune only":
            return not (pass_name == "regularize" and target == "activations")
        if name == "TL1 only":
            return not (pass_name == "prune" or pass_name == "regularize" and target == "weights")
        return True

    def scale(p: dict) -> dict:
        (pass_name, opts), = p.items()
        opts = dict(opts or {})
        if pass_name == "prune" and "tau" in opts:
            opts["tau"] *= strength[0]
        if pass_name == "regularize" and opts.get("target") == "activations":
            opts["weight"] *= strength[1]
        return {pass_name: opts}

    return [{**s, "passes": [scale(p) for p in s["passes"] if keep(p)]} for s in stages]


def batches(x, y, size, generator=None):
    order = torch.randperm(len(x), generator=generator) if generator is not None else torch.arange(len(x))
    for i in range(0, len(x), size):
        idx = order[i:i + size]
        yield x[idx], y[idx]


def cosine(lr: float, total_steps: int):
    """The learning rate at a global step: cosine decay from ``lr`` to 0 over ``total_steps``."""
    return lambda step: lr * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


def train(model, data, epochs: int, lr_at, seed: int, regularized: bool, first_step: int = 0) -> int:
    """Adam for ``epochs`` with the learning rate ``lr_at(first_step + step)``; returns the steps taken."""
    opt = torch.optim.Adam(model.parameters(), lr=lr_at(first_step))
    g, step = torch.Generator().manual_seed(seed), 0
    for _ in range(epochs):
        for xb, yb in batches(*data, BATCH, g):
            for group in opt.param_groups:
                group["lr"] = lr_at(first_step + step)
            loss = F.cross_entropy(model(xb), yb)
            if regularized:
                loss = loss + regularization_loss(model, step=step)
            opt.zero_grad()
            loss.backward()
            opt.step()
            after_step(model, step)
            step += 1
    return step


def run_stages(dense: nn.Module, stages: list[dict], data, lr: float, overrides: list[str], seed: int) -> nn.Module:
    """Each stage: transform with its passes, train the transformed module, run its finish pipeline."""
    model, example, done = copy.deepcopy(dense).eval(), (data[0][:2],), 0
    lr_at = cosine(lr, sum(s["epochs"] for s in stages) * math.ceil(len(data[0]) / BATCH))
    for k, stage in enumerate(stages):
        names = {next(iter(p)) for p in stage["passes"]}
        if stage["passes"]:
            ovr = [o for o in overrides if o.split(".", 1)[0] in names]
            model = sparsec.transform(model, stage["passes"], example_inputs=example, overrides=ovr,
                                      measure=False).module()
        done += train(model, data, stage["epochs"], lr_at, seed + k, "regularize" in names, first_step=done)
        if stage["passes"] and stage.get("finish"):
            model = sparsec.transform(model, stage["finish"], example_inputs=example, measure=False).module()
    return model


@torch.no_grad()
def evaluate(eager: nn.Module, x, y) -> dict:
    """Accuracy, weight / activation sparsity and multiplications (dense, and with zeros skipped)."""
    eager.eval()
    layers = [m for m in eager.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    count = {"dense": 0.0, "both": 0.0, "weights": 0.0, "acts": 0.0, "act_zeros": 0, "act_numel": 0}

    def hook(m, inputs, _):
        # products per output = conv / linear of the non-zero indicators; the counts that do not depend on the
        # activations come from one sample, those with all-ones weights from one output channel (groups = 1)
        a, w, n = inputs[0], m.weight, len(inputs[0])
        one_a, nz_a, nz_w = torch.ones_like(a[:1]), (a != 0).float(), (w != 0).float()
        if isinstance(m, nn.Conv2d):
            mults = lambda u, v: F.conv2d(u, v, None, m.stride, m.padding, m.dilation, m.groups)  # noqa: E731
        else:
            mults = lambda u, v: F.linear(u, v)  # noqa: E731
        count["dense"] += float(mults(one_a, torch.ones_like(w)).double().sum()) * n
        count["weights"] += float(mults(one_a, nz_w).double().sum()) * n
        count["both"] += float(mults(nz_a, nz_w).double().sum())
        count["acts"] += float(mults(nz_a, torch.ones_like(w[:1])).double().sum()) * w.shape[0]
        if m is not layers[0]:  # the ReLU maps, not the input image
            count["act_zeros"] += int((a == 0).sum())
            count["act_numel"] += a.numel()

    handles = [m.register_forward_hook(hook) for m in layers]
    correct = 0
    for xb, yb in batches(x, y, 1000):
        correct += int((eager(xb).argmax(1) == yb).sum())
    for h in handles:
        h.remove()
    zeros = sum(int((m.weight == 0).sum()) for m in layers)
    total = sum(m.weight.numel() for m in layers)
    return {"accuracy": correct / len(x), "weight_sparsity": zeros / total,
            "activation_sparsity": count["act_zeros"] / count["act_numel"],
            "flops_removed": 1 - count["both"] / count["dense"],
            "by_weights": 1 - count["weights"] / count["dense"], "by_acts": 1 - count["acts"] / count["dense"]}


def at_accuracy(curve: list[dict], accuracy: float) -> float | None:
    """FLOPs removed at ``accuracy`` along a curve (points in order of strength), interpolated linearly on the
    segment of the highest strength whose accuracies bracket it; None when no segment does."""
    for lo, hi in reversed(list(zip(curve, curve[1:]))):
        a0, a1 = lo["accuracy"], hi["accuracy"]
        if min(a0, a1) <= accuracy <= max(a0, a1):
            t = 0.0 if a0 == a1 else (accuracy - a0) / (a1 - a0)
            return lo["flops_removed"] + t * (hi["flops_removed"] - lo["flops_removed"])
    return None


def label(strength: tuple[float, float]) -> str:
    tau, lam = strength
    return f"×{tau:g}" if tau == lam else f"τ×{tau:g} λ×{lam:g}"


def tables(rows: list[tuple], strengths: list[tuple[float, float]]) -> str:
    """The per-variant table and the equal-accuracy comparison (markdown)."""
    out = ["| model | variant | test accuracy | weight sparsity | activation sparsity | mult. FLOPs removed |"
           " by weight zeros | by activation zeros | time |", "|---|---|---|---|---|---|---|---|---|"]
    for name, v, s, r, secs in rows:
        name_v = v if v == "dense" or strengths == [(1.0, 1.0)] else f"{v} {label(s)}"
        out.append(f"| {name} | {name_v} | {100 * r['accuracy']:.2f}% | {100 * r['weight_sparsity']:.1f}% |"
                   f" {100 * r['activation_sparsity']:.1f}% | **{100 * r['flops_removed']:.1f}%** |"
                   f" {100 * r['by_weights']:.1f}% | {100 * r['by_acts']:.1f}% | {secs:.0f} s |")
    out += ["", "| model | DSTF point | accuracy | DSTF FLOPs removed | prune only at that accuracy |"
            " TL1 only at that accuracy |", "|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r[0] for r in rows):
        dense = [r for n, v, _, r, _ in rows if n == name and v == "dense"]
        curves = {m: dense + [r for n, v, _, r, _ in rows if n == name and v == m]
                  for m in ("prune only", "TL1 only")}
        for n, v, s, r, _ in rows:
            if n != name or v != "DSTF":
                continue
            cells = []
            for m in ("prune only", "TL1 only"):
                f = at_accuracy(curves[m], r["accuracy"])
                cells.append("outside its curve" if f is None else f"{100 * f:.1f}%")
            out.append(f"| {name} | {label(s)} | {100 * r['accuracy']:.2f}% | **{100 * r['flops_removed']:.1f}%** |"
                       f" {cells[0]} | {cells[1]} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="lenet,resnet")
    parser.add_argument("--recipe", default=str(RECIPE))
    parser.add_argument("--out", help="write the markdown tables here as well (rewritten after every variant)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-limit", type=int, help="training images (default: per model, see MODELS)")
    parser.add_argument("--strengths", default="1,2,2:1,2:0.5", help="factors on the recipe's tau and TL1 weight, one run of"
                        " each sparse variant per factor; TAU:LAMBDA gives the two factors apart (default: 1,2,2:1,2:0.5)")
    parser.add_argument("--variants", default="prune only,TL1 only,DSTF", help="sparse variants to run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PASS.OPTION=VALUE",
                        help="override a recipe option for every model, e.g. --set prune.tau=0.03")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    stages = load_stages(pathlib.Path(args.recipe))
    strengths = [(float(f.split(":")[0]), float(f.split(":")[-1])) for f in args.strengths.split(",")]
    x_test, y_test = fashion_mnist("test")
    rows = []
    for name in args.models.split(","):
        spec = MODELS[name]
        torch.manual_seed(args.seed)
        x, y = fashion_mnist("train", limit=args.train_limit or spec["train"])
        t0 = time.perf_counter()
        dense = spec["build"]().train()
        lr_at = cosine(spec["lr"], spec["dense_epochs"] * math.ceil(len(x) / BATCH))
        train(dense, (x, y), spec["dense_epochs"], lr_at, args.seed, regularized=False)
        dense.eval()
        print(f"{name}: dense training {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        runs = {}  # (variant, its stages) -> strength; a factor that does not change a variant's stages is run once
        for v, f in [("dense", (0.0, 0.0))] + [(v, f) for f in strengths for v in args.variants.split(",")]:
            runs.setdefault((v, yaml.safe_dump(variant(stages, v, f))), f)
        for (v, _), strength in runs.items():
            t0 = time.perf_counter()
            trained = run_stages(dense, variant(stages, v, strength), (x, y), spec["lr"],
                                 spec["overrides"] + args.overrides, args.seed + 1)
            eager = copy.deepcopy(dense)
            eager.load_state_dict(trained.state_dict())
            r = evaluate(eager, x_test, y_test)
            rows.append((name, v, strength, r, time.perf_counter() - t0))
            print(f"{name} {v} {label(strength)}: {r} ({rows[-1][4]:.0f} s)", file=sys.stderr, flush=True)
            if args.out:
                pathlib.Path(args.out).write_text(tables(rows, strengths), encoding="utf-8")
    print(tables(rows, strengths))


if __name__ == "__main__":
    main()
