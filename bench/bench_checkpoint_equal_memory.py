"""The checkpoint solver at torch.compile's own activation memory, head to head (issue 16's
goal read strictly: at equal or lower measured memory, at least as fast).

    python bench/bench_checkpoint_equal_memory.py                  # gpt and llama
    python bench/bench_checkpoint_equal_memory.py --models llama

bench/bench_checkpoint.py judges each budget against the fastest alternative that fits
the same budget, so at a budget both may fit with torch.compile's plan keeping less. Here
the comparison is pinned to torch.compile's figure instead: for each fraction f,

1. ``torch.compile`` with ``activation_memory_budget = f`` runs in a process of its own
   (bench_checkpoint's ``worker``) and its activation memory M_f is measured (c10
   allocator, as in bench_checkpoint);
2. ``solve_checkpoint_plan`` is given M_f bytes as its budget, on options timed under the
   compile mode autoscale's tuner picked in bench_checkpoint (GPT, which draws dropout:
   'inductor-eager-rng'; Llama: 'inductor'), and its plan's activation memory is
   measured the same way, in its own process;
3. the two run head to head (bench_checkpoint's ``duel``: both compiled in one fresh
   process beside one eager baseline, interleaved) in ``--processes`` processes.

Goal per row: ours at or under M_f, and ours/theirs (step time; below 1: ours faster)
with a median at or under 1. The machine is shared: compare within one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_checkpoint as bc  # the sibling bench: models, workers, duel

FRACTIONS = (0.5, 0.25)
MODES = {"gpt": "inductor-eager-rng", "llama": "inductor"}


def _ours(name: str, budgets: dict[float, int]) -> dict[float, Any]:
    """Fraction -> the solver's Plan at that fraction's measured bytes (options timed under
    the model's compile mode, as the tuner times them)."""
    import autoscale
    from autoscale import Plan
    from autoscale.cost._checkpoint_solver import solve_checkpoint_plan
    from autoscale.plan import CompilePlan

    mode = MODES[name]
    model, batch = bc.build_model(name)
    graph = autoscale.capture(model, batch)
    timed = bc.compiled_options(model, batch, graph, mode)
    return {f: Plan(sections={"checkpoint": solve_checkpoint_plan(model, batch, graph, nbytes,
                                                                   options=timed),
                              "compile": CompilePlan(mode=mode)})
            for f, nbytes in budgets.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(bc.MODELS))
    parser.add_argument("--repeats", type=int, default=31, help="interleaved timing rounds")
    parser.add_argument("--processes", type=int, default=3,
                        help="head-to-head processes per row (their median is the verdict)")
    args = parser.parse_args()
    start = time.perf_counter()
    mib = bc.MIB
    print(f"{'model':6} {'f':>5} {'theirs MiB':>10} {'ours MiB':>9} {'ours/theirs':>11}  "
          f"{'per process':24} {'verdict':8} policies")
    for name in args.models.split(","):
        theirs = {f: bc.worker_row(dict(model=name, label=f"compile {f}", kind="compile",
                                        fraction=f, policies="", budget=f,
                                        repeats=args.repeats))
                  for f in FRACTIONS}
        for f, row in theirs.items():
            if row.error is not None:
                raise SystemExit(f"{name}: compile {f} failed: {row.error}")
        plans = _ours(name, {f: row.act_bytes for f, row in theirs.items()})
        for f, plan in plans.items():
            ours = bc.worker_row(dict(model=name, label="ours", kind="autoscale", fraction=f,
                                      policies="", plan=plan.to_dict(),
                                      repeats=args.repeats))
            ratios = []
            for _ in range(args.processes):
                got, why = bc._in_process(dict(model=name, duel=True, plan=plan.to_dict(),
                                               budget=f, repeats=args.repeats), 900)
                if got is None:
                    print(f"{name} {f}: a head-to-head process failed: {why}", flush=True)
                    continue
                ratios.append(got["ours"] / got["theirs"])
            ratio = statistics.median(ratios) if ratios else float("nan")
            fits = ours.error is None and ours.act_bytes <= theirs[f].act_bytes
            met = "met" if fits and ratio <= 1.0 else "missed"
            print(f"{name:6} {f:5.2f} {theirs[f].act_bytes / mib:10.2f} "
                  f"{ours.act_bytes / mib:9.2f} {ratio:11.3f}  "
                  f"{', '.join(f'{r:.3f}' for r in ratios):24} {met:8} "
                  f"{bc._describe(plan.checkpoint)} +{MODES[name]}", flush=True)
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
