"""Shared fixtures: the example workloads, importable by name, seeded."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny_gpt(batch_size: int = 8, dropout: float = 0.1):
    """The examples/gpt.py model at a size that trains in milliseconds."""
    import gpt

    config = gpt.GPTConfig(block_size=32, n_layer=3, n_head=2, n_embd=32, dropout=dropout)
    return gpt.build(batch_size=batch_size, config=config)
