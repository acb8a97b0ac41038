"""Large-batch training: does LAMB/LARS + LR scaling + warm-up keep the small-batch loss?

    python bench/bench_large_batch.py            # default run (see --help for the sizes)
    python bench/bench_large_batch.py --quick    # a few dozen steps: a smoke test only

Task: examples/gpt.py (a small character GPT) on the standard library's source text
(examples/text.py). Every run sees the same number of training samples and starts from the
same initial weights; batches come from one seeded stream, so a batch of k*B is exactly the
next k batches of B concatenated.

- Baseline: AdamW at batch B for N steps, its LR picked from a grid.
- At batch k*B for N/k steps:
  * "AdamW naive": the baseline's tuned LR and schedule, unchanged, no warm-up (what one
    gets by only raising the batch size).
  * "AdamW scaled": sqrt LR scaling + linear warm-up, base LR from a grid.
  * "LAMB": sqrt scaling + warm-up, base LR from a grid.
  * "LARS": linear scaling + warm-up, base LR from a grid.

Every run decays its LR along a cosine to 10% over its own steps (after the warm-up, if
any). A grid's "base LR" is the LR at batch B; the table prints it after scaling to k*B.
Each grid point is scored on one half of the corpus's held-out tail ("val", used to pick
the LR) and the winner is reported on the other half ("test", never used to choose
anything), so the ratios carry no selection bias. "ok" means the test loss is within
TOLERANCE of the baseline's. The last line says whether the goal holds: LAMB or LARS is
"ok" and plain (naive) AdamW at the large batch is worse than the better of them.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import gpt
from text import CharBatches

from autoscale.optim import LAMB, LARS, AdamW, scale_lr, warmup_schedule

TOLERANCE = 0.05  # a large-batch run "keeps" the loss when within 5% of the small-batch one
MIN_LR_FACTOR = 0.1  # cosine decay floor, as a fraction of the peak LR
CONFIG = gpt.GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=64, dropout=0.0)
EVAL_WINDOWS = 2048  # windows of block_size chars per held-out half (val and test)

# Each LR grid: GRID_POINTS base LRs (the LR at batch B, before scaling to k*B), sqrt(2)
# apart around a centre given per method in RECIPES. The centres were set so that on the
# default run every winner is interior; the table flags a winner at a grid edge with "edge".
GRID_POINTS = 5


def log_grid(centre: float, points: int = GRID_POINTS) -> tuple[float, ...]:
    """``points`` LRs a factor sqrt(2) apart, ``centre`` in the middle."""
    half = (points - 1) / 2
    return tuple(centre * 2 ** ((i - half) / 2) for i in range(points))


@dataclass(frozen=True)
class Recipe:
    """One table row: an optimizer, how its LR moves from batch B to batch k*B, a grid."""

    label: str
    opt: str  # "adamw", "lamb" or "lars"
    large: bool  # batch k*B for N/k steps, else batch B for N steps
    rule: str | None  # LR scaling rule from B to k*B; None keeps the base LR
    warmup: bool
    centre: float | None  # centre of the base-LR grid; None: only the baseline's winner


@dataclass
class Result:
    recipe: Recipe
    batch: int
    steps: int
    base_lr: float
    lr: float
    warmup_steps: int
    val: float
    test: float
    seconds: float
    kernel: str


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one (platform.processor() is often '')."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_optimizer(
    name: str, params: Sequence[torch.nn.Parameter], lr: float
) -> torch.optim.Optimizer:
    """The optimizer with this benchmark's fixed hyper-parameters (only the LR is searched)."""
    if name == "adamw":
        return AdamW(params, lr=lr, weight_decay=0.1)
    if name == "lamb":
        return LAMB(params, lr=lr, weight_decay=0.1)
    if name == "lars":
        # eta 1e-3 as in You et al. 2017; weight decay 1e-4 is their ImageNet setting.
        return LARS(params, lr=lr, momentum=0.9, weight_decay=1e-4, eta=1e-3)
    raise ValueError(f"unknown optimizer {name!r}")


def heldout_windows(n: int, seed: int) -> tuple[list, list]:
    """(val, test): ``n`` windows each from the first and second half of the held-out text.

    Disjoint halves, so the split that picks an LR is not the one that reports the loss.
    """
    data = CharBatches(block_size=CONFIG.block_size, seed=seed).val
    half = len(data) // 2
    gen = torch.Generator().manual_seed(seed)
    out = []
    for part in (data[:half], data[half:]):
        starts = torch.randint(len(part) - CONFIG.block_size - 1, (n,), generator=gen).tolist()
        x = torch.stack([part[s : s + CONFIG.block_size] for s in starts])
        y = torch.stack([part[s + 1 : s + 1 + CONFIG.block_size] for s in starts])
        out.append(list(zip(x.split(256), y.split(256), strict=True)))
    return out[0], out[1]


def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    with torch.no_grad():
        loss = sum(float(model(x, y)) * len(x) for x, y in batches)
    model.train()
    return loss / sum(len(x) for x, _ in batches)


def train(
    opt_name: str, lr: float, *, batch: int, steps: int, warmup_steps: int, init: dict,
    val: list, test: list,
) -> tuple[float, float, float, str]:
    """Train from ``init``; return (val loss, test loss, seconds, kernel). NaN if diverged."""
    model = gpt.GPT(CONFIG)
    model.load_state_dict(init)
    opt = make_optimizer(opt_name, list(model.parameters()), lr)
    sched = warmup_schedule(opt, warmup_steps, steps, decay="cosine", min_factor=MIN_LR_FACTOR)
    data = CharBatches(block_size=CONFIG.block_size, seed=1)  # same sample stream every run
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = data.get(batch)
        opt.zero_grad(set_to_none=True)
        loss = model(x, y)
        if not math.isfinite(loss.item()):
            return math.nan, math.nan, time.perf_counter() - t0, getattr(opt, "kernel_choice", "-")
        loss.backward()
        opt.step()
        sched.step()
    sec = time.perf_counter() - t0
    return evaluate(model, val), evaluate(model, test), sec, getattr(opt, "kernel_choice", "-")


def run_grid(
    recipe: Recipe, base_lrs: Sequence[float], *, batch: int, scale: int, steps: int,
    warmup: float, init: dict, val: list, test: list,
    log: Callable[[str], None] = print,
) -> list[Result]:
    """Train ``recipe`` once per base LR; return all results (the grid), in grid order."""
    big, big_steps = batch * scale, steps // scale
    b, n = (big, big_steps) if recipe.large else (batch, steps)
    warm = max(1, round(warmup * n)) if recipe.warmup else 0
    out = []
    for base_lr in base_lrs:
        lr = scale_lr(base_lr, batch, big, rule=recipe.rule) if recipe.rule else base_lr
        v, t, sec, kernel = train(recipe.opt, lr, batch=b, steps=n, warmup_steps=warm,
                                  init=init, val=val, test=test)
        out.append(Result(recipe, b, n, base_lr, lr, warm, v, t, sec, kernel))
        log(f"  {recipe.label:<13} base lr {base_lr:<9.3g} -> lr {lr:<9.3g} val {v:.4f}  "
            f"({sec:.1f}s)")
    return out


def best(results: Sequence[Result]) -> Result:
    """The run with the lowest validation loss (a diverged run never wins)."""
    return min(results, key=lambda r: r.val if math.isfinite(r.val) else math.inf)


RECIPES = (
    Recipe("AdamW", "adamw", large=False, rule=None, warmup=False, centre=2e-3),
    Recipe("AdamW naive", "adamw", large=True, rule=None, warmup=False, centre=None),
    Recipe("AdamW scaled", "adamw", large=True, rule="sqrt", warmup=True, centre=2e-3),
    Recipe("LAMB", "lamb", large=True, rule="sqrt", warmup=True, centre=1e-2),
    Recipe("LARS", "lars", large=True, rule="linear", warmup=True, centre=1.0),
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000, help="small-batch steps N")
    parser.add_argument("--batch", type=int, default=8, help="small batch B")
    parser.add_argument("--scale", type=int, default=8, help="large batch = scale * B")
    parser.add_argument("--warmup", type=float, default=0.1,
                        help="warm-up, as a fraction of the large-batch steps")
    # One thread by default: the ops are tiny, so a second thread gains little, and when the
    # machine is shared OpenMP's spin-waits made 2 threads 5-10x slower than 1 (measured).
    # One thread also makes every run bit-for-bit repeatable.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 64 steps, 2 LRs per grid (the numbers mean nothing)")
    args = parser.parse_args(argv)
    steps = 64 if args.quick else args.steps
    if steps // args.scale < 1:
        parser.error(f"--steps {steps} gives no large-batch steps at --scale {args.scale}")
    n_eval = 256 if args.quick else EVAL_WINDOWS

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    init = gpt.GPT(CONFIG).state_dict()  # one initialisation shared by every run
    val, test = heldout_windows(n_eval, seed=123)
    big = args.batch * args.scale
    t_start = time.perf_counter()
    print(f"device: cpu ({cpu_name()}, {os.cpu_count()} cores), "
          f"{torch.get_num_threads()} torch threads; torch {torch.__version__}; "
          f"python {platform.python_version()}")
    print(f"model: GPT {CONFIG.n_layer} layers, n_embd {CONFIG.n_embd}, block {CONFIG.block_size}"
          f"; {sum(p.numel() for p in gpt.GPT(CONFIG).parameters()) / 1e3:.0f}K params")
    print(f"samples per run: {steps * args.batch} windows (B={args.batch} x {steps} steps, "
          f"or {big} x {steps // args.scale}); val/test: {n_eval} windows each; "
          f"LR: cosine to {MIN_LR_FACTOR:g}x; tolerance {TOLERANCE:.0%}\n")

    grids: dict[str, list[Result]] = {}
    base_lr_tuned = math.nan
    print("LR grids (picked on val):")
    for recipe in RECIPES:
        lrs = [base_lr_tuned] if recipe.centre is None else list(log_grid(recipe.centre))
        if args.quick and len(lrs) > 2:
            lrs = lrs[1:3]
        grids[recipe.label] = run_grid(recipe, lrs, batch=args.batch, scale=args.scale,
                                       steps=steps, warmup=args.warmup, init=init, val=val,
                                       test=test)
        if not recipe.large:
            base_lr_tuned = best(grids[recipe.label]).base_lr

    baseline = best(grids[RECIPES[0].label])
    header = (f"{'method':<13} {'batch':>5} {'steps':>5} {'lr':>9} {'warm-up':>7} "
              f"{'val':>7} {'test':>7} {'ratio':>6}  {'vs tol':<6} {'grid':<5} {'sec':>6}  kernel")
    print(f"\nbest of each grid; ratio = test loss / baseline's test loss "
          f"(baseline: AdamW at batch {args.batch})")
    print(header)
    print("-" * len(header))
    ratios: dict[str, float] = {}
    for recipe in RECIPES:
        results = grids[recipe.label]
        r = best(results)
        ratio = r.test / baseline.test
        ratios[recipe.label] = ratio
        verdict = "base" if r is baseline else ("ok" if ratio <= 1 + TOLERANCE else "worse")
        lrs = [x.base_lr for x in results]
        where = "-" if len(lrs) < 2 else ("edge" if r.base_lr in (lrs[0], lrs[-1]) else "in")
        print(f"{recipe.label:<13} {r.batch:>5} {r.steps:>5} {r.lr:>9.3g} {r.warmup_steps:>7} "
              f"{r.val:>7.4f} {r.test:>7.4f} {ratio:>6.3f}  {verdict:<6} {where:<5} "
              f"{r.seconds:>6.1f}  {r.kernel}")

    naive = ratios["AdamW naive"]
    best_adaptive = min(ratios["LAMB"], ratios["LARS"])
    within = best_adaptive <= 1 + TOLERANCE
    naive_worse = naive > best_adaptive and naive > 1 + TOLERANCE
    print(f"\nplain AdamW at batch {big} (baseline LR, no warm-up): ratio {naive:.3f}; "
          f"better of LAMB/LARS: {best_adaptive:.3f}; AdamW scaled + warm-up: "
          f"{ratios['AdamW scaled']:.3f}")
    print(f"goal (LAMB or LARS within {TOLERANCE:.0%} of the small-batch loss AND plain AdamW "
          f"at batch {big} worse): {'MET' if within and naive_worse else 'NOT MET'} "
          f"(LAMB/LARS within tolerance: {'yes' if within else 'no'}; plain AdamW worse: "
          f"{'yes' if naive_worse else 'no'})")
    print(f"wall time: {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
