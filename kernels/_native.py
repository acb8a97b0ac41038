"""Build and load the C kernels of the CPU paths (``csrc/*.c``) with the machine's C compiler.

Why not torch.compile for these: inductor fuses an element-wise update followed by a
per-block reduction and a second element-wise pass (8-bit AdamW's requantization) into
two loops that each recompute the whole update, with exact sqrt and division intrinsics;
measured at 2x the time of torch's fused fp32 AdamW on this project's CPUs, against a goal
of 0.75x. A plain C loop that keeps a block's fp32 moments in a stack buffer between the
two passes, vectorized by gcc (``-O3 -march=native`` with OpenMP SIMD), does the update
once per element. Why not ``torch.utils.cpp_extension``: it compiles against the torch
headers (tens of seconds per build) and needs ninja; these kernels take raw pointers, so
a ctypes library builds in about a second with nothing but ``cc``.

The sources ship as package data next to this module (``csrc/``). Libraries are cached
under ``$AUTOSCALE_CACHE_DIR`` (default ``~/.cache/autoscale``), keyed by a hash of the
sources, the compiler, the flags and the CPU's feature flags (``-march=native`` code must
not run on another CPU that shares the home directory). A failed build is remembered for
the process and reported by :func:`load_error`; callers fall back to their torch paths.
"""

from __future__ import annotations

import ctypes
import hashlib
import operator
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["CSRC", "FLAGS", "BoundState", "build", "cache_dir", "load", "load_error", "source"]

#: Where the C sources live: one ``<name>.c`` per library, and the ``prelude.h`` they share.
CSRC = Path(__file__).resolve().parent / "csrc"

# Note: [C kernel flags]
# No -ffast-math: it implies -ffinite-math-only, under which gcc may assume that no value
# is inf or NaN and drop what carries them (Note: [non-finite gradients] in
# kernels/__init__.py); it also turns vectorized sqrt and division into estimates.
# -fno-math-errno lets sqrtf be one vector instruction (no errno branch), and
# -fno-trapping-math lets gcc vectorize without proving that no operation traps; neither
# changes a result. -ffp-contract=fast allows fused multiply-adds, which -std=c11 turns
# off (one rounding fewer per a*b+c; inf and NaN pass through an FMA as through the pair).
# Reductions vectorize under `omp simd reduction(...)`, which permits reassociation there
# only. Warnings are on, and tests/kernels/test_native_build.py builds with -Werror.
FLAGS = [
    "-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
    "-ffp-contract=fast", "-std=c11", "-Wall", "-Wextra", "-shared", "-fPIC",
]  # fmt: skip

_lock = threading.Lock()
_libs: dict[str, ctypes.CDLL] = {}
_errors: dict[str, str] = {}


def cache_dir() -> Path:
    """Where built libraries live; ``$AUTOSCALE_CACHE_DIR`` overrides the default."""
    env = os.environ.get("AUTOSCALE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "autoscale"


def source(name: str) -> Path:
    """The C source of library ``name``; FileNotFoundError (naming the fix) if not shipped."""
    path = CSRC / f"{name}.c"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the C sources are package data of autoscale.kernels "
            "(csrc/*.c, csrc/*.h); reinstall autoscale from a source tree that has them."
        )
    return path


def _cpu_identity() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build(name: str, out: Path, *, extra_flags: Sequence[str] = ()) -> str:
    """Compile ``csrc/<name>.c`` into the shared library ``out``; return the compiler's
    diagnostics (warnings), empty when there are none.

    Raises RuntimeError (with the compiler's message) when there is no compiler or the
    build fails, e.g. under ``extra_flags=["-Werror"]`` with a warning.
    """
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    cmd = [cc, *FLAGS, *extra_flags, f"-I{CSRC}", str(source(name)), "-o", str(out), "-lm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
    return proc.stderr.strip()


def load(name: str) -> ctypes.CDLL | None:
    """The library built from ``csrc/<name>.c``, or None if it cannot be built here.

    Invariant: one build per (sources, compiler, flags, CPU) per cache directory;
    concurrent processes each build into a temporary file and rename it into place, so a
    reader never sees a half-written library.
    """
    with _lock:
        if name in _libs:
            return _libs[name]
        if name in _errors:
            return None
        try:
            lib = _build_and_load(name)
        except Exception as err:  # no compiler, no OpenMP, read-only cache: torch path
            _errors[name] = f"{type(err).__name__}: {err}"
            return None
        _libs[name] = lib
        return lib


def load_error(name: str) -> str | None:
    """Why :func:`load` returned None for ``name``, or None if it did not fail."""
    return _errors.get(name)


def _build_and_load(name: str) -> ctypes.CDLL:
    texts = [source(name).read_text(), *(h.read_text() for h in sorted(CSRC.glob("*.h")))]
    key = hashlib.sha256(
        "\0".join([*texts, str(_compiler()), *FLAGS, platform.machine(),
                   _cpu_identity()]).encode()
    ).hexdigest()[:16]
    out_dir = cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{name}-{key}.so"
    if not target.exists():
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            built = Path(tmp) / f"{name}.so"
            build(name, built)
            os.replace(built, target)
    return ctypes.CDLL(str(target))


class BoundState:
    """A bucket's optimizer state bound to a C kernel: the pointer and size arrays that do
    not change from step to step, built once.

    Marshalling 136 tensors' pointers, sizes and layout checks into ctypes arrays costs
    ~0.5 ms a step once the kernel has streamed the caches out (4 % of a 50M-parameter
    step); with the state bound, a step marshals only params and grads. Invariant: it
    is used only while :meth:`same` holds, i.e. the state tensors are the very objects it
    was built from (it holds them, so their memory stays valid; they are persistent
    state, never gradients); the caller validates the layout before binding.
    """

    def __init__(self, numels: Sequence[int], *states: Sequence[torch.Tensor]) -> None:
        self.states = tuple(tuple(x) for x in states)
        self.numels = tuple(numels)
        n = len(self.numels)
        self.n_arr = (ctypes.c_int64 * n)(*self.numels)
        self.arrays = [(ctypes.c_void_p * n)(*[t.data_ptr() for t in x]) for x in self.states]

    def same(self, *states: Sequence[torch.Tensor]) -> bool:
        """True if ``states`` are, list by list, exactly the bound tensor objects."""
        return len(states) == len(self.states) and all(
            len(a) == len(b) and all(map(operator.is_, a, b))
            for a, b in zip(self.states, states, strict=True)
        )

    def params(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]
               ) -> tuple[ctypes.Array, ctypes.Array, int] | None:  # fmt: skip
        """Pointer arrays of ``params`` and ``grads`` and the bf16 flag; None unless they
        are contiguous, of one dtype (fp32 or bf16) and of the bound sizes. (CPU: the
        state was made on the params' device and binding takes CPU state only.)"""
        dtype = params[0].dtype
        if dtype not in (torch.float32, torch.bfloat16) or len(params) != len(self.numels):
            return None
        for p, g, n in zip(params, grads, self.numels, strict=True):
            if (p.dtype != dtype or g.dtype != dtype or p.numel() != n or g.numel() != n
                    or not p.is_contiguous() or not g.is_contiguous()):  # fmt: skip
                return None
        arr = ctypes.c_void_p * len(params)
        return (arr(*[p.data_ptr() for p in params]), arr(*[g.data_ptr() for g in grads]),
                int(dtype == torch.bfloat16))  # fmt: skip
