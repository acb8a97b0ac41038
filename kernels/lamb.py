"""Multi-tensor LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning").

Maths per tensor, in fp32, ``t`` its step after increment, ``wd_i`` = 0 for excluded
tensors (biases, norm weights) and ``weight_decay`` otherwise:

    m <- b1 * m + (1 - b1) * g
    v <- b2 * v + (1 - b2) * g^2
    u <- (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd_i * p     (no bias correction:
                                                                         divide by 1)
    r <- ||p|| / ||u||  if the tensor is adapted and both norms > 0, else 1   (trust ratio)
    p <- p - lr * r * u

Two launches (Note: [two-phase per-tensor norms]): phase 1 updates m, v and writes each
chunk's partial sums of p^2 and u^2; a torch op sums them per tensor and forms r; phase 2
recomputes u from the stored m, v and applies it. Recomputing u costs 4 bytes per element
less than saving it (12 vs 16 of extra traffic) and leaves the gradients untouched.

Every path computes all norms before any param moves, so sharded (DTensor) params can
sum their shards' norms in one collective per step (``kernels._dtensor``), the same
collectives whichever path a rank chose.

Paths (``kernel=``), and the machines that need them:
  "triton":    CUDA GPUs (fp32/bf16/fp16 params, fp32 state).
  "native":    CPUs with a C compiler (``kernels._cpu_optim``; fp32/bf16 params).
  "foreach":   CPUs without a C compiler, fp64 params anywhere (neither the C loops nor
               Triton take fp64 state), fp32 params on MPS/XPU: torch has no fused LAMB.
  "reference": the spec, and fp16/bf16 params where no C loop or Triton runs (fp16 on the
               CPU; fp16/bf16 on MPS/XPU).
A NaN in a tensor's grad makes its whole update NaN through the trust ratio (Note:
[non-finite gradients]).
"""

from __future__ import annotations

from collections import defaultdict
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

__all__ = ["KERNELS", "lamb", "lamb_reference"]

#: The ``kernel=`` names LAMB takes ("auto" chooses); paths in the module docstring.
KERNELS: tuple[str, ...] = ("auto", "triton", "foreach", "native", "reference")

if HAS_TRITON:
    import triton
    import triton.language as tl

    def _configs() -> list[triton.Config]:
        # Elementwise plus a per-program sum: BLOCK x warps trade registers for occupancy.
        return tuning_configs([
            triton.Config({"BLOCK": 1024}, num_warps=4),
            triton.Config({"BLOCK": 2048}, num_warps=8),
            triton.Config({"BLOCK": 512}, num_warps=2),
        ])

    # key: only the param dtype changes the winner; each program covers at most CHUNK elements.
    @triton.autotune(configs=_configs(), key=["P_DTYPE"], **RESTORE_HOOKS)
    @triton.jit
    def _lamb_phase1_kernel(
        addrs_ptr, numels_ptr, chunk_tensor_ptr, chunk_start_ptr, n_tensors,
        wd_ptr, partial_ptr, beta1, beta2, eps, bias_correction1, bias_correction2,
        CHUNK: tl.constexpr, P_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        c = tl.program_id(0)
        t = tl.load(chunk_tensor_ptr + c)
        start = tl.load(chunk_start_ptr + c)
        end = tl.minimum(start + CHUNK, tl.load(numels_ptr + t))
        # Table rows: 0 params, 1 grads, 2 exp_avg, 3 exp_avg_sq.
        p_ptr = tl.load(addrs_ptr + t).to(tl.pointer_type(P_DTYPE))
        g_ptr = tl.load(addrs_ptr + n_tensors + t).to(tl.pointer_type(P_DTYPE))
        m_ptr = tl.load(addrs_ptr + 2 * n_tensors + t).to(tl.pointer_type(tl.float32))
        v_ptr = tl.load(addrs_ptr + 3 * n_tensors + t).to(tl.pointer_type(tl.float32))
        wd = tl.load(wd_ptr + t)
        acc_p = tl.zeros((BLOCK,), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK,), dtype=tl.float32)
        for off in range(start, end, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            mask = idx < end
            p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            m = beta1 * tl.load(m_ptr + idx, mask=mask, other=0.0) + (1.0 - beta1) * g
            v = beta2 * tl.load(v_ptr + idx, mask=mask, other=0.0) + (1.0 - beta2) * g * g
            tl.store(m_ptr + idx, m, mask=mask)
            tl.store(v_ptr + idx, v, mask=mask)
            u = (m / bias_correction1) / (tl.sqrt(v / bias_correction2) + eps) + wd * p
            u = tl.where(mask, u, 0.0)  # masked lanes would add eps-sized garbage to ||u||
            acc_p += p * p
            acc_u += u * u
        tl.store(partial_ptr + 2 * c, tl.sum(acc_p, axis=0))
        tl.store(partial_ptr + 2 * c + 1, tl.sum(acc_u, axis=0))

    @triton.autotune(configs=_configs(), key=["P_DTYPE"], **RESTORE_HOOKS)
    @triton.jit
    def _lamb_phase2_kernel(
        addrs_ptr, numels_ptr, chunk_tensor_ptr, chunk_start_ptr, n_tensors,
        wd_ptr, scale_ptr, eps, bias_correction1, bias_correction2,
        CHUNK: tl.constexpr, P_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        c = tl.program_id(0)
        t = tl.load(chunk_tensor_ptr + c)
        start = tl.load(chunk_start_ptr + c)
        end = tl.minimum(start + CHUNK, tl.load(numels_ptr + t))
        # Table rows: 0 params, 1 exp_avg, 2 exp_avg_sq.
        p_ptr = tl.load(addrs_ptr + t).to(tl.pointer_type(P_DTYPE))
        m_ptr = tl.load(addrs_ptr + n_tensors + t).to(tl.pointer_type(tl.float32))
        v_ptr = tl.load(addrs_ptr + 2 * n_tensors + t).to(tl.pointer_type(tl.float32))
        wd = tl.load(wd_ptr + t)
        scale = tl.load(scale_ptr + t)  # lr * trust ratio
        for off in range(start, end, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            mask = idx < end
            p = tl.load(p_ptr + idx, mask=mask).to(tl.float32)
            m = tl.load(m_ptr + idx, mask=mask)
            v = tl.load(v_ptr + idx, mask=mask)
            u = (m / bias_correction1) / (tl.sqrt(v / bias_correction2) + eps) + wd * p
            tl.store(p_ptr + idx, (p - scale * u).to(P_DTYPE), mask=mask)


def _trust_ratio(p_norm: torch.Tensor, u_norm: torch.Tensor, adapt: torch.Tensor) -> torch.Tensor:
    """||p|| / ||u|| where adapted and neither norm is 0, else 1 (a zero-initialised or
    converged tensor must still move). A NaN norm gives a NaN ratio (Note: [non-finite
    gradients]): the test is ``== 0``, which NaN fails, not ``> 0``, which it would pass."""
    one = ~adapt | (p_norm == 0) | (u_norm == 0)
    return torch.where(one, torch.ones_like(p_norm), p_norm / torch.where(one, 1.0, u_norm))


def lamb_reference(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor], excluded: Sequence[bool], *, lr: float, beta1: float,
    beta2: float, eps: float, weight_decay: float, bias_correction: bool = True,
    reduce: NormSqReducer | None = None,
) -> None:
    """One LAMB step on each tensor, in place (the spec; see the module docstring).

    ``excluded[i]`` True: tensor i gets no trust ratio and no weight decay. State fp32
    (fp64 for fp64 params), the dtype the maths runs in. ``reduce``: see
    ``kernels._dtensor`` (None: each tensor is whole).
    """
    def update(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        p, m, v = params[i], exp_avgs[i], exp_avg_sqs[i]
        bc1, bc2 = _bias_corrections(float(steps[i].item()), beta1, beta2, bias_correction)
        u = (m / bc1) / ((v / bc2).sqrt() + eps)
        p32 = p.to(m.dtype)  # p itself when p is in the state dtype
        if not excluded[i] and weight_decay != 0:
            u.add_(p32, alpha=weight_decay)
        return p32, u

    # Phase 1: moments, then the norms of p and u; u is recomputed in phase 2 rather
    # than held for every tensor at once.
    norms = []
    for i, (g, m, v, step) in enumerate(zip(grads, exp_avgs, exp_avg_sqs, steps, strict=True)):
        step += 1
        g32 = g.to(m.dtype)
        m.lerp_(g32, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g32, g32, value=1.0 - beta2)
        p32, u = update(i)
        norms.append(torch.stack([p32.norm(), u.norm()]))
    if not norms:
        return
    norms_t = whole_norms(torch.stack(norms), range(len(norms)), reduce)
    for i, p in enumerate(params):
        p32, u = update(i)
        trust = _trust_ratio(norms_t[i, 0], norms_t[i, 1], torch.tensor(not excluded[i]))
        p32.sub_(lr * trust * u)
        if p32 is not p:
            p.copy_(p32)


def _bias_corrections(step: float, beta1: float, beta2: float, on: bool) -> tuple[float, float]:
    return (1.0 - beta1**step, 1.0 - beta2**step) if on else (1.0, 1.0)


def _lamb_triton(
    lists: Sequence[Sequence], *, lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float, bias_correction: bool, chunk: int, reduce: NormSqReducer | None,
) -> None:
    params, grads, exp_avgs, exp_avg_sqs, steps, excluded = lists
    groups: dict[float, list[int]] = defaultdict(list)
    for i, step in enumerate(steps):
        step += 1
        groups[float(step.item())].append(i)
    device, p_dtype = params[0].device, tl_dtype(params[0].dtype)
    # Phase 1 of every step-count group, then all norms at once, then every phase 2.
    phase1 = []
    for step_t, idx in groups.items():
        ps = [params[i] for i in idx]
        ms, vs = [exp_avgs[i] for i in idx], [exp_avg_sqs[i] for i in idx]
        bc1, bc2 = _bias_corrections(step_t, beta1, beta2, bias_correction)
        adapt = torch.tensor([not excluded[i] for i in idx], device=device)
        wd = torch.where(adapt, weight_decay, 0.0).float()
        table = tensor_table([ps, [grads[i] for i in idx], ms, vs], chunk=chunk)
        partial_sums = torch.empty(table.n_chunks, 2, dtype=torch.float32, device=device)
        launch(_lamb_phase1_kernel, table, wd, partial_sums, beta1, beta2, eps, bc1, bc2,
               written=(2, 3), P_DTYPE=p_dtype)
        phase1.append((idx, ps, ms, vs, bc1, bc2, adapt, wd, per_tensor_sum(table, partial_sums)))
    order = [i for ph in phase1 for i in ph[0]]
    sq = torch.cat([ph[-1] for ph in phase1])
    if reduce is not None:
        reduce(sq, order)
    norms_all = sq.sqrt().split([len(ph[0]) for ph in phase1])
    for (_, ps, ms, vs, bc1, bc2, adapt, wd, _), norms in zip(phase1, norms_all, strict=True):
        scale = (lr * _trust_ratio(norms[:, 0], norms[:, 1], adapt)).float()
        launch(_lamb_phase2_kernel, tensor_table([ps, ms, vs], chunk=chunk), wd, scale, eps,
               bc1, bc2, written=(0,), P_DTYPE=p_dtype)


def _lamb_foreach(
    lists: Sequence[Sequence], *, lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float, bias_correction: bool, reduce: NormSqReducer | None,
) -> None:
    params, grads, exp_avgs, exp_avg_sqs, steps, excluded = (list(x) for x in lists)
    torch._foreach_add_(steps, 1)
    bcs = [_bias_corrections(float(s.item()), beta1, beta2, bias_correction) for s in steps]
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    denom = torch._foreach_div(exp_avg_sqs, [b[1] for b in bcs])
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    u = torch._foreach_div(exp_avgs, [b[0] for b in bcs])
    torch._foreach_div_(u, denom)
    del denom
    wd = [0.0 if ex else weight_decay for ex in excluded]
    torch._foreach_add_(u, torch._foreach_mul(params, wd))
    norms = torch.stack([torch.stack(torch._foreach_norm(params)),
                         torch.stack(torch._foreach_norm(u))], dim=1)
    p_norm, u_norm = whole_norms(norms, range(len(params)), reduce).unbind(1)
    adapt = torch.tensor([not ex for ex in excluded], device=p_norm.device)
    scale = (-lr * _trust_ratio(p_norm, u_norm, adapt)).tolist()
    torch._foreach_mul_(u, scale)
    torch._foreach_add_(params, u)


def _lamb_native(
    lists: Sequence[Sequence], *, lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float, bias_correction: bool, reduce: NormSqReducer | None,
) -> None:
    params, grads, exp_avgs, exp_avg_sqs, steps, excluded = lists
    bcs = []
    for step in steps:
        step += 1
        bcs.append(_bias_corrections(float(step.item()), beta1, beta2, bias_correction))
    bc1, bc2 = [b[0] for b in bcs], [b[1] for b in bcs]
    wd = [0.0 if ex else weight_decay for ex in excluded]
    sq = _cpu_optim.lamb_phase1(params, grads, exp_avgs, exp_avg_sqs, beta1=beta1,
                                beta2=beta2, eps=eps, bc1=bc1, bc2=bc2, wd=wd)
    if reduce is not None:
        reduce(sq, range(len(params)))
    norms = sq.sqrt()
    adapt = torch.tensor([not ex for ex in excluded])
    scale = (lr * _trust_ratio(norms[:, 0], norms[:, 1], adapt)).tolist()
    _cpu_optim.lamb_phase2(params, exp_avgs, exp_avg_sqs, eps=eps, bc1=bc1, bc2=bc2, wd=wd,
                           scale=scale)


def lamb(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor], excluded: Sequence[bool], *, lr: float, beta1: float,
    beta2: float, eps: float, weight_decay: float, bias_correction: bool = True,
    kernel: str = "auto", chunk: int = DEFAULT_CHUNK,
) -> str:
    """One LAMB step over all tensors (same device and dtype), in place; returns the kernel.

    ``kernel``: "auto", "triton" (fp32 state: not for fp64), "foreach" (fp32 and fp64,
    state in the param dtype), "native" (the CPU C loops of ``kernels._cpu_optim``: fp32 or
    bf16 params, fp32 state) or "reference". DTensor params: see ``kernels._dtensor``.
    """
    if not params:
        return kernel

    def impls(reduce: NormSqReducer | None) -> dict[str, _Impl]:
        hyper: dict[str, Any] = dict(
            lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            bias_correction=bias_correction, reduce=reduce)
        out: dict[str, _Impl] = {"reference": lambda ls: lamb_reference(*ls, **hyper)}
        if HAS_TRITON and exp_avgs[0].dtype == torch.float32:
            out["triton"] = partial(_lamb_triton, chunk=chunk, **hyper)
        if (params[0].dtype in (torch.float32, torch.float64)
                and all(m.dtype == params[0].dtype for m in exp_avgs)):
            out["foreach"] = partial(_lamb_foreach, **hyper)
        if _cpu_optim.takes(params, grads, [exp_avgs, exp_avg_sqs]):
            out["native"] = partial(_lamb_native, **hyper)
        return out

    reduce = norm_sq_reducer(params)
    return run("lamb", kernel, impls(reduce), (params, grads, exp_avgs, exp_avg_sqs, steps,
               excluded), kernels=KERNELS, probe_impls=impls(None) if reduce else None)
