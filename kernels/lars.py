"""Multi-tensor LARS (You et al. 2017, "Large Batch Training of Convolutional Networks").

Maths per tensor, in fp32, ``wd_i`` = 0 for excluded tensors (biases, norm weights):

    r   <- eta * ||p|| / (||g|| + wd_i * ||p|| + eps)  if adapted and both norms > 0, else 1
    d   <- r * (g + wd_i * p)
    buf <- d on the first step, else momentum * buf + (1 - dampening) * d
    d   <- d + momentum * buf (Nesterov)  or  buf        (when momentum > 0)
    p   <- p - lr * d

This is the trust-ratio-inside-momentum form used by MLPerf ResNet-50 and NVIDIA's LARC
(``clip=False``). Two launches: phase 1 writes each chunk's partial sums of p^2 and g^2
(read-only), a torch op forms r per tensor, phase 2 applies the momentum update.

Every path computes all norms before any param moves, so sharded (DTensor) params can
sum their shards' norms in one collective per step (``kernels._dtensor``).

Paths (``kernel=``), and the machines that need them:
  "triton":    CUDA GPUs (fp32/bf16/fp16 params, fp32 buffers).
  "native":    CPUs with a C compiler (``kernels._cpu_optim``; fp32/bf16 params).
  "foreach":   CPUs without a C compiler, fp64 params anywhere (neither the C loops nor
               Triton take fp64 state), fp32 params on MPS/XPU: torch has no fused LARS.
  "reference": the spec, and fp16/bf16 params where no C loop or Triton runs (fp16 on the
               CPU; fp16/bf16 on MPS/XPU).
A NaN in a tensor's grad makes its whole update NaN through the trust ratio (Note:
[non-finite gradients]).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from . import _cpu_optim
from ._dispatch import run
from ._dtensor import NormSqReducer, norm_sq_reducer, whole_norms
from ._triton_util import (
    DEFAULT_CHUNK,
    HAS_TRITON,
    RESTORE_HOOKS,
    launch,
    per_tensor_sum,
    tensor_table,
    tl_dtype,
    tuning_configs,
)

_Impl = Callable[[Sequence[Any]], None]  # one path: a step on the tensor lists

__all__ = ["KERNELS", "lars", "lars_reference"]

#: The ``kernel=`` names LARS takes ("auto" chooses); paths in the module docstring.
KERNELS: tuple[str, ...] = ("auto", "triton", "foreach", "native", "reference")

if HAS_TRITON:
    import triton
    import triton.language as tl

    def _configs() -> list[triton.Config]:
        # Memory-bound: BLOCK x warps trade registers for occupancy.
        return tuning_configs([
            triton.Config({"BLOCK": 1024}, num_warps=4),
            triton.Config({"BLOCK": 2048}, num_warps=8),
            triton.Config({"BLOCK": 512}, num_warps=2),
        ])

    # key: only the param dtype changes the winner; each program covers at most CHUNK elements.
    @triton.autotune(configs=_configs(), key=["P_DTYPE"])
    @triton.jit
    def _lars_norms_kernel(
        addrs_ptr, numels_ptr, chunk_tensor_ptr, chunk_start_ptr, n_tensors, partial_ptr,
        CHUNK: tl.constexpr, P_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        c = tl.program_id(0)
        t = tl.load(chunk_tensor_ptr + c)
        start = tl.load(chunk_start_ptr + c)
        end = tl.minimum(start + CHUNK, tl.load(numels_ptr + t))
        # Table rows: 0 params, 1 grads.
        p_ptr = tl.load(addrs_ptr + t).to(tl.pointer_type(P_DTYPE))
        g_ptr = tl.load(addrs_ptr + n_tensors + t).to(tl.pointer_type(P_DTYPE))
        acc_p = tl.zeros((BLOCK,), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK,), dtype=tl.float32)
        for off in range(start, end, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            mask = idx < end
            p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            acc_p += p * p
            acc_g += g * g
        tl.store(partial_ptr + 2 * c, tl.sum(acc_p, axis=0))
        tl.store(partial_ptr + 2 * c + 1, tl.sum(acc_g, axis=0))

    @triton.autotune(configs=_configs(), key=["P_DTYPE", "HAS_MOMENTUM"], **RESTORE_HOOKS)
    @triton.jit
    def _lars_apply_kernel(
        addrs_ptr, numels_ptr, chunk_tensor_ptr, chunk_start_ptr, n_tensors,
        wd_ptr, trust_ptr, lr, momentum, dampening,
        CHUNK: tl.constexpr, P_DTYPE: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
        NESTEROV: tl.constexpr, FIRST: tl.constexpr, BLOCK: tl.constexpr,
    ):
        c = tl.program_id(0)
        t = tl.load(chunk_tensor_ptr + c)
        start = tl.load(chunk_start_ptr + c)
        end = tl.minimum(start + CHUNK, tl.load(numels_ptr + t))
        # Table rows: 0 params, 1 grads, 2 momentum buffers (when HAS_MOMENTUM).
        p_ptr = tl.load(addrs_ptr + t).to(tl.pointer_type(P_DTYPE))
        g_ptr = tl.load(addrs_ptr + n_tensors + t).to(tl.pointer_type(P_DTYPE))
        wd = tl.load(wd_ptr + t)
        trust = tl.load(trust_ptr + t)
        for off in range(start, end, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            mask = idx < end
            p = tl.load(p_ptr + idx, mask=mask).to(tl.float32)
            g = tl.load(g_ptr + idx, mask=mask).to(tl.float32)
            d = trust * (g + wd * p)
            if HAS_MOMENTUM:
                b_ptr = tl.load(addrs_ptr + 2 * n_tensors + t).to(tl.pointer_type(tl.float32))
                if FIRST:
                    buf = d
                else:
                    buf = momentum * tl.load(b_ptr + idx, mask=mask) + (1.0 - dampening) * d
                tl.store(b_ptr + idx, buf, mask=mask)
                # A constexpr branch (compiled away), not a runtime select.
                if NESTEROV:  # noqa: SIM108
                    d = d + momentum * buf
                else:
                    d = buf
            tl.store(p_ptr + idx, (p - lr * d).to(P_DTYPE), mask=mask)


def _trust_ratio(
    p_norm: torch.Tensor, g_norm: torch.Tensor, adapt: torch.Tensor, *, eta: float,
    weight_decay: float | torch.Tensor, eps: float,
) -> torch.Tensor:
    """eta * ||p|| / (||g|| + wd * ||p|| + eps) where adapted and neither norm is 0, else 1.

    A NaN norm gives a NaN ratio (Note: [non-finite gradients]): the test is ``== 0``.
    """
    one = ~adapt | (p_norm == 0) | (g_norm == 0)
    ratio = eta * p_norm / (g_norm + weight_decay * p_norm + eps)
    return torch.where(one, torch.ones_like(p_norm), ratio)


def lars_reference(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor], excluded: Sequence[bool], *, first_step: bool,
    lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
    eta: float, eps: float, reduce: NormSqReducer | None = None,
) -> None:
    """One LARS step on each tensor, in place (the spec; see the module docstring).

    ``momentum_buffers``: empty when ``momentum == 0``, else one buffer per param (fp32,
    or fp64 for fp64 params: the dtype the maths runs in).
    ``excluded[i]`` True: tensor i gets no trust ratio and no weight decay. ``reduce``:
    see ``kernels._dtensor`` (None: each tensor is whole).
    """
    if not params:
        return
    bufs: Sequence[torch.Tensor | None] = momentum_buffers or [None] * len(params)
    acc = torch.promote_types(params[0].dtype, torch.float32)
    norms = torch.stack([torch.stack([p.to(acc).norm(), g.to(acc).norm()])
                         for p, g in zip(params, grads, strict=True)])  # fmt: skip
    norms = whole_norms(norms, range(len(params)), reduce)
    for i, (p, g, buf, excl) in enumerate(zip(params, grads, bufs, excluded, strict=True)):
        p32, g32 = p.to(acc), g.to(acc)
        wd = 0.0 if excl else weight_decay
        trust = _trust_ratio(norms[i, 0], norms[i, 1], torch.tensor(not excl), eta=eta,
                             weight_decay=wd, eps=eps)
        d = (g32 + wd * p32) * trust
        if momentum != 0:
            assert buf is not None, "momentum > 0 needs one buffer per param"
            if first_step:
                buf.copy_(d)
            else:
                buf.mul_(momentum).add_(d, alpha=1.0 - dampening)
            d = d.add(buf, alpha=momentum) if nesterov else buf
        p32.add_(d, alpha=-lr)
        if p32 is not p:
            p.copy_(p32)


def _lars_triton(
    lists: Sequence[Sequence], *, first_step: bool, lr: float, momentum: float,
    dampening: float, weight_decay: float, nesterov: bool, eta: float, eps: float, chunk: int,
    reduce: NormSqReducer | None,
) -> None:
    params, grads, bufs, excluded = lists
    device, p_dtype = params[0].device, tl_dtype(params[0].dtype)
    adapt = torch.tensor([not ex for ex in excluded], device=device)
    wd = torch.where(adapt, weight_decay, 0.0).float()
    norm_table = tensor_table([params, grads], chunk=chunk)
    partial_sums = torch.empty(norm_table.n_chunks, 2, dtype=torch.float32, device=device)
    launch(_lars_norms_kernel, norm_table, partial_sums, written=(), P_DTYPE=p_dtype)
    sq = per_tensor_sum(norm_table, partial_sums)
    if reduce is not None:
        reduce(sq, range(len(params)))
    norms = sq.sqrt()
    trust = _trust_ratio(norms[:, 0], norms[:, 1], adapt, eta=eta, weight_decay=wd,
                         eps=eps).float()
    has_momentum = momentum != 0
    table = tensor_table([params, grads, bufs] if has_momentum else [params, grads], chunk=chunk)
    launch(_lars_apply_kernel, table, wd, trust, lr, momentum, dampening,
           written=(0, 2) if has_momentum else (0,), P_DTYPE=p_dtype,
           HAS_MOMENTUM=has_momentum, NESTEROV=nesterov, FIRST=first_step)


def _lars_foreach(
    lists: Sequence[Sequence], *, first_step: bool, lr: float, momentum: float,
    dampening: float, weight_decay: float, nesterov: bool, eta: float, eps: float,
    reduce: NormSqReducer | None,
) -> None:
    params, grads, bufs, excluded = (list(x) for x in lists)
    adapt = [not ex for ex in excluded]
    wd = [weight_decay if a else 0.0 for a in adapt]
    norms = torch.stack([torch.stack(torch._foreach_norm(params)),
                         torch.stack(torch._foreach_norm(grads))], dim=1)
    p_norm, g_norm = whole_norms(norms, range(len(params)), reduce).unbind(1)
    trust = _trust_ratio(p_norm, g_norm, torch.tensor(adapt, device=p_norm.device), eta=eta,
                         weight_decay=torch.tensor(wd, device=p_norm.device), eps=eps)
    d: tuple[torch.Tensor, ...] | list[torch.Tensor] = torch._foreach_add(
        grads, torch._foreach_mul(params, wd))
    torch._foreach_mul_(d, trust.tolist())
    if momentum != 0:
        if first_step:
            torch._foreach_copy_(bufs, d)
        else:
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, d, alpha=1.0 - dampening)
        d = torch._foreach_add(d, bufs, alpha=momentum) if nesterov else bufs
    torch._foreach_add_(params, d, alpha=-lr)


def _lars_native(
    lists: Sequence[Sequence], *, first_step: bool, lr: float, momentum: float,
    dampening: float, weight_decay: float, nesterov: bool, eta: float, eps: float,
    reduce: NormSqReducer | None,
) -> None:
    params, grads, bufs, excluded = lists
    sq = _cpu_optim.sq_norms(params, grads)
    if reduce is not None:
        reduce(sq, range(len(params)))
    norms = sq.sqrt()
    adapt = torch.tensor([not ex for ex in excluded])
    wd = [0.0 if ex else weight_decay for ex in excluded]
    trust = _trust_ratio(norms[:, 0], norms[:, 1], adapt, eta=eta,
                         weight_decay=torch.tensor(wd), eps=eps)
    _cpu_optim.sgd_apply(params, grads, bufs if momentum != 0 else None, wd=wd,
                         scale=trust.tolist(), lr=lr, momentum=momentum, dampening=dampening,
                         nesterov=nesterov, maximize=False, first_step=first_step)


def lars(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor], excluded: Sequence[bool], *, first_step: bool,
    lr: float, momentum: float = 0.9, dampening: float = 0.0, weight_decay: float = 0.0,
    nesterov: bool = False, eta: float = 1e-3, eps: float = 1e-8, kernel: str = "auto",
    chunk: int = DEFAULT_CHUNK,
) -> str:
    """One LARS step over all tensors (same device and dtype), in place; returns the kernel.

    ``kernel``: "auto", "triton" (fp32 buffers: not for fp64), "foreach" (fp32 and fp64,
    buffers in the param dtype), "native" (the CPU C loop of ``kernels._cpu_optim``: fp32
    or bf16 params, fp32 buffers) or "reference". DTensor params: see ``kernels._dtensor``.
    """
    if not params:
        return kernel

    def impls(reduce: NormSqReducer | None) -> dict[str, _Impl]:
        hyper: dict[str, Any] = dict(
            first_step=first_step, lr=lr, momentum=momentum, dampening=dampening,
            weight_decay=weight_decay, nesterov=nesterov, eta=eta, eps=eps,
            reduce=reduce)
        out: dict[str, _Impl] = {"reference": lambda ls: lars_reference(*ls, **hyper)}
        if HAS_TRITON and params[0].dtype != torch.float64:
            out["triton"] = partial(_lars_triton, chunk=chunk, **hyper)
        if params[0].dtype in (torch.float32, torch.float64):
            out["foreach"] = partial(_lars_foreach, **hyper)
        if _cpu_optim.takes(params, grads, [momentum_buffers] if momentum != 0 else []):
            out["native"] = partial(_lars_native, **hyper)
        return out

    reduce = norm_sq_reducer(params)
    return run("lars", kernel, impls(reduce), (params, grads, momentum_buffers, excluded),
               kernels=KERNELS, probe_impls=impls(None) if reduce else None)
