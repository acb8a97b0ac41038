"""Shared helpers for autoscale's multi-tensor Triton kernels.

Stable, small API (other kernel files import it; change it only with the lead):

- ``HAS_TRITON``: triton imports.
- ``INTERPRET``: ``TRITON_INTERPRET=1`` was set before this module was imported, so Triton
  kernels run on CPU tensors through the interpreter (slow; for tests).
- ``triton_usable(device)`` / ``require_triton(device, op)``: whether a Triton kernel can run
  on ``device``; the second raises :class:`~autoscale.errors.KernelUnavailable` if not.
- ``tuning_configs(configs)``: the autotune list to use (only the first under the
  interpreter, which cannot benchmark).
- ``TensorTable`` / ``tensor_table(lists, chunk=...)``: the device tables one launch reads.
- ``launch(kernel, table, *args, **meta)``: launches ``kernel`` over every chunk of the table.
- ``per_tensor_sum(table, partial)``: reduce per-chunk partial results to per-tensor ones
  (the second phase of a two-phase norm).
- ``RESTORE_HOOKS``: pass as ``@triton.autotune(..., **RESTORE_HOOKS)`` on an in-place kernel.
- ``on_device(device)``: the context a launch on ``device``'s tensors runs in.

Note: [multi-tensor launch]
One launch covers every tensor of a parameter list. The host builds, per list (params,
grads, state...), an int64 table of base addresses, plus each tensor's numel, and a chunk
table (tensor index, first element) with one row per ``chunk`` elements of each tensor. The
grid is 1-D over chunks: program ``c`` reads its tensor index and start, casts the
addresses to typed pointers (``tl.load(addrs + t).to(tl.pointer_type(DTYPE))``) and loops
over its chunk in ``BLOCK``-element steps. Chunks of one tensor never straddle another, so a
program touches one tensor; small tensors cost one short program, large ones many. This is
apex's ``multi_tensor_apply`` without the per-launch tensor-count limit, and it runs
unchanged under ``TRITON_INTERPRET=1`` (the interpreter honours int-to-pointer casts).

Note: [autotuning in-place kernels]
The autotuner benchmarks each config by running the kernel several times on the real
arguments; an optimizer step run ten times is a wrong step. ``restore_value`` cannot help
because the tensors hide behind the address table, so ``RESTORE_HOOKS`` saves the written
tensors of the table being launched before each benchmark run and copies them back after.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from autoscale.errors import KernelUnavailable

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a Linux-only dependency
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False

__all__ = [
    "DEFAULT_CHUNK",
    "HAS_TRITON",
    "INTERPRET",
    "RESTORE_HOOKS",
    "TensorTable",
    "launch",
    "on_device",
    "per_tensor_sum",
    "require_triton",
    "tensor_table",
    "tl_dtype",
    "triton_usable",
    "tuning_configs",
]

# Read once: triton itself reads the variable at import, so a later change has no effect.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Elements per program. 64K fp32 elements is 256 KiB per tensor stream: large enough that
#: launch and table reads are noise, small enough that ~50M params give ~800 programs, several
#: per SM on an H100.
DEFAULT_CHUNK = 65536


def triton_usable(device: torch.device) -> bool:
    """True when a Triton kernel can run on ``device`` in this process."""
    if not HAS_TRITON:
        return False
    return device.type == "cuda" or (device.type == "cpu" and INTERPRET)


def require_triton(device: torch.device, op: str) -> None:
    """Raise KernelUnavailable, naming the fix, unless Triton can run ``op`` on ``device``."""
    if not HAS_TRITON:
        raise KernelUnavailable(
            f"{op}: kernel='triton' needs the triton package, which is not installed; "
            "install triton (Linux) or use kernel='auto'."
        )
    if device.type == "cpu" and not INTERPRET:
        raise KernelUnavailable(
            f"{op}: kernel='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton "
            "is imported (slow; meant for tests); use kernel='auto' for the fast CPU path."
        )
    if device.type not in ("cpu", "cuda"):
        raise KernelUnavailable(
            f"{op}: kernel='triton' does not support device {device.type!r}; use kernel='auto'."
        )


def tuning_configs(configs: list[Any]) -> list[Any]:
    """The autotune configs to register: all on a GPU, the first only under the interpreter.

    The interpreter has no GPU driver to benchmark with, and one config skips benchmarking.
    """
    return configs[:1] if INTERPRET else configs


def tl_dtype(dtype: torch.dtype) -> Any:
    """The ``tl`` dtype for a torch float dtype the kernels support (fp32, bf16, fp16)."""
    table = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    if dtype not in table:
        raise KernelUnavailable(
            f"Triton optimizer kernels support float32, bfloat16 and float16 tensors, got "
            f"{dtype}; use kernel='reference'."
        )
    return table[dtype]


@dataclass(frozen=True)
class TensorTable:
    """Device tables describing ``n_lists`` lists of ``n_tensors`` tensors for one launch.

    Invariant: tensor ``i`` of every list has the same numel and is contiguous; ``addrs`` is
    (n_lists, n_tensors) int64 on the tensors' device; ``chunk_tensor``/``chunk_start`` have
    one row per ``chunk`` elements of each tensor, ordered by tensor. ``lists`` keeps the
    tensors alive (and lets the autotune hooks find them) while the table is in use; a
    table is built per call and never cached, so it holds no tensor past its launch.
    """

    lists: tuple[tuple[torch.Tensor, ...], ...]
    addrs: torch.Tensor  # (n_lists, n_tensors) int64
    numels: torch.Tensor  # (n_tensors,) int64
    chunk_tensor: torch.Tensor  # (n_chunks,) int32
    chunk_start: torch.Tensor  # (n_chunks,) int64
    n_tensors: int
    n_chunks: int
    chunk: int
    chunk_pos: torch.Tensor  # (n_chunks,) int64: the chunk's index within its tensor
    max_chunks: int  # the most chunks of one tensor


@dataclass(frozen=True)
class _Layout:
    """The part of a table that depends on tensor sizes only (see TensorTable)."""

    numels: torch.Tensor
    chunk_tensor: torch.Tensor
    chunk_start: torch.Tensor
    chunk_pos: torch.Tensor
    n_chunks: int
    max_chunks: int


# Note: [table cache]
# Building tables costs host work and a host-to-device copy; a training loop passes the same
# tensors each step, so the device tables of the last few calls are kept. Only device
# tables of integers are kept, never the tensors they describe: gradients are new tensors
# every step under zero_grad(set_to_none=True), and holding them would keep up to
# _TABLE_CACHE_SIZE steps of gradients alive, in a tool whose job is a memory budget. The
# chunk tables are keyed by sizes; the address table by the addresses themselves, so a hit
# is always the right table, even when a freed tensor's memory went to another tensor (the
# caching allocator hands a new step's grads the old addresses, so hits stay the rule).
_LAYOUTS: OrderedDict[tuple[Any, ...], _Layout] = OrderedDict()
_ADDRS: OrderedDict[tuple[Any, ...], torch.Tensor] = OrderedDict()
_TABLE_CACHE_SIZE = 16


def _cached(cache: OrderedDict[tuple[Any, ...], Any], key: tuple[Any, ...],
            build: Callable[[], Any]) -> Any:  # fmt: skip
    hit = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
        return hit
    value = cache[key] = build()
    if len(cache) > _TABLE_CACHE_SIZE:
        cache.popitem(last=False)
    return value


def _layout(numels: list[int], chunk: int, device: torch.device) -> _Layout:
    chunk_tensor: list[int] = []
    chunk_start: list[int] = []
    chunk_pos: list[int] = []
    for i, numel in enumerate(numels):
        for j, start in enumerate(range(0, numel, chunk)):
            chunk_tensor.append(i)
            chunk_start.append(start)
            chunk_pos.append(j)
    return _Layout(
        numels=torch.tensor(numels, dtype=torch.int64, device=device),
        chunk_tensor=torch.tensor(chunk_tensor, dtype=torch.int32, device=device),
        chunk_start=torch.tensor(chunk_start, dtype=torch.int64, device=device),
        chunk_pos=torch.tensor(chunk_pos, dtype=torch.int64, device=device),
        n_chunks=len(chunk_tensor),
        max_chunks=max(chunk_pos, default=-1) + 1,
    )


def tensor_table(
    lists: Sequence[Sequence[torch.Tensor]], *, chunk: int = DEFAULT_CHUNK
) -> TensorTable:
    """The tables for ``lists`` (device parts reused, Note: [table cache]); see Note:
    [multi-tensor launch].

    Raises ValueError if the lists differ in length, a tensor is not contiguous, or tensor
    ``i`` has different numels across lists.
    """
    lists_t = tuple(tuple(ts) for ts in lists)
    n = len(lists_t[0])
    if any(len(ts) != n for ts in lists_t):
        raise ValueError(f"tensor_table: lists have lengths {[len(ts) for ts in lists_t]}; "
                         "pass one entry per parameter in every list.")
    for ts in lists_t:
        for t in ts:
            if not t.is_contiguous():
                raise ValueError("tensor_table: a tensor is not contiguous; multi-tensor kernels "
                                 "address memory linearly. Call .contiguous() on it first.")
    numels = [t.numel() for t in lists_t[0]]
    for ts in lists_t[1:]:
        if [t.numel() for t in ts] != numels:
            raise ValueError("tensor_table: tensor sizes differ between lists (param vs state).")
    device = lists_t[0][0].device
    layout = _cached(_LAYOUTS, (str(device), chunk, tuple(numels)),
                     lambda: _layout(numels, chunk, device))  # fmt: skip
    ptrs = [[t.data_ptr() for t in ts] for ts in lists_t]
    addrs = _cached(_ADDRS, (str(device), tuple(map(tuple, ptrs))),
                    lambda: torch.tensor(ptrs, dtype=torch.int64, device=device))  # fmt: skip
    return TensorTable(
        lists=lists_t, addrs=addrs, numels=layout.numels, chunk_tensor=layout.chunk_tensor,
        chunk_start=layout.chunk_start, n_tensors=n, n_chunks=layout.n_chunks, chunk=chunk,
        chunk_pos=layout.chunk_pos, max_chunks=layout.max_chunks,
    )


# The table being launched and which of its lists the kernel writes; read by RESTORE_HOOKS.
_ACTIVE: dict[str, Any] = {"table": None, "written": (), "saved": None}


def _pre_hook(kwargs: dict[str, Any], reset_only: bool = False) -> None:
    table = _ACTIVE["table"]
    if table is None or reset_only:
        return
    _ACTIVE["saved"] = [[t.clone() for t in table.lists[k]] for k in _ACTIVE["written"]]


def _post_hook(kwargs: dict[str, Any], exception: BaseException | None) -> None:
    table, saved = _ACTIVE["table"], _ACTIVE["saved"]
    if table is None or saved is None:
        return
    for k, copies in zip(_ACTIVE["written"], saved, strict=True):
        for t, c in zip(table.lists[k], copies, strict=True):
            t.copy_(c)
    _ACTIVE["saved"] = None


#: Autotune hooks that make benchmarking an in-place multi-tensor kernel side-effect free.
RESTORE_HOOKS: dict[str, Callable[..., None]] = {"pre_hook": _pre_hook, "post_hook": _post_hook}


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current for a launch on its tensors (a no-op off CUDA).

    Triton launches on the current CUDA device and stream, whatever device the pointers
    belong to, and the multi-tensor kernels receive raw addresses: params on cuda:1 in a
    process whose current device is cuda:0 would be read through the wrong context.
    """
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launch(
    kernel: Any, table: TensorTable, *args: Any, written: Sequence[int], **meta: Any
) -> None:
    """Launch ``kernel[(n_chunks,)](addrs, numels, chunk_tensor, chunk_start, n_tensors, *args)``.

    ``CHUNK=table.chunk`` is passed as a meta-parameter; the kernel finds list ``k``'s address
    of tensor ``t`` at ``addrs + k * n_tensors + t``.

    ``written`` lists the indices of ``table.lists`` the kernel modifies, so autotuning can
    restore them (Note: [autotuning in-place kernels]).
    """
    _ACTIVE.update(table=table, written=tuple(written), saved=None)
    try:
        with on_device(table.addrs.device):
            kernel[(table.n_chunks,)](
                table.addrs, table.numels, table.chunk_tensor, table.chunk_start,
                table.n_tensors, *args,
                CHUNK=table.chunk, **meta,
            )
    finally:
        _ACTIVE.update(table=None, written=(), saved=None)


def per_tensor_sum(table: TensorTable, partial: torch.Tensor) -> torch.Tensor:
    """Sum per-chunk rows ``partial`` (n_chunks, k) into per-tensor rows (n_tensors, k), fp32.

    Used between the two launches of a per-tensor norm: each program writes its own row (no
    atomics), then the rows of each tensor's chunks are added. Deterministic: the rows are
    scattered (to distinct places) into a (n_tensors, max_chunks, k) grid and summed along
    the chunks, where ``index_add_`` would add with atomics on CUDA, in a varying order, and
    break bit-identical resume of LAMB and LARS there.
    """
    grid = torch.zeros(table.n_tensors, max(table.max_chunks, 1), partial.shape[1],
                       dtype=torch.float32, device=partial.device)
    grid[table.chunk_tensor.long(), table.chunk_pos] = partial.float()
    return grid.sum(1)
