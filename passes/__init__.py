"""Rewrite passes: each module exports one function that keeps a stated invariant.

Note: [passes rewrite modules, named by the captured graph]
DESIGN.md describes passes as graph rewrites. The graph that capture produces for a
HuggingFace model is a functional export graph (parameters lifted to inputs, kwargs
flattened); training that graph instead of the user's module would change what runs in
production and break the user's own forward (generation, data-dependent branches). So a
pass rewrites the runtime's private copy of the module tree, at the places the captured
ModelGraph names (block FQNs, per-node metadata), and keeps the state_dict keys of the
user's model unchanged so checkpoints stay interchangeable. Passes never copy the model
themselves; the runtime hands them a copy it owns.
"""

from autoscale.passes.checkpoint import checkpoint_blocks
from autoscale.passes.precision import autocast_forward

__all__ = ["autocast_forward", "checkpoint_blocks"]
