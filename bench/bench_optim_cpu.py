"""CPU optimizer step time: autoscale AdamW/SGD against torch.optim in the same run.

    python bench/bench_optim_cpu.py --params 50e6 --repeats 5

Parameters are a GPT-2-like list of shapes (token embedding, then per layer two LayerNorms,
qkv/proj/fc/proj weights and biases) scaled to about ``--params`` fp32 elements. Each
optimizer takes warm-up steps first (autoscale's first step also measures its candidate
kernels), then the median of ``--repeats`` timed steps is reported. Bandwidth: AdamW moves
28 bytes per param per step (read p, g, m, v; write p, m, v), SGD with momentum 20 (read
p, g, buf; write p, buf); the ceiling is the in-place streaming rate of ``a.addcmul_(b, c)``
over arrays far larger than cache (16 bytes per element), measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from autoscale.optim._adamw import AdamW
from autoscale.optim._sgd import SGD


def gpt_shapes(n_params: float) -> list[tuple[int, ...]]:
    """GPT-2-like parameter shapes totalling about ``n_params`` (at least one layer)."""
    d = 512 if n_params >= 20e6 else 256
    # Token embedding takes about half, as in GPT-2 small (vocab 50257), then positions.
    shapes: list[tuple[int, ...]] = [(min(50257, max(1024, int(n_params * 0.5 / d))), d),
                                     (1024, d)]
    layer = [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,),
             (d, 4 * d), (d,)]
    total = sum(torch.Size(s).numel() for s in shapes)
    while True:
        shapes += layer
        total += sum(torch.Size(s).numel() for s in layer)
        if total >= n_params:
            return [*shapes, (d,), (d,)]  # final LayerNorm


def median_time(fn: Callable[[], object], *, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def stream_bandwidth(repeats: int) -> float:
    """In-place streaming GB/s of a.addcmul_(b, c): read a, b, c, write a = 16 B/element."""
    n = 64 * 1024 * 1024  # 256 MiB per array, far beyond any CPU cache
    a, b, c = torch.rand(n), torch.rand(n), torch.rand(n)
    t = median_time(lambda: a.addcmul_(b, c, value=1e-9), warmup=2, repeats=repeats)
    return 16 * n / t / 1e9


def bench(name: str, make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
          params: list[torch.nn.Parameter], bytes_per_param: int,
          args: argparse.Namespace) -> tuple[str, float, str, str]:
    opt = make(params)
    t = median_time(opt.step, warmup=args.warmup, repeats=args.repeats)
    choice = getattr(opt, "kernel_choice", None) or "-"
    del opt
    gc.collect()
    n = sum(p.numel() for p in params)
    return name, t, f"{bytes_per_param * n / t / 1e9:.1f}", choice


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=50e6, help="fp32 parameters (about)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = gpt_shapes(args.params)
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in params)
    print(f"device: cpu ({platform.processor() or platform.machine()}), "
          f"{torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"python {sys.version.split()[0]}")
    try:
        import triton

        print(f"triton {triton.__version__} (not used on CPU)")
    except ImportError:
        print("triton not installed")
    print(f"params: {n / 1e6:.1f}M fp32 in {len(params)} tensors; median of {args.repeats} "
          f"steps after {args.warmup} warm-up")
    bw = stream_bandwidth(args.repeats)
    print(f"stream bandwidth (a.addcmul_(b, c), 16 B/elem): {bw:.1f} GB/s\n")

    adam_kw = dict(lr=1e-3, weight_decay=1e-2)
    sgd_kw = dict(lr=1e-2, momentum=0.9)
    rows = {
        "AdamW": [
            ("torch default", lambda ps: torch.optim.AdamW(ps, **adam_kw)),
            ("torch foreach", lambda ps: torch.optim.AdamW(ps, foreach=True, **adam_kw)),
            ("torch fused", lambda ps: torch.optim.AdamW(ps, fused=True, **adam_kw)),
            ("autoscale auto", lambda ps: AdamW(ps, **adam_kw)),
        ],
        "SGD momentum": [
            ("torch default", lambda ps: torch.optim.SGD(ps, **sgd_kw)),
            ("torch foreach", lambda ps: torch.optim.SGD(ps, foreach=True, **sgd_kw)),
            ("torch fused", lambda ps: torch.optim.SGD(ps, fused=True, **sgd_kw)),
            ("autoscale auto", lambda ps: SGD(ps, **sgd_kw)),
        ],
    }
    bytes_per_param = {"AdamW": 28, "SGD momentum": 20}
    header = (f"{'optimizer':<13} {'implementation':<15} {'step_ms':>9} {'GB/s':>7} "
              f"{'of_stream':>9} {'vs_fused':>9}  kernel")
    print(header)
    print("-" * len(header))
    for opt_name, variants in rows.items():
        results = [bench(name, make, params, bytes_per_param[opt_name], args)
                   for name, make in variants]
        fused_t = next(t for name, t, _, _ in results if name == "torch fused")
        for name, t, gbs, choice in results:
            # vs_fused > 1 means faster than torch fused=True (ratio of step times).
            print(f"{opt_name:<13} {name:<15} {t * 1e3:>9.1f} {gbs:>7} "
                  f"{float(gbs) / bw:>9.2f} {fused_t / t:>8.2f}x  {choice}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
