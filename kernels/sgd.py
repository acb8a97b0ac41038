"""Multi-tensor SGD with momentum, dampening, Nesterov and (L2) weight decay.

Maths (torch.optim.SGD), per element in fp32:

    d <- g (+ wd * p)                      # -g first when maximize
    if momentum:
        buf <- d                            on the first step
        buf <- momentum * buf + (1 - dampening) * d   afterwards
        d   <- d + momentum * buf  (Nesterov)  or  buf
    p <- p - lr * d

Momentum buffers are fp32 whatever the param dtype.

Paths (``kernel=``), and the machines that need them:
  "triton":      CUDA GPUs (fp32/bf16/fp16 params, fp32 buffers).
  "native":      CPUs with a C compiler (``kernels._cpu_optim``; fp32/bf16 params): bf16
                 params have no torch fused kernel with fp32 buffers.
  "torch_fused": CPUs without a C compiler, fp64 params on CUDA or CPU, fp32 params on
                 MPS/XPU (torch's fused SGD runs on the devices its fused AdamW does, with
                 buffers in the param dtype, so autoscale offers it for fp32/fp64 only).
                 Also what ``foreach=True`` asks for: foreach ops doing the same maths were
                 slower on every measurement (2-core VM, 4M params: fp32 0.9-1.1 vs
                 0.7-0.9 ms, fp64 3.5-3.8 vs 2.4-2.7 ms), so autoscale has no foreach SGD.
  "reference":   the spec, and fp16/bf16 params where no C loop or Triton runs (fp16 on the
                 CPU; fp16/bf16 on MPS/XPU).
Non-finite gradients propagate as in torch.optim (Note: [non-finite gradients]).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from . import _cpu_optim
from ._dispatch import run
from ._triton_util import (
    DEFAULT_CHUNK,
    HAS_TRITON,
    RESTORE_HOOKS,
    launch,
    tensor_table,
    tl_dtype,
    tuning_configs,
)

_Impl = Callable[[Sequence[Any]], None]  # one path: a step on the tensor lists

__all__ = ["KERNELS", "sgd", "sgd_reference"]

#: The ``kernel=`` names SGD takes ("auto" chooses); paths in the module docstring.
KERNELS: tuple[str, ...] = ("auto", "triton", "torch_fused", "native", "reference")

if HAS_TRITON:
    import triton
    import triton.language as tl

    def _configs() -> list[triton.Config]:
        # Elementwise and memory-bound: BLOCK x warps only trade registers for occupancy.
        return tuning_configs([
            triton.Config({"BLOCK": 1024}, num_warps=4),
            triton.Config({"BLOCK": 2048}, num_warps=8),
            triton.Config({"BLOCK": 4096}, num_warps=8),
        ])

    # key: the param dtype and whether there is a buffer stream change bytes per element;
    # tensor sizes do not matter (each program covers at most CHUNK elements).
    @triton.autotune(configs=_configs(), key=["P_DTYPE", "HAS_MOMENTUM"], **RESTORE_HOOKS)
    @triton.jit
    def _sgd_kernel(
        addrs_ptr, numels_ptr, chunk_tensor_ptr, chunk_start_ptr, n_tensors,
        lr, momentum, dampening, weight_decay,
        CHUNK: tl.constexpr, P_DTYPE: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
        NESTEROV: tl.constexpr, FIRST: tl.constexpr, MAXIMIZE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        c = tl.program_id(0)
        t = tl.load(chunk_tensor_ptr + c)
        start = tl.load(chunk_start_ptr + c)
        end = tl.minimum(start + CHUNK, tl.load(numels_ptr + t))
        # Table rows: 0 params, 1 grads, 2 momentum buffers (when HAS_MOMENTUM).
        p_ptr = tl.load(addrs_ptr + t).to(tl.pointer_type(P_DTYPE))
        g_ptr = tl.load(addrs_ptr + n_tensors + t).to(tl.pointer_type(P_DTYPE))
        for off in range(start, end, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            mask = idx < end
            p = tl.load(p_ptr + idx, mask=mask).to(tl.float32)
            d = tl.load(g_ptr + idx, mask=mask).to(tl.float32)
            if MAXIMIZE:
                d = -d
            d = d + weight_decay * p
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


def sgd_reference(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor], *, first_step: bool, lr: float, momentum: float,
    dampening: float, weight_decay: float, nesterov: bool, maximize: bool = False,
) -> None:
    """One SGD step on each tensor, in place (the spec; see the module docstring).

    ``momentum_buffers`` is empty when ``momentum == 0``; otherwise one buffer per param
    (fp32, or fp64 for fp64 params: the dtype the maths runs in), overwritten when
    ``first_step``. Same order of operations as
    torch.optim.SGD(foreach=False), so fp32 results match it.
    """
    bufs: Sequence[torch.Tensor | None] = momentum_buffers or [None] * len(params)
    for p, g, buf in zip(params, grads, bufs, strict=True):
        acc = torch.promote_types(p.dtype, torch.float32)
        p32 = p.to(acc)
        d = -g.to(acc) if maximize else g.to(acc)
        if weight_decay != 0:
            d = d.add(p32, alpha=weight_decay)
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


def _sgd_triton(
    lists: Sequence[Sequence[torch.Tensor]], *, first_step: bool, lr: float, momentum: float,
    dampening: float, weight_decay: float, nesterov: bool, maximize: bool, chunk: int,
) -> None:
    params, grads, bufs = lists
    has_momentum = momentum != 0
    table = tensor_table([params, grads, bufs] if has_momentum else [params, grads], chunk=chunk)
    launch(
        _sgd_kernel, table, lr, momentum, dampening, weight_decay,
        written=(0, 2) if has_momentum else (0,), P_DTYPE=tl_dtype(params[0].dtype),
        HAS_MOMENTUM=has_momentum, NESTEROV=nesterov, FIRST=first_step, MAXIMIZE=maximize,
    )


def _sgd_fused(
    lists: Sequence[Sequence[torch.Tensor]], *, first_step: bool, lr: float, momentum: float,
    dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
) -> None:
    params, grads, bufs = (list(ts) for ts in lists)
    torch._fused_sgd_(
        params, grads, bufs if momentum != 0 else [], weight_decay=weight_decay,
        momentum=momentum, lr=lr, dampening=dampening, nesterov=nesterov, maximize=maximize,
        is_first_step=first_step,
    )


def _sgd_native(
    lists: Sequence[Sequence[torch.Tensor]], *, first_step: bool, lr: float, momentum: float,
    dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
) -> None:
    params, grads, bufs = lists
    n = len(params)
    _cpu_optim.sgd_apply(params, grads, bufs if momentum != 0 else None, wd=[weight_decay] * n,
                         scale=[1.0] * n, lr=lr, momentum=momentum, dampening=dampening,
                         nesterov=nesterov, maximize=maximize, first_step=first_step)


def sgd(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor], *, first_step: bool, lr: float, momentum: float = 0.0,
    dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
    maximize: bool = False, kernel: str = "auto", chunk: int = DEFAULT_CHUNK,
) -> str:
    """One SGD step over all tensors (same device and dtype), in place; returns the kernel.

    ``kernel``: one of :data:`KERNELS`, as in :func:`autoscale.kernels.adamw.adamw`. torch's
    fused kernel needs buffers in the param dtype, so it is offered for fp32 and fp64 only;
    Triton's buffers are fp32, so it is not offered for fp64; "native" (the CPU C loop of
    ``kernels._cpu_optim``) takes fp32 or bf16 params with fp32 buffers.
    """
    if not params:
        return kernel
    hyper: dict[str, Any] = dict(
        first_step=first_step, lr=lr, momentum=momentum, dampening=dampening,
        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
    lists = (params, grads, momentum_buffers)
    impls: dict[str, _Impl] = {"reference": lambda ls: sgd_reference(*ls, **hyper)}
    if HAS_TRITON and params[0].dtype != torch.float64:
        impls["triton"] = partial(_sgd_triton, chunk=chunk, **hyper)
    if params[0].dtype in (torch.float32, torch.float64) and hasattr(torch, "_fused_sgd_"):
        impls["torch_fused"] = partial(_sgd_fused, **hyper)
    if _cpu_optim.takes(params, grads, [momentum_buffers] if momentum != 0 else []):
        impls["native"] = partial(_sgd_native, **hyper)
    return run("sgd", kernel, impls, lists, kernels=KERNELS)
