"""Data parallelism: DDP, or FSDP2 sharding of gradients, optimizer state and parameters."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from autoscale.capture import ModelGraph
from autoscale.errors import PassError
from autoscale.passes.base import MemoryTerms, PassContext
from autoscale.plan import ShardPlan

__all__ = ["ShardPass", "shard_model"]


def shard_model(model: nn.Module, *, plan: ShardPlan, graph: ModelGraph | None,
                process_group: Any, device_type: str) -> nn.Module:
    """Make ``model`` train data-parallel over ``process_group`` as ``plan.strategy`` says.

    ddp wraps the model in ``DistributedDataParallel`` (the returned module is the wrapper;
    its ``.module`` is ``model``). zero2/zero3 call FSDP2's ``fully_shard`` on every block
    the captured ``graph`` names, then on the root (as torchtitan wraps), in place; without
    a graph the root is the one unit.

    Invariant: when every rank steps on its own equal share of a batch, the gradients (hence
    the parameters after each optimizer step) equal those of one process on the whole batch,
    up to the reordering of fp32 sums in the all-reduce / reduce-scatter (tests bound it).
    Parameter names are unchanged; DDP prefixes state_dict keys with ``module.``, which the
    runtime's Result.state_dict removes (it saves the wrapped model's own state_dict).
    """
    size = dist.get_world_size(process_group)
    if size != plan.world_size:
        raise PassError(
            f"shard.world_size={plan.world_size} but the process group has {size} ranks; "
            f"run with torchrun --nproc-per-node {plan.world_size}, or re-plan for {size} "
            "ranks (ShardPlan(world_size=...))."
        )
    if plan.strategy == "ddp":
        # gradient_as_bucket_view: the gradients are views into DDP's buckets, so the
        # buckets are not a second copy of every gradient (torch's default copies them).
        return DistributedDataParallel(model, process_group=process_group,
                                       bucket_cap_mb=plan.bucket_cap_mb,
                                       gradient_as_bucket_view=True)
    mesh = DeviceMesh.from_group(process_group, device_type)
    for fqn in _block_fqns(model, graph):
        fully_shard(model.get_submodule(fqn), mesh=mesh,
                    reshard_after_forward=plan.reshard_after_forward)
    # The root's own parameters (embeddings, head, final norm) are needed again as soon as
    # backward starts, so it is not resharded after forward (FSDP2's own root heuristic).
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    return model


def _block_fqns(model: nn.Module, graph: ModelGraph | None) -> list[str]:
    fqns = [b.fqn for b in graph.blocks] if graph is not None else []
    for fqn in fqns:
        try:
            model.get_submodule(fqn)
        except AttributeError as err:
            raise PassError(
                f"the captured graph names block {fqn!r}, which is not a submodule of "
                f"{type(model).__name__}; capture this model (capture(model, inputs))."
            ) from err
    return fqns


class ShardPass:
    """The pipeline entry for :func:`shard_model` (plan section ``shard``)."""

    section = "shard"
    invariant = ("with each rank on an equal share of the batch, gradients and parameters "
                 "equal one process on the whole batch (fp32 sum reordering only)")

    def enabled(self, section: ShardPlan) -> bool:
        return section.strategy != "none"

    def apply(self, model: nn.Module, section: ShardPlan, ctx: PassContext) -> nn.Module:
        if ctx.process_group is None:
            raise PassError(
                f"shard.strategy={section.strategy!r} needs torch.distributed: run the job "
                f"under torchrun --nproc-per-node {section.world_size} and call "
                "torch.distributed.init_process_group() before building the result (or pass "
                "process_group=...)."
            )
        return shard_model(model, plan=section, graph=ctx.graph,
                           process_group=ctx.process_group, device_type=ctx.device.type)

    def memory(self, section: ShardPlan, graph: ModelGraph,
               terms: MemoryTerms) -> MemoryTerms:
        """Per-rank bytes. See Note: [per-rank memory of each strategy]."""
        if section.strategy in ("none", "ddp"):
            return terms
        ws = section.world_size
        blocks = [b.param_bytes for b in graph.blocks]
        largest = max(blocks, default=0)
        gradients = terms.gradients // ws
        temporaries = terms.temporaries + largest  # one unit's unsharded grad, pre-reduce
        if section.strategy == "zero2":
            parameters = terms.parameters // ws + graph.param_bytes
        else:
            root_own = max(graph.param_bytes - sum(blocks), 0) if blocks else graph.param_bytes
            parameters = terms.parameters // ws + root_own + 2 * largest
        return terms.replace(parameters=parameters, gradients=gradients,
                             optimizer_state=terms.optimizer_state // ws,
                             temporaries=temporaries)


# Note: [per-rank memory of each strategy]
# ddp: every rank holds parameters, gradients and state whole; with gradient_as_bucket_view
# the buckets are the gradients, so DDP adds nothing to the terms (bucket_cap_mb sets how
# the gradient bytes are cut for the all-reduce, not how many there are).
# zero2 (FSDP2, blocks not resharded after forward): every rank keeps its 1/ws shard of
# parameters, gradients and optimizer state; the all-gathered parameters of every unit stay
# live from forward to the end of backward, so the whole unsharded model is live at the
# peak (parameters/ws + param_bytes); one unit's unsharded gradient is live until its
# reduce-scatter (the largest block's, among the temporaries).
# zero3: blocks reshard after forward, so at most two blocks are unsharded at once (the one
# running and the one prefetched); the root's own parameters (embeddings, head) stay
# unsharded through the step (the root is not resharded after forward).
