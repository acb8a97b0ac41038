"""A workload whose plans misbehave by micro-batch size, to test trial isolation.

The whole batch (8) trains normally. A micro-batch of 1 raises, of 2 segfaults (a read
of address 0 through ctypes), of 4 hangs: the three ways a real trial goes wrong (a
kernel without a dtype, a native crash, a deadlock). Only a tuner that measures each
trial in its own process with a time limit survives all three.
"""

from __future__ import annotations

import ctypes
import time

import torch
from torch import nn


class Faulty(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # No repeated blocks: the plan space is the micro-batch size alone (1, 2, 4, 8).
        self.inner = nn.Linear(16, 16)
        self.outer = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if not isinstance(rows, int):  # tracing: symbolic sizes, no misbehaviour
            rows = 8
        if rows == 1:
            raise RuntimeError("no kernel for a batch of one")
        if rows == 2:
            ctypes.string_at(0)  # SIGSEGV
        if rows == 4:
            time.sleep(3600)
        return self.outer(torch.relu(self.inner(x))).pow(2).mean()


def build():
    torch.manual_seed(0)
    return Faulty(), (torch.randn(8, 16),)
