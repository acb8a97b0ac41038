"""Parsing and printing byte sizes ("8GiB", "512MB", 1_000_000)."""

from __future__ import annotations

import re

from autoscale.errors import TunerError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
    "ti": 1024**4, "tib": 1024**4,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | float | str, *, name: str = "memory_budget") -> int:
    """Return ``value`` as a whole number of bytes.

    Accepts an int/float of bytes or a string with a decimal (kB, MB, GB) or binary
    (KiB, MiB, GiB) unit. Raises TunerError naming ``name`` for anything else or for a
    value that is not positive.
    """
    if isinstance(value, bool):
        raise TunerError(f"{name} must be a size such as 8GiB or a number of bytes, got {value!r}.")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    elif isinstance(value, str) and (match := _PATTERN.match(value)):
        number, unit = float(match.group(1)), match.group(2).lower()
    else:
        raise TunerError(
            f"{name}={value!r} is not a size; write it as bytes (17179869184) or with a unit "
            "('16GiB', '512MiB', '8GB')."
        )
    if unit not in _UNITS:
        raise TunerError(
            f"{name}={value!r} has an unknown unit {unit!r}; use one of B, kB, MB, GB, KiB, "
            "MiB, GiB, TiB."
        )
    nbytes = int(number * _UNITS[unit])
    if nbytes <= 0:
        raise TunerError(f"{name}={value!r} must be positive.")
    return nbytes


def format_bytes(nbytes: float) -> str:
    """Human-readable binary size, e.g. ``1.50 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.2f} TiB"
