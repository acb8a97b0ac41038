"""The contract every rewrite pass keeps.

Note: [passes rewrite modules, named by the captured graph]
A pass rewrites the runtime's private copy of the user's module tree, at the places the
captured ModelGraph names (block FQNs, per-node metadata). It does not train a graph
instead of the module: the graph that capture produces for a HuggingFace model is a
functional export graph (parameters lifted to inputs, kwargs flattened), and training
it would change what runs in production and break the user's own forward (generation,
data-dependent branches). FSDP2, DDP comm hooks and checkpoint wrappers also act on
modules. Passes keep the state_dict keys of the user's model, so checkpoints stay
interchangeable, and never copy the model themselves: the runtime hands them a copy
it owns. This is the one place this rule is written down.

A pass receives (:class:`PassContext`) the model copy, its own plan section, the
captured graph, the device and, for distributed plans, the process group; it returns
the rewritten model (the same object, or a wrapper of it). It states its invariant (the
property the rewritten model keeps against the untouched one, checked by its test) and
reports its contribution to peak memory to the cost model (:meth:`Pass.memory`), on
:class:`MemoryTerms`, without running anything.

The runtime applies :data:`autoscale.passes.PIPELINE` in order; a new pass is one more
entry there and one plan section.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from autoscale.capture import ModelGraph

__all__ = ["MemoryTerms", "Pass", "PassContext"]


@dataclass(frozen=True)
class PassContext:
    """What a pass may read besides the model and its plan section."""

    graph: ModelGraph | None
    """The captured model: blocks and per-node metadata; None when the runtime was built
    without one (then only passes that need no graph names may be switched on)."""
    device: torch.device
    """Where the model's parameters live."""
    process_group: Any = None
    """The torch.distributed process group of a distributed plan; None on one process."""
    plan: Any = None
    """The whole Plan, for a pass whose rewrite depends on another section (under FSDP2
    the shard pass reads ``precision`` for its MixedPrecisionPolicy); None in tests that
    build a context by hand."""


@dataclass(frozen=True)
class MemoryTerms:
    """The cost model's running account of one step's peak memory, in bytes.

    Built from the model and its graph, then handed to each pass of the pipeline in
    order; a pass returns the terms with its own effect applied. The total is
    ``parameters + gradients + optimizer_state + activations + temporaries`` where
    ``activations = (outside + sum(saved) + recompute) * activation_factor``.
    """

    parameters: int
    """Parameters and buffers."""
    gradients: int
    optimizer_state: int
    saved: Mapping[str, int]
    """Block FQN -> bytes of that block's forward kept for backward."""
    outside: int
    """Activation bytes produced outside every block."""
    recompute: int = 0
    """Extra bytes live while one block is recomputed in backward."""
    activation_factor: float = 1.0
    """Multiplier on activation bytes (micro-batch share, precision, calibration)."""
    temporaries: int = 0
    """Short-lived buffers: the largest single op output, low-precision weight copies."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "saved", MappingProxyType(dict(self.saved)))

    def replace(self, **changes: Any) -> MemoryTerms:
        return dataclasses.replace(self, **changes)

    @property
    def activations(self) -> int:
        return int((self.outside + sum(self.saved.values()) + self.recompute)
                   * self.activation_factor)


@runtime_checkable
class Pass(Protocol):
    """One rewrite of the model copy, driven by one plan section."""

    section: str
    """Name of the plan section the pass reads (``plan.sections[section]``)."""
    invariant: str
    """What the rewritten model keeps equal to the untouched one (its test checks it)."""

    def enabled(self, section: Any) -> bool:
        """Whether this section asks for any rewrite (off passes are skipped)."""
        ...

    def apply(self, model: nn.Module, section: Any, ctx: PassContext) -> nn.Module:
        """Rewrite ``model`` (the runtime's copy) as ``section`` says; returns it."""
        ...

    def memory(self, section: Any, graph: ModelGraph, terms: MemoryTerms) -> MemoryTerms:
        """``terms`` with this pass's effect on peak memory applied (no real compute)."""
        ...

