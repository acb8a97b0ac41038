"""Run by tests/passes/test_shard.py under torchrun (gloo ranks): each shard strategy trains
through autoscale.runtime.build_result on this rank's share of every batch, next to plain
torch on the whole batch in this process.

``shard_worker.py OUT [train|reshard]``. Rank 0 writes one JSON object to OUT:

- train (2 ranks): per case, the per-step losses (averaged across ranks) and the plain
  run's, the largest difference between the final parameters (gathered with full_tensor
  under FSDP2) and the plain run's, how far the params moved, the wrapper types, whether
  Result.state_dict kept the user's keys and whether it round-trips, the loss scaler's type
  and final scale; per strategy ("memory/<strategy>") the measured per-rank peak of one
  step (the largest over ranks) next to the cost model's estimate; and for zero2/zero3
  under fp16 ("overflow/<strategy>-fp16"), each rank's view of a step with an inf put
  into rank 1's gradient shard.
- reshard (4 ranks): zero3 with reshard_to=2 against the plain run.
"""

from __future__ import annotations

import copy
import gc
import io
import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import ProfilerActivity, profile, record_function

import autoscale
from autoscale import (
    BatchPlan,
    CheckpointPlan,
    OptimizerPlan,
    Plan,
    PrecisionPlan,
    ShardPlan,
    capture,
)
from autoscale.cost._cost import estimate_graph
from autoscale.runtime import build_result

STEPS = 5
BATCH = 16  # global; each rank takes BATCH / world_size rows


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(x)))


class Net(nn.Module):
    """An input layer, repeated blocks (the FSDP2 units), a final norm and a head."""

    def __init__(self, width: int = 13, depth: int = 2) -> None:
        super().__init__()
        # FSDP2 shards dim 0: 13 rows split 7/6 (uneven shards), the head's single row
        # leaves rank 1 an empty shard.
        self.inp = nn.Linear(6, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)  # stays with the root (not a unit type)
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return nn.functional.mse_loss(self.head(self.norm(h)), y)


SGD = OptimizerPlan(kind="sgd", kernel="torch", kwargs={"lr": 0.1, "momentum": 0.9})
ADAMW = OptimizerPlan(kind="adamw", kernel="torch", kwargs={"lr": 1e-2})
CKPT = CheckpointPlan(blocks=("blocks.0", "blocks.1"))
BF16 = PrecisionPlan(mode="bf16")
# A moderate initial scale: this Net's backward stays finite in fp16 at 2**8, so the plain
# run and the sharded one skip no step and their figures compare (the overflow case forces
# one skip).
FP16 = PrecisionPlan(mode="fp16", init_scale=2.0**8)


def _shard(strategy: str, **kwargs: Any) -> ShardPlan:
    return ShardPlan(strategy=strategy, world_size=dist.get_world_size(), **kwargs)


def _cases() -> dict[str, dict[str, Any]]:
    return {
        "ddp": dict(shard=_shard("ddp", bucket_cap_mb=1)),
        "zero1": dict(shard=_shard("zero1", bucket_cap_mb=1)),
        # autoscale.optim's AdamW (kernel auto) as ZeroRedundancyOptimizer's optimizer_class.
        "zero1-adamw-autoscale": dict(shard=_shard("zero1"), optimizer=OptimizerPlan(
            kind="adamw", kernel="auto", kwargs={"lr": 1e-2})),
        "zero2": dict(shard=_shard("zero2")),
        "zero3": dict(shard=_shard("zero3")),
        # Micro-batches of 3 (rows 8 = 3 + 3 + 2: an uneven last one) and both blocks
        # checkpointed: DDP's no_sync accumulation, and recompute inside FSDP2's units.
        "ddp-micro-ckpt": dict(shard=_shard("ddp"), batch=BatchPlan(micro_batch_size=3),
                               checkpoint=CKPT),
        "zero3-micro-ckpt-adamw": dict(shard=_shard("zero3"), optimizer=ADAMW,
                                       batch=BatchPlan(micro_batch_size=3), checkpoint=CKPT),
        "ddp-bf16": dict(shard=_shard("ddp"), precision=BF16),
        "zero1-bf16": dict(shard=_shard("zero1"), precision=BF16),
        # FSDP2's MixedPrecisionPolicy (bf16 params, fp32 reduce) under autocast.
        "zero2-bf16": dict(shard=_shard("zero2"), precision=BF16),
        "zero3-bf16": dict(shard=_shard("zero3"), precision=BF16),
        # FSDP2's MixedPrecisionPolicy (fp16 params, fp32 reduce) under autocast, loss
        # scaled by ShardedGradScaler; DDP's fp16 (plain GradScaler) next to it.
        "ddp-fp16": dict(shard=_shard("ddp"), precision=FP16),
        "zero2-fp16": dict(shard=_shard("zero2"), precision=FP16),
        "zero3-fp16": dict(shard=_shard("zero3"), precision=FP16),
        "zero2-offload": dict(shard=_shard("zero2", offload=True), optimizer=ADAMW),
        "zero3-offload": dict(shard=_shard("zero3", offload=True), optimizer=ADAMW),
    }


def _batches(width: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)  # the same global batches on every rank
    return [(torch.randn(BATCH, width, generator=gen), torch.randn(BATCH, 1, generator=gen))
            for _ in range(STEPS)]


def _mine(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    rank, world = dist.get_rank(), dist.get_world_size()
    share = BATCH // world
    return tuple(t[rank * share:(rank + 1) * share] for t in batch)


def _plain(model: nn.Module, plan: Plan) -> tuple[list[float], list[torch.Tensor]]:
    """The reference: plain torch.optim on the whole batch, one process."""
    model = copy.deepcopy(model)
    cls = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[plan.optimizer.kind]
    opt = cls(model.parameters(), **plan.optimizer.kwargs)
    mode = plan.precision.mode
    dtype = torch.float16 if mode == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cpu", init_scale=plan.precision.init_scale,
                                  enabled=mode == "fp16")
    losses = []
    for x, y in _batches():
        with torch.autocast("cpu", dtype=dtype, enabled=mode != "fp32"):
            loss = model(x, y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, [p.detach() for p in model.parameters()]


def _full(model: nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor().detach() if hasattr(p, "full_tensor") else p.detach()
            for p in model.parameters()]  # fmt: skip


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


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
    losses = []
    for batch in _batches():
        loss = torch.tensor(result.step(_mine(batch)))
        dist.all_reduce(loss)  # each rank's mean over an equal share: the mean is global
        losses.append(loss.item() / dist.get_world_size())
    ref_losses, ref_params = _plain(model, plan)
    params = _full(result.model)
    out = {
        "losses": losses,
        "ref_losses": ref_losses,
        "vs_plain": _max_diff(params, ref_params),
        "moved": _max_diff(params, [p.detach() for p in model.parameters()]),
        "wrapper": type(result.model).__name__,
        "optimizer": type(result.optimizer).__name__,
        "units": sorted(n for n, m in user.named_modules()
                        if type(m).__name__.startswith("FSDP")),
        "block_types": [type(b).__name__ for b in user.blocks],
        "block_weight_after_forward": sorted(set(seen)),
        "keys_kept": list(result.state_dict()["model"]) == list(model.state_dict()),
        "scaler": type(result.scaler).__name__,
        "scale": result.scaler.get_scale() if result.scaler is not None else None,
    }
    if name.startswith("zero1"):
        out.update(_round_trip(result, plan, model, graph))
    return out


class NormNet(nn.Module):
    """Blocks with batch norm: FSDP2's bf16 units must keep its weights fp32."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(6, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.Tanh())
            for _ in range(2))
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return nn.functional.mse_loss(self.head(h), y)


def _batch_norm() -> dict[str, Any]:
    """Losses of 3 bf16 steps of NormNet under ddp, zero2 and zero3. Batch norm takes its
    statistics over each rank's own rows under every strategy (not one process's whole
    batch), so the sharded runs are compared with DDP's."""
    torch.manual_seed(0)
    model = NormNet()
    graph = capture(model, _batches()[0])
    out = {}
    for strategy in ("ddp", "zero2", "zero3"):
        plan = Plan(sections={"optimizer": SGD, "shard": _shard(strategy), "precision": BF16})
        result = build_result(plan, model, graph=graph)
        out[f"batch-norm/{strategy}-bf16"] = [result.step(_mine(b)) for b in _batches()[:3]]
    return out


def _round_trip(result, plan: Plan, model: nn.Module, graph) -> dict:
    """Result.state_dict of a trained zero1 result loaded into a fresh one: one more step
    on each gives the same parameters; the state is torch's full format."""
    # Through bytes, as a checkpoint file is: on the CPU a state_dict's tensors are the
    # live ones (torch.optim's too), which a second result would then share.
    buffer = io.BytesIO()
    torch.save(result.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = build_result(plan, model, graph=graph)
    fresh.load_state_dict(state)
    again = result.state_dict()
    batch = _mine(_batches()[0])
    result.step(batch)
    fresh.step(batch)
    plain = torch.optim.SGD if plan.optimizer.kind == "sgd" else torch.optim.AdamW
    plain(copy.deepcopy(model).parameters(), lr=0.1).load_state_dict(state["optimizer"])
    n_params = len(list(model.parameters()))
    dropped = getattr(result.optimizer, "_all_state_dicts", None) == []
    return {
        "consolidated_dropped": dropped,
        "resumed_vs_trained": _max_diff(_full(fresh.model), _full(result.model)),
        "full_state": sorted(state["optimizer"]["state"]) == list(range(n_params))
        and all(v is not None for v in state["optimizer"]["state"].values()),
        # load_state_dict left ``state`` as it was (ZeRO's own sets other ranks' to None).
        "state_unchanged": all(
            torch.equal(state["optimizer"]["state"][i][k], again["optimizer"]["state"][i][k])
            for i in again["optimizer"]["state"] for k in again["optimizer"]["state"][i]
            if torch.is_tensor(again["optimizer"]["state"][i][k])),
    }


def _user(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def _memory(strategy: str, *, accumulate: bool = False) -> dict:
    """One step's per-rank peak of a model whose parameter and AdamW state bytes dominate
    its activations (width 256, 6 blocks: 1 MiB of parameters a block), and the estimate.

    See Note: [measuring a rank's peak with the profiler].
    """
    torch.manual_seed(0)
    model = Net(width=256, depth=6)
    batch = (torch.randn(BATCH, 6), torch.randn(BATCH, 1))
    graph = capture(model, batch)
    plan = Plan(sections={"optimizer": ADAMW,
                          "shard": _shard(strategy) if strategy != "none" else ShardPlan()})
    if accumulate:  # two micro-batches a rank: DDP's no_sync, then a synced backward
        micro = BATCH // dist.get_world_size() // 2
        plan = plan.replace(batch=BatchPlan(micro_batch_size=micro, grad_accum_steps=2))
    mine = _mine(batch) if strategy != "none" else batch
    result = build_result(plan, model, graph=graph)
    result.step(mine)  # the optimizer state exists from here on
    gc.collect()
    baseline = _live_bytes(result, mine)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for i in range(MEMORY_STEPS):
            with record_function(f"step{i}"):
                result.step(mine)
    events = sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns())
    rises = []
    for i in range(MEMORY_STEPS):
        (mark,) = [e for e in events if e.name() == f"step{i}"]
        live = peak = 0
        for e in events:
            if e.name() == "[memory]" and mark.start_ns() <= e.start_ns() <= mark.end_ns():
                live += e.nbytes()
                peak = max(peak, live)
        rises.append(peak)
    peak = baseline + min(rises)
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak)
    est = estimate_graph(model, graph, plan)
    simulated = autoscale.estimate(model, batch, plan, graph=graph).total
    return {"measured": max(peaks), "per_rank": peaks, "estimate": est.total,
            "simulated": simulated, "plan": plan.to_dict(),
            "baseline": baseline, "rises": rises,
            "parameters": est.parameters, "gradients": est.gradients,
            "optimizer_state": est.optimizer_state, "activations": est.activations,
            "temporaries": est.temporaries}


# Note: [measuring a rank's peak with the profiler]
# torch.profiler's memory events see every allocation and free of this thread, FSDP2's
# UntypedStorage.resize_ included (a dispatch-mode tracker does not). A step's peak is the
# bytes live when it starts (counted from the result's tensors) plus the largest rise of
# the running sum of its events. Gloo's threads sometimes drop the last reference to a
# tensor a collective used, a free this thread's profiler misses, so a step's rise is an
# upper bound that is sometimes off by a block or two (seen: 2-3 MiB of 13); the least of
# MEMORY_STEPS steps' rises is taken (every step of the loop is the same step). With 4
# steps, a loaded CI run once had every step of both ranks over by 0.49 MiB at zero3 (the
# estimate 3.1% under both readings); 8 steps of a 6 MiB model cost milliseconds.
MEMORY_STEPS = 8


def _live_bytes(result, batch: tuple[torch.Tensor, ...]) -> int:
    """Bytes of the distinct storages a result holds between steps, plus the batch."""
    optimizer = getattr(result.optimizer, "optim", result.optimizer)  # ZeRO's local one
    tensors = [t for state in optimizer.state.values() for t in state.values()
               if torch.is_tensor(t)]
    tensors += [*result.model.parameters(), *result.model.buffers(), *batch]
    seen: dict[int, int] = {}
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    total = sum(seen.values())
    if isinstance(result.model, DistributedDataParallel):
        # gradient_as_bucket_view: DDP's buckets hold every gradient and outlive the step
        # (zero_grad sets the views to None, not the buckets).
        total += sum(p.numel() * p.element_size() for p in result.model.parameters())
    return total


def _overflow(strategy: str, model: nn.Module, graph) -> dict:
    """fp16 under FSDP2 with an inf put into rank 1's shard of one gradient at step 1
    (of 0, 1, 2), just before the loss scaler unscales: per rank, whether the parameters
    moved at each step, the scale after it, and whether the rank's own shards held an inf
    when the unscale began."""
    plan = Plan(sections={"optimizer": SGD, "shard": _shard(strategy), "precision": FP16})
    result = build_result(plan, model, graph=graph)
    scaler, rank = result.scaler, dist.get_rank()
    unscale, step = scaler.unscale_, [0]
    saw_inf: list[bool] = []

    def unscale_with_inf(optimizer: torch.optim.Optimizer) -> None:
        weight = _user(result.model).blocks[0].up.weight  # 26 rows: 13 on each rank
        if rank == 1 and step[0] == 1:
            weight.grad.to_local()[0, 0] = float("inf")
        saw_inf.append(not all(p.grad.to_local().isfinite().all().item()
                               for p in result.model.parameters() if p.grad is not None))
        unscale(optimizer)

    scaler.unscale_ = unscale_with_inf  # type: ignore[method-assign]
    moved, scales = [], []
    for step[0], batch in enumerate(_batches()[:3]):
        before = [p.detach().to_local().clone() for p in result.model.parameters()]
        result.step(_mine(batch))
        moved.append(any(not torch.equal(b, p.detach().to_local())
                         for b, p in zip(before, result.model.parameters(), strict=True)))
        scales.append(scaler.get_scale())
    mine = {"moved": moved, "scales": scales, "saw_inf": saw_inf,
            "scaler": type(scaler).__name__}
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return {"ranks": every}


def _reshard() -> dict:
    torch.manual_seed(0)
    model = Net()
    graph = capture(model, _batches()[0])
    return {"zero3-reshard2": _run("zero3-reshard2", dict(
        shard=_shard("zero3", reshard_to=2), optimizer=ADAMW), model, graph)}


def main(out: str, mode: str) -> None:
    dist.init_process_group("gloo")
    if mode == "reshard":
        results = _reshard()
    else:
        # Memory first: garbage the training cases leave would be freed at random inside a
        # profiled window.
        results = {}
        for strategy in ("ddp", "zero1", "zero2", "zero3"):
            gc.collect()
            results[f"memory/{strategy}"] = _memory(strategy)
        gc.collect()
        results["memory/ddp-accumulate"] = _memory("ddp", accumulate=True)
        torch.manual_seed(0)
        model = Net()
        graph = capture(model, _batches()[0])
        results.update({name: _run(name, sections, model, graph)
                        for name, sections in _cases().items()})
        for strategy in ("zero2", "zero3"):
            results[f"overflow/{strategy}-fp16"] = _overflow(strategy, model, graph)
        results.update(_batch_norm())
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "train")
    # Leave without running C++ static destructors: gloo's threads made a rank abort
    # at interpreter exit ("terminate called without an active exception") about one
    # launch in ten, after its work was written (same fix as bench/bench_compress.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
