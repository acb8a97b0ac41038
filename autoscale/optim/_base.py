"""Shared machinery of autoscale's fused optimizers.

Contract of every subclass:

- It is a ``torch.optim.Optimizer``; constructor arguments and defaults match torch.optim
  where they overlap, plus keyword-only ``kernel``.
- All state lives in ``optimizer.state`` (so its size can be counted); floating state is
  fp32 for fp32/bf16/fp16 params and fp64 for fp64 params (torch.optim keeps fp64 state
  there, and a drop-in must not lose precision), integer state (8-bit codes) keeps its dtype;
  ``state_dict()``/``load_state_dict()`` round-trip exactly, so a resumed run takes
  bit-identical next steps.
- ``step()`` runs one multi-tensor kernel call per (param group, device, dtype) bucket;
  ``kernel_choice`` says which kernel ran last (see autoscale.kernels._dispatch).
- DTensor params (FSDP2's ``fully_shard``) work as with torch.optim: state is sharded
  like its param (AdamW8bit: rank-local codes for the local shard), each rank steps its
  shard, and LAMB/LARS take whole-tensor norms (see autoscale.kernels._dtensor).
"""

from __future__ import annotations

import itertools
import operator
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

__all__ = ["FusedOptimizer", "ParamsT"]

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


def _check_flags(name: str, *, capturable: bool = False, differentiable: bool = False) -> None:
    if capturable:
        raise ValueError(f"{name}(capturable=True) is not supported: autoscale kernels keep the "
                         "step count on the host. Pass capturable=False (the default).")
    if differentiable:
        raise ValueError(f"{name}(differentiable=True) is not supported: the fused kernels update "
                         f"in place outside autograd. Use torch.optim.{name} for that.")


class FusedOptimizer(torch.optim.Optimizer):
    """Base class; subclasses implement :meth:`_step_bucket` and :meth:`_init_state`."""

    #: The ``kernel=`` names this optimizer takes: its op module's ``KERNELS`` (the paths
    #: that op has), so a name without a path is refused here, not at the first step.
    kernels: ClassVar[tuple[str, ...]]

    def __init__(self, params: ParamsT, defaults: dict[str, Any], *, kernel: str = "auto") -> None:
        if kernel not in self.kernels:
            name = type(self).__name__
            raise ValueError(f"{name}: kernel={kernel!r} is not one of {self.kernels}; {name} "
                             f"has no {kernel!r} path. Use kernel='auto' to let it choose.")
        if defaults.get("foreach") and defaults.get("fused"):
            raise ValueError(f"{type(self).__name__}: foreach=True and fused=True cannot both be "
                             "set; pick one (or neither, to let autoscale measure).")
        self.kernel = kernel
        #: "device/dtype" -> kernel name that ran the last step for that bucket.
        self.kernel_choices: dict[str, str] = {}
        super().__init__(params, defaults)

    @property
    def kernel_choice(self) -> str | None:
        """The kernel used by the last step (None before the first), e.g. "torch_fused".

        With several (device, dtype) buckets choosing differently: "cpu/torch.float32=...,...".
        """
        names = set(self.kernel_choices.values())
        if not names:
            return None
        if len(names) == 1:
            return names.pop()
        return ",".join(f"{k}={v}" for k, v in sorted(self.kernel_choices.items()))

    def __getstate__(self) -> dict[str, Any]:
        # torch pickles only defaults, state and param_groups; the kernel= choice is ours.
        return {**super().__getstate__(), "kernel": self.kernel}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Also called by load_state_dict (without "kernel"): the live choice then stays.
        if "kernel" not in state and not hasattr(self, "kernel"):
            state = {**state, "kernel": "auto"}
        super().__setstate__(state)
        if not hasattr(self, "kernel_choices"):
            self.kernel_choices = {}
        # A state dict from torch.optim lacks our group keys; fill them from our defaults.
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def _state_dtype(self, p: torch.Tensor) -> torch.dtype:
        """The dtype of ``p``'s floating state: see :func:`state_dtype`."""
        return state_dtype(p)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like torch.optim, but keep float state in :meth:`_state_dtype` (fp32 for
        fp32/bf16 params) and never alias ``state_dict``.

        torch casts floating state to the param dtype (bf16 params would get bf16 moments,
        breaking the fp32-state contract and exact resume), so the saved tensors are put back
        after the base class has matched params to ids.
        """
        saved = {
            pid: {k: v for k, v in st.items() if isinstance(v, torch.Tensor)}
            for pid, st in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        id_to_param = dict(zip(ids, params, strict=True))
        for pid, tensors in saved.items():
            p = id_to_param[pid]
            for key, value in tensors.items():
                if key == "step":
                    # Host-side step count (torch.optim's non-fused layout) wherever it was.
                    self.state[p][key] = value.detach().to("cpu", torch.float32, copy=True)
                elif value.is_floating_point():
                    # Contiguous too: torch.optim lays state out like a strided param.
                    self.state[p][key] = value.detach().to(
                        p.device, self._state_dtype(p), copy=True,
                        memory_format=torch.contiguous_format,
                    )
                else:  # integer state (8-bit codes): its own dtype, but never aliased either
                    self.state[p][key] = value.detach().to(p.device, copy=True)

    def _kernel_for(self, group: dict[str, Any], device: torch.device,
                    dtype: torch.dtype = torch.float32) -> str:  # fmt: skip
        """The kernel to use: ``kernel=`` wins, then torch's fused/foreach flags, else auto.

        The flags are torch.optim's, so they ask for torch's kind of path where autoscale
        has one for these tensors, and fall back to auto where it has not (torch's fused
        kernels keep state in the param dtype, so autoscale offers them for fp32/fp64
        params only): ``AdamW(bf16_params, fused=True)`` steps, as it does in torch.optim,
        rather than failing. ``foreach=True`` asks for the foreach path where the op has
        one, else for the fused one: AdamW and SGD have no foreach path (torch's fused
        kernel covers its dtypes and devices, faster; see their kernel modules).
        ``kernel=`` is taken strictly.
        """
        if self.kernel != "auto":
            return self.kernel
        torch_path = dtype in (torch.float32, torch.float64)
        if group.get("foreach") and "foreach" in self.kernels:
            return "foreach" if torch_path else "auto"
        if group.get("fused") or group.get("foreach"):
            if device.type == "cuda":
                return "triton" if dtype != torch.float64 else "auto"
            return "torch_fused" if torch_path else "auto"
        return "auto"

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimizer step over every param with a gradient; returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        live = [[p for p in group["params"] if p.grad is not None] for group in self.param_groups]
        # Every param is checked before any moves, so a refused step changes nothing; the
        # checks are C-level loops (a per-param Python check was ~40 us per 100 params).
        for params in live:
            if any(map(_GRAD_IS_SPARSE, params)) or any(map(torch.Tensor.is_complex, params)):
                for p in params:
                    self._check_param(p)
        for group, params_with_grad in zip(self.param_groups, live, strict=True):
            buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
            for p in params_with_grad:
                if not self.state[p]:
                    self._init_state(group, p)
                buckets[(p.device, p.dtype)].append(p)
            for (device, dtype), params in buckets.items():
                name = self._step_bucket(group, params, self._kernel_for(group, device, dtype))
                self.kernel_choices[f"{device.type}/{dtype}"] = name
        return loss

    def _check_param(self, p: torch.Tensor) -> None:
        """Raise ValueError for a param the kernels cannot step (sparse grad, complex)."""
        if p.grad is not None and p.grad.is_sparse:
            raise ValueError(f"{type(self).__name__} does not support sparse gradients; "
                             "use torch.optim.SparseAdam or dense gradients.")
        if p.is_complex():
            # The kernels are real-valued; running them would drop the imaginary part.
            raise ValueError(
                f"{type(self).__name__} does not support complex parameters (got {p.dtype}, "
                f"shape {tuple(p.shape)}); keep them in a torch.optim optimizer, or store "
                "them as real tensors (torch.view_as_real)."
            )

    def _momentum_parts(self, params: list[torch.Tensor]
                        ) -> list[tuple[list[torch.Tensor], bool]]:  # fmt: skip
        """Split ``params`` into (params, first_step) parts for the SGD-style kernels.

        Params without a ``momentum_buffer`` get a zeroed one and ``first_step=True``
        (their first momentum step copies d into the buffer, no dampening, as torch does);
        the rest ``first_step=False``. Empty parts are left out.
        """
        new = [p for p in params if "momentum_buffer" not in self.state[p]]
        old = [p for p in params if "momentum_buffer" in self.state[p]]
        for p in new:
            self.state[p]["momentum_buffer"] = state_zeros_like(p)
        return [(part, first) for part, first in ((new, True), (old, False)) if part]

    def _init_state(self, group: dict[str, Any], p: torch.Tensor) -> None:
        raise NotImplementedError

    def _step_bucket(self, group: dict[str, Any], params: list[torch.Tensor], kernel: str) -> str:
        raise NotImplementedError


_GRAD_IS_SPARSE = operator.attrgetter("grad.is_sparse")


def state_dtype(p: torch.Tensor) -> torch.dtype:
    """fp64 for fp64 params, else fp32: moments are never kept below fp32 (bf16 params get
    fp32 state, the mixed-precision contract) nor below the param's own precision."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def state_zeros_like(p: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Zeroed state buffer shaped like ``p`` in ``dtype`` (default :func:`state_dtype`),
    contiguous (multi-tensor kernels need it); a DTensor with ``p``'s mesh and placements
    when ``p`` is one (FSDP2), as torch.optim keeps it."""
    return torch.zeros_like(p, dtype=dtype or state_dtype(p), memory_format=torch.contiguous_format)


def host_step() -> torch.Tensor:
    """A step counter in torch.optim's non-fused layout: fp32 scalar tensor on the CPU."""
    return torch.tensor(0.0, dtype=torch.float32)


def adam_state(p: torch.Tensor, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Fresh Adam-family state for ``p``, in torch.optim.AdamW's keys and layout: a host
    ``step`` counter and ``exp_avg`` / ``exp_avg_sq`` in ``dtype`` (default
    :func:`state_dtype`) (AdamW, LAMB, AdamW8bit's small tensors)."""
    return {"step": host_step(), "exp_avg": state_zeros_like(p, dtype),
            "exp_avg_sq": state_zeros_like(p, dtype)}


def excluded(group: dict[str, Any], p: torch.Tensor) -> bool:
    """True if ``p`` skips trust-ratio adaptation and weight decay (LAMB, LARS).

    The usual rule: 1-D tensors (biases, norm weights) are excluded while the group has
    ``exclude_1d=True`` (default); ``adapt=False`` excludes the whole group.
    """
    return (not group["adapt"]) or (group["exclude_1d"] and p.dim() <= 1)
