"""Shared fixtures: the example workloads, importable by name, seeded."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET once, when it is first imported, and test collection
# imports autoscale (hence triton) from whichever test module comes first; so without a
# GPU the interpreter is switched on here, before any of them. tests/kernels/conftest.py
# explains why the kernel tests need it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
