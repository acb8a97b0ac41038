"""Run by tests/measure/test_fsdp_memory.py under torchrun (2 gloo ranks): the per-rank
peak of an FSDP2 zero3 training step, by the allocator tracker, the dispatch ledger and
measure(), next to a hand count.

The model is N_BLOCKS bias-free Linear(D, D) + ReLU blocks, each its own FSDP2 unit
(``fully_shard`` per block, then the root, over ``DeviceMesh.from_group``), trained with
AdamW (single-tensor path) on a (B, D) batch; D = 512 makes each block's weight P = 1 MiB,
so every FSDP2 buffer is a whole multiple of P/2 and a miscount cannot hide among the
activations (8 KiB each).

Rank 0 writes one JSON object to argv[1]: per rank, the hand count and, with argv[2]
"allocator", the allocator tracker's baseline, peak and end bytes for TRACKED_STEPS steps
in a row and measure()'s figures; with "ledger", the dispatch ledger's.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from autoscale.measure._allocator import AllocatorPeakTracker
from autoscale.measure._measure import measure
from autoscale.measure._memory import PeakMemoryTracker

D, N_BLOCKS, B = 512, 3, 4
F32 = 4
P = D * D * F32  # one block's weight, unsharded
ACT = B * D * F32  # one (B, D) activation
TRACKED_STEPS = 3  # gloo's worker thread sometimes frees a buffer late: see the test


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(N_BLOCKS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x.square().mean()


def hand_count(world: int) -> dict[str, int]:
    """The per-rank peak of one zero3 step, by its parts (see the comments)."""
    shard = P // world
    baseline = (N_BLOCKS * shard  # sharded weights
                + 2 * N_BLOCKS * shard  # AdamW exp_avg, exp_avg_sq (sharded)
                + N_BLOCKS * F32  # AdamW's 0-dim fp32 step counts
                + ACT)  # the batch
    # The peak is in backward, in the middle block's reduce-scatter (FSDP2, gloo, 3 units):
    in_flight = (shard  # the last block's gradient, reduce-scattered already
                 + P  # the first block's all-gather output, prefetched for its backward
                 + P  # the middle block's unsharded weight gradient (its mm's output)
                 + P + shard  # its reduce-scatter input (the grads chunk-cat) and output
                 + P  # gloo's copy of that input, made inside _reduce_scatter_base_
                 + 2 * ACT)  # the first block's saved ReLU output and the middle's dX
    return {"baseline": baseline, "peak": baseline + in_flight}


def _tracked(cls: type, model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
             step: Callable[[torch.Tensor], None]) -> dict[str, int]:
    with cls(roots=(model, opt, x)) as t:
        step(x)
    return {"baseline": t.baseline_bytes, "peak": t.peak_bytes, "end": t.end_bytes}


def main(out_path: str, mode: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = Net()
    mesh = DeviceMesh.from_group(dist.group.WORLD, "cpu")
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    x = torch.randn(B, D)

    def step(batch: torch.Tensor) -> None:
        model(batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):  # lazy init, AdamW state
        step(x)
    mine: dict[str, object] = {"hand": hand_count(dist.get_world_size())}
    if mode == "ledger":
        # A process of its own: the ledger and a profiled step in one FSDP2 process made it
        # abort at exit in 4 runs of 12 ("terminate called without an active exception");
        # either alone, 0 of 16.
        mine["ledger"] = _tracked(PeakMemoryTracker, model, opt, x, step)
    else:
        mine["allocator"] = [_tracked(AllocatorPeakTracker, model, opt, x, step)
                             for _ in range(TRACKED_STEPS)]
        m = measure(step, x, model=model, optimizer=opt, warmup=1, iters=1)
        mine["measure"] = {"baseline": m.baseline_bytes, "peak": m.peak_memory_bytes}
    ranks: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"P": P, "ranks": ranks}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # Leave without running C++ static destructors: gloo's threads made a rank abort
    # at interpreter exit ("terminate called without an active exception") about one
    # launch in ten, after its work was written (same fix as bench/bench_compress.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
