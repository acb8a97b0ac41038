"""CUDA optimizer step time: autoscale's Triton AdamW/SGD against torch fused, same run.

    python bench/bench_optim_gpu.py --params 50e6 --repeats 20

Same GPT-like parameter list as bench_optim_cpu.py. Rows: torch.optim.AdamW fused=True and
foreach=True, autoscale AdamW (Triton), 8-bit AdamW from bitsandbytes / torchao /
autoscale (each only where importable), and SGD momentum (torch fused vs Triton). Times are
medians of CUDA-event-synchronised steps after warm-up (the first autoscale step also
autotunes). Bandwidth is compared with an in-place ``a.addcmul_(b, c)`` stream (16 B/elem).
Without a GPU it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_optim_cpu import gpt_shapes


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


def stream_bandwidth(dev: torch.device) -> float:
    """In-place GB/s of a.addcmul_(b, c) over 1 GiB arrays (16 B/element)."""
    a, b, c = (torch.rand(256 * 1024 * 1024, device=dev) for _ in range(3))
    ms = cuda_median_ms(lambda: a.addcmul_(b, c, value=1e-9), warmup=3, repeats=10)
    return 16 * a.numel() / ms / 1e6


def eight_bit_variants() -> list[tuple[str, Callable]]:
    variants = []
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
    try:
        from autoscale.optim._adamw8bit import AdamW8bit

        variants.append(("autoscale 8bit", lambda ps: AdamW8bit(ps, lr=1e-3)))
    except ImportError as err:
        print(f"autoscale AdamW8bit not importable ({err}): no row")
    return variants


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=50e6)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_optim_gpu: no CUDA device in this process; nothing to measure (skipped).")
        return 0
    import triton

    from autoscale.optim._adamw import AdamW
    from autoscale.optim._sgd import SGD

    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(dev)}; torch {torch.__version__}; "
          f"triton {triton.__version__}")
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=dev) * 0.02)
              for s in gpt_shapes(args.params)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in params)
    bw = stream_bandwidth(dev)
    print(f"params: {n / 1e6:.1f}M fp32 in {len(params)} tensors; stream {bw:.0f} GB/s\n")
    rows = {
        "AdamW": (28, [
            ("torch fused", lambda ps: torch.optim.AdamW(ps, fused=True)),
            ("torch foreach", lambda ps: torch.optim.AdamW(ps, foreach=True)),
            ("autoscale triton", lambda ps: AdamW(ps, kernel="triton")),
            *eight_bit_variants(),
        ]),
        "SGD momentum": (20, [
            ("torch fused", lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, fused=True)),
            ("autoscale triton", lambda ps: SGD(ps, lr=1e-2, momentum=0.9, kernel="triton")),
        ]),
    }
    print(f"{'optimizer':<13} {'implementation':<18} {'step_ms':>8} {'GB/s':>7} "
          f"{'of_stream':>9} {'vs_fused':>9}")
    for opt_name, (bytes_per_param, variants) in rows.items():
        fused_ms = None
        for name, make in variants:
            opt = make(params)
            ms = cuda_median_ms(opt.step, warmup=args.warmup, repeats=args.repeats)
            del opt
            torch.cuda.empty_cache()
            fused_ms = fused_ms or ms  # first row is the baseline
            gbs = bytes_per_param * n / ms / 1e6  # 8-bit rows move fewer bytes: nominal only
            print(f"{opt_name:<13} {name:<18} {ms:>8.2f} {gbs:>7.0f} {gbs / bw:>9.2f} "
                  f"{fused_ms / ms:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
