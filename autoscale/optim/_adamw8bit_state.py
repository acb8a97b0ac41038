"""AdamW8bit's state in and out of ``state_dict``: the codes, or fp32 moments that
torch.distributed.checkpoint (DCP) can re-shard.

Note: [8-bit state in distributed checkpoints]
Under FSDP2 each rank keeps codes and block scales for its own flat shard (blocks start at
the shard's first element), so a block's scale covers elements that another world size
puts in two shards: the codes of one layout mean nothing in another, and saved as plain
tensors under one key they would be taken from one rank only (DCP keeps one copy of a
non-DTensor value). So ``state_dict`` hands each moment of a DTensor param out as what
torch.optim.AdamW keeps, an fp32 DTensor ``exp_avg`` / ``exp_avg_sq`` sharded like its
param (dequantized from the codes), which DCP saves shard-wise and re-shards to any world
size; ``load_state_dict`` quantizes them into the new shard's blocks. The alternative,
codes per element as a DTensor with blocks aligned to the shard, re-shards exactly only
when every shard boundary of every world size falls on a block boundary, which FSDP2's
dim-0 chunking of an arbitrary shape does not give (33 rows of 16 split 17/16: boundary
at element 272, not a multiple of 64), and it would change the kernels' layout.
Costs: while a checkpoint is taken the rank holds its state in fp32 too (8 bytes per
element of its shard on top of ~2), and the checkpoint is as big as fp32 AdamW's. A load
at the same layout gives back the same codes and scales: a block's largest element has
code +-127 (m) or 255 (sqrt(v)), which dequantizes to exactly its scale, so the block's
absmax is its scale again, and every other element lies well inside its code's rounding
interval (tests check a million elements). The one exception is a block whose largest m
was zeroed by the step's guard (its v quantized to 0: its sqrt(v) under 4e-6 of the
block's largest while its m is the block's largest), re-rounded as below. At another
layout each new block's scale is the largest dequantized value in it, so every element is
re-rounded once, to within half a level of its new block's map (at most 1/127 of the
block's largest moment: the top levels of both maps are 2/127 and 4/255 wide).
The small tensors (fp32 moments, fewer than min_8bit_size elements) are handed out as
DTensors too, since their rank-local moments are shards as well.
"""

from __future__ import annotations

from typing import Any

import torch

from autoscale.kernels._dtensor import is_dtensor, local
from autoscale.kernels.adamw8bit import (
    _quantize_unsigned_with,
    dequantize_signed,
    dequantize_unsigned,
    quantize_signed,
    state_numel,
)

__all__ = ["CODE_KEYS", "internal_state", "portable_state"]

CODE_KEYS = ("exp_avg_q", "exp_avg_scale", "exp_avg_sq_q", "exp_avg_sq_scale")


def portable_state(state: dict[str, Any], p: torch.Tensor, block: int) -> dict[str, Any]:
    """A new dict: ``state`` with 8-bit moments as fp32 ``exp_avg`` / ``exp_avg_sq`` shaped
    like ``p`` (its local shard, as DTensors sharded like ``p`` when it is one).

    ``state`` itself is not changed (torch's state_dict hands out the live dicts).
    """
    out = {k: v for k, v in state.items() if k not in CODE_KEYS}
    shape = local(p).shape
    if "exp_avg_q" in state:
        n = shape.numel()
        m = dequantize_signed(state["exp_avg_q"].view(-1, block), state["exp_avg_scale"])
        v = dequantize_unsigned(state["exp_avg_sq_q"].view(-1, block), state["exp_avg_sq_scale"])
        out["exp_avg"] = m.view(-1)[:n].view(shape)
        out["exp_avg_sq"] = v.view(-1)[:n].view(shape)
    if is_dtensor(p):
        for key in ("exp_avg", "exp_avg_sq"):
            if not is_dtensor(out[key]):
                out[key] = _like(out[key], p)
    return out


def _like(t: torch.Tensor, p: Any) -> torch.Tensor:
    """``t``, a tensor shaped like DTensor ``p``'s local shard, as a DTensor sharded like ``p``."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


def internal_state(state: dict[str, Any], p: torch.Tensor, *, block: int,
                   min_8bit_size: int) -> dict[str, Any]:
    """A new dict: a saved param state in the layout AdamW8bit steps on.

    DTensors become their local shards; fp32 moments of a param that takes 8-bit state
    (``p.numel() >= min_8bit_size``, the whole size, as at init) are quantized into this
    shard's blocks; codes are taken as they are if they fit this shard.

    Raises:
        ValueError: codes saved for a shard of another size, or moments of another shape,
            naming the fix.
    """
    out = {k: local(v) for k, v in state.items()}
    shape = local(p).shape
    n = shape.numel()
    if "exp_avg_q" in out:
        padded = out["exp_avg_q"].numel()
        if padded != state_numel(n, block):
            raise ValueError(
                f"AdamW8bit.load_state_dict: 8-bit codes of {padded} elements were saved for "
                f"a shard of another size (this one has {n} elements, block_size={block}): "
                "codes do not re-shard. Save with state_dict_moments='fp32' (the default "
                "for FSDP2 params) to load at another world size.")
        return out
    for key in ("exp_avg", "exp_avg_sq"):
        if out[key].shape != shape:
            raise ValueError(
                f"AdamW8bit.load_state_dict: {key} has shape {tuple(out[key].shape)}, this "
                f"param's (local shard) {tuple(shape)}. Load a sharded checkpoint through "
                "torch.distributed.checkpoint (get/set_optimizer_state_dict), which "
                "re-shards it.")
    if p.numel() < min_8bit_size:
        return out
    m, v = out.pop("exp_avg"), out.pop("exp_avg_sq")
    out.update(zip(CODE_KEYS, _quantized(m, v, block), strict=True))
    return out


def _quantized(m: torch.Tensor, v: torch.Tensor, block: int) -> tuple[torch.Tensor, ...]:
    """(m_q, m_scale, v_q, v_scale) of fp32 moments, padded to whole blocks, as the step's
    requantization leaves them (kernels/adamw8bit.py, module docstring): a block with a
    non-finite moment gets codes 0 and NaN scales, and m is 0 wherever v's code is 0."""
    padded = state_numel(m.numel(), block)
    blocks = []
    for t in (m, v):
        flat = torch.zeros(padded, dtype=torch.float32, device=t.device)
        flat[:t.numel()] = t.reshape(-1)
        blocks.append(flat.view(-1, block))
    mb, vb = blocks
    ok = (mb.isfinite() & vb.isfinite()).all(dim=1, keepdim=True)
    mq, ms = quantize_signed(torch.where(ok, mb, 0.0))
    # sqrt(v) through fp64: torch's fp32 sqrt is an ulp off for a few elements in a million
    # (measured 6 in 1e6), which would move a block's scale off the one it was saved with;
    # rounded from fp64 it is exactly the dequantized sqrt(v) that v was squared from.
    sv = torch.sqrt(torch.where(ok, vb, 0.0).double()).float()
    vs = sv.amax(dim=1)
    vq = _quantize_unsigned_with(sv, vs.unsqueeze(1)).to(torch.uint8)
    mq = torch.where(vq == 0, 0, mq).to(torch.int8)
    bad = ~ok.squeeze(1)
    ms, vs = ms.masked_fill(bad, torch.nan), vs.masked_fill(bad, torch.nan)
    mq, vq = mq.masked_fill(bad.unsqueeze(1), 0), vq.masked_fill(bad.unsqueeze(1), 0)
    return mq.reshape(-1), ms.contiguous(), vq.reshape(-1), vs.contiguous()
