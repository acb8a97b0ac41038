"""Run by tests/search/test_ranks.py under torchrun (2 gloo ranks): a tuned plan applied the
production way, ``autoscale.apply(plan, model, inputs)`` in every rank.

argv: plan file, output JSON. Rank 0 writes what the job set up (the wrapper type, FSDP
units, the compression counters) and the per-step losses of three runs on the same
global batches: through apply(), through build_result as the tuner's trial workers build
it, and one process on the whole batch with the plan's sharding and compression removed.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import autoscale
from autoscale import CompressPlan, ShardPlan
from autoscale.passes.compress import comm_stats
from autoscale.runtime import build_result
from autoscale.runtime._batch import rank_share

STEPS = 3


def _workload():
    path = Path(__file__).parents[1] / "workloads" / "ranked.py"
    spec = importlib.util.spec_from_file_location("ranked", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build()


def _losses(result, batches, rank: int, world: int) -> list[float]:
    out = []
    for batch in batches:
        loss = torch.tensor(result.step(rank_share(batch, rank, world)))
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        out.append(float(loss))
    return out


def main() -> None:
    plan_path, out_path = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, inputs = _workload()
    plan = autoscale.Plan.load(plan_path)
    torch.manual_seed(1)
    batches = [tuple(torch.randn_like(t) for t in inputs) for _ in range(STEPS)]
    applied = autoscale.apply(plan, copy.deepcopy(model), inputs)
    graph = autoscale.capture(model, inputs)
    tuner_way = build_result(plan, copy.deepcopy(model), graph=graph)
    stats = comm_stats(applied.model)
    report = {
        "wrapper": type(applied.model).__name__,
        "units": sorted(n for n, m in applied.model.named_modules()
                        if isinstance(m, torch.distributed.fsdp.FSDPModule)),
        "tuner_units": sorted(n for n, m in tuner_way.model.named_modules()
                              if isinstance(m, torch.distributed.fsdp.FSDPModule)),
        "compressed": stats is not None,
        "applied": _losses(applied, batches, rank, world),
        "tuner_way": _losses(tuner_way, batches, rank, world),
    }
    report["comm_calls"] = stats.calls if stats is not None else 0
    local = plan.replace(shard=ShardPlan(), compress=CompressPlan())
    one = build_result(local, copy.deepcopy(model), graph=graph)
    report["one_process"] = _losses(one, batches, 0, 1)
    if rank == 0:
        Path(out_path).write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Leave without running C++ static destructors: gloo's threads made a rank abort
    # at interpreter exit ("terminate called without an active exception") about one
    # launch in ten, after its work was written (same fix as bench/bench_compress.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
