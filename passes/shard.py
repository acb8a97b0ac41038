"""Data parallelism: DDP (+ a sharded optimizer), or FSDP2 sharding of gradients, optimizer
state and parameters.

Note: [zero1 is torch's ZeroRedundancyOptimizer over DDP]
zero1 keeps DDP for the gradients (all-reduced in buckets, every rank holds them whole)
and shards only the optimizer state, with ``torch.distributed.optim.ZeroRedundancyOptimizer``
wrapped around the plan's optimizer class (torch.optim's or autoscale.optim's: ZeRO builds
``optimizer_class(local_params, **defaults)``, so a kernel= choice passes through). It is
torch's own, kept implementation of ZeRO stage 1: each rank owns whole parameters (a greedy
partition by size), steps only those, then broadcasts them. A hand-written sharded-state
optimizer would repeat that and its state-dict consolidation for no gain; its one cost,
that shards are whole parameters and so only near-even, is what the cost model's
``optimizer_state / world_size`` leaves out (tests bound it). Its ``state_dict`` needs
``consolidate_state_dict`` on every rank first: :func:`full_optimizer_state` does that for
each rank in turn, so every rank gets the same full (torch-format, global-index) state.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from autoscale.capture import ModelGraph
from autoscale.errors import PassError
from autoscale.passes.base import MemoryTerms, PassContext
from autoscale.plan import PrecisionPlan, ShardPlan

__all__ = ["ShardPass", "full_optimizer_state", "grad_scaler", "shard_model",
           "shard_optimizer", "shard_units"]

# Leaf modules outside the blocks that get their own FSDP2 unit: embeddings and output
# heads, the big matrices outside the repeated layers. Norms and biases stay with the root
# (an all-gather of a few KiB per step buys nothing).
_UNIT_TYPES = (nn.Embedding, nn.Linear)


def shard_model(model: nn.Module, *, plan: ShardPlan, graph: ModelGraph | None,
                process_group: Any, device_type: str,
                precision: PrecisionPlan | None = None) -> nn.Module:
    """Make ``model`` train data-parallel over ``process_group`` as ``plan.strategy`` says.

    ddp and zero1 wrap the model in ``DistributedDataParallel`` (the returned module is the
    wrapper; its ``.module`` is ``model``); zero1's sharded optimizer is
    :func:`shard_optimizer`'s. zero2/zero3 call FSDP2's ``fully_shard`` in place on each of
    :func:`shard_units` (the captured blocks, then embeddings and heads), then on the root.
    Under bf16 or fp16 ``precision`` the units get ``MixedPrecisionPolicy(param_dtype=bf16
    or fp16, reduce_dtype=fp32)`` (see Note: [bf16 under FSDP2]; fp16's loss scaler is
    :func:`grad_scaler`'s); with ``plan.offload``, ``CPUOffloadPolicy(pin_memory=False)``.

    Invariant: when every rank steps on its own equal share of a batch, the gradients (hence
    the parameters after each optimizer step) equal those of one process on the whole batch,
    up to the reordering of fp32 sums in the all-reduce / reduce-scatter (tests bound it);
    under bf16/fp16, up to the rounding of the low-precision forward and backward that one
    process under autocast also does (fp16: with the same steps skipped by the loss
    scaler). Parameter names are unchanged; DDP prefixes state_dict keys with ``module.``,
    which the runtime's Result.state_dict removes.
    """
    size = dist.get_world_size(process_group)
    if size != plan.world_size:
        raise PassError(
            f"shard.world_size={plan.world_size} but the process group has {size} ranks; "
            f"run with torchrun --nproc-per-node {plan.world_size}, or re-plan for {size} "
            "ranks (ShardPlan(world_size=...))."
        )
    if plan.uses_ddp:
        # gradient_as_bucket_view: the gradients are views into DDP's buckets, so the
        # buckets are not a second copy of every gradient (torch's default copies them).
        return DistributedDataParallel(model, process_group=process_group,
                                       bucket_cap_mb=plan.bucket_cap_mb,
                                       gradient_as_bucket_view=True)
    # The mesh's rank map is real data even when the cost model builds this step on fake
    # tensors (autoscale/cost/_simulate.py): DeviceMesh reads it with tolist().
    with unset_fake_temporarily():
        mesh = DeviceMesh.from_group(process_group, device_type)
    options = _fsdp_options(plan, precision)
    if "mp_policy" in options:  # Note: [batch norm under FSDP2's low precision]
        norm_options = {**options, "mp_policy": MixedPrecisionPolicy(
            param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)}
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                fully_shard(module, mesh=mesh, reshard_after_forward=plan.reshard_after_forward,
                            **norm_options)
    for fqn in shard_units(model, graph):
        fully_shard(model.get_submodule(fqn), mesh=mesh,
                    reshard_after_forward=plan.reshard_after_forward, **options)
    # The root's own parameters (final norm, tied embedding/head) are needed again as soon
    # as backward starts, so it is not resharded after forward (FSDP2's own root heuristic).
    fully_shard(model, mesh=mesh, reshard_after_forward=False, **options)
    return model


# Note: [batch norm under FSDP2's low precision]
# FSDP2's param_dtype casts a unit's parameters but not its buffers, and CPU batch_norm
# refuses bf16 weights beside fp32 running statistics ("expected scalar type BFloat16 but
# found Float": the CNN example under zero2 bf16). Under autocast alone batch norm runs
# with fp32 weights on bf16 inputs, which the kernel takes; so each batch-norm layer with
# parameters becomes its own unit with fp32 parameters (sharded and reduced like any
# other), the rest of its block stays low precision. Layer and group norm are on
# autocast's fp32 list and need nothing.


# Note: [bf16 under FSDP2]
# FSDP2 casts each unit's all-gathered parameters to bf16 (param_dtype) and its gradients
# back to fp32 before the reduce-scatter (reduce_dtype), so the sharded master weights,
# gradients and optimizer state stay fp32, as under autocast alone. Autocast (the precision
# pass, applied before this one) still wraps the root's forward: with bf16 weights the
# matmuls need no cast, and autocast keeps the ops on its fp32 list (softmax, norms, losses)
# in fp32, which FSDP2's parameter cast alone would run in bf16. FSDP2's cast of each unit's
# inputs is off (cast_forward_inputs=False): autocast casts what the matmuls take, and float
# inputs that are no matmul's (regression targets) keep their precision, as under autocast
# on one process. fp16 is the same policy with param_dtype=fp16; see Note: [fp16 under
# FSDP2] for its loss scaling.
_LOW_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _fsdp_options(plan: ShardPlan, precision: PrecisionPlan | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if precision is not None and precision.mode in _LOW_DTYPES:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=_LOW_DTYPES[precision.mode],
                                                    reduce_dtype=torch.float32,
                                                    cast_forward_inputs=False)
    elif precision is not None and precision.mode != "fp32":
        raise PassError(f"precision.mode={precision.mode!r} under shard.strategy="
                        f"{plan.strategy!r} is not supported; use 'bf16', 'fp16' or 'fp32'.")
    # pin_memory needs an accelerator; on a CPU-only job the offloaded state stays put.
    options["offload_policy"] = (CPUOffloadPolicy(pin_memory=False) if plan.offload
                                 else OffloadPolicy())
    return options


# Note: [fp16 under FSDP2]
# fp16's loss scaling must skip the same steps on every rank: a rank that stepped while
# another skipped would leave the shards of one parameter from two different models.
# Under FSDP2 each rank unscales and checks only its own gradient shards (fp32: the
# reduce-scatter ran in reduce_dtype, so an fp16 overflow in backward arrives as an inf in
# some rank's shard). torch's ShardedGradScaler is GradScaler with an all-reduce of
# found_inf over the process group after the unscale, so every rank sees any rank's inf;
# on DTensor gradients torch 2.13's _amp_foreach_non_finite_check_and_unscale_ runs on the
# local shards (DTensor's found_inf_reduce_handler also max-reduces found_inf over the
# mesh, once per device and dtype group). ShardedGradScaler's own all-reduce is kept
# anyway: it does not depend on every gradient being a DTensor, and it covers a rank that
# holds no gradient at all. Checked on 2 gloo ranks (tests/passes/test_shard.py): an inf
# put into one rank's shard makes both ranks skip that step and halve the scale.
def grad_scaler(precision: PrecisionPlan, shard: ShardPlan, *, device_type: str,
                process_group: Any = None) -> torch.amp.GradScaler | None:
    """The loss scaler for ``precision``: None unless fp16, then a GradScaler.

    Under FSDP2 (zero2/zero3) it is torch's ShardedGradScaler over ``process_group`` (the
    default group when None), so that every rank skips the same steps (see Note: [fp16
    under FSDP2]); otherwise ``torch.amp.GradScaler`` (DDP and zero1 gradients are whole
    on every rank after the all-reduce, so each rank finds the same infs). Both start at
    ``precision.init_scale``.
    """
    if precision.mode != "fp16":
        return None
    if not shard.uses_fsdp:
        return torch.amp.GradScaler(device_type, init_scale=precision.init_scale)
    if process_group is None:
        process_group = dist.group.WORLD
    return ShardedGradScaler(device_type, init_scale=precision.init_scale,
                             process_group=process_group)


def shard_units(model: nn.Module, graph: ModelGraph | None) -> list[str]:
    """FQNs of the modules that become their own FSDP2 unit, in module order (root excluded).

    Each block the captured ``graph`` names, then each leaf ``nn.Embedding``/``nn.Linear``
    outside every block (token and position embeddings, output heads) that shares no
    parameter with another module: FSDP2 needs tied parameters (a GPT's embedding and head)
    in one unit, so those stay with the root. Without a graph, nothing: the root is the
    one unit.
    """
    if graph is None:
        return []
    blocks = [b.fqn for b in graph.blocks]
    for fqn in blocks:
        try:
            model.get_submodule(fqn)
        except AttributeError as err:
            raise PassError(
                f"the captured graph names block {fqn!r}, which is not a submodule of "
                f"{type(model).__name__}; capture this model (capture(model, inputs))."
            ) from err
    owners: dict[int, set[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(name)
    extra = []
    for name, module in model.named_modules():
        inside = any(name == b or name.startswith(b + ".") for b in blocks)
        own = list(module.parameters(recurse=False))
        if (name and not inside and isinstance(module, _UNIT_TYPES) and own
                and not any(module.children())
                and all(owners[id(p)] == {name} for p in own)):
            extra.append(name)
    return blocks + extra


def shard_optimizer(optimizer_class: type[torch.optim.Optimizer],
                    params: Iterable[torch.nn.Parameter], *, plan: ShardPlan,
                    process_group: Any = None, **defaults: Any) -> torch.optim.Optimizer:
    """``optimizer_class(params, **defaults)``, its state sharded across ranks under zero1.

    zero1: a ``ZeroRedundancyOptimizer`` over ``process_group`` (see Note: [zero1 is
    torch's ZeroRedundancyOptimizer over DDP]); every other strategy: the optimizer itself
    (FSDP2's parameters are already shards). Invariant: the parameters after each step are
    those the unsharded optimizer gives (each rank steps its own parameters with the same
    maths, then broadcasts them).
    """
    if plan.strategy != "zero1":
        return optimizer_class(params, **defaults)  # type: ignore[call-arg]
    if process_group is None:
        process_group = dist.group.WORLD
    return ZeroRedundancyOptimizer(list(params), optimizer_class=optimizer_class,
                                   process_group=process_group, **defaults)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state_dict; under zero1 the full one, on every rank (collective).

    ZeroRedundancyOptimizer's state is consolidated onto each rank in turn and read there,
    so every rank returns the same torch-format state (global parameter indices) that a
    plain optimizer or a ZeroRedundancyOptimizer at any world size loads. Every rank must
    call it. The consolidated copy is not kept in the optimizer afterwards (it would be a
    full copy of the state on the host until the next call).
    """
    if not isinstance(optimizer, ZeroRedundancyOptimizer):
        return optimizer.state_dict()
    state: dict[str, Any] = {}
    for rank in range(optimizer.world_size):
        optimizer.consolidate_state_dict(to=rank)
        if rank == optimizer.rank:
            state = optimizer.state_dict()
    # torch keeps the gathered per-rank states here until the next consolidation (private;
    # tests/distributed/shard_worker.py checks that it is still the attribute emptied).
    optimizer._all_state_dicts = []  # type: ignore[attr-defined]
    return state


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
        precision = ctx.plan.precision if ctx.plan is not None else None
        return shard_model(model, plan=section, graph=ctx.graph,
                           process_group=ctx.process_group, device_type=ctx.device.type,
                           precision=precision)

    def memory(self, section: ShardPlan, graph: ModelGraph,
               terms: MemoryTerms) -> MemoryTerms:
        """Per-rank bytes. See Note: [per-rank memory of each strategy]."""
        ws = section.world_size
        if section.strategy in ("none", "ddp"):
            return terms
        if section.strategy == "zero1":
            return terms.replace(optimizer_state=terms.optimizer_state // ws)
        blocks = [b.param_bytes for b in graph.blocks]
        largest = max(blocks, default=0)
        root_own = max(graph.param_bytes - sum(blocks), 0)
        if section.strategy == "zero2":
            live = graph.param_bytes
        elif section.reshard_to is None:
            live = root_own + 2 * largest
        else:
            live = root_own + 2 * largest + sum(blocks) // section.reshard_to
        return terms.replace(parameters=terms.parameters // ws + live,
                             gradients=terms.gradients // ws,
                             optimizer_state=terms.optimizer_state // ws,
                             temporaries=terms.temporaries + 2 * largest)


# Note: [per-rank memory of each strategy]
# ddp: every rank holds parameters, gradients and state whole; with gradient_as_bucket_view
# the buckets are the gradients, so DDP adds nothing to the terms (bucket_cap_mb sets how
# the gradient bytes are cut for the all-reduce, not how many there are).
# zero1: as ddp, but each rank keeps the optimizer state of its own parameters only
# (optimizer_state / ws; ZeRO's partition is by whole parameters, so a rank's share is
# near, not exactly, 1/ws). The step's broadcast writes into the parameters: no buffer.
# zero2 (FSDP2, blocks not resharded after forward): every rank keeps its 1/ws shard of
# parameters, gradients and optimizer state; the all-gathered parameters of every unit stay
# live from forward to the end of backward, so the whole unsharded model is live at the
# peak (parameters/ws + param_bytes). Among the temporaries, two units' gradient bytes:
# the running unit's unsharded gradient, and the previous unit's reduce-scatter input,
# which FSDP2 keeps until the next unit's reduce-scatter starts
# (reduce_scatter_max_input_buffers=1); the largest block's, twice.
# zero3: blocks reshard after forward, so at most two units are unsharded at once (the one
# running and the one prefetched: FSDP2's all-gather buffers); the root's own parameters
# stay unsharded through the step (the root is not resharded after forward). With
# reshard_to=r each block keeps a 1/r shard from its forward to its backward on top.
# The graph names blocks only, so embeddings and heads that shard_units makes units are
# counted as the root's own here: an over-estimate for zero3 by their unsharded bytes.
# offload: on a CPU machine the host is the device, so moving the sharded state to host
# memory saves nothing of a per-device budget there and the terms stay as they are; on an
# accelerator the sharded parameters, gradients and optimizer state (the "/ ws" terms) would
# leave the device, which MemoryTerms cannot tell apart (it has no device): the estimate
# keeps them, an over-estimate for offload on an accelerator.
# bf16, fp16 (MixedPrecisionPolicy): the unsharded parameters are 16-bit, half the bytes
# counted above, and autocast then caches no weight copies; Pass.memory sees only its own
# section, so this too is left as an over-estimate.
