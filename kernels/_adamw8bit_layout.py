"""The 8-bit AdamW state layout and step scalars, shared by every path of
``kernels.adamw8bit`` (the dispatcher and the reference) and by ``_triton_adamw8bit``.

Layout of the state of a parameter with n elements, nb = ceil(n / block_size):
m_q (nb * block_size,) int8, m_scale (nb,) fp32, v_q (nb * block_size,) uint8,
v_scale (nb,) fp32, all contiguous.
"""

from __future__ import annotations

import torch

__all__ = ["check", "hyper", "state_numel"]


def state_numel(numel: int, block_size: int) -> int:
    """Length of the padded quantized state of a parameter: whole blocks."""
    return -(-numel // block_size) * block_size


def hyper(
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int
) -> tuple[float, float, float, float, float, float]:
    """(beta1, beta2, eps, decay, step_size, 1/sqrt(bc2)) as torch.optim.AdamW computes them."""
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    return beta1, beta2, eps, 1.0 - lr * weight_decay, lr / bc1, bc2**-0.5


def check(p: torch.Tensor, g: torch.Tensor, mq: torch.Tensor, ms: torch.Tensor,
          vq: torch.Tensor, vs: torch.Tensor, block_size: int, step: int) -> int:  # fmt: skip
    """Validate the state layout; return the number of blocks.

    Raises ValueError naming the tensor that does not fit and how to allocate it.
    """
    nb = -(-p.numel() // block_size)
    if g.shape != p.shape:
        raise ValueError(f"grad shape {tuple(g.shape)} != param shape {tuple(p.shape)}.")
    if step < 1:
        raise ValueError(f"step must be >= 1 (bias correction uses 1 - beta**step), got {step}.")
    padded = nb * block_size
    # One flat test first: this runs for every tensor at every step.
    if (mq.dtype == torch.int8 and vq.dtype == torch.uint8 and ms.dtype == torch.float32
            and vs.dtype == torch.float32 and mq.numel() == padded and vq.numel() == padded
            and ms.numel() == nb and vs.numel() == nb and mq.is_contiguous()
            and vq.is_contiguous() and ms.is_contiguous() and vs.is_contiguous()):  # fmt: skip
        return nb
    want = {"m_q": (mq, torch.int8, padded), "v_q": (vq, torch.uint8, padded),
            "m_scale": (ms, torch.float32, nb), "v_scale": (vs, torch.float32, nb)}  # fmt: skip
    for name, (t, dtype, numel) in want.items():
        if t.dtype != dtype or t.numel() != numel or not t.is_contiguous():
            raise ValueError(
                f"{name} must be a contiguous {dtype} tensor of {numel} elements for a "
                f"{p.numel()}-element param with block_size={block_size}; got {t.dtype} "
                f"with {t.numel()}. Allocate it with kernels.adamw8bit.state_numel()."
            )
    return nb
