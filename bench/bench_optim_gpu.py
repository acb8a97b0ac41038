"""CUDA optimizer step time: autoscale's Triton kernels against torch's, in the same run.

    python bench/bench_optim_gpu.py --params 50e6 --repeats 20
    TRITON_INTERPRET=1 python bench/bench_optim_gpu.py --smoke   # the code path, on CPU

Same GPT-like parameter list as bench_optim_cpu.py. Groups of rows, the first row of each
the baseline of its "vs_base" column (its time over the row's: above 1 is faster):

- AdamW: torch.optim.AdamW fused=True and foreach=True, autoscale AdamW (Triton), 8-bit
  AdamW from bitsandbytes and torchao (each only where importable) and autoscale's (Triton).
- SGD momentum: torch fused against autoscale's Triton kernel.
- LAMB and LARS: torch has neither, so autoscale's own torch path (foreach ops, the CPU
  fallback) is the baseline for its Triton kernel.

Times are medians of CUDA-event-synchronised steps after warm-up (the first autoscale step
also autotunes). GB/s is nominal: the bytes of one fp32 pass over parameter, gradient and
state (AdamW and LAMB 28 B/param, SGD and LARS 20) over the step time, and "of_stream" its
ratio to an in-place ``a.addcmul_(b, c)`` stream (16 B/elem) measured in the same run.
Without a GPU it prints why and exits 0.

``--smoke`` runs the whole script on CPU tensors of a few hundred elements with Triton's
interpreter (every row, every kernel, the table), with wall-clock timing: it checks that
the script and its Triton paths work where no GPU is, and its times mean nothing.
Third-party 8-bit rows are CUDA-only and left out there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_optim_cpu import gpt_shapes

from autoscale.kernels import _triton_util
from autoscale.optim import LAMB, LARS, SGD, AdamW, AdamW8bit


def cuda_median_ms(fn: Callable[[], object], *, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def wall_median_ms(fn: Callable[[], object], *, warmup: int, repeats: int) -> float:
    """--smoke's timer: wall-clock median on CPU (the CPU has no events to record)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def stream_bandwidth(dev: torch.device, timer: Callable[..., float], numel: int) -> float:
    """In-place GB/s of a.addcmul_(b, c) over ``numel``-element arrays (16 B/element)."""
    a, b, c = (torch.rand(numel, device=dev) for _ in range(3))
    ms = timer(lambda: a.addcmul_(b, c, value=1e-9), warmup=3, repeats=10)
    return 16 * a.numel() / ms / 1e6


# --smoke: a few small tensors, matrices and vectors, none a multiple of a Triton block
SMOKE_SHAPES = [(48, 40), (40,), (120, 40), (120,), (40, 160), (7,)]


def eight_bit_variants(*, third_party: bool) -> list[tuple[str, Callable]]:
    """8-bit AdamW rows: bitsandbytes and torchao where importable (only if
    ``third_party``), then autoscale's Triton kernel."""
    variants = []
    if not third_party:
        print("--smoke: bitsandbytes/torchao rows are CUDA-only: left out")
        return [("autoscale 8bit", lambda ps: AdamW8bit(ps, lr=1e-3, kernel="triton"))]
    try:
        import bitsandbytes as bnb

        variants.append(("bitsandbytes 8bit", lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3)))
    except ImportError:
        print("bitsandbytes not installed: no row")
    try:
        from torchao.optim import AdamW8bit as AoAdamW8bit

        variants.append(("torchao 8bit", lambda ps: AoAdamW8bit(ps, lr=1e-3)))
    except ImportError:
        print("torchao not installed: no row")
    variants.append(("autoscale 8bit", lambda ps: AdamW8bit(ps, lr=1e-3, kernel="triton")))
    return variants


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=50e6)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--smoke", action="store_true",
                        help="run every row on tiny CPU tensors under TRITON_INTERPRET=1 "
                             "(checks the code path; the times mean nothing)")
    args = parser.parse_args(argv)
    if args.smoke:
        if not _triton_util.INTERPRET:
            # Triton reads the variable when it is imported, so it cannot be set from here.
            parser.error("--smoke runs the Triton kernels in Triton's CPU interpreter, which "
                         "must be chosen before triton is imported: run "
                         "TRITON_INTERPRET=1 python bench/bench_optim_gpu.py --smoke")
        dev, timer, shapes = torch.device("cpu"), wall_median_ms, SMOKE_SHAPES
        warmup, repeats, stream_numel = 1, 2, 1 << 16
        print("--smoke: CPU tensors, Triton interpreter; checks the code path, times mean "
              "nothing")
    elif not torch.cuda.is_available():
        print("bench_optim_gpu: no CUDA device in this process; nothing to measure (skipped).")
        return 0
    else:
        dev, timer, shapes = torch.device("cuda"), cuda_median_ms, gpt_shapes(args.params)
        warmup, repeats, stream_numel = args.warmup, args.repeats, 256 * 1024 * 1024
        print(f"device: {torch.cuda.get_device_name(dev)}")
    import triton

    print(f"torch {torch.__version__}; triton {triton.__version__}")
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=dev) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in params)
    bw = stream_bandwidth(dev, timer, stream_numel)
    print(f"params: {n / 1e6:.3g}M fp32 in {len(params)} tensors; stream {bw:.0f} GB/s\n")
    rows = {
        "AdamW": (28, [
            ("torch fused", lambda ps: torch.optim.AdamW(ps, fused=True)),
            ("torch foreach", lambda ps: torch.optim.AdamW(ps, foreach=True)),
            ("autoscale triton", lambda ps: AdamW(ps, kernel="triton")),
            *eight_bit_variants(third_party=not args.smoke),
        ]),
        "SGD momentum": (20, [
            ("torch fused", lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, fused=True)),
            ("autoscale triton", lambda ps: SGD(ps, lr=1e-2, momentum=0.9, kernel="triton")),
        ]),
        "LAMB": (28, [
            ("autoscale foreach", lambda ps: LAMB(ps, kernel="foreach")),
            ("autoscale triton", lambda ps: LAMB(ps, kernel="triton")),
        ]),
        "LARS": (20, [
            ("autoscale foreach", lambda ps: LARS(ps, lr=0.1, momentum=0.9, kernel="foreach")),
            ("autoscale triton", lambda ps: LARS(ps, lr=0.1, momentum=0.9, kernel="triton")),
        ]),
    }
    print(f"{'optimizer':<13} {'implementation':<18} {'step_ms':>8} {'GB/s':>7} "
          f"{'of_stream':>9} {'vs_base':>8}  kernel")
    for opt_name, (bytes_per_param, variants) in rows.items():
        base_ms = None
        for name, make in variants:
            opt = make(params)
            ms = timer(opt.step, warmup=warmup, repeats=repeats)
            kernel = getattr(opt, "kernel_choice", "torch")
            del opt
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            base_ms = base_ms or ms  # the first row of each group is its baseline
            gbs = bytes_per_param * n / ms / 1e6  # 8-bit rows move fewer bytes: nominal only
            print(f"{opt_name:<13} {name:<18} {ms:>8.2f} {gbs:>7.0f} {gbs / bw:>9.2f} "
                  f"{base_ms / ms:>7.2f}x  {kernel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
