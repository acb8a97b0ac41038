"""Large-batch training: does LAMB/LARS + LR scaling + warm-up keep the small-batch loss?

    python bench/bench_large_batch.py --steps 1600 --batch 8 --scale 8

Task: examples/gpt.py (a small character GPT) on the standard library's source text. The
baseline trains with AdamW at batch B for N steps. Then, on the same number of samples
(batch k*B for N/k steps), it trains with LAMB (sqrt LR scaling + linear warm-up), LARS
(linear scaling + warm-up) and plain AdamW (sqrt scaling, no warm-up). Every run starts from
the same initial weights and sees batches from the same seeded stream. It prints each final
validation loss and its ratio to the baseline's; "ok" means within the stated tolerance.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import gpt
from text import CharBatches

from autoscale.optim._adamw import AdamW
from autoscale.optim._lamb import LAMB
from autoscale.optim._lars import LARS
from autoscale.optim._schedule import scale_lr, warmup_schedule

TOLERANCE = 0.05  # a large-batch run "keeps" the loss when within 5% of the small-batch one
CONFIG = gpt.GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=64, dropout=0.0)


def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    with torch.no_grad():
        loss = sum(float(model(x, y)) for x, y in batches) / len(batches)
    model.train()
    return loss


def train(
    make_opt: Callable[[torch.nn.Module], tuple[torch.optim.Optimizer, object | None]],
    *, batch: int, steps: int, init: dict, val: list,
) -> tuple[float, float, str]:
    """Train from ``init`` for ``steps`` at ``batch``; return (val loss, seconds, kernel)."""
    model = gpt.GPT(CONFIG)
    model.load_state_dict(init)
    opt, sched = make_opt(model)
    data = CharBatches(block_size=CONFIG.block_size, seed=1)  # same sample stream every run
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = data.get(batch)
        opt.zero_grad(set_to_none=True)
        loss = model(x, y)
        if not math.isfinite(loss.item()):
            return float("nan"), time.perf_counter() - t0, getattr(opt, "kernel_choice", "-")
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    return evaluate(model, val), time.perf_counter() - t0, getattr(opt, "kernel_choice", "-")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1600, help="small-batch steps N")
    parser.add_argument("--batch", type=int, default=8, help="small batch B")
    parser.add_argument("--scale", type=int, default=8, help="large batch = scale * B")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW LR at batch B")
    # LAMB's step is lr * ||p|| per tensor, not lr per element as Adam's: with weights of
    # std ~0.02 it needs a larger LR for the same movement.
    parser.add_argument("--lamb-lr", type=float, default=2e-2, help="LAMB LR at batch B")
    parser.add_argument("--lars-lr", type=float, default=1.0, help="LARS LR at batch B")
    parser.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of steps")
    args = parser.parse_args()
    torch.manual_seed(0)
    init = gpt.GPT(CONFIG).state_dict()
    val_data = CharBatches(block_size=CONFIG.block_size, seed=123)
    val = [val_data.get(64, split="val") for _ in range(20)]
    big, big_steps = args.batch * args.scale, args.steps // args.scale
    warm = max(1, int(args.warmup * big_steps))
    lr_sqrt = scale_lr(args.lr, args.batch, big, rule="sqrt")
    lr_lamb = scale_lr(args.lamb_lr, args.batch, big, rule="sqrt")
    lr_lars = scale_lr(args.lars_lr, args.batch, big, rule="linear")
    print(f"device: cpu ({platform.machine()}), {torch.get_num_threads()} threads; "
          f"torch {torch.__version__}")
    print(f"model: GPT {CONFIG.n_layer} layers, n_embd {CONFIG.n_embd}, block {CONFIG.block_size}"
          f"; {sum(p.numel() for p in gpt.GPT(CONFIG).parameters()) / 1e3:.0f}K params; "
          f"val loss over {len(val)} x 64 windows")
    print(f"samples per run: {args.steps * args.batch} (B={args.batch} x {args.steps} steps, "
          f"or {big} x {big_steps}); tolerance {TOLERANCE:.0%}\n")

    def adamw(lr: float) -> Callable:
        return lambda m: (AdamW(m.parameters(), lr=lr, weight_decay=0.1), None)

    def lamb(m):
        opt = LAMB(m.parameters(), lr=lr_lamb, weight_decay=0.1)
        return opt, warmup_schedule(opt, warm)

    def lars(m):
        opt = LARS(m.parameters(), lr=lr_lars, momentum=0.9, weight_decay=1e-4, eta=1e-3)
        return opt, warmup_schedule(opt, warm)

    runs = [
        ("AdamW", args.batch, args.steps, f"lr {args.lr:g}", adamw(args.lr)),
        ("LAMB", big, big_steps, f"sqrt lr {lr_lamb:.3g}, warm-up {warm}", lamb),
        ("LARS", big, big_steps, f"linear lr {lr_lars:.3g}, warm-up {warm}", lars),
        ("AdamW", big, big_steps, f"sqrt lr {lr_sqrt:.3g}, no warm-up", adamw(lr_sqrt)),
    ]
    header = (f"{'optimizer':<9} {'batch':>5} {'steps':>5}  {'schedule':<30} {'val_loss':>8} "
              f"{'ratio':>6}  {'ok':<3} {'sec':>5}  kernel")
    print(header)
    print("-" * len(header))
    base = None
    results = {}
    for name, batch, steps, sched_desc, make in runs:
        loss, sec, kernel = train(make, batch=batch, steps=steps, init=init, val=val)
        base = loss if base is None else base
        ratio = loss / base
        ok = "yes" if ratio <= 1 + TOLERANCE else "no"
        results[(name, batch)] = ratio
        print(f"{name:<9} {batch:>5} {steps:>5}  {sched_desc:<30} {loss:>8.4f} {ratio:>6.3f}  "
              f"{ok:<3} {sec:>5.1f}  {kernel}")
    adam_big = results[("AdamW", big)]
    best_adaptive = min(results[("LAMB", big)], results[("LARS", big)])
    print(f"\nplain AdamW at batch {big} vs the better of LAMB/LARS: "
          f"{'worse' if adam_big > best_adaptive else 'not worse'} "
          f"(ratio {adam_big:.3f} vs {best_adaptive:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
