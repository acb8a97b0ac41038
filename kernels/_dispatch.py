"""The one dispatcher of autoscale's kernels: every op (AdamW, SGD, LAMB, LARS, 8-bit
AdamW, block-wise quantization) hands :func:`run` its paths, and ``kernel=`` names one of
:data:`KERNELS`. With "auto" it takes Triton on CUDA, else picks by measurement, once per
(op, device type, dtype) per process.

Note: [choosing the CPU path by measurement]
Which torch path is fastest on CPU (``torch._fused_adamw_``, the ``torch._foreach_*`` ops,
a per-tensor loop) depends on the torch build, the core count and the tensor-size mix, and
has changed between torch releases, so we do not hard-code it. At the first step of an
(op, device, dtype) the caller hands us one runner per candidate, each doing one step on
*scratch copies* of (a bounded prefix of) the real parameter list; we run each once to warm
up, then time it a few times and keep the median. Candidates are first checked against the
reference on a small sample, so a path that computes different maths is never chosen.
The winner is cached for the life of the process.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import torch

from autoscale.errors import KernelUnavailable

from ._dtensor import any_dtensor, local
from ._triton_util import require_triton, triton_usable

__all__ = [
    "KERNELS", "TIMINGS", "cached_choice", "choose", "clear_cache", "isolated_choices",
    "passes_check", "run", "scratch_prefix",
]  # fmt: skip

#: Every kernel name some op has; "auto" chooses. Each op's module has its own ``KERNELS``
#: (the names it takes) and says in its docstring which machine needs each path.
KERNELS = ("auto", "triton", "torch_fused", "foreach", "native", "compiled", "reference")

_CHOICES: dict[tuple[str, str, torch.dtype], str] = {}
_BY_OFFER: dict[tuple[str, str, torch.dtype, tuple[str, ...]], str] = {}
#: Timings behind each cached choice (seconds per step, median), for benchmarks and logs.
TIMINGS: dict[tuple[str, str, torch.dtype], dict[str, float]] = {}

# Timing copies are capped so that choosing never more than ~doubles peak memory on a big
# model and takes well under a second; 4M elements is enough to reach streaming speed.
_SCRATCH_ELEMENTS = 4_000_000


def clear_cache() -> None:
    """Forget every cached choice (tests use this to force a new measurement)."""
    _CHOICES.clear()
    _BY_OFFER.clear()
    TIMINGS.clear()


@contextlib.contextmanager
def isolated_choices() -> Iterator[None]:
    """Choose afresh inside (no cached choice applies), and forget what was chosen there on
    exit, the choices from before back in place: a calibration that steps made-up tensors
    (autoscale/cost/_rates.py) must not choose the paths of the job in the same process,
    which are chosen on the job's own tensors."""
    saved = dict(_CHOICES), dict(_BY_OFFER), dict(TIMINGS)
    clear_cache()
    try:
        yield
    finally:
        clear_cache()
        _CHOICES.update(saved[0])
        _BY_OFFER.update(saved[1])
        TIMINGS.update(saved[2])


def cached_choice(op: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """The kernel already chosen for this key, or None if none was measured yet."""
    return _CHOICES.get((op, device.type, dtype))


def scratch_prefix(n_tensors: Sequence[int], *, max_elements: int = _SCRATCH_ELEMENTS) -> int:
    """How many leading tensors (by numel) fit in ``max_elements`` (at least one)."""
    total, k = 0, 0
    for numel in n_tensors:
        if k > 0 and total + numel > max_elements:
            break
        total += numel
        k += 1
    return k


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def choose(
    op: str,
    device: torch.device,
    dtype: torch.dtype,
    runners: Mapping[str, Callable[[], None]],
    *,
    offered: tuple[str, ...] = (),
    repeats: int = 3,
) -> str:
    """Return the fastest of ``runners`` (name -> one scratch step), measured and cached.

    The cache key is (op, device type, dtype, ``offered``): the paths the op offered for
    these tensors (before the agreement check), so tensors offered fewer paths (say, no C
    loop for ``maximize=True``) get their own choice instead of another's winner.
    :func:`cached_choice` reads the latest choice per (op, device type, dtype).

    Invariant: every runner computes the same maths as the reference (the caller filters
    them); runners only touch scratch tensors, never the user's parameters.
    """
    key = (op, device.type, dtype)
    if (*key, offered) in _BY_OFFER:
        return _BY_OFFER[(*key, offered)]
    if not runners:
        raise ValueError(f"choose({op!r}): no candidate kernels for {device.type}/{dtype}.")
    timings: dict[str, float] = {}
    for name, run in runners.items():
        run()  # warm-up: first-touch page faults, lazy init, caches
        samples = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            run()
            _sync(device)
            samples.append(time.perf_counter() - t0)
        timings[name] = statistics.median(samples)
    best = min(timings, key=timings.__getitem__)
    _BY_OFFER[(*key, offered)] = _CHOICES[key] = best
    TIMINGS[key] = timings
    return best


Lists = Sequence[Sequence[Any]]
Impl = Callable[[Lists], None]
#: ``agrees(impl, reference, lists)``: does ``impl`` compute what ``reference`` does, judged
#: on clones of a sample of ``lists``?
Agrees = Callable[[Impl, Impl, Lists], bool]

# Sample size for the agreement check: small enough to cost nothing, big enough to catch a
# path that computes different maths. Tolerance: the torch fused/foreach kernels and the C
# loops reorder fp32 operations (e.g. lerp vs mul-add, FMA contraction), which moves results
# by a few ulps, never 1e-4 (Note: [agreement in the output's own rounding]).
_CHECK_ELEMENTS = 4096
_CHECK_RTOL, _CHECK_ATOL = 1e-4, 1e-6


def _clone_lists(lists: Lists, n: int, max_elements: int | None = None) -> list[list[torch.Tensor]]:
    out = []
    for ts in lists:
        row = []
        for t in ts[:n]:
            if not isinstance(t, torch.Tensor):  # per-tensor flags ride along unchanged
                row.append(t)
                continue
            if max_elements is not None and t.dim() > 0:
                t = t.reshape(-1)[:max_elements]
            row.append(t.detach().clone())
        out.append(row)
    return out


def passes_check(op: str, name: str, check: Callable[[], bool]) -> bool:
    """``check()`` (does path ``name`` of ``op`` agree with the reference?), where a path
    whose check raises is ruled out with a warning: choosing among paths must never fail a
    step that the reference can take."""
    try:
        return check()
    except Exception as err:  # any failure disqualifies the path
        warnings.warn(f"{op}: kernel {name!r} failed its check and is not used "
                      f"({type(err).__name__}: {err}).", RuntimeWarning, stacklevel=3)
        return False


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """``got`` within fp32 reordering noise of ``want`` plus one rounding step of their own
    dtype, and non-finite exactly where ``want`` is (Note: [non-finite gradients]).

    Note: [agreement in the output's own rounding]
    The reference computes in fp32 and rounds once to the tensor's dtype; a path computing
    the same maths lands a few fp32 ulps away before that rounding, and where the exact
    value lies that close to a rounding midpoint the two round to neighbouring values: one
    bf16 ulp (2^-8 to 2^-7 relative), 40x the fp32 tolerance. Judged at fp32 tolerance, the
    C loop (FMA-contracted) and the reference differ so in about one sample in seven of
    bench-like bf16 AdamW values (one element of the 16k sampled), ruling out a path that
    is 10x faster. So one step from ``want`` to its neighbour in its own dtype, on
    ``got``'s side, is allowed on top of the noise: one rounding apart passes, two do not;
    for fp32 tensors the step is 1e-7 relative, below the noise.
    """
    g, w = got.double(), want.double()
    step = torch.zeros_like(w)
    if want.is_floating_point():  # the gap from want to its neighbour on got's side
        step = (torch.nextafter(want, got.to(want.dtype)).double() - w).abs()
    finite = torch.isfinite(g) & torch.isfinite(w)
    near = (g - w).abs() <= _CHECK_ATOL + _CHECK_RTOL * w.abs() + step
    same = (g == w) | (torch.isnan(g) & torch.isnan(w))  # an inf only matches itself
    return bool(torch.where(finite, near, same).all())


def _agrees(impl: Impl, reference: Impl, lists: Lists) -> bool:
    """The default check: every output :func:`_close` to the reference's, judged on clones
    of up to 4096 elements of up to 4 tensors."""
    n = min(len(lists[0]), 4)
    ref_lists = _clone_lists(lists, n, _CHECK_ELEMENTS)
    got_lists = _clone_lists(ref_lists, n)
    reference(ref_lists)
    impl(got_lists)
    return all(
        _close(g, r)
        for gs, rs in zip(got_lists, ref_lists, strict=True)
        for g, r in zip(gs, rs, strict=True)
        if isinstance(g, torch.Tensor)
    )


def run(op: str, kernel: str, impls: Mapping[str, Impl], lists: Lists, *,
        kernels: Sequence[str] = KERNELS, probe_impls: Mapping[str, Impl] | None = None,
        agrees: Agrees | None = None, why_not: Mapping[str, str] | None = None) -> str:
    """Run one step of ``op`` on ``lists`` with ``kernel`` (or the chosen one); return its name.

    ``impls`` maps kernel names to functions of the tensor lists (hyper-parameters bound);
    it must hold "reference", and holds "triton" when the op has a Triton kernel. With
    ``kernel="auto"``: Triton on CUDA, else the fastest torch path that agrees with the
    reference (Note: [choosing the CPU path by measurement]).

    Invariant: every path sees plain contiguous tensors. DTensors (FSDP2's sharded
    params, their grads and state) are replaced by their rank-local tensors, which share
    their storage: the ops are elementwise, or (LAMB, LARS) reduce their norms through
    ``kernels._dtensor``. A strided one (a transposed Parameter)
    is stepped as a contiguous copy and copied back, because the multi-tensor kernels
    address memory linearly (Triton refuses strided tensors; torch's fused CPU kernels
    pair elements in memory order, so a grad or state laid out unlike its param got the
    wrong elements, and state kept in the param's memory order would not match the other
    paths or torch.optim after a load).

    ``kernels``: the names the op takes (its module's ``KERNELS``); ``impls`` holds some
    of them. ``probe_impls``: the same paths without collectives (LAMB/LARS on sharded params),
    for the agreement check and the timing runs on samples and scratch copies, whose
    sizes differ between ranks; default ``impls``. ``agrees``: the op's agreement check
    (default: every output close to the reference's, on up to 4096 elements of each
    tensor). ``why_not``: for paths the op knows but cannot offer here, why not; the
    error for a forced one says it.

    Raises ValueError for an unknown kernel name, KernelUnavailable when a forced kernel
    cannot run on these tensors.
    """
    # Both checks run every step, so they are kept to C-level loops (~30 us for 5 lists of
    # 136 tensors, against ~170 us for a per-tensor Python check). Params decide DTensor-ness:
    # their grads and state follow them.
    if any_dtensor(lists[0]):
        lists = [[local(t) for t in ts] for ts in lists]
    if all(map(_all_contiguous, lists)):
        return _run(op, kernel, kernels, impls, lists, probe_impls or impls,
                    agrees or _agrees, why_not or {})
    strided = [
        (t, t.contiguous()) for ts in lists for t in ts
        if isinstance(t, torch.Tensor) and not t.is_contiguous()
    ]  # fmt: skip
    swap = {id(t): c for t, c in strided}
    work = [[swap.get(id(t), t) if isinstance(t, torch.Tensor) else t for t in ts]
            for ts in lists]  # fmt: skip
    name = _run(op, kernel, kernels, impls, work, probe_impls or impls, agrees or _agrees,
                why_not or {})
    # Read-only inputs (grads) are copied back too: unchanged, and strided ones are rare.
    for t, c in strided:
        t.copy_(c)
    return name


def _all_contiguous(ts: Sequence) -> bool:
    # A list holds tensors, or per-tensor flags (LAMB/LARS's excluded) that need no check.
    return not ts or not isinstance(ts[0], torch.Tensor) or all(map(torch.Tensor.is_contiguous, ts))


def _run(op: str, kernel: str, kernels: Sequence[str], impls: Mapping[str, Impl],
         lists: Lists, probe: Mapping[str, Impl], agrees: Agrees,
         why_not: Mapping[str, str]) -> str:  # fmt: skip
    first = lists[0][0]
    device, dtype = first.device, first.dtype
    assert set(impls) <= set(kernels), f"{op} offers paths outside its KERNELS"
    if kernel not in kernels:
        raise ValueError(f"{op}: kernel={kernel!r} is not one of {tuple(kernels)}.")
    if kernel != "auto" and kernel not in impls:
        why = f" ({why_not[kernel]})" if kernel in why_not else ""
        raise KernelUnavailable(
            f"{op}: kernel={kernel!r} is not available for {device.type}/{dtype} tensors{why}; "
            f"use kernel='auto' or one of {sorted(impls)}."
        )
    if kernel == "triton":
        require_triton(device, op)
    if kernel != "auto":
        impls[kernel](lists)
        return kernel
    if device.type == "cuda" and "triton" in impls and triton_usable(device):
        impls["triton"](lists)
        return "triton"
    # The interpreter is a correctness tool, orders of magnitude slower: never a candidate.
    offered = tuple(sorted(k for k in probe if k != "triton"))
    name = _BY_OFFER.get((op, device.type, dtype, offered))
    if name is None:
        candidates = {k: f for k, f in probe.items() if k != "triton"}
        reference = probe["reference"]
        candidates = {
            k: f for k, f in candidates.items()
            if k == "reference"
            or passes_check(op, k, partial(agrees, f, reference, lists))
        }
        k = scratch_prefix([t.numel() for t in lists[0]])
        # One scratch copy shared by all candidates: its values drift step by step, which does
        # not change the cost of elementwise maths.
        scratch = _clone_lists(lists, k)
        runners = {name_: (lambda f=f: f(scratch)) for name_, f in candidates.items()}
        name = choose(op, device, dtype, runners, offered=offered)
        del scratch, runners
    impls[name](lists)
    return name
