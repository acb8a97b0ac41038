"""What this machine does per second: matmul FLOPs, memory bytes, and the cost of one op.

Note: [machine rates]
The step-time estimate (autoscale/cost/_time.py) prices every aten op of the simulated step
as ``max(flops / matmul_flops_per_s, bytes / memory_bytes_per_s) + op_overhead_s``. The
three rates are measured once per machine by a short run (about 7 s here, half of it the
compile of 8-bit AdamW's inductor path, which its kernel dispatcher times like a job's first step):

- ``matmul_flops_per_s``: the matmuls of a small training step (two Linear layers and an
  attention-shaped batched matmul, forward and backward), timed op by op;
  ``bf16_flops_per_s`` and ``fp16_flops_per_s`` the same step under autocast, which CPUs
  run anywhere from a few times faster (bf16 units) to many times slower (no fp16 GEMM).
  Every call's rate is kept (``matmul_curve``) from the step at widths 64 to 512 (fp16: 32
  and 64): a small matmul runs far below a large one (bf16 here: ~25 GFLOP/s at width 64,
  ~380 at 512), and a model's matmul is priced at the rate of its size. Convolutions
  (mkldnn's kernels) get points of their own, from two 3x3 convolutions of 16 and 64
  channels on 4 images of 16x16, and of 32 on 16 of 32x32 (fp16: 8 channels; Note: [a
  convolution's rate falls past the caches]). So does fused attention
  (``scaled_dot_product_attention``'s CPU kernel), forward and backward apart, from a
  causal self-attention of 4 sequences of 4 heads at 32, 64, 128 and 256 tokens (fp16: the
  first two): it runs far below a matmul of the same FLOPs, and its bf16 backward below
  its fp32 one (here ~6 against ~50 GFLOP/s at 64 tokens of 32 channels a head), which is
  what made bf16 look ~2x faster than it runs on attention models when these kernels were
  priced as FLOP-free.
- ``memory_bytes_per_s``: an out-of-place add of two 16 MiB fp32 tensors (bytes read plus
  written over its time): past the caches, what a large elementwise op streams at; the
  median of 5 fresh sets of tensors (``_bandwidth``).
- ``op_overhead_s``: a tiny training step (a stack of 8x8 Linear layers on 2 samples,
  forward and backward) timed and divided by the number of aten ops it dispatches, counted
  by the same counter the estimate uses. Its tensors are so small that its time is all
  overhead: Python module calls, autograd's bookkeeping, the dispatcher, kernel launch.
  That is the per-op price a small model pays, and a loop of bare ``torch.add`` calls
  (without autograd and modules) would under-state it several times over.
- ``random_numbers_per_s``: ``bernoulli_`` over 4 Mi elements (dropout's masks).
- ``checkpoint_call_s``: what ``torch.utils.checkpoint`` costs per block call beyond the
  ops it recomputes (the RNG state saved and restored, its saved-tensor hooks, the
  recompute's Python): 16 tiny blocks trained checkpointed and not, less the counted extra
  ops. About 0.3 ms here, per checkpointed block and micro-batch: on the HuggingFace models
  the estimate priced fully checkpointed steps 5-9% under their measured time without it.
- ``optimizers``: each optimizer's step, per element and per tensor (Note: [the optimizer
  step's price]).

Note: [timing a busy machine]
Other processes only ever slow a call down, so each rate takes the fastest of a few calls.
With one torch thread each call's time is also the lesser of its wall-clock time and the
CPU time this process spent: on a machine shared with other jobs the wall clock counts the
time the scheduler gave to them, the CPU time does not. With more threads only the wall
clock is used: CPU time over the thread count assumes every thread busy throughout, and the
serial parts of a call (the per-op dispatch, ops below torch's parallel grain) keep one
thread busy. That assumption made rates measured at 2 threads 2-3x too fast (op overhead
1.23 us against 2.49 measured at 1 thread; matmul 252 GFLOP/s against 83), and the GPT
example's step was priced at 29 ms where it ran in 89.

They are cached as JSON under ``~/.cache/autoscale/`` (``$XDG_CACHE_HOME`` if set), keyed
by the CPU model, torch version and thread count, the three things that change them, and by
``_VERSION``, which changes with what is measured.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from autoscale.errors import PlanError

__all__ = ["CONVOLUTIONS", "ELEMENTWISE_OPS", "ROW_OPS", "SHORT_ROW", "MachineRates",
           "attention_slices",
           "cache_path", "kernel_flops", "machine_rates", "measure_rates", "optimizer_key",
           "rate_kind"]


@dataclass(frozen=True, slots=True)
class MachineRates:
    """The rates the step-time estimate prices ops at (Note: [machine rates])."""

    matmul_flops_per_s: float
    """FLOPs per second of an fp32 matmul."""
    memory_bytes_per_s: float
    """Bytes read plus written per second by a large elementwise op."""
    op_overhead_s: float
    """Seconds one aten op costs beyond its FLOPs and bytes (dispatch, autograd, launch)."""
    bf16_flops_per_s: float | None = None
    """FLOPs per second of a bf16 matmul (None: as fp32's)."""
    fp16_flops_per_s: float | None = None
    """FLOPs per second of an fp16 matmul (None: as fp32's)."""
    random_numbers_per_s: float | None = None
    """Random numbers drawn per second (dropout's bernoulli_; None: 4 bytes each at
    ``memory_bytes_per_s``)."""
    matmul_curve: tuple[tuple[str, float, float], ...] = ()
    """Measured (precision, FLOPs of one call, FLOPs per second) points: a matmul's rate
    depends on its size (Note: [machine rates]); a fused attention's points are FLOPs of
    one (sequence, head) slice (Note: [attention's rate goes by its slice]); empty: the
    flat rates above."""
    checkpoint_call_s: float = 0.0
    """Seconds one checkpointed block call costs beyond its recomputed ops (the RNG state
    saved and replayed, the saved-tensor hooks, the recompute's Python)."""
    elementwise: tuple[tuple[str, str, float], ...] = ()
    """Measured (aten op, dtype, elements per second) of the pointwise and normalization
    ops that compute more than they move (Note: [ops that compute more than they move]);
    empty: every such op at ``memory_bytes_per_s``."""

    optimizers: tuple[tuple[str, float, float], ...] = ()
    """Measured (optimizer key, seconds per parameter element, seconds per parameter
    tensor) of ``optimizer_key``'s optimizers, their ``step()`` as a job calls it (Note:
    [the optimizer step's price]); empty: priced by the bytes they move."""

    def __post_init__(self) -> None:
        # JSON hands the points back as lists.
        object.__setattr__(self, "matmul_curve", tuple(
            (str(p), float(f), float(r)) for p, f, r in self.matmul_curve))
        object.__setattr__(self, "elementwise", tuple(
            (str(op), str(d), float(r)) for op, d, r in self.elementwise))
        object.__setattr__(self, "optimizers", tuple(
            (str(k), float(e), float(t)) for k, e, t in self.optimizers))
        for name in ("matmul_flops_per_s", "memory_bytes_per_s", "op_overhead_s",
                     "bf16_flops_per_s", "fp16_flops_per_s", "random_numbers_per_s"):
            value = getattr(self, name)
            if value is None and name not in ("matmul_flops_per_s", "memory_bytes_per_s",
                                              "op_overhead_s"):
                continue
            if not isinstance(value, int | float) or not value > 0:
                raise PlanError(f"MachineRates.{name} must be a positive number, got "
                                f"{value!r}; measure it with machine_rates().")

    def flops_per_s(self, precision: str = "", flops: float | None = None) -> float:
        """The matmul rate for "bf16", "fp16" or "" (fp32), and for a convolution or an
        attention kernel in those (``rate_kind``); for a call of ``flops`` FLOPs, interpolated on
        ``matmul_curve`` (log scale, clamped at its ends) where measured."""
        points = sorted((f, r) for p, f, r in self.matmul_curve if p == precision)
        if flops is None or not points:
            low = {"bf16": self.bf16_flops_per_s, "fp16": self.fp16_flops_per_s}
            return low.get(precision.rpartition("-")[2]) or self.matmul_flops_per_s
        if flops <= points[0][0]:
            return points[0][1]
        for (f0, r0), (f1, r1) in itertools.pairwise(points):
            if flops <= f1:
                return r0 + (r1 - r0) * math.log(flops / f0) / math.log(f1 / f0)
        return points[-1][1]

    def elements_per_s(self, op: str, dtype: str, row: int | None = None) -> float | None:
        """Elements per second of aten ``op`` (its packet name) on ``dtype`` tensors
        ("float32", "bfloat16", "float16"); None where not measured. For an op of
        ``ROW_OPS`` on rows of ``row`` elements, interpolated (log scale, clamped) between
        its rates on short and long rows (Note: [a softmax's rate goes by its rows])."""
        def rate_of(name: str) -> float | None:
            for n, d, rate in self.elementwise:
                if n == name and d == dtype:
                    return rate
            return None

        long = rate_of(op)
        if row is None or op not in ROW_OPS:
            return long
        short = rate_of(f"{op}@{SHORT_ROW}")
        if long is None or short is None:
            return long or short
        where = math.log(min(max(row, SHORT_ROW), _COLS) / SHORT_ROW) / math.log(
            _COLS / SHORT_ROW)
        return short + (long - short) * where

    def optimizer_seconds(self, key: str) -> tuple[float, float] | None:
        """(seconds per parameter element, seconds per parameter tensor) of the optimizer
        ``optimizer_key`` names; None where not measured."""
        for name, element_s, tensor_s in self.optimizers:
            if name == key:
                return element_s, tensor_s
        return None

    def random_per_s(self) -> float:
        """Random numbers drawn per second."""
        return self.random_numbers_per_s or self.memory_bytes_per_s / 4

    def scaled(self, factor: float) -> MachineRates:
        """These rates ``factor`` times faster: every op's estimated time divides by it."""
        def times(rate: float | None) -> float | None:
            return rate * factor if rate is not None else None

        return MachineRates(self.matmul_flops_per_s * factor,
                            self.memory_bytes_per_s * factor, self.op_overhead_s / factor,
                            times(self.bf16_flops_per_s), times(self.fp16_flops_per_s),
                            times(self.random_numbers_per_s),
                            tuple((p, f, r * factor) for p, f, r in self.matmul_curve),
                            self.checkpoint_call_s / factor,
                            tuple((op, d, r * factor) for op, d, r in self.elementwise),
                            tuple((k, e / factor, t / factor) for k, e, t in self.optimizers))


# Part of the cache key: a change to what is measured, or how, measures again.
_VERSION = 17


def rate_kind(family: str, precision: str) -> str:
    """The curve's name for a kernel of ``family`` ("" a matmul, "conv", "attn",
    "attn-bwd") in ``precision`` ("", "bf16", "fp16")."""
    return "-".join(part for part in (family, precision) if part)


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo where there is one (platform.processor() is often
    empty); the machine's name in the rates cache key and in the benchmarks' tables."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "autoscale"


def cache_path(device: str = "cpu", *, cache_dir: Path | None = None) -> Path:
    """The file ``machine_rates(device)`` reads and writes on this machine."""
    key = (f"rates {_VERSION}|{cpu_model()}|torch {torch.__version__}"
           f"|threads {torch.get_num_threads()}|{device}")
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return (cache_dir or _cache_dir()) / f"machine_rates-{digest}.json"


def machine_rates(device: str = "cpu", *, cache_dir: Path | None = None,
                  refresh: bool = False) -> MachineRates:
    """This machine's rates for ``device``, measured once (~1 s) and then read from the
    cache (Note: [machine rates]); ``refresh`` measures again and rewrites the file.

    Only "cpu" is measured here; the file is written atomically (a temporary file in the
    same folder, then ``os.replace``), so concurrent tuner workers never read half of one.
    """
    if device != "cpu":
        raise PlanError(f"machine_rates(device={device!r}): only 'cpu' is calibrated; "
                        "pass MachineRates(...) measured on that device instead.")
    path = cache_path(device, cache_dir=cache_dir)
    if not refresh:
        try:
            return MachineRates(**json.loads(path.read_text())["rates"])
        except (OSError, ValueError, KeyError, TypeError, PlanError):
            pass  # absent, from another version, or damaged: measure again
    rates = measure_rates()
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"key": {"cpu": cpu_model(), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "device": device},
              "rates": asdict(rates)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)
    return rates


def _best_seconds(fn: Callable[[], Any], *, reps: int, budget_s: float,
                  before: Callable[[], Any] | None = None) -> float:
    """The fastest of up to ``reps`` calls of ``fn`` (after one warm-up), stopping early
    once ``budget_s`` is spent; see Note: [timing a busy machine]. ``before`` runs
    untimed ahead of each timed call."""
    fn()
    threads = torch.get_num_threads()
    times: list[float] = []
    spent = 0.0
    while len(times) < reps and spent < budget_s:
        if before is not None:
            before()
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        took = time.perf_counter() - start
        times.append(_call_seconds(took, time.process_time() - cpu, threads))
        spent += took
    return min(times)


def _bandwidth(trials: int = 5) -> float:
    """Bytes per second of an out-of-place add of two 16 MiB fp32 tensors, read plus
    written: the median over ``trials`` fresh sets of tensors of each set's fastest call.
    Where a set's pages land moves its speed by a third (25 to 41 GB/s here, in one
    process or another), a luck the fastest call of one set keeps and the median drops."""
    rates = []
    for _ in range(trials):
        x, y = torch.randn(1 << 22), torch.randn(1 << 22)
        out = torch.empty_like(x)
        seconds = _best_seconds(functools.partial(torch.add, x, y, out=out), reps=5,
                                budget_s=0.1)
        rates.append(3 * x.nbytes / seconds)
    return statistics.median(rates)


def _call_seconds(wall: float, cpu: float, threads: int) -> float:
    """One call's seconds: Note: [timing a busy machine]."""
    return min(wall, cpu) if threads == 1 else wall


def measure_rates() -> MachineRates:
    """Measure the three rates on the CPU now (no cache); see Note: [machine rates]."""
    with torch.no_grad():
        bandwidth = _bandwidth()
        x = torch.randn(1 << 22)
        seconds = _best_seconds(functools.partial(x.bernoulli_, 0.9), reps=5, budget_s=0.2)
        random = x.numel() / seconds
    # Low-precision matmuls differ by CPU (bf16 units; fp16 often without a fast path).
    curves: dict[str, dict[tuple[str, int], float]] = {"": {}, "bf16": {}, "fp16": {}}
    for width in (64, 128, 512):
        for dtype, name in ((torch.float32, ""), (torch.bfloat16, "bf16")):
            _matmul_rate(dtype, width, curves[name])
    fp32, bf16 = (_matmul_rate(dtype, 256, curves[name])
                  for dtype, name in ((torch.float32, ""), (torch.bfloat16, "bf16")))
    _matmul_rate(torch.float16, 32, curves["fp16"])
    fp16 = _matmul_rate(torch.float16, 64, curves["fp16"])
    for width, images in ((16, (4, 16)), (64, (4, 16)), (32, (16, 32))):
        for dtype, name in ((torch.float32, ""), (torch.bfloat16, "bf16")):
            _matmul_rate(dtype, width, curves[name], conv=True, images=images)
    _matmul_rate(torch.float16, 8, curves["fp16"], conv=True)
    for dtype, name, shapes in ((torch.float32, "", _ATTENTION_SHAPES),
                                (torch.bfloat16, "bf16", _ATTENTION_SHAPES),
                                (torch.float16, "fp16", _ATTENTION_SHAPES[:2])):
        for seq, dim in shapes:
            _timed(_attention_step(dtype, seq, dim), curves[name])
    curve = tuple((rate_kind(family, name), float(f), r)
                  for name, points in curves.items()
                  for (family, f), r in sorted(points.items()))
    overhead = _op_overhead()
    return MachineRates(matmul_flops_per_s=fp32,
                        memory_bytes_per_s=bandwidth, op_overhead_s=overhead,
                        bf16_flops_per_s=bf16, fp16_flops_per_s=fp16,
                        random_numbers_per_s=random, matmul_curve=curve,
                        checkpoint_call_s=_checkpoint_call(overhead),
                        elementwise=_elementwise_rates(overhead),
                        optimizers=_optimizer_rates())


# Note: [the optimizer step's price]
# Pricing the optimizer step by the bytes its kernels move (28 per element for AdamW) left
# out what the step costs around them: autoscale.optim's step() gathers each group's
# tensors, checks them and hands them to the kernel dispatcher, some microseconds per
# parameter tensor. Timed here on the example models (step() alone, gradients in place),
# AdamW's step took 0.74 ms on the CNN (28 tensors, 75 K elements) where its bytes said
# 0.14, and 1.5 ms on HF ViT where they said 0.96. It also put 8-bit AdamW below SGD with
# momentum on every model (its codes are 1 byte), where its step ran 10-20% slower. So each
# optimizer's ``step()`` is timed as a job calls it, over one mix of many small tensors and
# one of a few large ones (``_OPTIMIZER_MIXES``, each choosing its kernel path as a job's
# first step does), and the two timings give a cost per tensor and per element; a model's
# step is priced at its tensor count and elements. The kernel paths chosen here are
# forgotten afterwards (``isolated_choices``): the job in this process chooses its own.
_OPTIMIZER_MIXES = ((64, 256), (16, 1 << 16))
"""(tensors, elements each) of the two timed parameter mixes."""


def optimizer_key(kind: str, kernel: str, kwargs: Any) -> str | None:
    """The ``MachineRates.optimizers`` key of an optimizer plan's (kind, kernel, kwargs):
    its kind, "sgd-plain" for SGD without momentum; None for a kernel other than the
    default one of its kind ('auto'; 'torch' for 'adam'), which is not measured."""
    if kernel != ("torch" if kind == "adam" else "auto"):
        return None
    if kind == "sgd" and not dict(kwargs or {}).get("momentum"):
        return "sgd-plain"
    return kind


def _cold_seconds(fn: Callable[[], Any], grads: list[torch.Tensor], *, reps: int,
                  budget_s: float) -> float:
    """``_best_seconds`` of ``fn`` called as a job's optimizer step runs, after its
    backward: before each call (untimed) 64 MiB are read and written, then ``grads``, which
    backward leaves in the caches."""
    flush = torch.zeros(1 << 24)

    def evict() -> None:
        flush.add_(1.0)
        torch._foreach_mul_(grads, 1.0)

    return _best_seconds(fn, reps=reps, budget_s=budget_s, before=evict)


def _optimizer_calibration() -> dict[str, tuple[str, dict[str, Any]]]:
    """Key -> (kind, kwargs) of each optimizer whose step is timed."""
    return {"adamw": ("adamw", {}), "adam": ("adam", {}), "sgd": ("sgd", {"momentum": 0.9}),
            "sgd-plain": ("sgd", {}), "lamb": ("lamb", {}), "lars": ("lars", {}),
            "adamw8bit": ("adamw8bit", {})}


def _optimizer_rates() -> tuple[tuple[str, float, float], ...]:
    from autoscale.kernels._dispatch import isolated_choices
    from autoscale.runtime._optimizers import build_optimizer, optimizer_plan

    out = []
    (n_small, small), (n_large, large) = _OPTIMIZER_MIXES
    for key, (kind, kwargs) in _optimizer_calibration().items():
        plan = optimizer_plan(kind, kwargs)
        assert optimizer_key(plan.kind, plan.kernel, plan.kwargs) == key
        times = []
        for count, size in _OPTIMIZER_MIXES:
            params = [nn.Parameter(torch.randn(size)) for _ in range(count)]
            grads = [torch.randn(size) * 1e-3 for _ in params]
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            with isolated_choices():
                optimizer = build_optimizer(plan, params)
                times.append(_cold_seconds(optimizer.step, grads, reps=7, budget_s=0.15))
        # times[i] = count_i * tensor_s + count_i * size_i * element_s
        per_small, per_large = times[0] / n_small, times[1] / n_large
        element_s = max((per_large - per_small) / (large - small), 1e-12)
        tensor_s = max(per_small - small * element_s, 0.0)
        out.append((key, element_s, tensor_s))
    return tuple(out)


# Note: [ops that compute more than they move]
# A pointwise op with a transcendental function, a softmax or a normalization runs below
# the memory bandwidth on a CPU: measured here at 2 threads on 512 Ki elements, gelu's
# backward 2.5 G elements/s fp32 (12 bytes an element: 30 GB/s, near the bandwidth) but
# softmax 2.6 G/s in bf16 (6 bytes an element, priced 2.5x faster than it ran) and the
# tanh-approximated gelu's backward of the GPT example 6.5 ms where its bytes said 0.6.
# Low precision is where the bytes mislead most: bf16 halves the bytes, while the CPU
# converts every element to fp32 and back, so such ops run no faster than in fp32 (the
# HF ViT bf16 plan measured slower than fp32 and was priced 10% faster). Each op in
# ``ELEMENTWISE_OPS`` is timed on 512 Ki elements in fp32, bf16 and fp16, less the per-op
# overhead (priced apart), and an op of the model is priced at
# ``max(elements / its rate, bytes / memory_bytes_per_s)``, its elements the largest
# tensor it reads or writes. Ops not in the table keep the bandwidth price.
_ROWS, _COLS = 1024, 512


def _elementwise_calls(x: torch.Tensor, g: torch.Tensor, *, cols: int = _COLS
                       ) -> dict[str, Callable[[], Any]]:
    """Each measured op, called on x and g of (1024, 512) (g positive, of x's shape: a
    gradient, a divisor); ``cols``: x's rows are that long instead."""
    aten = torch.ops.aten
    w, b = torch.ones(cols, dtype=x.dtype), torch.zeros(cols, dtype=x.dtype)
    _, mean, rstd = aten.native_layer_norm(x, [cols], w, b, 1e-5)
    return {
        "aten.gelu": lambda: aten.gelu(x),
        "aten.gelu_backward": lambda: aten.gelu_backward(g, x),
        "aten.silu": lambda: aten.silu(x),
        "aten.silu_backward": lambda: aten.silu_backward(g, x),
        "aten.tanh": lambda: aten.tanh(x),
        "aten.tanh_backward": lambda: aten.tanh_backward(g, x),
        "aten.sigmoid": lambda: aten.sigmoid(x),
        "aten.exp": lambda: aten.exp(x),
        "aten.rsqrt": lambda: aten.rsqrt(g),
        "aten.pow": lambda: aten.pow(x, 2),
        "aten.div": lambda: aten.div(x, g),
        "aten.mul": lambda: aten.mul(x, g),
        "aten.add": lambda: aten.add(x, g),
        "aten._softmax": lambda: aten._softmax(x, -1, False),
        "aten._safe_softmax": lambda: aten._safe_softmax(x, -1),
        "aten._softmax_backward_data": lambda: aten._softmax_backward_data(g, x, -1, x.dtype),
        "aten._log_softmax": lambda: aten._log_softmax(x, -1, False),
        "aten._log_softmax_backward_data": lambda: aten._log_softmax_backward_data(
            g, x, -1, x.dtype),
        "aten.native_layer_norm": lambda: aten.native_layer_norm(x, [cols], w, b, 1e-5),
        "aten.native_layer_norm_backward": lambda: aten.native_layer_norm_backward(
            g, x, [cols], mean, rstd, w, b, [True, True, True]),
        "aten.sum": lambda: aten.sum(x, [-1]),
        "aten.mean": lambda: aten.mean(x, [-1]),
    }


ELEMENTWISE_OPS = frozenset({
    "aten.gelu", "aten.gelu_backward", "aten.silu", "aten.silu_backward", "aten.tanh",
    "aten.tanh_backward", "aten.sigmoid", "aten.exp", "aten.rsqrt", "aten.pow", "aten.div",
    "aten.mul", "aten.add", "aten._softmax", "aten._safe_softmax",
    "aten._softmax_backward_data", "aten._log_softmax", "aten._log_softmax_backward_data",
    "aten.native_layer_norm", "aten.native_layer_norm_backward", "aten.sum", "aten.mean"})
"""The aten ops (packet names) whose element rates are measured: the keys of
``_elementwise_calls`` (named here so that importing this module runs no op)."""


# Note: [a softmax's rate goes by its rows]
# A softmax reduces each row (its max, then its sum) before it writes it, so short rows run
# slower per element: ``_safe_softmax`` here at 0.50 G elements/s on rows of 512 and 0.24
# on rows of 64, the rows of HF GPT-2's and BERT's attention at 64 tokens, where its rate
# from rows of 512 priced their softmax at 1.1 ms for 2.4. The softmax family
# (``ROW_OPS``) is also timed on rows of ``SHORT_ROW`` ("<op>@64" in ``elementwise``), and
# an op is priced at the rate for its rows' length, interpolated between the two.
SHORT_ROW = 64
ROW_OPS = frozenset({"aten._softmax", "aten._safe_softmax", "aten._softmax_backward_data",
                     "aten._log_softmax", "aten._log_softmax_backward_data"})
"""The ops whose element rate goes by the length of the rows they reduce."""


def _elementwise_rates(overhead: float) -> tuple[tuple[str, str, float], ...]:
    out = []
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(_ROWS, _COLS).to(dtype)
            g = (torch.rand(_ROWS, _COLS) + 0.5).to(dtype)
            name = str(dtype).removeprefix("torch.")
            try:
                calls = _elementwise_calls(x, g)
            except (RuntimeError, NotImplementedError):  # no layer norm for this dtype
                continue
            assert calls.keys() == ELEMENTWISE_OPS, "name each measured op in ELEMENTWISE_OPS"
            short = _elementwise_calls(x.view(-1, SHORT_ROW), g.view(-1, SHORT_ROW),
                                       cols=SHORT_ROW)
            calls.update({f"{op}@{SHORT_ROW}": short[op] for op in ROW_OPS})
            for op, call in calls.items():
                try:
                    seconds = _best_seconds(call, reps=5, budget_s=0.05)
                except (RuntimeError, NotImplementedError):  # no kernel for this dtype
                    continue
                out.append((op, name, x.numel() / max(seconds - overhead, overhead)))
    return tuple(out)


class _MatmulTimer(TorchDispatchMode):
    """Times the matmuls dispatched under it (Note: [timing a busy machine]), with their
    FLOPs by torch's formulas; other ops run untimed."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self.seconds = 0.0
        self.calls: dict[tuple[str, int], list[float]] = {}
        """(its family: see ``rate_kind``, FLOPs of a call) -> [FLOPs, seconds] of every
        call of that size: a Linear's three matmuls (forward, the input's and the weight's
        gradients) have its FLOPs each and are read as one rate, their layouts' mix
        (Note: [a matmul's rate is its layouts' mix])."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet not in _MATMULS and packet not in CONVOLUTIONS and packet not in _ATTENTION:
            return func(*args, **kwargs)
        start, cpu = time.perf_counter(), time.process_time()
        out = func(*args, **kwargs)
        seconds = _call_seconds(time.perf_counter() - start, time.process_time() - cpu,
                                torch.get_num_threads())
        flops, family = kernel_flops(func, args, kwargs, out)
        self.seconds += seconds
        self.flops += flops
        key = (family, flops // attention_slices(func, args))
        total = self.calls.setdefault(key, [0.0, 0.0])
        total[0] += flops
        total[1] += seconds
        return out


_MATMULS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm,
            torch.ops.aten.baddbmm}
#: Convolutions run at rates of their own (mkldnn's), kept apart on the curve.
CONVOLUTIONS = {torch.ops.aten.convolution, torch.ops.aten.convolution_backward}


def _attention_ops() -> dict[Any, tuple[str, Callable[..., int]]]:
    # The CPU's fused attention kernels are not in torch's FLOP registry (only the CUDA
    # ones are), so their FLOPs come from the same formulas by hand: the batched matmuls
    # the kernel runs (causal or not: this kernel computes every block either way).
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_: Any,
                **__: Any) -> int:
        return int(sdpa_flop_count(q.shape, k.shape, v.shape))

    def backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 *_: Any, **__: Any) -> int:
        return int(sdpa_backward_flop_count(grad.shape, q.shape, k.shape, v.shape))

    ops: dict[Any, tuple[str, Callable[..., int]]] = {}
    for name, entry in (("_scaled_dot_product_flash_attention_for_cpu", ("attn", forward)),
                        ("_scaled_dot_product_flash_attention_for_cpu_backward",
                         ("attn-bwd", backward))):
        if hasattr(torch.ops.aten, name):  # absent from older torch builds
            ops[getattr(torch.ops.aten, name)] = entry
    return ops


#: Fused attention runs at rates of its own, far from a matmul's of the same FLOPs (bf16
#: backward here: ~6 GFLOP/s at 64 tokens and 32 channels a head, bf16 matmuls ~200), and
#: its backward at others than its forward; each kept apart on the curve.
_ATTENTION = _attention_ops()


def attention_slices(func: Any, args: Any) -> int:
    """How many (sequence, head) slices one fused attention call runs, 1 for any other op.

    Note: [attention's rate goes by its slice]
    A fused attention kernel's rate depends on the work of one (sequence, head) slice, its
    tokens and channels, not on how many slices a call runs: bf16 attention forward and
    backward here, 65 tokens of 32 channels, ran at 7.6 GFLOP/s in 8 sequences of 4 heads
    as in 4 of 4, and at 34 GFLOP/s at 256 tokens. Looked up on a curve by the call's FLOPs
    (as a matmul is), HF ViT's 8 sequences were priced at the rate of the calibration's
    4 at 92 tokens, 1.5x what they ran at (its bf16 plan was priced 16% fast). So the
    attention points of ``matmul_curve`` are FLOPs per slice, and a call is looked up at
    its FLOPs over its slices."""
    if func._overloadpacket not in _ATTENTION:
        return 1
    query = args[1] if _ATTENTION[func._overloadpacket][0] == "attn-bwd" else args[0]
    return max(math.prod(query.shape[:-2]), 1)


def kernel_flops(func: Any, args: Any, kwargs: Any, out: Any) -> tuple[int, str]:
    """(FLOPs, family: see ``rate_kind``) of one call of an aten op; (0, "") where torch
    has no formula for it."""
    packet = func._overloadpacket
    if packet in _ATTENTION:
        family, formula = _ATTENTION[packet]
        return formula(*args, **kwargs), family
    counted = flop_registry.get(packet)
    if counted is None:
        return 0, ""
    return int(counted(*args, **kwargs, out_val=out)), "conv" if packet in CONVOLUTIONS else ""


def _matmul_rate(dtype: torch.dtype, width: int,
                 curve: dict[tuple[str, int], float] | None = None, *,
                 conv: bool = False, images: tuple[int, int] = (4, 16)) -> float:
    """FLOPs per second of the matmuls of a small training step (Linear layers and an
    attention-shaped batched matmul, forward and backward, under autocast for bf16/fp16):
    the layouts and casts a model's step runs them with, which standalone GEMMs of the same
    size can beat several times over (bf16 batched matmuls and the backward's transposed
    operands, on CPUs with bf16 units). Each size's rate (its calls' FLOPs over their
    seconds: Note: [a matmul's rate is its layouts' mix]) goes into ``curve``. With
    ``conv``: two 3x3 convolutions of ``width`` channels instead, on ``images`` (how
    many, their side)."""
    torch.manual_seed(0)
    if conv:
        return _timed(_conv_step(dtype, width, *images), curve)
    rows = 2 * width
    up, down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
    x = torch.randn(rows, width)

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            h = up(x).view(16, rows // 16, 2 * width)  # (heads, T, C)
            scores = h @ h.transpose(1, 2)  # (heads, T, T)
            y = down((scores @ h).view(rows, 2 * width))
        y.float().square().mean().backward()

    return _timed(step, curve)


# Note: [a convolution's rate falls past the caches]
# A matmul's rate rises with its size; a convolution's rises, then falls once its images
# leave the caches: 3x3 convolutions of 32 channels on 32x32 images, forward and backward,
# ran at 94 GFLOP/s on 8 images and 76 on 32, where a curve from 4 images of 16x16 (16 and
# 64 channels) priced both at 95, its highest point. The example CNN then measured faster
# in 4 micro-batches of 8 than in one batch of 32, and was priced 1% slower (the extra
# ops' overhead and nothing to gain). So the curve has a third point past the caches: 16
# images of 32x32 at 32 channels.
def _conv_step(dtype: torch.dtype, width: int, count: int = 4, side: int = 16
               ) -> Callable[[], None]:
    convs = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(width, width, 3, padding=1))
    x = torch.randn(count, width, side, side)

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            y = convs(x)
        y.float().square().mean().backward()

    return step


#: (tokens, channels a head) of the calibration's attention: from a small model's to a
#: long context's, where the kernel nears its matmul rate (fp16: the first two; its
#: backward runs at ~7 GFLOP/s, and the longest alone would take a second).
_ATTENTION_SHAPES = ((32, 32), (64, 32), (128, 32), (256, 64))


def _attention_step(dtype: torch.dtype, seq: int, dim: int) -> Callable[[], None]:
    """Self-attention over 4 sequences of 4 heads, forward and backward, on q, k and v
    laid out as a model's projections leave them (heads a transposed view)."""
    batch, heads = 4, 4
    qkv = torch.randn(batch, seq, 3 * heads * dim, dtype=dtype, requires_grad=True)

    def step() -> None:
        q, k, v = (t.view(batch, seq, heads, dim).transpose(1, 2)
                   for t in qkv.chunk(3, dim=-1))
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.float().square().mean().backward()

    return step


def _timed(step: Callable[[], None], curve: dict[tuple[str, int], float] | None) -> float:
    step()
    best = 0.0
    for _ in range(3):
        with _MatmulTimer() as timer:
            step()
        best = max(best, timer.flops / timer.seconds)
        for key, (flops, seconds) in timer.calls.items():
            if curve is not None and seconds > 0:
                curve[key] = max(curve.get(key, 0.0), flops / seconds)
    return best


# Note: [a matmul's rate is its layouts' mix]
# A training step's matmuls come in three layouts per Linear: forward multiplies by the
# transposed weight, the input's gradient by the weight as stored, the weight's gradient by
# the transposed input. With a fast GEMM they run alike; without one they do not: fp16 on
# this CPU (no fp16 GEMM) ran 10.6-18.8 GFLOP/s forward, 6.8 for the weight's gradient and
# 2.4-4.3 for the input's, and the GPT example's fp16 step took 966 ms where it was priced
# at 517, its matmuls at their forward's rate: the curve kept the fastest call of each
# size. The three have the same FLOPs, so each size's point is now the calibration run's
# FLOPs over its seconds for all calls of that size, the mix a model's Linears run.


def _checkpoint_call(op_overhead_s: float) -> float:
    """Seconds a checkpointed block call adds beyond the ops it recomputes: 16 tiny blocks
    (two 8x8 Linear layers, GELU, dropout) trained checkpointed and not, the difference
    less the extra ops (counted) at ``op_overhead_s``, per block."""
    from torch.utils.checkpoint import checkpoint

    from autoscale.cost._time import OpCounter

    torch.manual_seed(0)
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8),
                                         nn.Dropout(0.1)) for _ in range(16))
    x = torch.randn(2, 8, requires_grad=True)

    def step(checkpointed: bool) -> None:
        y = x
        for block in blocks:
            y = checkpoint(block, y, use_reentrant=False) if checkpointed else block(y)
        y.sum().backward()

    ops = []
    for mode in (False, True):
        with OpCounter() as counter:
            step(mode)
        ops.append(counter.op_count)
    plain, wrapped = (_best_seconds(functools.partial(step, mode), reps=10, budget_s=0.3)
                      for mode in (False, True))
    extra = wrapped - plain - (ops[1] - ops[0]) * op_overhead_s
    return max(extra / len(blocks), 0.0)


def _op_overhead() -> float:
    from autoscale.cost._time import OpCounter

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(8)])
    x = torch.randn(2, 8)

    def step() -> None:
        model(x).square().mean().backward()

    with OpCounter() as counter:
        step()
    ops = counter.op_count
    seconds = _best_seconds(step, reps=30, budget_s=0.4)
    return seconds / ops
