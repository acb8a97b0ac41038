"""Byte sizes as users write them."""

from __future__ import annotations

import pytest

from autoscale import TunerError, parse_bytes


@pytest.mark.parametrize(("text", "nbytes"), [
    ("8GiB", 8 * 2**30), ("512MiB", 512 * 2**20), ("1.5 GiB", int(1.5 * 2**30)),
    ("8GB", 8 * 10**9), ("100", 100), (4096, 4096), ("2kib", 2048), (1e9, 10**9),
])
def test_sizes(text, nbytes) -> None:
    assert parse_bytes(text) == nbytes


@pytest.mark.parametrize("bad", ["", "GiB", "8 parsecs", "-1GiB", 0, -5, True, None, [1]])
def test_bad_sizes_name_the_argument(bad) -> None:
    with pytest.raises(TunerError, match="memory_budget"):
        parse_bytes(bad)
