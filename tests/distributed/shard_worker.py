"""Run by tests/passes/test_shard.py under torchrun (2 gloo ranks): each shard strategy
trains through autoscale.runtime.build_result on this rank's half of every batch, next to
plain torch on the whole batch in this process.

Rank 0 writes one JSON object to argv[1]: per case, the per-step losses (averaged across
ranks) and the plain run's, the largest difference between the final parameters
(gathered with full_tensor under FSDP2) and the plain run's, how far the params moved,
the wrapper types and whether Result.state_dict kept the user's keys.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from autoscale import (
    BatchPlan,
    CheckpointPlan,
    OptimizerPlan,
    Plan,
    PrecisionPlan,
    ShardPlan,
    capture,
)
from autoscale.runtime import build_result

STEPS = 3
BATCH = 16  # global; each of the 2 ranks takes 8 rows


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(x)))


class Net(nn.Module):
    """Embedding-like input layer, two repeated blocks (the FSDP2 units), a head."""

    def __init__(self, width: int = 13) -> None:
        super().__init__()
        # FSDP2 shards dim 0: 13 rows split 7/6 (uneven shards), the head's single row
        # leaves rank 1 an empty shard.
        self.inp = nn.Linear(6, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(2))
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return nn.functional.mse_loss(self.head(h), y)


CASES = {
    "ddp": dict(shard=ShardPlan(strategy="ddp", world_size=2, bucket_cap_mb=1)),
    "zero2": dict(shard=ShardPlan(strategy="zero2", world_size=2)),
    "zero3": dict(shard=ShardPlan(strategy="zero3", world_size=2)),
    # Micro-batches of 3 (rows 8 = 3 + 3 + 2: an uneven last one) and both blocks
    # checkpointed: DDP's no_sync accumulation, and recompute inside FSDP2's units.
    "ddp-micro-ckpt": dict(shard=ShardPlan(strategy="ddp", world_size=2),
                           batch=BatchPlan(micro_batch_size=3),
                           checkpoint=CheckpointPlan(blocks=("blocks.0", "blocks.1"))),
    "zero3-micro-ckpt-adamw": dict(shard=ShardPlan(strategy="zero3", world_size=2),
                                   batch=BatchPlan(micro_batch_size=3),
                                   checkpoint=CheckpointPlan(blocks=("blocks.0", "blocks.1")),
                                   optimizer=OptimizerPlan(kind="adamw", kernel="torch",
                                                           kwargs={"lr": 1e-2})),
    # Autocast wraps the root's forward, DDP wraps that: the plan rule lets only DDP
    # compose with autocast.
    "ddp-bf16": dict(shard=ShardPlan(strategy="ddp", world_size=2),
                     precision=PrecisionPlan(mode="bf16")),
}
SGD = OptimizerPlan(kind="sgd", kernel="torch", kwargs={"lr": 0.1, "momentum": 0.9})


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)  # the same global batches on every rank
    return [(torch.randn(BATCH, 6, generator=gen), torch.randn(BATCH, 1, generator=gen))
            for _ in range(STEPS)]


def _plain(model: nn.Module, plan: Plan) -> tuple[list[float], list[torch.Tensor]]:
    """The reference: plain torch.optim on the whole batch, one process."""
    model = copy.deepcopy(model)
    cls = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[plan.optimizer.kind]
    opt = cls(model.parameters(), **plan.optimizer.kwargs)
    low = plan.precision.mode == "bf16"
    losses = []
    for x, y in _batches():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, [p.detach() for p in model.parameters()]


def _full(model: nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor().detach() if hasattr(p, "full_tensor") else p.detach()
            for p in model.parameters()]  # fmt: skip


def _run(name: str, sections: dict, model: nn.Module, graph) -> dict:
    sections = {"optimizer": SGD, **sections}
    plan = Plan(sections=sections)
    result = build_result(plan, model, graph=graph)
    # What FSDP2 holds in a block while the head runs (forward done, backward not begun):
    # DTensor shards after a reshard (zero3), plain unsharded tensors otherwise.
    seen: list[str] = []
    user = _user(result.model)
    user.head.register_forward_hook(
        lambda *_: seen.append(type(user.blocks[0].up.weight).__name__))
    rank, world = dist.get_rank(), dist.get_world_size()
    share = BATCH // world
    losses = []
    for x, y in _batches():
        mine = (x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share])
        loss = torch.tensor(result.step(mine))
        dist.all_reduce(loss)  # each rank's mean over an equal share: the mean is global
        losses.append(loss.item() / world)
    ref_losses, ref_params = _plain(model, plan)
    params = _full(result.model)
    return {
        "losses": losses,
        "ref_losses": ref_losses,
        "vs_plain": max((a - b).abs().max().item() for a, b in zip(params, ref_params,
                                                                   strict=True)),
        "moved": max((a - b.detach()).abs().max().item()
                     for a, b in zip(params, model.parameters(), strict=True)),
        "wrapper": type(result.model).__name__,
        "block_types": [type(b).__name__ for b in user.blocks],
        "block_weight_after_forward": sorted(set(seen)),
        "keys_kept": list(result.state_dict()["model"]) == list(model.state_dict()),
    }


def _user(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def main(out: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = Net()
    graph = capture(model, _batches()[0])
    results = {name: _run(name, sections, model, graph) for name, sections in CASES.items()}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
