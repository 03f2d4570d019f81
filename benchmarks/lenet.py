"""LeNet-5 (ReLU) and Fashion-MNIST, shared by the training-time sparsity benchmarks (regularize, prune/DSTF).

Data: Debian's ``dataset-fashion-mnist`` (``apt-get install -y dataset-fashion-mnist``; 60,000 train + 10,000 test
28×28 images in IDX format under /usr/share/datasets/fashion-mnist/), read without any download. Images are
zero-padded to 32×32 as in the original LeNet-5 and scaled to [0, 1].
"""
from __future__ import annotations

import gzip
import pathlib

import numpy as np
import torch
from torch import nn

FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")


class LeNet5(nn.Module):
    """LeNet-5 with ReLU: conv(1→6, 5×5) → pool → conv(6→16, 5×5) → pool → fc 400→120 → fc 120→84 → fc 84→10.

    The four ReLU maps (``act1`` … ``act4``, module paths of the same name) are the activation maps whose zeros
    DSTF counts.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1, self.act1, self.pool1 = nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2)
        self.conv2, self.act2, self.pool2 = nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2)
        self.fc1, self.act3 = nn.Linear(16 * 5 * 5, 120), nn.ReLU()
        self.fc2, self.act4 = nn.Linear(120, 84), nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.act1(self.conv1(x)))
        x = self.pool2(self.act2(self.conv2(x)))
        x = self.act3(self.fc1(x.flatten(1)))
        return self.fc3(self.act4(self.fc2(x)))


def load_idx(path: pathlib.Path) -> np.ndarray:
    """An IDX (MNIST-format) .gz file as a uint8 array."""
    data = gzip.open(path, "rb").read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def fashion_mnist(split: str = "train", limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images ``[N, 1, 32, 32]`` float in [0, 1], labels ``[N]`` int64) of the ``train`` or ``test`` split."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images = FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz"
    if not images.exists():
        raise SystemExit(f"Fashion-MNIST not found at {FASHION_MNIST}: apt-get install -y dataset-fashion-mnist")
    x = torch.from_numpy(load_idx(images)[:limit]).float().div_(255).unsqueeze(1)
    y = torch.from_numpy(load_idx(FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz")[:limit]).long()
    return nn.functional.pad(x, (2, 2, 2, 2)), y
