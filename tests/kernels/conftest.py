"""Kernel tests run every Triton kernel on CPU through the Triton interpreter.

Triton reads TRITON_INTERPRET when it is imported, so it is set here, before any test
module (or autoscale.kernels) imports triton. If something imported triton earlier in the
process, the ``interpret`` fixture fails with the command that works.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture
def interpret() -> None:
    """Fail (not skip: a skip would hide untested kernels) unless the interpreter is on."""
    from autoscale.kernels import _triton_util

    if not _triton_util.HAS_TRITON:
        pytest.skip("triton is not installed (it installs on Linux only)")
    if not _triton_util.INTERPRET:
        pytest.fail("triton was imported before tests/kernels/conftest.py set "
                    "TRITON_INTERPRET=1; run `TRITON_INTERPRET=1 pytest tests/kernels`.")
