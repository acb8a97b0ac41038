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


def child_pids(parent: int, *, marker: bytes | None = None, live: bool = False) -> list[int]:
    """Processes whose parent is ``parent`` (from /proc): only those whose command line
    holds ``marker`` if given, and only those not yet reaped zombies with ``live``."""
    from pathlib import Path

    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            cmdline = (entry / "cmdline").read_bytes() if marker is not None else b""
        except OSError:
            continue
        if int(ppid) == parent and not (live and state == "Z") and (
                marker is None or marker in cmdline):
            found.append(int(entry.name))
    return found
