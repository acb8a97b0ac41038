"""The runtime: a planned model + optimizer and its training step."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from autoscale.errors import TunerError
from autoscale.passes import PIPELINE, PassContext
from autoscale.passes.shard import full_optimizer_state, grad_scaler
from autoscale.plan._plan import Plan, SchedulePlan
from autoscale.runtime._batch import (
    Batch,
    LossFn,
    batch_size,
    call_model,
    check_batch,
    compute_loss,
    default_loss,
    split_batch,
    to_device,
)
from autoscale.runtime._optimizers import build_optimizer

__all__ = ["Result", "build_result"]


@dataclass
class Result:
    """A model and optimizer rewritten as ``plan`` says, ready to train.

    ``step(batch)`` runs forward, backward and the optimizer step with the plan's
    micro-batching, accumulation and precision. ``model`` is a private copy of the user's
    model unless the call that built it said ``inplace=True``.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    plan: Plan
    loss_fn: LossFn = default_loss
    report: Any = None
    scaler: torch.amp.GradScaler | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    graph: Any = field(default=None, repr=False)
    needs_ranks: int | None = None
    """Set when the plan is for N ranks but this Result was built in one process (what
    optimize(world_size=N) returns): it carries the plan and report, and step() refuses."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def held_state(self) -> list[torch.Tensor]:
        """Tensors the step keeps between steps outside the model and the optimizer
        (gradient compression's residuals and factors); the peak measurement's roots."""
        from autoscale.passes.compress import comm_stats

        stats = comm_stats(self.model)
        return [] if stats is None else stats.held_tensors()

    def step(self, batch: Batch) -> float:
        """One optimizer step on ``batch``; returns the batch's mean loss.

        The batch is split along dim 0 into micro-batches of ``plan.batch.micro_batch_size``;
        each micro-batch's loss is weighted by its share of the samples, so the gradient
        equals that of the whole batch's mean loss (for per-sample-mean losses), whatever
        the split. Gradients are freed after the step (``zero_grad(set_to_none=True)``).

        Under a distributed plan ``batch`` is this rank's share and the returned loss is
        this rank's; with DDP only the last micro-batch's backward all-reduces (the others
        run under ``no_sync()`` and accumulate locally). FSDP2 reduce-scatters every
        micro-batch's gradients, which keeps only the shard between micro-batches.
        """
        if self.needs_ranks is not None:
            raise TunerError(
                f"this plan is for a {self.needs_ranks}-rank job and this process is one: "
                f"save it (result.plan.save('plan.json')) and run autoscale.apply(plan, model, "
                f"inputs) in each rank under torchrun --nproc-per-node {self.needs_ranks}.")
        loss_sum = self.accumulate(to_device(check_batch(batch, name="batch"), self.device))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss_sum)

    def accumulate(self, batch: Batch) -> torch.Tensor:
        """Forward and backward of every micro-batch of ``batch`` (on this Result's device),
        gradients accumulated, no optimizer step; returns the weighted mean loss as a 0-dim
        tensor (no host sync: the cost model runs this on fake tensors)."""
        total = batch_size(batch)
        loss_sum = torch.zeros((), device=self.device)
        self.model.train()
        micros = list(split_batch(batch, self.plan.batch.micro_batch_size))
        for i, (micro, size) in enumerate(micros):
            with self._sync(last=i == len(micros) - 1):
                loss = compute_loss(self.loss_fn, call_model(self.model, micro), micro)
                weighted = loss.float() * (size / total)
                (self.scaler.scale(weighted) if self.scaler else weighted).backward()
            loss_sum += weighted.detach()
        return loss_sum

    def _sync(self, *, last: bool) -> contextlib.AbstractContextManager[Any]:
        if isinstance(self.model, DistributedDataParallel) and not last:
            return self.model.no_sync()
        return contextlib.nullcontext()

    @property
    def _user_module(self) -> nn.Module:
        # DDP's wrapper prefixes every state_dict key with "module."; the wrapped module
        # holds the same tensors under the user's own keys.
        if isinstance(self.model, DistributedDataParallel):
            return self.model.module
        return self.model

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer and loss-scaler state, for checkpoint and resume.

        The model's keys are the user's model's under every plan (DDP's ``module.`` prefix
        is not added); under FSDP2 its values are the rank's DTensor shards. Under zero1
        the optimizer's state is consolidated from every rank: a collective, so every rank
        calls this, and each gets the whole state in torch's format (passes/shard.py,
        ``full_optimizer_state``).
        """
        state = {"model": self._user_module.state_dict(),
                 "optimizer": full_optimizer_state(self.optimizer)}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; ``state`` itself is not changed."""
        self._user_module.load_state_dict(state["model"])
        optimizer = state["optimizer"]
        # ZeroRedundancyOptimizer.load_state_dict sets the entries of other ranks'
        # parameters to None in the dict it is given: hand it a copy of the mapping.
        self.optimizer.load_state_dict({**optimizer, "state": dict(optimizer["state"])})
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])


def build_result(plan: Plan, model: nn.Module, *, loss_fn: LossFn | None = None,
                 inplace: bool = False, graph: Any = None,
                 device: torch.device | str | None = None,
                 process_group: Any = None) -> Result:
    """Apply ``plan``'s passes to a copy of ``model`` (or to ``model`` if ``inplace``).

    The passes run in PIPELINE order (autoscale/passes/__init__.py); a pass whose section
    asks for nothing is skipped. With ``device`` the copy is moved there first (the tuner's
    workers keep the pristine model on the CPU so that it is not part of a trial's peak).
    The passes get ``process_group``, or else torch.distributed's default group when it is
    initialized (under torchrun), or else None (one process).
    """
    model = model if inplace else copy.deepcopy(model)
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    if process_group is None and dist.is_available() and dist.is_initialized():
        process_group = dist.group.WORLD
    ctx = PassContext(graph=graph, device=device, process_group=process_group, plan=plan)
    for rewrite in PIPELINE:
        section = plan.sections[rewrite.section]
        if rewrite.enabled(section):
            model = rewrite.apply(model, section, ctx)
    optimizer = build_optimizer(plan.optimizer, model.parameters(), shard=plan.shard,
                                process_group=process_group)
    scheduler = _build_schedule(plan.schedule, optimizer)
    # Under FSDP2 a sharded scaler, so that every rank skips the same steps.
    scaler = grad_scaler(plan.precision, plan.shard, device_type=device.type,
                         process_group=process_group)
    return Result(model=model, optimizer=optimizer, plan=plan,
                  loss_fn=loss_fn or default_loss, scaler=scaler, scheduler=scheduler,
                  graph=graph)


def _build_schedule(plan: SchedulePlan, optimizer: torch.optim.Optimizer
                    ) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Rescale the lr for the plan's batch size, and build the warm-up/decay schedule."""
    from autoscale.optim import scale_lr, warmup_schedule

    if plan.lr_scaling != "none":
        # SchedulePlan's own check: a scaling rule comes with both batch sizes.
        assert plan.base_batch_size is not None and plan.batch_size is not None
        for group in optimizer.param_groups:
            group["lr"] = scale_lr(group["lr"], plan.base_batch_size, plan.batch_size,
                                   rule=plan.lr_scaling)
            group["initial_lr"] = group["lr"]
    if not plan.active:
        return None
    return warmup_schedule(optimizer, plan.warmup_steps, plan.total_steps, decay=plan.decay,
                           min_factor=plan.min_factor)
