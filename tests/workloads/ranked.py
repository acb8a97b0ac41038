"""A small data-parallel workload whose rank 1 crashes on one plan, to test multi-rank trials.

The global batch is 8 rows (4 a rank at world size 2). Every plan trains normally except
micro-batches of 1 row, where rank 1 alone segfaults (a read of address 0 through
ctypes) while rank 0 goes on into the gradient all-reduce and would wait there forever:
the tuner must notice the dead rank, kill the live one and fail that trial only.
"""

from __future__ import annotations

import ctypes

import torch
import torch.distributed as dist
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class Ranked(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(16, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(2))
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if isinstance(rows, int) and rows == 1 and dist.is_initialized() and dist.get_rank() == 1:
            ctypes.string_at(0)  # SIGSEGV on rank 1 only
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return nn.functional.mse_loss(self.head(h).squeeze(-1), y)


def build():
    torch.manual_seed(0)
    return Ranked(), (torch.randn(8, 16), torch.randn(8))
