"""Benchmark autoscale.optim.AdamW8bit against torch.optim.AdamW in the same run.

(a) CPU step time over ~``--params`` fp32 parameters in a GPT-like mix of shapes:
    AdamW8bit (kernel="auto": its dispatcher times the one-pass C kernel, the
    torch.compile path and the reference, and keeps the fastest) vs AdamW(fused=True).
    Goal: ratio <= 0.75. --with-compiled adds the torch.compile path as a row.
(b) Optimizer-state bytes per parameter, every tensor in optimizer.state counted
    (fp32 moments of small tensors and the step counters included). Goal <= 2.1 vs 8.0.
(c) Convergence: examples/gpt.py on its stdlib-text corpus, ``--steps`` steps with
    warm-up and cosine decay, AdamW8bit vs fp32 AdamW in ``--seeds`` pairs (a pair shares
    init and batches); validation loss on 32 fixed batches.
    Goal: relative difference within 2 % for every seed.

    python bench/bench_adamw8bit.py [--params 50e6] [--steps 300] [--seeds 3] [--repeats 21]
                                    [--skip-convergence] [--with-compiled]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from autoscale.kernels import _dispatch
from autoscale.optim._adamw8bit import AdamW8bit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_optim_cpu import interleaved_ms  # noqa: E402 - found through the path above


def gpt_like_shapes(target: float, d: int = 512, vocab: int = 16000) -> list[tuple[int, ...]]:
    """Embedding + untied head + transformer layers (qkv, proj, mlp, biases, norms)."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (vocab, d), (d,), (d,)]
    layer = [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,),
             (d,), (d,), (d,), (d,)]  # fmt: skip
    while sum(torch.Size(s).numel() for s in shapes) < target:
        shapes += layer
    return shapes


def _time_steps(
    opts: dict[str, torch.optim.Optimizer], repeats: int, warmup_s: float
) -> tuple[dict[str, list[float]], int]:
    """Interleaved step timings (ms) and the number of warm-up rounds, by
    bench_optim_cpu's protocol (Note: [interleaved timing] there).

    What no warm-up controls: the 2-vCPU VM this was written on switches, over seconds to
    minutes, between a slow memory state (fused AdamW ~26 ms a step) and a fast one
    (~17 ms). The 8-bit step is 0.61-0.64x of fused in the first and 0.70-0.77x in the
    second, so a run's ratio depends on the state it happened to meet; the printed fused
    time says which.
    """
    return interleaved_ms({name: opt.step for name, opt in opts.items()}, repeats=repeats,
                          warmup_s=warmup_s)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )


def bench_step(n_params: float, repeats: int, with_compiled: bool, warmup_s: float) -> None:
    shapes = gpt_like_shapes(n_params)
    torch.manual_seed(0)
    kernels = {"adamw_fused": None, "adamw8bit": "auto"}
    if with_compiled:
        kernels["adamw8bit_compiled"] = "compiled"  # the torch.compile path, for reference
    groups = {}
    for name in kernels:
        ps = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
        for p in ps:
            p.grad = torch.randn_like(p) * 1e-3
        groups[name] = ps
    opts: dict[str, torch.optim.Optimizer] = {
        name: torch.optim.AdamW(groups[name], lr=1e-4, fused=True) if kernel is None
        else AdamW8bit(groups[name], lr=1e-4, kernel=kernel)
        for name, kernel in kernels.items()
    }  # fmt: skip
    total = sum(p.numel() for p in groups["adamw8bit"])
    small = sum(p.numel() for p in groups["adamw8bit"] if p.numel() < 4096)
    times, rounds = _time_steps(opts, repeats, warmup_s)
    base = times["adamw_fused"]
    print(f"\n(a) CPU step, {total / 1e6:.1f}M fp32 params in {len(shapes)} tensors "
          f"({small} params in tensors < 4096 keep fp32 state), {repeats} repeats after "
          f"{rounds} warm-up rounds (>= {warmup_s:g} s), "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    # Ratios per repeat (the runs are interleaved, so each pair saw the same machine
    # load), then the median: robust to a noisy neighbour slowing one repeat.
    print(f"{'optimizer':<20}{'min_ms':>9}{'median_ms':>11}{'GB/s':>7}{'ratio (median)':>16}")
    moved = {"adamw_fused": 28}  # bytes per param per step; 8-bit: 16 (see kernels/)
    for name, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base, strict=True))
        gbs = total * moved.get(name, 16) / (statistics.median(ts) * 1e-3) / 1e9
        print(f"{name:<20}{min(ts):>9.1f}{statistics.median(ts):>11.1f}{gbs:>7.1f}"
              f"{ratio:>15.2f}x")  # fmt: skip
    ratio8 = statistics.median(t / b for t, b in zip(times["adamw8bit"], base, strict=True))
    print(f"goal: adamw8bit / adamw_fused <= 0.75 -> measured {ratio8:.2f} "
          f"({'met' if ratio8 <= 0.75 else 'NOT met'})")
    key = ("adamw8bit", "cpu", torch.float32)
    if key in _dispatch.TIMINGS:
        picked = _dispatch.cached_choice("adamw8bit", torch.device("cpu"), torch.float32)
        shown = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in _dispatch.TIMINGS[key].items())
        print(f"dispatcher (scratch copy of the first tensors): {shown} -> {picked}")

    print("\n(b) optimizer state, every tensor in optimizer.state")
    print(f"{'optimizer':<20}{'MiB':>9}{'bytes/param':>13}")
    for name, opt in opts.items():
        b = state_bytes(opt)
        print(f"{name:<20}{b / 2**20:>9.1f}{b / total:>13.3f}")
    print("goal: adamw8bit <= 2.1 bytes/param (fp32 AdamW: 8.0)")


def bench_convergence(steps: int, seeds: int = 3) -> None:
    """fp32 AdamW vs AdamW8bit on the GPT example, ``seeds`` paired runs.

    Each run warms up over 10 % of the steps and decays along a cosine to 10 % of the LR,
    so the final loss is a settled point rather than a snapshot of a noisy trajectory, and
    it is scored on 32 fixed held-out batches (32K characters). A pair shares the seed
    (init and batches). Measured on this setup: with a constant LR and 8 val batches a
    pair's difference swung by up to 3 % with the seed (either way), so one seed could
    neither show nor refute a 2 % difference.
    """
    sys.path.insert(0, str(ROOT / "examples"))
    import gpt
    from text import CharBatches

    from autoscale.optim import warmup_schedule

    config = gpt.GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=128, dropout=0.0)
    batch_size, lr = 16, 2e-3
    val_batches = CharBatches(block_size=config.block_size, seed=1234)
    val = [val_batches.get(batch_size, split="val") for _ in range(32)]
    rows = []
    for seed in range(seeds):
        results = {}
        for name in ("adamw_fp32", "adamw8bit"):
            torch.manual_seed(seed)
            model = gpt.GPT(config)
            n8 = sum(p.numel() for p in model.parameters() if p.numel() >= 4096)
            opt = (torch.optim.AdamW(model.parameters(), lr=lr) if name == "adamw_fp32"
                   else AdamW8bit(model.parameters(), lr=lr))  # fmt: skip
            sched = warmup_schedule(opt, steps // 10, steps, decay="cosine", min_factor=0.1)
            data = CharBatches(block_size=config.block_size, seed=seed)
            losses = []
            t0 = time.perf_counter()
            for _ in range(steps):
                x, y = data.get(batch_size)
                loss = model(x, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
            model.eval()
            with torch.no_grad():
                val_loss = statistics.mean(model(x, y).item() for x, y in val)
            results[name] = (statistics.mean(losses[-20:]), val_loss, time.perf_counter() - t0)
        rows.append(results)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n(c) convergence: examples/gpt.py {config.n_layer} layers, n_embd {config.n_embd}, "
          f"{n_params / 1e6:.2f}M params ({n8 / 1e6:.2f}M with 8-bit state), batch "
          f"{batch_size}x{config.block_size}, lr {lr} (10 % warm-up, cosine to 10 %), "
          f"{steps} steps, {seeds} seeds")  # fmt: skip
    print(f"{'seed':<6}{'optimizer':<14}{'train_last20':>14}{'val_loss':>10}{'seconds':>9}"
          f"{'val diff':>10}")  # fmt: skip
    diffs = []
    for seed, results in enumerate(rows):
        ref, q = results["adamw_fp32"][1], results["adamw8bit"][1]
        diffs.append(100 * (q - ref) / ref)
        for name, (tr, va, sec) in results.items():
            diff = f"{diffs[-1]:+9.2f}%" if name == "adamw8bit" else ""
            print(f"{seed:<6}{name:<14}{tr:>14.4f}{va:>10.4f}{sec:>9.1f}{diff:>10}")
    worst = max(diffs, key=abs)
    print(f"goal: |val8bit - valfp32| / valfp32 <= 2 % for every seed -> mean "
          f"{statistics.mean(diffs):+.2f} %, worst {worst:+.2f} % "
          f"({'met' if abs(worst) <= 2 else 'NOT met'})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=50e6, help="parameters in (a), (b)")
    ap.add_argument("--steps", type=int, default=300, help="training steps in (c)")
    ap.add_argument("--seeds", type=int, default=3, help="paired runs in (c)")
    ap.add_argument("--repeats", type=int, default=21, help="timed steps per optimizer in (a)")
    ap.add_argument("--warmup-s", type=float, default=3.0,
                    help="(a): interleaved warm-up for at least this long (see _time_steps)")
    ap.add_argument("--skip-convergence", action="store_true", help="skip (c)")
    ap.add_argument("--with-compiled", action="store_true",
                    help="also time the torch.compile path (first step compiles, ~20 s)")
    args = ap.parse_args()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cpu = platform.processor() or platform.machine()
    print(f"device: cpu ({cpu}), torch {torch.__version__}, triton {triton_version}, "
          f"python {platform.python_version()}")  # fmt: skip
    bench_step(args.params, args.repeats, args.with_compiled, args.warmup_s)
    if not args.skip_convergence:
        bench_convergence(args.steps, args.seeds)


if __name__ == "__main__":
    main()
