"""checkpoint_blocks keeps outputs and gradients equal to the untouched model's."""

from __future__ import annotations

import copy

import pytest
import torch
from tests_helpers import grads_of

from autoscale import CheckpointPlan, PassError
from autoscale.passes import checkpoint_blocks


def test_every_block_checkpointed_gives_same_loss_and_grads_with_dropout() -> None:
    from tests_helpers import tiny_gpt

    model, (x, y) = tiny_gpt(dropout=0.2)  # dropout on: RNG must be replayed exactly
    rewritten = checkpoint_blocks(copy.deepcopy(model),
                                  plan=CheckpointPlan(blocks=("h.0", "h.1", "h.2")))
    torch.manual_seed(123)
    loss_ref = model(x, y)
    loss_ref.backward()
    torch.manual_seed(123)
    loss = rewritten(x, y)
    loss.backward()
    # Same kernels on the same inputs in the same order: equal up to float reassociation
    # in the recompute (none on CPU in practice), so a tight tolerance.
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    for name, ref in grads_of(model).items():
        torch.testing.assert_close(grads_of(rewritten)[name], ref, rtol=1e-6, atol=1e-7,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert model.state_dict().keys() == rewritten.state_dict().keys()


def test_checkpointing_saves_fewer_tensors() -> None:
    from tests_helpers import tiny_gpt

    model, (x, y) = tiny_gpt(dropout=0.0)
    rewritten = checkpoint_blocks(copy.deepcopy(model),
                                  plan=CheckpointPlan(blocks=("h.0", "h.1", "h.2")))

    def saved_bytes(m) -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(x, y)
        return total

    assert saved_bytes(rewritten) < 0.5 * saved_bytes(model)


def test_unknown_block_is_refused() -> None:
    with pytest.raises(PassError, match=r"'h\.9', which is not a submodule"):
        checkpoint_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)),
                          plan=CheckpointPlan(blocks=("h.9",)))
