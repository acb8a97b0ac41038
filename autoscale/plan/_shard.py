"""The ``shard`` plan section: how a data-parallel job splits its state across ranks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from autoscale.errors import PlanError
from autoscale.plan._plan import plan_section

__all__ = ["SHARD_STRATEGIES", "ShardPlan"]

SHARD_STRATEGIES = ("none", "ddp", "zero1", "zero2", "zero3")


@plan_section("shard", omit_default=True)
@dataclass(frozen=True, slots=True)
class ShardPlan:
    """Data parallelism over ``world_size`` ranks (passes/shard.py applies it).

    The defaults (strategy 'none') switch sharding off, so plan files written before this
    section existed load and run on one process unchanged; at its defaults the section is
    left out of the plan's JSON and digest (``omit_default``), which therefore stay those of
    schema 1.

    Invariants: ``world_size >= 2`` for every strategy but 'none'; ``mesh`` is the 1-D
    device mesh ``(world_size,)`` (filled in when left empty); ``reshard_to`` and
    ``offload`` are set only where FSDP2 runs (zero2/zero3; ``reshard_to`` zero3 only).
    """

    strategy: Literal["none", "ddp", "zero1", "zero2", "zero3"] = "none"
    """none: no data parallelism. ddp: torch DDP, every rank holds everything and gradients
    are all-reduced in buckets. zero1: DDP with torch's ZeroRedundancyOptimizer, each rank
    keeping and stepping the optimizer state of its share of the parameters, then
    broadcasting them. zero2: FSDP2 ``fully_shard`` per block, then the root, with
    ``reshard_after_forward=False``: parameters, gradients and optimizer state are sharded
    between steps, and each block's parameters, all-gathered once in forward, stay whole
    until its backward. zero3: the same with ``reshard_after_forward=True`` for the blocks:
    each block is all-gathered in forward and again in backward."""
    bucket_cap_mb: int = 25
    """DDP's gradient bucket size in MiB (torch's default); strategies ddp and zero1."""
    world_size: int = 1
    """Ranks the plan was made (and measured) for; the runtime refuses a process group of
    another size unless ``size_agnostic``."""
    mesh: tuple[int, ...] = ()
    """Shape of the device mesh the ranks form; 1-D ``(world_size,)`` (pure data
    parallelism) is what autoscale builds. Empty means ``(world_size,)``."""
    reshard_to: int | None = None
    """zero3 only: after forward, reshard each block to groups of this many ranks (FSDP2's
    integer ``reshard_after_forward``: less all-gather traffic in backward for more
    memory). A divisor of ``world_size`` between 2 and ``world_size - 1``; None: all ranks."""
    offload: bool = False
    """zero2/zero3 only: keep sharded parameters, gradients and optimizer state in host
    memory (FSDP2's ``CPUOffloadPolicy(pin_memory=False)``; pinned memory needs an
    accelerator), the optimizer stepping on the CPU."""
    size_agnostic: bool = False
    """The plan may run at any world size (its figures were measured at ``world_size``);
    otherwise a job with another number of ranks is refused."""

    def __post_init__(self) -> None:
        if isinstance(self.world_size, bool) or self.world_size < 1:
            raise PlanError(f"shard.world_size must be >= 1, got {self.world_size}; pass "
                            "torch.distributed.get_world_size().")
        if self.bucket_cap_mb < 1:
            raise PlanError(f"shard.bucket_cap_mb must be >= 1, got {self.bucket_cap_mb}.")
        if self.strategy != "none" and self.world_size < 2:
            raise PlanError(
                f"shard.strategy={self.strategy!r} needs shard.world_size >= 2, got "
                f"{self.world_size}; set world_size to the number of ranks (torchrun "
                "--nproc-per-node), or strategy='none' for one process."
            )
        if not self.mesh and self.strategy != "none":
            object.__setattr__(self, "mesh", (self.world_size,))
        if self.mesh and self.mesh != (self.world_size,):
            raise PlanError(
                f"shard.mesh={list(self.mesh)} is not supported: autoscale builds a 1-D mesh "
                f"of all ranks, [{self.world_size}] for world_size={self.world_size} "
                "(2-D meshes, HSDP and tensor parallelism, are not planned yet). Remove the "
                "field or set it to [world_size]."
            )
        fsdp = self.strategy in ("zero2", "zero3")
        if self.offload and not fsdp:
            raise PlanError(
                f"shard.offload=true needs shard.strategy 'zero2' or 'zero3' (FSDP2's "
                f"CPUOffloadPolicy), got {self.strategy!r}; set offload=false or pick zero2/3."
            )
        if self.reshard_to is not None:
            ws = self.world_size
            if self.strategy != "zero3":
                raise PlanError(f"shard.reshard_to is for strategy 'zero3' only, got "
                                f"{self.strategy!r}; remove it.")
            if not (1 < self.reshard_to < ws and ws % self.reshard_to == 0):
                raise PlanError(
                    f"shard.reshard_to={self.reshard_to} must divide world_size={ws} and lie "
                    f"between 2 and {ws - 1} (FSDP2's integer reshard_after_forward); use null "
                    "to reshard to all ranks."
                )

    @property
    def reshard_after_forward(self) -> bool | int:
        """FSDP2's ``reshard_after_forward`` for the blocks: True for zero3 (or its
        ``reshard_to``), False for zero2."""
        if self.strategy != "zero3":
            return False
        return self.reshard_to if self.reshard_to is not None else True

    @property
    def uses_fsdp(self) -> bool:
        """zero2/zero3: FSDP2 units rather than a DDP wrapper."""
        return self.strategy in ("zero2", "zero3")

    @property
    def uses_ddp(self) -> bool:
        """ddp/zero1: the model is wrapped in DistributedDataParallel."""
        return self.strategy in ("ddp", "zero1")
