"""CPU optimizer step time: autoscale AdamW/SGD against torch.optim in the same run.

    python bench/bench_optim_cpu.py --params 50e6

Parameters are a GPT-2-like list of shapes (token embedding, then per layer two LayerNorms,
qkv/proj/fc/proj weights and biases) scaled to about ``--params`` fp32 elements. Bandwidth:
AdamW moves 28 bytes per param per step (read p, g, m, v; write p, m, v), SGD with
momentum 20 (read p, g, buf; write p, buf); the ceiling is the in-place streaming rate of
``a.addcmul_(b, c)`` over arrays far larger than cache (16 bytes per element).

Tables "AdamW bf16" and "SGD bf16" step bf16 copies of the params: torch.optim keeps
bf16 state for them (AdamW 14 bytes per param, SGD 10), autoscale fp32 state (22, 14).
Their "autoscale ref" row is the reference path that auto took for bf16 params before
the one-pass C loops (kernels/csrc/optim.c, run by kernels/_cpu_optim.py) became
candidates; a claim line prints auto's speed-up over it. vs_base there compares against
torch's fused kernel with bf16 state, which is less work and less precise. Tables "LAMB"
and "LARS" (no torch.optim counterpart) compare auto with autoscale's foreach path, the
best CPU path before the C loops; its "#2" row is the noise control.

Protocol (Note: [interleaved timing]): every implementation of one optimizer (with a
second torch fused one as a control: its vs_base is the noise floor), and the stream,
step in turn in each round, so all of them meet the same machine state; ratios
(vs_base, of_stream) are taken per round and their median printed. A sequential protocol
(each implementation's steps in a block) gave autoscale's AdamW 0.64x of fused on this
VM although both ran the same torch fused kernel: the VM had switched between a slow
memory state (fused ~26 ms) and a fast one (~17 ms) between the two blocks.
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
from autoscale.optim._lamb import LAMB
from autoscale.optim._lars import LARS
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


def interleaved_ms(
    fns: dict[str, Callable[[], object]], *, repeats: int, warmup_s: float
) -> tuple[dict[str, list[float]], int]:
    """Per-call times (ms) of each of ``fns``, called in turn, ``repeats`` rounds; and the
    number of warm-up rounds run first.

    Note: [interleaved timing]
    This 2-vCPU VM switches, over seconds to minutes, between a slow and a fast memory
    state (torch's fused AdamW on 50M params: ~26 vs ~17 ms a step). Timing one
    implementation after another compares them across states; taking a round of all of
    them at a time, and ratios per round, compares them within one. Warm-up: at least two
    rounds (state allocation, autoscale's first-step kernel measurement, compilation)
    and at least ``warmup_s`` seconds (first-touch page faults).
    """
    rounds, end = 0, time.perf_counter() + warmup_s
    while rounds < 2 or time.perf_counter() < end:
        for fn in fns.values():
            fn()
        rounds += 1
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times, rounds


def median_ratio(num: list[float], den: list[float]) -> float:
    """The median over rounds of num[i] / den[i] (interleaved samples, same length)."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


NOISE = 0.03  # see the goal lines in main()
STREAM_NUMEL = 64 * 1024 * 1024  # 256 MiB per array, far beyond any CPU cache


def stream_fn() -> Callable[[], object]:
    """One in-place streaming pass a.addcmul_(b, c): read a, b, c, write a = 16 B/element."""
    a, b, c = torch.rand(STREAM_NUMEL), torch.rand(STREAM_NUMEL), torch.rand(STREAM_NUMEL)
    return lambda: a.addcmul_(b, c, value=1e-9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=50e6, help="fp32 parameters (about)")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds")
    parser.add_argument("--warmup-s", type=float, default=3.0,
                        help="interleaved warm-up rounds for at least this long (seconds)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args(argv)
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
    print(f"params: {n / 1e6:.1f}M fp32 in {len(params)} tensors; {args.repeats} interleaved "
          f"rounds after >= {args.warmup_s:g} s of warm-up rounds; medians, ratios per round")
    stream = stream_fn()

    adam_kw = dict(lr=1e-3, weight_decay=1e-2)
    sgd_kw = dict(lr=1e-2, momentum=0.9)
    lars_kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
    params_bf16 = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in params]
    for p, q in zip(params_bf16, params, strict=True):
        p.grad = q.grad.to(torch.bfloat16)
    # name -> (params, baseline row, bytes per param for torch rows, for autoscale rows,
    #          rows). Bytes: what one pass over memory moves (reads + writes, per param).
    tables: dict[str, tuple[list, str, int, int, list]] = {
        "AdamW": (params, "torch fused", 28, 28, [
            ("torch default", lambda ps: torch.optim.AdamW(ps, **adam_kw)),
            ("torch foreach", lambda ps: torch.optim.AdamW(ps, foreach=True, **adam_kw)),
            ("torch fused", lambda ps: torch.optim.AdamW(ps, fused=True, **adam_kw)),
            ("torch fused #2", lambda ps: torch.optim.AdamW(ps, fused=True, **adam_kw)),
            ("autoscale auto", lambda ps: AdamW(ps, **adam_kw)),
        ]),
        "SGD momentum": (params, "torch fused", 20, 20, [
            ("torch default", lambda ps: torch.optim.SGD(ps, **sgd_kw)),
            ("torch foreach", lambda ps: torch.optim.SGD(ps, foreach=True, **sgd_kw)),
            ("torch fused", lambda ps: torch.optim.SGD(ps, fused=True, **sgd_kw)),
            ("torch fused #2", lambda ps: torch.optim.SGD(ps, fused=True, **sgd_kw)),
            ("autoscale auto", lambda ps: SGD(ps, **sgd_kw)),
        ]),
        # bf16 params: torch keeps bf16 state, autoscale fp32 (more bytes, and precise)
        "AdamW bf16": (params_bf16, "torch fused", 14, 22, [
            ("torch default", lambda ps: torch.optim.AdamW(ps, **adam_kw)),
            ("torch fused", lambda ps: torch.optim.AdamW(ps, fused=True, **adam_kw)),
            ("torch fused #2", lambda ps: torch.optim.AdamW(ps, fused=True, **adam_kw)),
            ("autoscale ref", lambda ps: AdamW(ps, kernel="reference", **adam_kw)),
            ("autoscale auto", lambda ps: AdamW(ps, **adam_kw)),
        ]),
        "SGD bf16": (params_bf16, "torch fused", 10, 14, [
            ("torch fused", lambda ps: torch.optim.SGD(ps, fused=True, **sgd_kw)),
            ("torch fused #2", lambda ps: torch.optim.SGD(ps, fused=True, **sgd_kw)),
            ("autoscale ref", lambda ps: SGD(ps, kernel="reference", **sgd_kw)),
            ("autoscale auto", lambda ps: SGD(ps, **sgd_kw)),
        ]),
        # no LAMB/LARS in torch: the baseline is autoscale's foreach path (torch ops),
        # the best CPU path before the C loops. LAMB: pass 1 reads p, g, m, v, writes
        # m, v; pass 2 reads p, m, v, writes p (40 B). LARS: norms read p, g; then SGD (28 B).
        "LAMB": (params, "autoscale foreach", 40, 40, [
            ("autoscale foreach", lambda ps: LAMB(ps, kernel="foreach")),
            ("autoscale foreach#2", lambda ps: LAMB(ps, kernel="foreach")),
            ("autoscale auto", lambda ps: LAMB(ps)),
        ]),
        "LARS": (params, "autoscale foreach", 28, 28, [
            ("autoscale foreach", lambda ps: LARS(ps, kernel="foreach", **lars_kw)),
            ("autoscale foreach#2", lambda ps: LARS(ps, kernel="foreach", **lars_kw)),
            ("autoscale auto", lambda ps: LARS(ps, **lars_kw)),
        ]),
    }
    header = (f"{'optimizer':<13} {'implementation':<19} {'step_ms':>9} {'GB/s':>7} "
              f"{'of_stream':>9} {'vs_base':>8}  kernel")
    print()
    print(header)
    print("-" * len(header))
    ratios: dict[str, dict[str, float]] = {}
    for opt_name, (ps, base, bytes_torch, bytes_ours, variants) in tables.items():
        # All implementations step the same params (each with its own state); a step's
        # cost does not depend on the values.
        opts = {name: make(ps) for name, make in variants}
        times, _ = interleaved_ms({**{k: o.step for k, o in opts.items()}, "stream": stream},
                                  repeats=args.repeats, warmup_s=args.warmup_s)
        ratios[opt_name] = {}
        for name, opt in opts.items():
            ts = times[name]
            moved = n * (bytes_ours if name.startswith("autoscale") else bytes_torch)
            gbs = moved / statistics.median(ts) / 1e6
            # of_stream: (moved / t) / (16 * STREAM_NUMEL / t_stream), per round
            of_stream = median_ratio([moved / t for t in ts],
                                     [16 * STREAM_NUMEL / t for t in times["stream"]])
            vs_base = median_ratio(times[base], ts)  # > 1: faster than the baseline
            ratios[opt_name][name] = vs_base
            print(f"{opt_name:<13} {name:<19} {statistics.median(ts):>9.1f} {gbs:>7.1f} "
                  f"{of_stream:>9.2f} {vs_base:>7.2f}x  "
                  f"{getattr(opt, 'kernel_choice', None) or '-'}")
        stream_gbs = 16 * STREAM_NUMEL / statistics.median(times["stream"]) / 1e6
        print(f"{'':<13} {'(stream)':<19} {statistics.median(times['stream']):>9.1f} "
              f"{stream_gbs:>7.1f} {1.0:>9.2f}")
        print(f"{'':<13} vs_base: against {base!r}")
        del opts
        gc.collect()
    print()
    for opt_name in ("AdamW", "SGD momentum"):
        # "torch fused #2" is a second, identical fused optimizer: its vs_base is the
        # noise floor of this comparison (0.99-1.01 in A/B runs of 40 rounds), which the
        # goal's NOISE margin covers with room to spare and no more.
        ratio = ratios[opt_name]["autoscale auto"]
        print(f"goal: autoscale {opt_name} no slower than torch fused (vs_base >= "
              f"{1 - NOISE:.2f}) -> {ratio:.2f}x ({'met' if ratio >= 1 - NOISE else 'NOT met'})")
    for opt_name in ("AdamW bf16", "SGD bf16"):
        gain = ratios[opt_name]["autoscale auto"] / ratios[opt_name]["autoscale ref"]
        print(f"claim: autoscale {opt_name.split()[0]} on bf16 params (fp32 state), auto vs "
              f"the reference path it used to take -> {gain:.1f}x faster")
    for opt_name in ("LAMB", "LARS"):
        print(f"claim: autoscale {opt_name} auto vs its foreach path (torch ops) -> "
              f"{ratios[opt_name]['autoscale auto']:.1f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
