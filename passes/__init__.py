"""Rewrite passes, and the one ordered list the runtime applies.

The contract every pass keeps (what it receives and returns, its invariant, its memory
report to the cost model) is in :mod:`autoscale.passes.base`, with the note on why
passes rewrite the module tree at the places the captured graph names.
"""

from autoscale.passes.base import MemoryTerms, Pass, PassContext
from autoscale.passes.checkpoint import CheckpointPass, checkpoint_blocks
from autoscale.passes.compile import CompilePass, compile_model
from autoscale.passes.compress import CompressPass, comm_stats, compress_model
from autoscale.passes.precision import PrecisionPass, autocast_forward
from autoscale.passes.shard import ShardPass, shard_model

#: The passes in the order the runtime applies them. Checkpointing wraps block forwards
#: first; autocast then wraps the root's forward, so recomputed blocks run under the
#: same autocast state as their first forward (checkpoint replays it). Sharding (and
#: compression) go after both, as torchtitan orders AC before FSDP wrapping: FSDP2's hooks
#: then run around the checkpointed block forward, and DDP wraps the autocast root.
#: Compilation goes last: it compiles the forward the others built (checkpoint wrappers and
#: autocast traced into one graph); plans that compile do not shard (passes/compile.py).
PIPELINE: tuple[Pass, ...] = (CheckpointPass(), PrecisionPass(), ShardPass(), CompressPass(),
                              CompilePass())

__all__ = [
    "PIPELINE",
    "CheckpointPass",
    "CompilePass",
    "CompressPass",
    "MemoryTerms",
    "Pass",
    "PassContext",
    "PrecisionPass",
    "ShardPass",
    "autocast_forward",
    "checkpoint_blocks",
    "comm_stats",
    "compile_model",
    "compress_model",
    "shard_model",
]
