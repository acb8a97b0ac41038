"""The C sources of the native paths (kernels/csrc/) ship with the package, build without
a warning, and with flags that keep IEEE inf/NaN semantics (Note: [C kernel flags])."""

from __future__ import annotations

import pytest

from autoscale.kernels import _native

SOURCES = ["adamw8bit", "optim"]


def test_sources_are_installed() -> None:
    # Package data: pyproject's [tool.setuptools.package-data] must list csrc/*.c, csrc/*.h.
    names = sorted(p.name for p in _native.CSRC.iterdir())
    assert {f"{name}.c" for name in SOURCES} | {"prelude.h"} <= set(names), names
    assert sorted(p.stem for p in _native.CSRC.glob("*.c")) == SOURCES


@pytest.mark.parametrize("name", SOURCES)
def test_source_builds_without_warnings(name: str, tmp_path) -> None:
    if _native._compiler() is None:
        pytest.skip("no C compiler on this host (the native paths are then not offered)")
    diagnostics = _native.build(name, tmp_path / f"{name}.so", extra_flags=["-Werror"])
    assert diagnostics == ""
    assert (tmp_path / f"{name}.so").is_file()


def test_flags_keep_inf_and_nan() -> None:
    # Each of these implies -ffinite-math-only (or reassociation everywhere); the
    # behaviour itself is tested in tests/kernels/test_nonfinite.py.
    banned = {"-ffast-math", "-Ofast", "-ffinite-math-only", "-funsafe-math-optimizations",
              "-fassociative-math"}  # fmt: skip
    assert not banned & set(_native.FLAGS)
    assert {"-Wall", "-Wextra"} <= set(_native.FLAGS)
