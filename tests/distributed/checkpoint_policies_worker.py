"""Run by tests/passes/test_checkpoint_policies.py under torchrun (2 gloo ranks): the GPT
example with mixed checkpoint policies (selective, full, none) under each shard strategy
trains through build_result on this rank's half of the batch, next to plain torch on the
whole batch in this process. Rank 0 writes {case: {"loss_diff", "param_diff", "moved"}}
to the JSON file named by argv[1]."""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist

from autoscale import BlockPolicy, CheckpointPlan, OptimizerPlan, Plan, ShardPlan
from autoscale.runtime import build_result
from autoscale.runtime._batch import rank_share

STEPS = 3
POLICIES = CheckpointPlan.of({
    "h.0": BlockPolicy("h.0", "selective", save=("mm", "addmm", "bmm", "sdpa")),
    "h.1": "full",
    "h.2": BlockPolicy("h.2", "selective", save=("mm",)),
})
SGD = OptimizerPlan(kind="sgd", kernel="torch", kwargs={"lr": 0.1})


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _case(strategy: str, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]
          ) -> dict[str, float]:
    world, rank = dist.get_world_size(), dist.get_rank()
    plan = Plan(sections={"checkpoint": POLICIES, "optimizer": SGD,
                          "shard": ShardPlan(strategy=strategy, world_size=world)})
    result = build_result(plan, model)
    plain = copy.deepcopy(model)
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    loss_diff = 0.0
    for _ in range(STEPS):
        loss = torch.tensor(result.step(rank_share(batch, rank, world)))
        dist.all_reduce(loss)
        opt.zero_grad()
        ref = plain(*batch)
        ref.backward()
        opt.step()
        loss_diff = max(loss_diff, abs(loss.item() / world - ref.item()))
    mine = {n: _full(p.detach()) for n, p in result.model.named_parameters()}
    ref_params = dict(plain.named_parameters())
    start = dict(model.named_parameters())
    # The runtime may wrap the model (DDP: "module."); match names by suffix.
    param_diff = moved = 0.0
    for name, p in mine.items():
        key = name.removeprefix("module.")
        param_diff = max(param_diff, (p - ref_params[key]).abs().max().item())
        moved = max(moved, (ref_params[key] - start[key]).abs().max().item())
    return {"loss_diff": loss_diff, "param_diff": param_diff, "moved": moved}


def main() -> None:
    dist.init_process_group("gloo")
    sys.path.insert(0, "examples")
    import gpt

    torch.manual_seed(0)
    config = gpt.GPTConfig(block_size=32, n_layer=3, n_head=2, n_embd=32, dropout=0.0)
    model, batch = gpt.build(batch_size=8, config=config)
    out = {s: _case(s, model, batch) for s in ("ddp", "zero2", "zero3")}
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f)
    dist.destroy_process_group()
    # As the other workers: leave without interpreter teardown, where freeing the gloo
    # process group can deadlock with its worker threads (autoscale/cli.py, apply_plan).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
