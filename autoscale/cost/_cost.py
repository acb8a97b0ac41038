"""The cost model: memory and step time of a plan, estimated without running it.

Note: [how the estimate is built]
Static memory (parameters, buffers, gradients, optimizer state) is counted exactly
from the model. Activation memory comes from the captured graph's FakeTensor metadata:
the bytes each block produces in forward for the example batch, scaled by the
micro-batch's share of the batch; then each pass of the pipeline applies its own effect
(passes/base.py, ``Pass.memory``): a checkpointed block keeps only its input plus, while
one block is recomputed in backward, that block's activations; autocast shrinks
activations and caches low-precision weights. The graph counts every
tensor forward produces, an over-estimate of what autograd saves, so the tuner
calibrates the activation term by one real measurement (``calibrate``) and compares
estimates with a margin: the estimate only prunes, the measurement decides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from autoscale.capture import ModelGraph
from autoscale.passes import PIPELINE, MemoryTerms
from autoscale.plan import Plan

__all__ = [
    "Calibration", "MemoryEstimate", "calibrate", "estimate", "estimate_graph",
    "simulated_estimate", "static_bytes",
]

# Bytes of optimizer state per fp32 byte of trainable parameter; 8-bit AdamW keeps two
# 1-byte codes plus an fp32 scale per 256-element block (2.03 B/param, bench_adamw8bit).
_STATE_FACTOR = {"adamw": 2.0, "adam": 2.0, "lamb": 2.0, "lars": 1.0, "adamw8bit": 0.51}


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of one training step (per rank), by category, and its time.

    ``method`` says how: "simulated" (the planned step run on fake tensors: Note: [the
    estimate is a simulated step]), where ``peak_bytes`` is the simulated high-water mark
    and ``phase`` where it falls; or "graph" (a sum over the captured graph's tensors,
    the tuner's fallback), where the total is the sum of the categories.
    """

    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    """Saved for backward by one micro-batch's forward."""
    temporaries: int
    """The transient high-water mark above what is held (inside forward, backward or the
    optimizer step), FSDP2's all-gather buffers included."""
    step_time_s: float | None = None
    batch: int = 0
    comm_buffers: int = 0
    """Sharding's communication buffers (FSDP2 all-gather/reduce-scatter, DDP buckets)."""
    residuals: int = 0
    """Error-feedback residuals of gradient compression."""
    peak_bytes: int | None = None
    phase: str | None = None
    method: str = "graph"

    @property
    def total(self) -> int:
        """The predicted peak."""
        if self.peak_bytes is not None:
            return self.peak_bytes
        return (self.parameters + self.gradients + self.optimizer_state + self.activations
                + self.temporaries)


@dataclass(frozen=True)
class Calibration:
    """Ratios that map graph-derived estimates onto measurements on this machine."""

    activation_scale: float = 1.0
    """measured (peak - static) / estimated (activations + temporaries)."""
    flops_per_s: float | None = None
    """Achieved training FLOP rate of the baseline (3x forward FLOPs per sample / time)."""


def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    return list(seen.values())


def static_bytes(model: nn.Module, plan: Plan) -> tuple[int, int, int]:
    """(parameters + buffers, gradients, optimizer state) in bytes; exact for fp32 state."""
    params = _unique_params(model)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    param_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    kind = plan.optimizer.kind
    if kind == "sgd":
        momentum = plan.optimizer.kwargs.get("momentum", 0) or 0
        factor = 1.0 if momentum else 0.0
    else:
        factor = _STATE_FACTOR[kind]
    return param_bytes, trainable, int(trainable * factor)


def estimate(model: nn.Module, example_inputs: Any, plan: Plan | None = None, *,
             graph: Any = None, loss_fn: Any = None) -> MemoryEstimate:
    """Estimate ``plan``'s peak memory per device for one training step of ``model`` on
    ``example_inputs`` (the global batch), by category, with the phase of the peak.

    The planned step is simulated on fake tensors (no real compute, no allocation): see
    Note: [the estimate is a simulated step]. ``model`` is only read. Raises PlanError
    when the plan was made for another model or the model cannot be simulated.
    """
    from autoscale.capture._capture import capture
    from autoscale.runtime._batch import check_batch

    plan = plan or Plan()
    batch = check_batch(example_inputs)
    if graph is None:
        graph = capture(model, batch)
    _check_fingerprint(model, graph, plan)
    return simulated_estimate(model, batch, plan, graph=graph, loss_fn=loss_fn)


def _check_fingerprint(model: nn.Module, graph: Any, plan: Plan) -> None:
    if plan.fingerprint is None:
        return
    from autoscale.errors import PlanError
    from autoscale.plan import Fingerprint

    here = Fingerprint.of(model, graph.structure_hash())
    if diff := plan.fingerprint.differences(here):
        raise PlanError(f"the plan was made for another model ({', '.join(diff)} differ); "
                        "estimate it for the model it was tuned on, or tune this one.")


def simulated_estimate(model: nn.Module, batch: Any, plan: Plan, *, graph: Any,
                       loss_fn: Any = None) -> MemoryEstimate:
    """The simulated step's figures, with what sharding and compression change per rank
    taken from those passes' own reports (the plan against its unsharded twin)."""
    from autoscale.cost._simulate import simulate_step

    sim = simulate_step(model, batch, plan, loss_fn=loss_fn, graph=graph)
    low = plan.precision.mode != "fp32" and plan.shard.uses_fsdp
    est = MemoryEstimate(parameters=sim.parameters, gradients=sim.gradients,
                         optimizer_state=sim.optimizer_state, activations=sim.activations,
                         temporaries=sim.temporaries, batch=sim.batch,
                         peak_bytes=sim.peak, phase=sim.phase, method="simulated")
    if plan.shard.strategy == "none":
        return est
    if sim.compressed:
        return replace(est, residuals=sim.residuals)
    if sim.sharded:
        return _compressed(est, model, graph, plan, codec_working=sim.codec_working)
    return _sharded(est, model, graph, plan, weight_copies=sim.weight_copies if low else 0)


def _compressed(est: MemoryEstimate, model: nn.Module, graph: Any, plan: Plan, *,
                codec_working: bool = False) -> MemoryEstimate:
    """``est`` (one rank's step with its FSDP2 units simulated: Note: [simulating FSDP2])
    with the compress pass's residual, held through the whole step, and its working copy:
    with ``codec_working`` already in the simulated peak at each reduce-scatter (Note: [a
    compressed reduce-scatter's working memory] in autoscale/cost/_simulate.py), else
    added to the whole step as the pass reports it (passes/compress.py)."""
    residual, working = _compression_terms(model, graph, plan)
    if codec_working:  # already in the simulated peak, where it happens
        return replace(est, residuals=residual, peak_bytes=est.total + residual)
    return replace(est, temporaries=est.temporaries + working, residuals=residual,
                   peak_bytes=est.total + residual + working)


def _compression_terms(model: nn.Module, graph: Any, plan: Plan) -> tuple[int, int]:
    """(error-feedback residual, codec working copy) bytes the compress pass reports for
    ``plan``: its graph estimate against the same plan uncompressed."""
    from autoscale.plan import CompressPlan

    whole = estimate_graph(model, graph, plan)
    exact = estimate_graph(model, graph, plan.replace(compress=CompressPlan()))
    return whole.gradients - exact.gradients, whole.temporaries - exact.temporaries


def _sharded(est: MemoryEstimate, model: nn.Module, graph: Any, plan: Plan, *,
             weight_copies: int = 0) -> MemoryEstimate:
    """``est`` (one rank's step, unsharded) with the shard and compress passes' deltas:
    parameters, gradients and state divided, FSDP2's unsharded units and buffers, the
    compression residual and working copy (passes/shard.py, passes/compress.py).

    Under FSDP2 with bf16/fp16 (``weight_copies`` > 0: what the local simulation's
    autocast copied) the all-gathered parameters are low precision, half the bytes the
    shard pass counts for fp32, and autocast copies nothing: both are taken off. Measured
    on the GPT example at 2 ranks (tune trials): zero3 bf16 +23% -> -2.4%; zero2 bf16
    +39% -> -0.7% with the note below."""
    from autoscale.plan import BatchPlan, CompressPlan, ShardPlan

    share = max(graph.batch_size // plan.shard.world_size, 1)
    micro = plan.batch.micro_batch_size or share
    local = plan.replace(shard=ShardPlan(), compress=CompressPlan(),
                         batch=BatchPlan(micro_batch_size=micro,
                                         grad_accum_steps=plan.batch.grad_accum_steps))
    exact = estimate_graph(model, graph, plan.replace(compress=CompressPlan()))
    alone = estimate_graph(model, graph, local)
    d_params = exact.parameters - alone.parameters
    if weight_copies:
        unsharded = exact.parameters - alone.parameters // plan.shard.world_size
        d_params -= unsharded // 2 + weight_copies
    d_grads = exact.gradients - alone.gradients
    d_state = exact.optimizer_state - alone.optimizer_state
    comm = exact.temporaries - alone.temporaries
    # zero2's peak is where backward starts: the whole unsharded model and every saved
    # activation live, no reduce-scatter begun, so its buffers are not on top (measured at
    # 2 ranks: 13.85 vs 13.84 MiB fp32, 11.5 vs 11.58 bf16); zero3's falls mid-backward,
    # with two units in flight.
    if plan.shard.strategy == "zero2":
        comm = 0
    residual, working = _compression_terms(model, graph, plan)
    hook_peak = 0
    if plan.shard.uses_ddp and plan.compress.method in (*_PROBED_CODECS, "powersgd"):
        # Note: [a DDP comm hook's peak]
        working = 0
        hook_working = (_powersgd_hook_working(model, plan)
                        if plan.compress.method == "powersgd"
                        else _ddp_hook_working(model, plan))
        hook_peak = (est.parameters + d_params + est.optimizer_state + d_state + est.batch
                     + est.gradients + d_grads + residual + hook_working)
    # Held through the whole step, so they move the peak wherever it falls; the sharded
    # gradients too (the backward peak holds all but the last unit's).
    moved = d_params + d_state + d_grads + comm + residual + working
    return replace(est, parameters=est.parameters + d_params,
                   gradients=est.gradients + d_grads,
                   optimizer_state=est.optimizer_state + d_state,
                   temporaries=est.temporaries + working, comm_buffers=comm,
                   residuals=residual, peak_bytes=max(est.total + moved, hook_peak))


# Note: [a DDP comm hook's peak]
# A compressing DDP comm hook (int8 and top-k: passes/compress.py's codecs) works on
# one bucket at a time at the end of backward, when every gradient bucket and the residuals
# are live and the activations are all but freed: its peak is that, plus what the codec
# allocates on the largest bucket (its fp32 sum with the residual, codes, the gathered rows
# of every rank, the decoded sum), against the forward's peak with the residuals on top.
# What the codec allocates is probed: the codec run once for real on zeros of the largest
# bucket's size (the kernel dispatcher's path and its temporaries included), cached per
# size. Measured at 2 ranks, mlp example, ddp int8: a "largest block" guess was 24% under
# (an 8 MiB bucket's codec holds about twice its size). The 16-bit casts are probed alike
# (the hook's fp32 bucket / world_size, then its 16-bit copy: 1.5x the bucket; the guess
# read the mlp's ddp bf16 17% under). torch's PowerSGD hook, measured once it compresses
# (passes/compress.py's warmup_steps), holds two copies of its bucket beside the old error
# tensor: the gradient with the error added (kept to take the new error from) and the new
# error itself, made before the old one is dropped (_powersgd_hook_working).
# Since the decode runs on the backward's thread (Note: [decode on the autograd thread] in
# passes/compress.py) the measurement sees it: the mlp's ddp int8 step measures 74.51 MB
# against this estimate's 74.44 (-0.09%). The hook's residual is counted once: in the
# measured (second) step the hook replaces it after DDP's bucket rebuild, and the old one is
# freed there (Note: [the tracker does not keep its roots alive] in
# autoscale/measure/_memory.py).
_PROBED_CODECS = frozenset({"int8", "topk", "bf16", "fp16"})
_HOOK_WORKING_CACHE: dict[tuple[Any, ...], int] = {}


def _ddp_hook_working(model: nn.Module, plan: Plan) -> int:
    """Bytes the compress pass's codec allocates on the largest DDP bucket of ``model``
    under ``plan``: every trainable parameter's elements. DDP (torch 2.13, without
    ``find_unused_parameters``) puts every parameter in one bucket for the first step and
    rebuilds its buckets after it (at ``bucket_cap_mb``, measured: the mlp example's 8.49
    MB stayed one bucket); the first step's hook is the largest a job runs."""
    params = [p for p in _unique_params(model) if p.requires_grad]
    if not params:
        return 0
    return _codec_working(plan, sum(p.numel() for p in params))


def _powersgd_hook_working(model: nn.Module, plan: Plan) -> int:
    """Bytes torch's PowerSGD DDP hook allocates on the largest bucket: its copy of the
    bucket with the error added and the new error (2x the bucket, fp32), and the
    concatenated tensors it sends whole (the 1-D ones: biases, norms). The buckets are
    DDP's rebuilt ones (PowerSGD starts after the rebuild): parameters in reverse order,
    a bucket closed once it reaches ``bucket_cap_mb`` MiB."""
    params = [p for p in _unique_params(model) if p.requires_grad]
    cap = plan.shard.bucket_cap_mb * 1024 * 1024
    largest = size = whole = largest_whole = 0
    for p in reversed(params):
        size += p.numel() * 4
        whole += p.numel() * 4 if p.dim() <= 1 else 0
        if size >= cap:
            largest, largest_whole = max(largest, size), max(largest_whole, whole)
            size = whole = 0
    largest, largest_whole = max(largest, size), max(largest_whole, whole)
    return 2 * largest + largest_whole


def _probe(key: tuple[Any, ...], run: Callable[[], None], roots: tuple[Any, ...]) -> int:
    """Bytes ``run`` allocates beyond ``roots`` at its peak, cached by ``key``: run once
    untracked first (the kernel dispatcher times its paths on first use, which is not the
    codec's memory), then under the allocator's trace where the profiler is free, else
    the dispatch ledger."""
    from autoscale.measure._allocator import AllocatorPeakTracker, profiler_is_free
    from autoscale.measure._memory import PeakMemoryTracker

    if key in _HOOK_WORKING_CACHE:
        return _HOOK_WORKING_CACHE[key]
    run()
    tracker = (AllocatorPeakTracker if profiler_is_free() else PeakMemoryTracker)(
        roots=roots, device="cpu")
    with tracker:
        run()
    _HOOK_WORKING_CACHE[key] = extra = tracker.peak_bytes - tracker.baseline_bytes
    return extra


def _codec_working(plan: Plan, n: int) -> int:
    from autoscale.passes.compress import _Cast, _codec

    c = plan.compress
    key = (c.method, c.int8_block, c.topk_ratio, c.keeps_residual, n, plan.shard.world_size)
    if key in _HOOK_WORKING_CACHE:
        return _HOOK_WORKING_CACHE[key]
    codec, world = _codec(c), plan.shard.world_size
    bucket = torch.zeros(n)
    residual = torch.zeros(n) if c.keeps_residual else None

    def hook() -> None:
        if isinstance(codec, _Cast):  # _DDPCompressor.cast: all-reduces the copy in place
            codec.encode(bucket.div(world), None)
            return
        packed = codec.encode(bucket, residual)
        gathered = packed.repeat(world)  # every rank's packing, as the hook gathers them
        codec.decode_sum(gathered.view(world, -1), n)

    return _probe(key, hook, (bucket, residual))


def reduce_scatter_working(plan: Plan, n: int) -> int:
    """Bytes the compress pass's int8 or top-k FSDP2 reduce-scatter allocates beyond its
    input, output and residual on a (world_size, ``n``) input under ``plan``: the packed
    rows, the rows all_to_all_single returns, the decode (passes/compress.py,
    ``_CompressedReduceScatter``), probed on real zeros and cached per size. Where a torch
    profiler already runs in this process (the user's), 0: nothing is probed."""
    from torch.utils._python_dispatch import _disable_current_modes

    from autoscale.measure._allocator import profiler_is_free
    from autoscale.passes.compress import _codec

    c, world = plan.compress, plan.shard.world_size
    key = ("reduce_scatter", c.method, c.int8_block, c.topk_ratio, c.keeps_residual, n,
           world)
    if key in _HOOK_WORKING_CACHE:
        return _HOOK_WORKING_CACHE[key]
    with _disable_current_modes():  # called from inside the fake step
        if not profiler_is_free():
            return 0
        codec = _codec(c)
        rows, out = torch.zeros(world, n), torch.zeros(n)
        residual = torch.zeros(world, n) if c.keeps_residual else None

        def reduce_scatter() -> None:
            packed = torch.stack([codec.encode(rows[j], None if residual is None
                                               else residual[j]) for j in range(world)])
            received = packed.clone()  # all_to_all_single's output: valid codes to decode
            out.copy_(codec.decode_sum(received, n))

        return _probe(key, reduce_scatter, (rows, out, residual))


def estimate_graph(model: nn.Module, graph: Any, plan: Plan, *,
                   calibration: Calibration | None = None) -> MemoryEstimate:
    """Estimate ``plan``'s peak step memory and time for ``model`` captured as ``graph``.

    Invariant: monotone in the knobs that save memory: more checkpointed blocks, a smaller
    micro-batch or a lower precision never raise the activation estimate.
    """
    calibration = calibration or Calibration()
    params, grads, state = static_bytes(model, plan)
    batch = max(graph.batch_size, 1)
    # The graph holds the global batch; each of a distributed plan's ranks trains on its
    # share of it, in micro-batches of that share.
    share = max(batch // plan.shard.world_size, 1) if plan.shard.strategy != "none" else batch
    micro = plan.batch.micro_batch_size or share
    scale = min(micro, share) / batch * calibration.activation_scale
    saved = {b.fqn: b.activation_bytes for b in graph.blocks}
    terms = MemoryTerms(
        parameters=params, gradients=grads, optimizer_state=state, saved=saved,
        outside=max(graph.activation_bytes - sum(saved.values()), 0),
        activation_factor=scale, temporaries=int(_largest_node_bytes(graph) * scale))
    for rewrite in PIPELINE:  # each pass reports its own effect: passes/base.py
        terms = rewrite.memory(plan.sections[rewrite.section], graph, terms)
    return MemoryEstimate(terms.parameters, terms.gradients, terms.optimizer_state,
                          terms.activations, terms.temporaries,
                          step_time_s=_step_time(graph, plan, calibration))


def _largest_node_bytes(graph: object) -> int:
    nodes = getattr(graph, "nodes", {}) or {}
    return max((getattr(m, "bytes", 0) or 0 for m in nodes.values()), default=0)


def _step_time(graph: ModelGraph, plan: Plan, calibration: Calibration) -> float | None:
    if not calibration.flops_per_s:
        return None
    checkpointed = set(plan.checkpoint.names)
    recompute = sum(b.flops for b in graph.blocks if b.fqn in checkpointed)
    flops = 3 * graph.flops + recompute  # forward + backward (2x) + recomputed forwards
    if plan.shard.strategy != "none":  # each rank computes on its share of the batch
        flops /= plan.shard.world_size
    return flops / calibration.flops_per_s


def calibrate(model: nn.Module, graph: ModelGraph, plan: Plan, *, peak_bytes: int,
              step_time_s: float) -> Calibration:
    """Fit the activation scale and FLOP rate to one measured plan."""
    raw = estimate_graph(model, graph, plan)
    static = raw.parameters + raw.gradients + raw.optimizer_state
    dynamic = raw.activations + raw.temporaries
    scale = max(peak_bytes - static, 0) / dynamic if dynamic else 1.0
    ranks = plan.shard.world_size if plan.shard.strategy != "none" else 1
    rate = 3 * graph.flops / ranks / step_time_s if step_time_s > 0 and graph.flops else None
    return replace(Calibration(), activation_scale=max(scale, 0.05), flops_per_s=rate)
