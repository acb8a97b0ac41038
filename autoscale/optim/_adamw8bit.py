"""AdamW with 8-bit block-wise quantized moments (Dettmers et al., arXiv 2110.02861).

A drop-in for ``torch.optim.AdamW``: same constructor arguments and defaults, same
update maths, but each moment of a parameter with at least ``min_8bit_size`` elements
is stored as one byte per element plus one fp32 scale per ``block_size`` elements
(see ``autoscale.kernels.adamw8bit`` for the maps). Smaller tensors (biases, norms)
keep fp32 moments, as bitsandbytes does: they are a small share of the parameters and
the most sensitive to quantization noise.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from autoscale.kernels import _cpu_adamw8bit, _cpu_optim, _dispatch
from autoscale.kernels._adamw8bit_layout import hyper as _hyper
from autoscale.kernels._dtensor import is_dtensor, local
from autoscale.kernels._native import BoundState
from autoscale.kernels.adamw import adamw
from autoscale.kernels.adamw8bit import KERNELS, Kernel, adamw8bit_multi, state_numel

from ._adamw8bit_state import internal_state, portable_state
from ._base import FusedOptimizer, adam_state, host_step

__all__ = ["AdamW8bit"]


class AdamW8bit(FusedOptimizer):
    """AdamW whose moments are stored in 8 bits, ~2.03 bytes of state per parameter.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay,
            bias-corrected moments).
        block_size: elements per quantization block (one fp32 scale each); a power of
            two so the same state works with the Triton kernel. 256 costs 8/256 =
            0.03 bytes/param of scales and tracks fp32 AdamW more closely than 2048.
        min_8bit_size: parameters with fewer elements keep fp32 moments.
        kernel: kernel path ("auto", "triton", "native", "compiled", "reference"), see
            ``autoscale.kernels.adamw8bit.adamw8bit_multi``; "auto" picks by measurement.
        state_dict_moments: how :meth:`state_dict` hands out 8-bit moments. "codes": as
            kept (exact, ~2 bytes/param, loads only where the shard has the same size);
            "fp32": dequantized, as torch's AdamW ``exp_avg`` / ``exp_avg_sq`` (DTensors
            sharded like the param under FSDP2), which torch.distributed.checkpoint
            re-shards to any world size; "auto": fp32 for DTensor params, codes for the
            rest. See Note: [8-bit state in distributed checkpoints].

    State per parameter (all in ``self.state``, so ``state_dict`` round-trips exactly):
    ``step`` (fp32 scalar tensor, as torch's AdamW) and either ``exp_avg_q`` (int8),
    ``exp_avg_scale`` (fp32, one per block), ``exp_avg_sq_q`` (uint8),
    ``exp_avg_sq_scale`` (fp32), or fp32 ``exp_avg`` / ``exp_avg_sq`` for small tensors.
    Params may be fp32 or bf16; the update maths is fp32 either way. ``load_state_dict``
    takes either form of the moments, and DTensors.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        block_size: int = 256,
        min_8bit_size: int = 4096,
        kernel: Kernel = "auto",
        state_dict_moments: Literal["auto", "codes", "fp32"] = "auto",
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}; use lr >= 0.")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}; use eps >= 0.")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}; use [0, 1).")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}; use >= 0.")
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(
                f"block_size must be a power of two >= 16, got {block_size}; 256 is the default."
            )
        if min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be >= 0, got {min_8bit_size}.")
        if state_dict_moments not in ("auto", "codes", "fp32"):
            raise ValueError(f"state_dict_moments must be 'auto', 'codes' or 'fp32', got "
                             f"{state_dict_moments!r}.")
        self.state_dict_moments = state_dict_moments
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            block_size=block_size, min_8bit_size=min_8bit_size,
        )  # fmt: skip
        #: (id(group), device, dtype) -> (step-counter views, their buffer, group); see
        #: _advance_steps. Derived from the state, so never saved (torch pickles only
        #: defaults, state and param_groups).
        self._step_packs: dict[tuple[Any, ...], tuple[list[torch.Tensor], torch.Tensor, Any]] = {}
        #: (bucket key, i, block_size) or (bucket key, "small") -> the state bound to the C
        #: kernel; see _step_bucket.
        self._bound: dict[tuple[Any, ...], BoundState] = {}
        #: The steady CPU step, once every bucket is bound; see _steady_step.
        self._steady: list[_SteadyGroup] | None = None
        super().__init__(params, defaults, kernel=kernel)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "state_dict_moments": self.state_dict_moments}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # load_state_dict calls this without the key: the live choice then stays.
        if not hasattr(self, "state_dict_moments"):
            self.state_dict_moments = "auto"
        if not hasattr(self, "_step_packs"):  # unpickled; load_state_dict keeps the caches
            self._step_packs, self._bound = {}, {}
        self._steady = None

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state_dict, with 8-bit moments as ``state_dict_moments`` says.

        Invariant: ``load_state_dict`` of it gives back the same state (codes and scales)
        wherever the param's shard has the size it had; where it has another (fp32 form,
        another world size) each element is re-rounded once into its new block.
        """
        sd = super().state_dict()
        if self.state_dict_moments == "codes":
            return sd
        state = dict(sd["state"])
        for group, packed in zip(self.param_groups, sd["param_groups"], strict=True):
            for p, pid in zip(group["params"], packed["params"], strict=True):
                if pid in state and (self.state_dict_moments == "fp32" or is_dtensor(p)):
                    state[pid] = portable_state(state[pid], p, group["block_size"])
        return {**sd, "state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` (of any ``state_dict_moments``, at any world size
        when fp32) or torch.optim.AdamW gave: fp32 moments of 8-bit-sized params are
        quantized into this shard's blocks, DTensors become their local shards.
        ``state_dict`` itself is not changed."""
        state = dict(state_dict["state"])
        for group, saved in zip(self.param_groups, state_dict["param_groups"], strict=True):
            block = saved.get("block_size", group["block_size"])
            smallest = saved.get("min_8bit_size", group["min_8bit_size"])
            for p, pid in zip(group["params"], saved["params"], strict=True):
                if pid in state:
                    state[pid] = internal_state(state[pid], p, block=block,
                                                min_8bit_size=smallest)
        super().load_state_dict({**state_dict, "state": state})

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One AdamW step over every param with a gradient; returns ``closure()``'s loss.

        On the CPU, once every bucket's state is bound to the C kernel, a step whose
        params, grads and state are the very objects of the last one takes a short path
        (:meth:`_steady_step`) with the same maths; anything else takes the general one.
        """
        if closure is None and self._steady is not None and self._steady_step(self._steady):
            return None
        loss = super().step(closure)
        self._steady = self._plan_steady()
        return loss

    kernels = KERNELS

    def _state_dtype(self, p: torch.Tensor) -> torch.dtype:
        # Its update maths is fp32 on every path (the C and Triton kernels included), so
        # fp64 params get fp32 moments here too: 8-bit state is lossy by design anyway.
        return torch.float32

    def _init_state(self, group: dict[str, Any], p: torch.Tensor) -> None:
        state = self.state[p]
        # A DTensor param (FSDP2) gets plain rank-local state for its local shard: the
        # update is elementwise and the codes' blocks are per shard anyway. The 8-bit-or-not
        # choice uses the whole size, so every rank makes the same one.
        if p.numel() < group["min_8bit_size"]:
            state.update(adam_state(local(p), torch.float32))
            return
        state["step"] = host_step()
        block = group["block_size"]
        n = state_numel(local(p).numel(), block)
        state["exp_avg_q"] = torch.zeros(n, dtype=torch.int8, device=p.device)
        f32: dict[str, Any] = dict(dtype=torch.float32, device=p.device)
        state["exp_avg_scale"] = torch.zeros(n // block, **f32)
        state["exp_avg_sq_q"] = torch.zeros(n, dtype=torch.uint8, device=p.device)
        state["exp_avg_sq_scale"] = torch.zeros(n // block, **f32)

    def _advance_steps(self, key: tuple[Any, ...], group: dict[str, Any],
                       states: list[dict[str, Any]]) -> list[int]:  # fmt: skip
        """Add 1 to each state's ``step`` counter; return the new counts, in order.

        The counters stay what torch.optim.AdamW keeps (one fp32 scalar tensor per param,
        advanced in place), but are 0-dim views of one buffer per bucket, so the add and
        the read-back are one op each: per-param counters cost ~0.3 ms a step over 136
        params (a foreach add plus a stack), 2-3 % of a 50M-parameter 8-bit step. Counters
        that are not exactly the cached views (first step, a new param, load_state_dict, a
        user's assignment) are repacked from their current values first, so the counts are
        always the counters' own.
        """
        counters = [st["step"] for st in states]
        cached = self._step_packs.get(key)
        if (cached is None or len(cached[0]) != len(counters)
                or any(a is not b for a, b in zip(cached[0], counters, strict=True))):  # fmt: skip
            buf = torch.stack([c.detach().to("cpu", torch.float32).reshape(()) for c in counters])
            views = list(buf.unbind())
            for st, view in zip(states, views, strict=True):
                st["step"] = view
            # Holding the group keeps id(group) from being reused by a later dict.
            cached = self._step_packs[key] = (views, buf, group)
        cached[1].add_(1.0)
        return [int(s) for s in cached[1].tolist()]

    def _step_bucket(self, group: dict[str, Any], params: list[torch.Tensor], kernel: str) -> str:
        small: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any], int]] = []
        # 8-bit tensors by step count (one bucket unless params joined late): each bucket is
        # one multi-tensor kernel call.
        buckets: dict[int, list[tuple[torch.Tensor, dict[str, Any]]]] = {}
        lr, (beta1, beta2) = group["lr"], group["betas"]
        eps, wd, block = group["eps"], group["weight_decay"], group["block_size"]
        device, dtype = params[0].device, params[0].dtype
        key = (id(group), device, dtype)
        states = [self.state[p] for p in params]
        for p, state, step in zip(params, states, self._advance_steps(key, group, states),
                                  strict=True):  # fmt: skip
            if "exp_avg_q" not in state:
                small.append((local(p), local(p.grad), state, step))
            else:
                buckets.setdefault(step, []).append((p, state))
        # Once a bucket has run on the C kernel, its state stays bound to it (see
        # BoundState): later steps marshal only params and grads, while
        # the dispatcher still picks the C kernel and the state tensors are the same.
        chosen = _dispatch.cached_choice("adamw8bit", device, dtype) if kernel == "auto" else kernel
        native = device.type == "cpu" and chosen == "native"
        name = kernel
        for i, (step, items) in enumerate(buckets.items()):
            ps = [local(p) for p, _ in items]
            grads = [local(p.grad) for p, _ in items]
            state = _gather([st for _, st in items], _KEYS_8BIT)
            # block in the key: a group whose block_size changed must not reuse a binding
            bound = self._bound.get((key, i, block)) if native else None
            if bound is not None and bound.same(*state) and _cpu_adamw8bit.step_bound(
                bound, ps, grads, _hyper(lr, beta1, beta2, eps, wd, step), block
            ):
                name = "native"
                continue
            name = adamw8bit_multi(
                ps, grads, *state, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd,
                step=step, block_size=block, kernel=kernel,
            )  # fmt: skip
            if name == "native":  # adamw8bit_multi checked the layout
                self._bound[(key, i, block)] = BoundState(
                    [p.numel() for p in ps], *state)
        if small:
            self._step_small(key, small, kernel, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                             weight_decay=wd)
        return name

    def _plan_steady(self) -> list[_SteadyGroup] | None:
        """The steady step's plan after a general step, or None if it does not apply.

        It applies when, in every group, every param has a grad and all are CPU tensors
        of one dtype, and every 8-bit bucket (params of one step count) and the small
        tensors are bound to the C kernel.
        """
        plan = []
        for group in self.param_groups:
            params = group["params"]
            if not params or any(p.grad is None or is_dtensor(p) for p in params):
                return None
            device, dtype = params[0].device, params[0].dtype
            if (device.type != "cpu" or self.kernel_choices.get(f"cpu/{dtype}") != "native"
                    or any(p.dtype != dtype for p in params)):  # fmt: skip
                return None
            key = (id(group), device, dtype)
            states = [self.state[p] for p in params]
            pack = self._step_packs.get(key)
            if pack is None or not all(map(operator.is_, (st["step"] for st in states), pack[0])):
                return None
            # 8-bit buckets as _step_bucket forms them: by step count, in order of first use
            by_step: dict[int, list[int]] = {}
            for i, st in enumerate(states):
                if "exp_avg_q" in st:
                    by_step.setdefault(int(pack[0][i]), []).append(i)
            small = tuple(i for i, st in enumerate(states) if "exp_avg_q" not in st)
            buckets = []
            for b, idx in enumerate(by_step.values()):
                bound_key = (key, b, group["block_size"])
                bound = self._bound.get(bound_key)
                if bound is None or not bound.same(*_gather([states[i] for i in idx], _KEYS_8BIT)):
                    return None
                buckets.append((tuple(idx), bound_key, bound))
            small_key = (key, "small")
            bound_small = self._bound.get(small_key)
            if small and (
                bound_small is None
                or not bound_small.same(*_gather([states[i] for i in small], _KEYS_FP32))
            ):
                return None
            plan.append(_SteadyGroup(group, params, len(params), dtype, group["block_size"],
                                     tuple(buckets), small, pack[0], pack[1], small_key,
                                     bound_small))  # fmt: skip
        return plan

    def _steady_step(self, plan: list[_SteadyGroup]) -> bool:
        """The step of :meth:`_step_bucket`'s bound C path, for every group, with only
        the checks a step needs: the same groups, params, state dicts and state tensors
        (identity), step counters, bindings and kernel choice as when the plan was made,
        and grads and params that fit the kernel. Either every check passes and every
        group steps, or nothing changes and it returns False (the general path then runs).

        Why: the Python around the kernel runs with cold caches (the kernel, or backward,
        has just streamed hundreds of MB), so each object touched costs a DRAM miss. On
        a 50M-param, 136-tensor model (2-vCPU Zen 4 VM) a step took 0.30-0.34 ms less
        than on the general path (median of paired differences, both interleaved with
        torch's fused AdamW in one process: 0.703 -> 0.683 of its time in the fast
        memory state).
        """
        groups, state = self.param_groups, self.state
        if len(groups) != len(plan):
            return False
        runs = []
        try:
            for group, sg in zip(groups, plan, strict=True):
                params = sg.params
                if (group is not sg.group or group["params"] is not params
                        or len(params) != sg.n or group["block_size"] != sg.block
                        or self._bound.get(sg.small_key) is not sg.bound_small):  # fmt: skip
                    return False
                kernel = self._kernel_for(group, params[0].device, sg.dtype)
                if kernel == "auto":
                    kernel = _dispatch.cached_choice("adamw8bit", params[0].device, sg.dtype)
                if kernel != "native":
                    return False
                states = [state[p] for p in params]
                if not all(map(operator.is_, map(_STEP, states), sg.counters)):
                    return False
                grads = [p.grad for p in params]
                if not all(map(operator.is_not, grads, itertools.repeat(None))):
                    return False
                parts: list[tuple[tuple[int, ...], BoundState | None, tuple[str, ...]]] = [
                    (idx, bound, _KEYS_8BIT) for idx, bound_key, bound in sg.buckets
                    if self._bound.get(bound_key) is bound
                ]  # fmt: skip
                if len(parts) != len(sg.buckets):
                    return False
                if sg.small:
                    parts.append((sg.small, sg.bound_small, _KEYS_FP32))
                arrays = []
                for idx, bound, keys in parts:
                    a = None
                    if bound is not None and bound.same(*_gather([states[i] for i in idx], keys)):
                        a = bound.params([params[i] for i in idx], [grads[i] for i in idx])
                    if a is None:
                        return False
                    arrays.append(a)
                runs.append((group, sg, arrays))
        except (KeyError, RuntimeError):  # a state entry gone, a sparse grad: general path
            return False
        for group, sg, arrays in runs:
            lr, (beta1, beta2) = group["lr"], group["betas"]
            eps, wd = group["eps"], group["weight_decay"]
            sg.buffer.add_(1.0)
            steps = [int(s) for s in sg.buffer.tolist()]
            for (idx, _, bound), a in zip(sg.buckets, arrays[: len(sg.buckets)], strict=True):
                hyper = _hyper(lr, beta1, beta2, eps, wd, steps[idx[0]])
                _cpu_adamw8bit.run_bound(bound, a, hyper, sg.block)
            if sg.small:
                _cpu_optim.run_adamw32_bound(
                    sg.bound_small, arrays[-1], [steps[i] for i in sg.small], lr=lr,
                    beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd)  # fmt: skip
        return True

    def _step_small(self, key: tuple[Any, ...],
                    small: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any], int]],
                    kernel: str, **hyper: float) -> None:  # fmt: skip
        """The fp32-moment tensors: bound to the C kernel once they have run on it."""
        moments = _gather([s for _, _, s, _ in small], _KEYS_FP32)
        bound = self._bound.get((key, "small"))
        if bound is not None and bound.same(*moments):
            ps, grads = [it[0] for it in small], [it[1] for it in small]
            if _cpu_optim.adamw32_bound(bound, ps, grads, [it[3] for it in small], **hyper):
                return
        if _adamw_fp32(small, kernel, **hyper):  # all in one C call, moments checked: bind them
            self._bound[(key, "small")] = BoundState(
                [it[0].numel() for it in small], *moments)


_KEYS_8BIT = ("exp_avg_q", "exp_avg_scale", "exp_avg_sq_q", "exp_avg_sq_scale")
_KEYS_FP32 = ("exp_avg", "exp_avg_sq")
_STEP = operator.itemgetter("step")


def _gather(states: list[dict[str, Any]], keys: tuple[str, ...]) -> list[list[torch.Tensor]]:
    """For each key, the list of ``state[key]`` over ``states``, in order."""
    return [list(map(operator.itemgetter(k), states)) for k in keys]


@dataclass(frozen=True)
class _SteadyGroup:
    """One param group's part of the steady-step plan (see AdamW8bit._steady_step): what
    the last general step used, held so a later step can check it is still all the same."""

    group: dict[str, Any]
    params: list[torch.Tensor]  # the group's own "params" list object
    n: int
    dtype: torch.dtype
    block: int
    #: the 8-bit buckets: (param indices, in group order; _bound key; its binding)
    buckets: tuple[tuple[tuple[int, ...], tuple[Any, ...], BoundState], ...]
    small: tuple[int, ...]  # indices of the fp32-moment params
    counters: list[torch.Tensor]  # the step-counter views (see _advance_steps)
    buffer: torch.Tensor  # their buffer
    small_key: tuple[Any, ...]
    bound_small: BoundState | None


def _adamw_fp32(
    items: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any], int]],
    kernel: str,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> bool:
    """torch.optim.AdamW's maths for the small tensors with fp32 moments; True if all of
    them went through one call of the C loop (``_cpu_optim.adamw32_step``).

    On the CPU, when the C library builds, one call of ``adamw32_step`` takes them all (fp32
    or bf16 params): torch's fused kernel opens one OpenMP region per tensor, ~0.4-0.6 ms
    for the ~100 biases and norms of a transformer right after the 8-bit kernel. The rest
    go through ``kernels.adamw.adamw``, the dispatcher of fp32-state AdamW ("auto", or
    this optimizer's "triton"/"reference" when forced).
    """
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    calls = 0
    if _cpu_optim.available():
        for dtype in (torch.float32, torch.bfloat16):
            part = [it for it in items if it[0].device.type == "cpu" and it[0].dtype == dtype
                    and it[1].dtype == dtype and it[0].is_contiguous()
                    and it[1].is_contiguous()]  # fmt: skip
            if part:
                _cpu_optim.adamw32_step(
                    [p for p, _, _, _ in part], [g for _, g, _, _ in part],
                    [s["exp_avg"] for _, _, s, _ in part], [s["exp_avg_sq"] for _, _, s, _ in part],
                    [t for _, _, _, t in part], **hyper,
                )  # fmt: skip
                calls += 1
                done = {id(it[0]) for it in part}
                items = [it for it in items if id(it[0]) not in done]
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault((it[0].device, it[0].dtype), []).append(i)
    small_kernel = kernel if kernel in ("triton", "reference") else "auto"
    for idx in groups.values():
        part = [items[i] for i in idx]
        # adamw() advances step tensors itself; the counts here are already advanced.
        adamw([p for p, _, _, _ in part], [g for _, g, _, _ in part],
              [s["exp_avg"] for _, _, s, _ in part], [s["exp_avg_sq"] for _, _, s, _ in part],
              [torch.tensor(t - 1.0) for _, _, _, t in part], **hyper,
              kernel=small_kernel)  # fmt: skip
    return calls == 1 and not items
