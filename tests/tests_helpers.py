"""Small helpers shared by tests (importable because tests/ is on sys.path)."""

from __future__ import annotations

import torch


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def tiny_gpt(batch_size: int = 8, dropout: float = 0.1):
    """The examples/gpt.py model at a size that trains in milliseconds."""
    import gpt

    config = gpt.GPTConfig(block_size=32, n_layer=3, n_head=2, n_embd=32, dropout=dropout)
    return gpt.build(batch_size=batch_size, config=config)
