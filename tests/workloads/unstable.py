"""A workload whose build() returns another model in the tuner's worker processes (they
run as ``python -c``): the tuner must refuse it instead of measuring a different model."""

from __future__ import annotations

import sys

import torch
from torch import nn


def build():
    torch.manual_seed(0)
    width = 24 if sys.argv[0] == "-c" else 16
    model = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 1))
    return model, (torch.randn(8, 16),), lambda out, batch: out.pow(2).mean()
