"""The ``shard`` plan section: how a data-parallel job splits its state across ranks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from autoscale.errors import PlanError
from autoscale.plan._plan import plan_section

__all__ = ["ShardPlan"]


@plan_section("shard", omit_default=True)
@dataclass(frozen=True, slots=True)
class ShardPlan:
    """Data parallelism over ``world_size`` ranks (passes/shard.py applies it).

    The defaults (strategy 'none') switch sharding off, so plan files written before this
    section existed load and run on one process unchanged; at its defaults the section is
    left out of the plan's JSON and digest (``omit_default``), which therefore stay those of
    schema 1.
    """

    strategy: Literal["none", "ddp", "zero2", "zero3"] = "none"
    """none: no data parallelism. ddp: torch DDP, every rank holds everything and gradients
    are all-reduced in buckets. zero2: FSDP2 ``fully_shard`` per block, then the root, with
    ``reshard_after_forward=False``: parameters, gradients and optimizer state are sharded
    between steps, and each block's parameters, all-gathered once in forward, stay whole
    until its backward. zero3: the same with ``reshard_after_forward=True`` for the blocks:
    each block is all-gathered in forward and again in backward."""
    bucket_cap_mb: int = 25
    """DDP's gradient bucket size in MiB (torch's default); used by strategy 'ddp' only."""
    world_size: int = 1
    """Ranks the plan was made for; the runtime refuses a process group of another size."""

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

    @property
    def reshard_after_forward(self) -> bool:
        """FSDP2's flag for the blocks: True for zero3 only."""
        return self.strategy == "zero3"
