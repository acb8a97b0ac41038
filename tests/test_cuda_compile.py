"""scripts/check_cuda_compile.py: every Triton kernel compiles to a cubin for sm_80/sm_90
with Triton's NVIDIA backend on this GPU-less machine, and a kernel that does not compile
is reported as a failure (so the check can fail)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_cuda_compile.py"
KERNELS = ("_adamw_kernel", "_sgd_kernel", "_lamb_phase1_kernel", "_lamb_phase2_kernel",
           "_lars_norms_kernel", "_lars_apply_kernel", "_adamw8bit_multi_kernel",
           "_quantize_kernel")  # fmt: skip


def _python(*args: str) -> subprocess.CompletedProcess:
    # Without TRITON_INTERPRET: other tests set it in their own process, and under it
    # @triton.jit builds interpreter functions, which cannot be compiled.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=900)


def _rows(stdout: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines() if line.startswith("_")]


def _check(out: subprocess.CompletedProcess, archs: tuple[str, ...]) -> None:
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = _rows(out.stdout)
    assert rows and all("yes" in r for r in rows), out.stdout
    for kernel in KERNELS:
        for arch in archs:
            assert any(r[0] == kernel and arch in r for r in rows), (kernel, arch)
    assert "all compiled" in out.stdout


@pytest.mark.distributed
def test_every_kernel_compiles_for_sm90_first_config() -> None:
    _check(_python(str(SCRIPT), "--arch", "90", "--first-config"), ("sm_90",))


@pytest.mark.distributed
@pytest.mark.slow
def test_every_kernel_and_config_compiles_for_sm80_and_sm90() -> None:
    _check(_python(str(SCRIPT)), ("sm_80", "sm_90"))


@pytest.mark.distributed
def test_a_kernel_that_does_not_compile_is_a_failure(tmp_path: Path) -> None:
    # Indexing a tensor with an integer is not Triton: that kernel must be reported as not
    # compiled (ok False, with the error), and its sibling without the index as compiled.
    prog = tmp_path / "broken.py"
    prog.write_text(textwrap.dedent(f"""
        import sys
        import torch
        import triton
        import triton.language as tl
        sys.path.insert(0, {str(SCRIPT.parent)!r})
        import check_cuda_compile as c

        @triton.jit
        def good(x_ptr, BLOCK: tl.constexpr):
            i = tl.arange(0, BLOCK)
            a = tl.load(x_ptr + i)
            tl.store(x_ptr + i, a + 1.0)

        @triton.jit
        def bad(x_ptr, BLOCK: tl.constexpr):
            i = tl.arange(0, BLOCK)
            a = tl.load(x_ptr + i)
            tl.store(x_ptr + i, a + a[0])

        for fn in (good, bad):
            args = {{"x_ptr": torch.zeros(16), "BLOCK": 16}}
            (r,) = c.compile_launch(c.Launch(fn.__name__, fn, args, {{}}), 90,
                                    first_config=True)
            print(fn.__name__, r.ok, r.detail)
    """))
    out = _python(str(prog))
    assert out.returncode == 0, out.stderr[-3000:]
    result = dict(line.split(" ", 1) for line in out.stdout.splitlines()
                  if line.split(" ", 1)[0] in ("good", "bad"))
    assert result["good"].startswith("True"), out.stdout
    assert result["bad"].startswith("False CompilationError"), out.stdout
