"""Multi-tensor AdamW: one Triton launch for a whole parameter list.

Maths (Loshchilov & Hutter, decoupled weight decay; torch.optim.AdamW with amsgrad=False),
per element, in fp32, with ``t`` the tensor's step after increment:

    p <- p * (1 - lr * wd)
    m <- b1 * m + (1 - b1) * g
    v <- b2 * v + (1 - b2) * g^2
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

Params and grads are fp32, bf16 or fp16; ``m`` and ``v`` are always fp32 (bf16 state loses
small updates to rounding).

Paths (``kernel=``), and the machines that need them:
  "triton":      CUDA GPUs (fp32/bf16/fp16 params, fp32 state).
  "native":      CPUs with a C compiler (``kernels._cpu_optim.adamw32_step``; fp32/bf16 params,
                 fp32 state). torch's fused kernel needs state in the param dtype, so bf16
                 params had only the reference's chain of ops: ~10x slower (163 vs 15 ms
                 over 38M bf16 params on the 2-core VM).
  "torch_fused": CPUs without a C compiler, fp64 params on CUDA or CPU, fp32 params on
                 MPS/XPU (torch's fused AdamW runs on cpu, cuda, mps, xpu, hpu for
                 fp64/fp32/fp16/bf16, but with state in the param dtype, so autoscale
                 offers it for fp32/fp64 only). Also what ``foreach=True`` asks for: torch's
                 foreach AdamW takes the same dtypes and devices and was slower on every
                 measurement (2-core VM, 4M params: fp32 5-6 vs 2 ms, fp64 13 vs 4 ms), so
                 no machine needs it and autoscale has no foreach AdamW.
  "reference":   the spec, and fp16/bf16 params where no C loop or Triton runs (fp16 on the
                 CPU; fp16/bf16 on MPS/XPU).
Non-finite gradients propagate as in torch.optim (Note: [non-finite gradients]).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch.optim.adam import adam as _torch_adam

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

__all__ = ["KERNELS", "adamw", "adamw_reference"]

#: The ``kernel=`` names AdamW takes ("auto" chooses); paths in the module docstring.
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
            triton.Config({"BLOCK": 512}, num_warps=2),
        ])

    # key: only the param dtype changes the winner (bf16 halves the p/g bytes); sizes do not,
    # because every program handles at most CHUNK elements whatever the tensor sizes.
    @triton.autotune(configs=_configs(), key=["P_DTYPE"], **RESTORE_HOOKS)
    @triton.jit
    def _adamw_kernel(
        addrs_ptr, numels_ptr, chunk_tensor_ptr, chunk_start_ptr, n_tensors,
        lr, beta1, beta2, eps, weight_decay, step_size, bias_correction2_sqrt,
        CHUNK: tl.constexpr, P_DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        c = tl.program_id(0)
        t = tl.load(chunk_tensor_ptr + c)
        start = tl.load(chunk_start_ptr + c)
        end = tl.minimum(start + CHUNK, tl.load(numels_ptr + t))
        # Table rows: 0 params, 1 grads, 2 exp_avg, 3 exp_avg_sq (see _triton_util).
        p_ptr = tl.load(addrs_ptr + t).to(tl.pointer_type(P_DTYPE))
        g_ptr = tl.load(addrs_ptr + n_tensors + t).to(tl.pointer_type(P_DTYPE))
        m_ptr = tl.load(addrs_ptr + 2 * n_tensors + t).to(tl.pointer_type(tl.float32))
        v_ptr = tl.load(addrs_ptr + 3 * n_tensors + t).to(tl.pointer_type(tl.float32))
        decay = 1.0 - lr * weight_decay
        for off in range(start, end, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            mask = idx < end
            p = tl.load(p_ptr + idx, mask=mask).to(tl.float32)
            g = tl.load(g_ptr + idx, mask=mask).to(tl.float32)
            if MAXIMIZE:
                g = -g
            m = tl.load(m_ptr + idx, mask=mask)
            v = tl.load(v_ptr + idx, mask=mask)
            m = beta1 * m + (1.0 - beta1) * g
            v = beta2 * v + (1.0 - beta2) * g * g
            denom = tl.sqrt(v) / bias_correction2_sqrt + eps
            p = p * decay - step_size * (m / denom)
            tl.store(m_ptr + idx, m, mask=mask)
            tl.store(v_ptr + idx, v, mask=mask)
            tl.store(p_ptr + idx, p.to(P_DTYPE), mask=mask)


def _adamw_triton(
    lists: Sequence[Sequence[torch.Tensor]], *, lr: float, beta1: float, beta2: float,
    eps: float, weight_decay: float, maximize: bool, chunk: int,
) -> None:
    params, grads, exp_avgs, exp_avg_sqs, steps = lists
    # Bias correction depends on each tensor's step; tensors usually share it, so group by
    # step value and launch once per group (one launch in the common case).
    groups: dict[float, list[int]] = defaultdict(list)
    for i, step in enumerate(steps):
        step += 1
        groups[float(step.item())].append(i)
    for step_t, idx in groups.items():
        table = tensor_table(
            [[params[i] for i in idx], [grads[i] for i in idx],
             [exp_avgs[i] for i in idx], [exp_avg_sqs[i] for i in idx]],
            chunk=chunk,
        )
        bias_correction1 = 1.0 - beta1**step_t
        bias_correction2 = 1.0 - beta2**step_t
        launch(
            _adamw_kernel, table, lr, beta1, beta2, eps, weight_decay,
            lr / bias_correction1, math.sqrt(bias_correction2),
            written=(0, 2, 3), P_DTYPE=tl_dtype(params[idx[0]].dtype), MAXIMIZE=maximize,
        )


def adamw_reference(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float, maximize: bool = False,
) -> None:
    """One AdamW step on each tensor, in place (the spec; see the module docstring).

    ``steps`` are scalar tensors (torch.optim's ``state["step"]``), incremented here. The
    maths is computed in the state dtype (fp32, or fp64 for fp64 params) and written back
    in the param dtype.
    Same operation order as torch.optim.AdamW(foreach=False), so fp32 results match it.
    """
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        step += 1
        t = float(step.item())
        p32 = p.to(m.dtype)  # p itself when p is in the state dtype
        g32 = -g.to(m.dtype) if maximize else g.to(m.dtype)
        p32.mul_(1.0 - lr * weight_decay)
        m.lerp_(g32, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g32, g32, value=1.0 - beta2)
        bias_correction1 = 1.0 - beta1**t
        bias_correction2_sqrt = math.sqrt(1.0 - beta2**t)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        p32.addcdiv_(m, denom, value=-lr / bias_correction1)
        if p32 is not p:
            p.copy_(p32)


def _adamw_torch_fused(
    lists: Sequence[Sequence[torch.Tensor]], *, lr: float, beta1: float, beta2: float,
    eps: float, weight_decay: float, maximize: bool,
) -> None:
    params, grads, exp_avgs, exp_avg_sqs, steps = lists
    _torch_adam(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), [], list(steps),
        foreach=False, fused=True, decoupled_weight_decay=True, amsgrad=False,
        beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, maximize=maximize,
    )


def _adamw_native(
    lists: Sequence[Sequence[torch.Tensor]], *, lr: float, beta1: float, beta2: float,
    eps: float, weight_decay: float, maximize: bool,
) -> None:
    params, grads, exp_avgs, exp_avg_sqs, steps = lists
    counts = []
    for step in steps:
        step += 1
        counts.append(int(step.item()))
    _cpu_optim.adamw32_step(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs),
                            counts, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                            weight_decay=weight_decay)  # fmt: skip


def _native_takes(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                  exp_avgs: Sequence[torch.Tensor], maximize: bool) -> bool:  # fmt: skip
    dtype = params[0].dtype
    return (not maximize and params[0].device.type == "cpu"
            and dtype in (torch.float32, torch.bfloat16)
            and all(g.dtype == dtype for g in grads)
            and all(m.dtype == torch.float32 for m in exp_avgs)
            and _cpu_optim.available())  # fmt: skip


def adamw(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float, maximize: bool = False, kernel: str = "auto",
    chunk: int = DEFAULT_CHUNK,
) -> str:
    """One AdamW step over all tensors (same device and dtype), in place; returns the kernel.

    ``kernel``: one of :data:`KERNELS`: "auto" (Triton on CUDA, else the fastest path by
    measurement), "triton", "torch_fused", "native" or "reference". torch's fused kernel
    needs state in the param dtype, so it is offered for fp32 and fp64 params only;
    Triton's state is fp32, so it is offered for fp32/bf16/fp16 params only; "native" (the
    C loop) for CPU fp32/bf16 params with fp32 state, without maximize.

    Raises KernelUnavailable if the forced kernel cannot run on these tensors.
    """
    lists = (params, grads, exp_avgs, exp_avg_sqs, steps)
    if not params:
        return kernel
    hyper: dict[str, Any] = dict(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        maximize=maximize)
    impls: dict[str, _Impl] = {"reference": lambda ls: adamw_reference(*ls, **hyper)}
    if HAS_TRITON and exp_avgs[0].dtype == torch.float32:  # the kernel's state is fp32
        impls["triton"] = partial(_adamw_triton, chunk=chunk, **hyper)
    if (params[0].dtype in (torch.float32, torch.float64)
            and all(m.dtype == params[0].dtype for m in exp_avgs)):
        impls["torch_fused"] = partial(_adamw_torch_fused, **hyper)
    if _native_takes(params, grads, exp_avgs, maximize):
        impls["native"] = partial(_adamw_native, **hyper)
    return run("adamw", kernel, impls, lists, kernels=KERNELS)
