"""Compile every Triton kernel of autoscale for NVIDIA GPUs, on a machine without one.

    python scripts/check_cuda_compile.py                      # sm_80 and sm_90, every config
    python scripts/check_cuda_compile.py --arch 90 --first-config   # one config per kernel

The numerics of the kernels are tested on CPU under ``TRITON_INTERPRET=1``, but the
interpreter runs the Python code of a kernel with numpy: it never type-checks or lowers
it for a GPU. This script does that part ahead of time with Triton's own NVIDIA backend
(TTIR -> TTGIR -> LLVM IR -> PTX -> cubin through the ``ptxas`` bundled in the triton
wheel), for each kernel, with the argument types of its real launches and each of its
autotune configs. It prints one row per compile with the registers and the local memory
(spills) that ``cuobjdump`` reads from the cubin, and exits 1 if any compile failed.

What it shows: each kernel compiles to a cubin for the named GPUs, as a launch on that
GPU would compile it. What it does not show: that the cubin runs correctly, or fast;
that needs a GPU (``bench/bench_optim_gpu.py`` and the kernel tests on CUDA).

How the launches are found: every optimizer and quantization op runs one step on small
CPU tensors (fp32 and bf16 params, sizes that are not multiples of a block) with each
kernel object swapped for a recorder, which keeps the arguments instead of launching.
The argument types follow Triton's launch rules: a tensor is a pointer to its dtype, an
int is i32 when it fits and i64 otherwise, a float is fp32, a bool i1. The recorded
values are never computed, so the host code after a launch sees unwritten buffers; that
is harmless here because nothing is checked, only compiled.

Uses ``triton.compile`` with ``triton.compiler.ASTSource`` and
``triton.backends.compiler.GPUTarget``: the ahead-of-time entry points that Triton's own
``triton.tools.compile`` is built on.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
           torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8",
           torch.bool: "i1"}  # fmt: skip
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas")


def arg_type(value: Any) -> str:
    """The Triton signature type of one launch argument (Triton's launch rules)."""
    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a launch argument of type {type(value).__name__}")


@dataclass
class Launch:
    """One recorded launch: the kernel's name, its JIT function, the bound arguments."""

    name: str
    jit: Any
    args: dict[str, Any]
    options: dict[str, Any]
    configs: list[Any] = field(default_factory=list)  # the autotuner's, or [] if none

    def key(self) -> tuple:
        types = tuple((k, "constexpr:" + repr(v) if self.is_constexpr(k) else arg_type(v))
                      for k, v in self.args.items())
        return (self.name, types, tuple(sorted(self.options.items())))

    def is_constexpr(self, name: str) -> bool:
        return any(p.name == name and p.is_constexpr for p in self.jit.params)


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kw)`` records instead of launching."""

    def __init__(self, name: str, kernel: Any, out: list[Launch]) -> None:
        self.name, self.kernel, self.out = name, kernel, out
        import triton

        tuned = isinstance(kernel, triton.runtime.Autotuner)
        self.jit = kernel.fn if tuned else kernel  # an Autotuner wraps the JIT function
        self.configs = list(kernel.configs) if tuned else []

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def record(*args: Any, **kw: Any) -> None:
            options = {k: kw.pop(k) for k in _LAUNCH_OPTIONS if k in kw}
            # bind_partial: the autotuner supplies its config keys (BLOCK...) per config
            bound = inspect.signature(self.jit.fn).bind_partial(*args, **kw)
            self.out.append(Launch(self.name, self.jit, dict(bound.arguments), options,
                                   self.configs))
        return record


def _kernel_modules() -> list[Any]:
    from autoscale.kernels import _triton_adamw8bit, adamw, lamb, lars, quant, sgd

    return [adamw, sgd, lamb, lars, _triton_adamw8bit, quant]


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Swap every ``@triton.jit`` kernel of autoscale.kernels for a recorder, and let the
    CPU-tensor checks of the Triton paths pass (they accept CPU tensors when interpreting)."""
    import triton

    from autoscale.kernels import _triton_util

    out: list[Launch] = []
    swapped: list[tuple[Any, str, Any]] = []
    for module in _kernel_modules():
        for name, obj in vars(module).items():
            if isinstance(obj, triton.runtime.jit.JITFunction | triton.runtime.Autotuner):
                swapped.append((module, name, obj))
                setattr(module, name, _Recorder(name, obj, out))
    old_flag, old_env = _triton_util.INTERPRET, os.environ.get("TRITON_INTERPRET")
    _triton_util.INTERPRET = True
    os.environ["TRITON_INTERPRET"] = "1"  # read at call time by the quant/8-bit checks
    try:
        yield out
    finally:
        for module, name, obj in swapped:
            setattr(module, name, obj)
        _triton_util.INTERPRET = old_flag
        if old_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old_env


def record_launches() -> list[Launch]:
    """Run two steps of each optimizer (kernel="triton", fp32 and bf16 params) and each
    quantization op once with recorders in place; return the distinct launches."""
    from autoscale.kernels import quant
    from autoscale.optim import LAMB, LARS, SGD, AdamW, AdamW8bit

    makers: list[Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = [
        lambda ps: AdamW(ps, kernel="triton"),
        lambda ps: AdamW(ps, maximize=True, kernel="triton"),
        lambda ps: SGD(ps, lr=0.1, kernel="triton"),
        lambda ps: SGD(ps, lr=0.1, momentum=0.9, kernel="triton"),
        lambda ps: SGD(ps, lr=0.1, momentum=0.9, nesterov=True, kernel="triton"),
        lambda ps: LAMB(ps, kernel="triton"),
        lambda ps: LARS(ps, lr=0.1, momentum=0.9, kernel="triton"),
        lambda ps: AdamW8bit(ps, kernel="triton", min_8bit_size=0),
    ]
    with recording() as out:
        for dtype in (torch.float32, torch.bfloat16):
            for make in makers:
                gen = torch.Generator().manual_seed(0)
                ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype))
                      for s in [(3, 300), (700,), (33,)]]
                for p in ps:
                    p.grad = torch.randn(p.shape, generator=gen).to(dtype)
                opt = make(ps)
                for _ in range(2):  # the first step of SGD/LARS is a kernel of its own
                    opt.step()
        grad = torch.randn(1000)
        quant.quantize_with_feedback(grad, torch.zeros(1000), 256, kernel="triton")
        quant.quantize_blockwise(grad, 256, kernel="triton")
    unique: dict[tuple, Launch] = {}
    for launch in out:
        unique.setdefault(launch.key(), launch)
    return list(unique.values())


def _resources(cubin: bytes, cuobjdump: Path) -> tuple[str, str]:
    """(registers, local-memory bytes) per thread from ``cuobjdump -res-usage``."""
    if not cuobjdump.exists():
        return "?", "?"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    reg, local = re.search(r"REG:(\d+)", text), re.search(r"LOCAL:(\d+)", text)
    return (reg.group(1) if reg else "?"), (local.group(1) if local else "?")


@dataclass
class Compiled:
    launch: Launch
    arch: int
    config: str
    ok: bool
    seconds: float
    detail: str  # cubin size and resources, or the error's first line
    regs: str = "-"
    local: str = "-"


def compile_launch(launch: Launch, arch: int, *, first_config: bool) -> list[Compiled]:
    """Compile ``launch`` for ``sm_<arch>`` once per autotune config (or its launch options)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    configs = launch.configs[:1] if first_config else launch.configs
    results = []
    for config in configs or [None]:
        constexprs = {k: v for k, v in launch.args.items() if launch.is_constexpr(k)}
        options = dict(launch.options)
        label = ",".join(f"{k}={v}" for k, v in sorted(options.items())) or "default"
        if config is not None:
            constexprs.update(config.kwargs)
            options.update(num_warps=config.num_warps, num_stages=config.num_stages)
            label = ",".join([*(f"{k}={v}" for k, v in config.kwargs.items()),
                              f"warps={config.num_warps}", f"stages={config.num_stages}"])
        signature = {}
        for p in launch.jit.params:
            if p.is_constexpr:
                signature[p.name] = "constexpr"
            else:
                signature[p.name] = arg_type(launch.args[p.name])
        src = ASTSource(launch.jit, signature, constexprs=constexprs)
        t0 = time.perf_counter()
        try:
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        except Exception as err:  # reported per row; the exit code says so
            first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            results.append(Compiled(launch, arch, label, False, time.perf_counter() - t0,
                                    f"{type(err).__name__}: {first}"[:120]))
            continue
        cubin = kernel.asm["cubin"]
        regs, local = _resources(cubin, cuobjdump)
        results.append(Compiled(launch, arch, label, True, time.perf_counter() - t0,
                                f"{len(cubin) / 1024:.0f} KiB", regs, local))
    return results


def describe(launch: Launch) -> str:
    """The launch's constexprs (its specialization), for the table."""
    parts = []
    for k, v in launch.args.items():
        if launch.is_constexpr(k) and k != "CHUNK":
            parts.append(f"{k}={getattr(v, 'name', v)}")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90],
                        help="CUDA compute capabilities as integers (default: 80 90)")
    parser.add_argument("--first-config", action="store_true",
                        help="only the first autotune config of each kernel (faster)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 makes @triton.jit build interpreter functions, "
                     "which do not compile: run without it")
    try:
        import triton
    except ImportError:
        print("check_cuda_compile: triton is not installed (Linux only); nothing to check.")
        return 0
    print(f"torch {torch.__version__}; triton {triton.__version__}; "
          f"targets: {', '.join(f'sm_{a}' for a in args.arch)}")
    launches = record_launches()
    print(f"{len(launches)} distinct launches recorded from the optimizers and quant ops\n")
    header = (f"{'kernel':<26} {'launch':<62} {'arch':>5} {'config':<34} {'ok':<4} "
              f"{'regs':>4} {'local':>5} {'cubin':>7} {'sec':>5}")
    print(header)
    print("-" * len(header))
    failed = 0
    for launch in launches:
        for arch in args.arch:
            for r in compile_launch(launch, arch, first_config=args.first_config):
                failed += not r.ok
                print(f"{launch.name:<26} {describe(launch):<62} {'sm_' + str(arch):>5} "
                      f"{r.config:<34} {'yes' if r.ok else 'NO':<4} {r.regs:>4} {r.local:>5} "
                      f"{r.detail if r.ok else '':>7} {r.seconds:>5.1f}"
                      + ("" if r.ok else f"\n    {r.detail}"))
    print(f"\n{'all compiled' if not failed else f'{failed} compile(s) FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
