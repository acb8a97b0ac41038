"""Note: [table cache] (kernels/_triton_util.py): the Triton paths keep no gradient alive.

With ``zero_grad(set_to_none=True)`` every step's grads are new tensors; a cache of launch
tables holding them would keep up to its size of steps of gradients in memory.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from autoscale.optim import LAMB, LARS, SGD, AdamW, AdamW8bit

OPTIMIZERS = {
    "AdamW": lambda ps: AdamW(ps, lr=1e-2, kernel="triton"),
    "SGD": lambda ps: SGD(ps, lr=1e-2, momentum=0.9, kernel="triton"),
    "LAMB": lambda ps: LAMB(ps, lr=1e-2, kernel="triton"),
    "LARS": lambda ps: LARS(ps, lr=1e-2, kernel="triton"),
    "AdamW8bit": lambda ps: AdamW8bit(ps, lr=1e-2, min_8bit_size=64, kernel="triton"),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_earlier_steps_grads_are_freed(interpret, name: str) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Linear(12, 3))
    opt = OPTIMIZERS[name](model.parameters())
    x = torch.randn(8, 16)
    seen: list[weakref.ref] = []
    for _ in range(20):
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        seen += [weakref.ref(p.grad) for p in model.parameters()]
        opt.step()
    gc.collect()
    n = len(list(model.parameters()))
    alive_earlier = [r for r in seen[:-n] if r() is not None]
    assert not alive_earlier, f"{len(alive_earlier)} grads of earlier steps still alive"
    assert all(r() is not None for r in seen[-n:])  # the current grads, held by the params
