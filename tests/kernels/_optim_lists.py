"""Random tensor lists shared by the optimizer-kernel tests."""

from __future__ import annotations

import torch

# Several tensors per launch, sizes below, at and above the chunk used in tests (256 elements)
# and not multiples of any BLOCK, 1-D ones (excluded by LAMB/LARS) and 2-D ones.
SHAPE_SETS = {
    "one_small": [(5,)],
    "mixed": [(3, 5), (1000,), (7,), (40, 30)],
    "many": [(300,)] * 5 + [(17, 33), (1,)],
}
CHUNK = 256  # small, so that one tensor spans several chunks (programs)


def randn_list(shapes, dtype, *, scale: float = 1.0) -> list[torch.Tensor]:
    return [(torch.randn(s) * scale).to(dtype) for s in shapes]


def zeros_list(shapes) -> list[torch.Tensor]:
    return [torch.zeros(s) for s in shapes]


def clone_all(lists):
    return [[t.clone() if isinstance(t, torch.Tensor) else t for t in ts] for ts in lists]


def adamw8bit_state(n: int, block: int) -> list[torch.Tensor]:
    """Zeroed 8-bit AdamW state (m_q, m_scale, v_q, v_scale) for an n-element param."""
    from autoscale.kernels.adamw8bit import state_numel

    ns = state_numel(n, block)
    return [
        torch.zeros(ns, dtype=torch.int8), torch.zeros(ns // block),
        torch.zeros(ns, dtype=torch.uint8), torch.zeros(ns // block),
    ]  # fmt: skip
