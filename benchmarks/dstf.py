"""DSTF dual sparse training (recipes/dstf.yaml) on LeNet-5 and a small ResNet, Fashion-MNIST, CPU.

For each model: train dense (DSTF step 1), then four variants from that same dense model with the same number of
fine-tuning epochs, each run through sparsec (transform → train the transformed module → finish pipeline):

- dense:       plain fine-tuning (no passes);
- prune only:  the recipe without the Transformed-L1 activation regulariser (weight L1, then |w| < tau pruning);
- TL1 only:    the recipe without weight L1 and pruning (Transformed L1 on the ReLU maps);
- DSTF:        the whole recipe (weight L1 → threshold pruning → TL1 fine-tuning with the masks fixed).

Printed per variant, on the 10,000 test images: accuracy; weight sparsity (zeros in conv / linear weights);
activation sparsity (zeros in the ReLU maps that feed conv / linear layers, element-weighted; DSTF's definition);
and DSTF's metric, the multiplications removed: a product w·a of a conv / linear layer is skipped when w = 0 or
a = 0 (the input image counts as an activation), counted exactly over the test images and given as a fraction of
the dense model's multiplications. Also the part removed by weight zeros alone and by activation zeros alone.

    .venv/bin/python benchmarks/dstf.py [--models lenet,resnet] [--out benchmarks/results/dstf.md]
"""
from __future__ import annotations

import argparse
import copy
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


#: Per model: the network, dense epochs, fine-tuning epochs per stage, training images, and recipe overrides.
MODELS = {
    "lenet": dict(build=LeNet5, train=20000, dense_epochs=3, lr=2e-3, overrides=[]),
    "resnet": dict(build=ResNet8, train=8000, dense_epochs=3, lr=2e-3, overrides=[]),
}


def load_stages(path: pathlib.Path) -> list[dict]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))["stages"]


def variant(stages: list[dict], name: str) -> list[dict]:
    """The stages of a variant: the recipe with some passes left out (see the module docstring)."""
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

    return [{**s, "passes": [p for p in s["passes"] if keep(p)]} for s in stages]


def batches(x, y, size, generator=None):
    order = torch.randperm(len(x), generator=generator) if generator is not None else torch.arange(len(x))
    for i in range(0, len(x), size):
        idx = order[i:i + size]
        yield x[idx], y[idx]


def train(model, data, epochs: int, lr: float, seed: int, regularized: bool) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g, step = torch.Generator().manual_seed(seed), 0
    for _ in range(epochs):
        for xb, yb in batches(*data, 128, g):
            loss = F.cross_entropy(model(xb), yb)
            if regularized:
                loss = loss + regularization_loss(model, step=step)
            opt.zero_grad()
            loss.backward()
            opt.step()
            after_step(model, step)
            step += 1


def run_stages(dense: nn.Module, stages: list[dict], data, lr: float, overrides: list[str], seed: int) -> nn.Module:
    """Each stage: transform with its passes, train the transformed module, run its finish pipeline."""
    model, example = copy.deepcopy(dense).eval(), (data[0][:2],)
    for k, stage in enumerate(stages):
        names = {next(iter(p)) for p in stage["passes"]}
        if stage["passes"]:
            ovr = [o for o in overrides if o.split(".", 1)[0] in names]
            model = sparsec.transform(model, stage["passes"], example_inputs=example, overrides=ovr,
                                      measure=False).module()
        train(model, data, stage["epochs"], lr, seed + k, regularized="regularize" in names)
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
        a = inputs[0]
        ones_a, nz_a = torch.ones_like(a), (a != 0).float()
        ones_w, nz_w = torch.ones_like(m.weight), (m.weight != 0).float()
        if isinstance(m, nn.Conv2d):
            mults = lambda u, v: F.conv2d(u, v, None, m.stride, m.padding, m.dilation, m.groups)  # noqa: E731
        else:
            mults = lambda u, v: F.linear(u, v)  # noqa: E731
        count["dense"] += float(mults(ones_a, ones_w).double().sum())
        count["both"] += float(mults(nz_a, nz_w).double().sum())
        count["weights"] += float(mults(ones_a, nz_w).double().sum())
        count["acts"] += float(mults(nz_a, ones_w).double().sum())
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="lenet,resnet")
    parser.add_argument("--recipe", default=str(RECIPE))
    parser.add_argument("--out", help="write the markdown table here as well")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-limit", type=int, help="training images (default: per model, see MODELS)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PASS.OPTION=VALUE",
                        help="override a recipe option for every model, e.g. --set prune.tau=0.03")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    stages = load_stages(pathlib.Path(args.recipe))
    x_test, y_test = fashion_mnist("test")
    rows = []
    for name in args.models.split(","):
        spec = MODELS[name]
        torch.manual_seed(args.seed)
        x, y = fashion_mnist("train", limit=args.train_limit or spec["train"])
        t0 = time.perf_counter()
        dense = spec["build"]().train()
        train(dense, (x, y), spec["dense_epochs"], spec["lr"], args.seed, regularized=False)
        dense.eval()
        print(f"{name}: dense training {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for v in ("dense", "prune only", "TL1 only", "DSTF"):
            t0 = time.perf_counter()
            trained = run_stages(dense, variant(stages, v), (x, y), spec["lr"], spec["overrides"] + args.overrides,
                                 args.seed + 1)
            eager = copy.deepcopy(dense)
            eager.load_state_dict(trained.state_dict())
            r = evaluate(eager, x_test, y_test)
            rows.append((name, v, r, time.perf_counter() - t0))
            print(f"{name} {v}: {r} ({rows[-1][3]:.0f} s)", file=sys.stderr)
    table = ["| model | variant | test accuracy | weight sparsity | activation sparsity | mult. FLOPs removed |"
             " by weight zeros | by activation zeros | time |", "|---|---|---|---|---|---|---|---|---|"]
    for name, v, r, secs in rows:
        table.append(f"| {name} | {v} | {100 * r['accuracy']:.2f}% | {100 * r['weight_sparsity']:.1f}% |"
                     f" {100 * r['activation_sparsity']:.1f}% | **{100 * r['flops_removed']:.1f}%** |"
                     f" {100 * r['by_weights']:.1f}% | {100 * r['by_acts']:.1f}% | {secs:.0f} s |")
    print("\n".join(table))
    if args.out:
        pathlib.Path(args.out).write_text("\n".join(table) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
