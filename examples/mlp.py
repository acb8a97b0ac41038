"""A residual MLP: the smallest model worth tuning.

``autoscale tune examples/mlp.py --budget 256MiB --trials 5``
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class MLP(nn.Module):
    def __init__(self, in_features: int = 64, width: int = 256, depth: int = 4,
                 classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList([ResidualBlock(width) for _ in range(depth)])
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def loss_fn(output: torch.Tensor, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return F.cross_entropy(output, batch[1])


class Classifier(nn.Module):
    """Wraps the MLP so that forward(x, y) takes the labels too (the batch is (x, y))."""

    def __init__(self) -> None:
        super().__init__()
        self.net = MLP()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build(batch_size: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(batch_size, 64)
    y = torch.randint(0, 10, (batch_size,))
    return Classifier(), (x, y), loss_fn
