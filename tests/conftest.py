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


def pytest_collection_finish(session: pytest.Session) -> None:
    # What collection imported (torch, transformers, optuna, the test modules) lives as
    # long as the run, so the collections measure() runs before each tracked step need not
    # walk it: frozen, as the tuner's trial processes do (Note: [a collection walks only
    # what trials make]); 84 of them took 16.8 s of the default run before.
    import gc

    gc.freeze()


def pytest_unconfigure(config: pytest.Config) -> None:
    # Objects still frozen at interpreter exit are never finalized, and nanobind (triton's
    # bindings) prints a leak report for each of its own.
    import gc

    gc.unfreeze()
