"""What ``autoscale apply`` does besides parsing its arguments: join torchrun's ranks,
apply a saved plan to the workload with its checks shown, train a few steps and compare
what they measured with the figures the plan recorded.

Kept out of autoscale/cli.py so that the command file stays about commands; the tables
are built here and printed there.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch import nn

from autoscale._units import format_bytes
from autoscale.errors import PlanMismatchError

__all__ = ["Ranks", "StepRun", "applied", "join_ranks", "leave_ranks", "steps_table",
           "summary_table", "train", "validation_table"]


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job (rank 0 of 1 outside torchrun) and its device."""

    device: torch.device
    rank: int = 0
    world: int = 1
    joined: bool = False
    """True when this command initialised the process group (and so destroys it)."""


def join_ranks(model: nn.Module) -> Ranks:
    """Join torchrun's process group when ``WORLD_SIZE > 1`` and nobody has yet.

    Gloo on CPU; on CUDA NCCL with one GPU per rank (``LOCAL_RANK``), the model moved to
    it, as the tuner's workers do. A group the user's script initialised is used as is.
    """
    import torch.distributed as dist

    device = next(model.parameters()).device
    if dist.is_available() and dist.is_initialized():
        return Ranks(device, dist.get_rank(), dist.get_world_size())
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks(device=device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        model.to(device)
    # Note: [env:// rendezvous] torchrun exports MASTER_ADDR/PORT, RANK and WORLD_SIZE;
    # the default init_method reads them, so the command needs no options of its own.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(device, dist.get_rank(), dist.get_world_size(), joined=True)


def leave_ranks(ranks: Ranks) -> None:
    """Destroy the process group if :func:`join_ranks` created it."""
    if ranks.joined:
        import torch.distributed as dist

        dist.destroy_process_group()


def applied(plan: Any, work: Any, ranks: Ranks) -> tuple[Any, list[str]]:
    """``autoscale.apply(plan, ...)`` on the workload, and the warnings it gave as text.

    Raises PlanMismatchError (another model, another world size) as apply does, and also
    for a one-process plan run by several ranks: each rank would train its own copy with
    no gradient exchange, which no user of torchrun means.
    """
    import autoscale

    if ranks.world > 1 and plan.shard.strategy == "none":
        raise PlanMismatchError(
            f"the plan is for one process (shard.strategy 'none') but this job has "
            f"{ranks.world} ranks, which would train {ranks.world} unrelated copies; run it "
            f"without torchrun, or tune a plan for {ranks.world} ranks (autoscale tune "
            f"--nproc {ranks.world}).")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = autoscale.apply(plan, work.model, work.example_inputs, loss_fn=work.loss_fn)
    return result, list(dict.fromkeys(str(w.message) for w in caught))


def validation_table(plan_path: Path, plan: Any, result: Any, ranks: Ranks) -> Table:
    """What was checked before training: schema, model, world size, environment."""
    from autoscale.plan import Environment

    table = Table(title="plan checks", show_header=False)
    table.add_column("check", style="bold")
    table.add_column("result")
    table.add_row("plan file", f"{plan_path} (schema {plan.schema_version}): valid")
    fp = plan.fingerprint
    table.add_row("model fingerprint", "not recorded in the plan: not checked" if fp is None
                  else f"matches ({len(fp.parameters)} parameter tensors, graph "
                       f"{fp.graph[:12]})")
    planned = plan.shard.world_size if plan.shard.strategy != "none" else 1
    used = result.plan.shard
    how = ("matches" if planned == ranks.world else
           f"re-sized to {used.world_size} (size-agnostic plan)" if used.strategy != "none"
           else "sharding dropped (size-agnostic plan, one process)")
    table.add_row("world size", f"here {ranks.world}, plan {planned}: {how}")
    here, env = Environment.current(ranks.device), plan.environment
    if env is None:
        table.add_row("environment", f"here {here.device}; torch {here.torch} (the plan "
                      "records none)")
    else:
        same = (env.device, env.torch) == (here.device, here.torch)
        table.add_row("environment", f"here {here.device}; torch {here.torch} | plan "
                      f"{env.device}; torch {env.torch}: "
                      + ("same" if same else "[yellow]differs[/] (warning below)"))
    return table


@dataclass(frozen=True)
class StepRun:
    """What :func:`train` saw: each step's loss (mean over ranks) and seconds, the peak
    of the step run under the memory tracker, and which steps the timing median uses."""

    losses: tuple[float, ...]
    seconds: tuple[float, ...]
    peak_bytes: int
    tracked: int
    timed: tuple[int, ...]
    samples: int

    @property
    def step_time_s(self) -> float:
        return statistics.median(self.seconds[i] for i in self.timed)


def train(result: Any, example_inputs: Any, ranks: Ranks, steps: int) -> StepRun:
    """``steps`` optimizer steps of ``result`` on this rank's share of the example batch.

    Note: [which steps count] the first step pays one-off costs (optimizer state
    allocation, kernel choice) and the step run under the peak-memory tracker is slowed
    by it, so the median step time leaves both out when other steps remain. The tracked
    step is the second, once the optimizer state exists, as in autoscale.measure.
    """
    from autoscale.measure._measure import _peak_tracker
    from autoscale.runtime._batch import batch_size, rank_share, to_device

    share = to_device(rank_share(example_inputs, ranks.rank, ranks.world), result.device)
    tracked = 1 if steps > 1 else 0
    losses, seconds, peak = [], [], 0
    for i in range(steps):
        _sync(ranks.device)
        if i == tracked:
            with _peak_tracker((result.model, result.optimizer, share), ranks.device) as t:
                start = time.perf_counter()
                loss = result.step(share)
            peak = t.peak_bytes
        else:
            start = time.perf_counter()
            loss = result.step(share)
        _sync(ranks.device)
        seconds.append(time.perf_counter() - start)
        losses.append(_mean_over_ranks(loss, ranks))
    timed = tuple(i for i in range(steps) if i not in (0, tracked)) or tuple(range(steps))
    return StepRun(tuple(losses), tuple(seconds), peak, tracked, timed,
                   batch_size(example_inputs))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mean_over_ranks(loss: float, ranks: Ranks) -> float:
    if ranks.world == 1:
        return loss
    import torch.distributed as dist

    t = torch.tensor([loss], dtype=torch.float64, device=ranks.device)
    dist.all_reduce(t)
    return float(t.item()) / ranks.world


def steps_table(run: StepRun) -> Table:
    """One row a step: loss (the global batch's, averaged over ranks) and milliseconds."""
    table = Table(title="training steps")
    for col in ("step", "loss", "ms", ""):
        table.add_column(col, justify="right" if col else "left")
    for i, (loss, s) in enumerate(zip(run.losses, run.seconds, strict=True)):
        note = ["warm-up"] * (i == 0 and 0 not in run.timed)
        note += ["memory tracked"] * (i == run.tracked)
        table.add_row(str(i + 1), f"{loss:.4f}", f"{s * 1e3:.1f}", ", ".join(note))
    return table


def summary_table(run: StepRun, plan: Any, ranks: Ranks) -> Table:
    """This run's median step time, throughput and peak beside the plan's recorded ones."""
    m = plan.measured
    budget = m.memory_budget_bytes if m is not None else None
    where = f"rank 0 of {ranks.world}" if ranks.world > 1 else "this process"
    table = Table(title=f"this run vs the plan's recorded figures (peak: {where}; budget "
                        f"{format_bytes(budget) if budget else 'none'})")
    for col in ("", "samples/s", "step ms", "peak memory", "fits budget"):
        table.add_column(col, justify="left" if not col else "right")

    def fits(peak: int) -> str:
        return "-" if not budget else "yes" if peak <= budget else "no"

    st = run.step_time_s
    table.add_row(f"this run (median of {len(run.timed)} step(s))", f"{run.samples / st:.1f}",
                  f"{st * 1e3:.1f}", format_bytes(run.peak_bytes), fits(run.peak_bytes))
    if m is None:
        table.add_row("plan (recorded)", "-", "-", "-", "-")
        return table
    if m.batch_size and m.batch_size != run.samples:
        table.caption = (f"the plan's figures were measured at a batch of {m.batch_size}, "
                         f"this run's at {run.samples}: the ratios compare unlike steps")
    table.add_row("plan (recorded when tuned)", f"{m.samples_per_s:.1f}",
                  f"{m.step_time_s * 1e3:.1f}", format_bytes(m.peak_memory_bytes),
                  fits(m.peak_memory_bytes))
    table.add_row("ratio (this run / recorded)", f"{run.samples / st / m.samples_per_s:.2f}x",
                  f"{st / m.step_time_s:.2f}x",
                  f"{run.peak_bytes / m.peak_memory_bytes:.2f}x", "")
    return table
