"""Step time of a plan, estimated from the simulated step's ops and this machine's rates.

Note: [the step-time estimate prices the simulated step]
The step whose memory autoscale/cost/_simulate.py estimates (Note: [the estimate is a
simulated step]) is run again on fake tensors, under a dispatch mode (``OpCounter``) that
sees every aten op the real step would run, in the same order: the plan's micro-batches,
autocast's casts, the checkpoint wrappers' recomputation inside backward, the loss. Each
op is priced as

    max(flops / matmul_flops_per_s, bytes / memory_bytes_per_s) + op_overhead_s

(a roofline plus a fixed cost per op), its FLOPs from torch's own formulas
(``torch.utils.flop_counter``'s registry, the ones FlopCounterMode uses; the CPU's fused
attention kernels, which that registry lacks, by its attention formulas) and its bytes the
sizes of the tensors it reads and writes (a view moves none); an op that draws random
numbers (dropout's masks) is priced by the numbers drawn. The FLOP rate is that of the
op's kind (matmul, convolution, attention forward or backward), precision and size. The
rates are this machine's (autoscale/cost/_rates.py, Note: [machine rates]). On a CPU a
small model is overhead-bound: the per-op term, not the FLOPs, is most of its step, and it
is what makes micro-batching cost time.

What the fake step does not run is added from counts:
- Each checkpointed block call's own cost beyond its recomputed ops (blocks times
  micro-batches, at ``checkpoint_call_s``: Note: [machine rates]).
- The optimizer step (its CPU kernels need real pointers): its parameter tensors and
  elements at the rates its ``step()`` was timed at (Note: [the optimizer step's price]);
  for an optimizer not timed, the bytes it moves per parameter element
  (``OPTIMIZER_BYTES``), one op per tensor.
- A distributed plan's communication: one rank's share of the batch is simulated on the
  local plan (as the memory estimate does), and the gradient bytes it sends (after the
  compressor, by passes/compress.py's own payload formulas) and FSDP2's parameter
  all-gathers cross the link at ``link_bytes_per_s``, the payload rate of one all-reduce
  (what WorkerRunner.all_reduce_seconds measures: ``nbytes / seconds``). Communication is
  added, not overlapped with compute: on a CPU gloo's threads take the cores compute uses.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from autoscale.cost._rates import (
    ELEMENTWISE_OPS,
    ROW_OPS,
    MachineRates,
    attention_slices,
    kernel_flops,
    machine_rates,
    optimizer_key,
    rate_kind,
)
from autoscale.errors import PlanError
from autoscale.plan import CompressPlan, Plan, ShardPlan
from autoscale.runtime._batch import Batch, LossFn

__all__ = ["OPTIMIZER_BYTES", "OpCounter", "StepTimeEstimate", "communication_bytes",
           "estimate_step_time", "optimizer_bytes", "optimizer_work", "refine"]

#: Bytes each optimizer kind's step moves per parameter element, read plus written, for
#: fp32 parameters and gradients and its state (one pass unless said).
OPTIMIZER_BYTES: dict[str, float] = {
    # reads p, g, m, v and writes p, m, v.
    "adamw": 7 * 4, "adam": 7 * 4,
    # reads p, g, momentum buffer and writes p, buffer (without momentum: reads p, g).
    "sgd": 5 * 4,
    # two passes: reads p, g, m, v, writes m, v and the update; then reads p and the
    # update (their norms are taken then) and writes p.
    "lamb": 10 * 4,
    # a pass for the norms of p and g, then SGD with momentum.
    "lars": 2 * 4 + 5 * 4,
    # reads p, g (fp32) and the two 1-byte codes, writes p and the codes; the fp32 scale
    # per 256-element block of each moment is read and written (4 * 4 / 256).
    "adamw8bit": 3 * 4 + 4 * 1 + 16 / 256,
}
_SGD_PLAIN_BYTES = 3 * 4


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run under it, with each one's FLOPs and bytes; works on real and
    fake tensors alike (it only reads shapes). ``ops`` maps (flops, bytes, recompute,
    precision) to how many ops had them; ``recompute`` marks forward ops run inside
    backward with grad enabled (the checkpoint wrappers' recomputation), ``precision`` is
    "bf16" or "fp16" for an op with FLOPs on such tensors, prefixed "conv-" for a
    convolution and "attn-" or "attn-bwd-" for fused attention, forward or backward (their
    rates are their own: ``rate_kind``; attention's suffixed "@" and its (sequence, head)
    slices: Note: [attention's rate goes by its slice]), "rng" for an op that draws
    random numbers (dropout's masks: its first field is then the numbers drawn, not
    FLOPs), else "". prim ops (a fake tensor's ``.device``) are not ops a real step
    dispatches, and are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[tuple[int, int, bool, str]] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace == "prim":
            return out
        flops, precision = price_key(func, args, kwargs, out)
        # A view moves no bytes; an in-place op reads its inputs and writes its output.
        nbytes = 0 if func.is_view else _tensor_bytes((args, kwargs)) + _tensor_bytes(out)
        # Backward runs with grad disabled, except where a checkpoint wrapper recomputes.
        recompute = torch._C._current_graph_task_id() != -1 and torch.is_grad_enabled()
        self.ops[(flops, nbytes, recompute, precision)] += 1
        return out

    @property
    def op_count(self) -> int:
        return sum(self.ops.values())


_LOW = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def price_key(func: Any, args: Any, kwargs: Any, out: Any) -> tuple[int, str]:
    """(work, kind) of one aten op, as ``OpCounter`` records them: FLOPs and their rate
    kind for a matmul, convolution or attention kernel; numbers drawn and "rng" for a
    random op; for an op with a measured element rate (``ELEMENTWISE_OPS``: Note: [ops
    that compute more than they move]) its largest tensor's elements and "ew <op>
    <dtype>"; else (0, "")."""
    flops, family = kernel_flops(func, args, kwargs, out)
    first = _first_tensor(out)
    if flops:
        kind = rate_kind(family, _LOW.get(first.dtype, "") if first is not None else "")
        slices = attention_slices(func, args)
        # Its rate is looked up per slice: Note: [attention's rate goes by its slice].
        return flops, kind if slices == 1 else f"{kind}@{slices}"
    if func._overloadpacket in _RANDOM and first is not None:
        return first.numel(), "rng"
    name = str(func._overloadpacket)
    if name in ELEMENTWISE_OPS:
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if tensors:
            largest = max(tensors, key=lambda t: t.numel())
            kind = f"ew {name} {str(largest.dtype).removeprefix('torch.')}"
            if name in ROW_OPS and largest.dim():
                # Note: [a softmax's rate goes by its rows]
                kind += f" {largest.shape[-1]}"
            return largest.numel(), kind
    return 0, ""


# Drawing random numbers is its own cost on a CPU (a generator per element: dropout's
# bernoulli_ is ~15x the time of an add of the same size), priced at its measured rate.
_RANDOM = {getattr(torch.ops.aten, name) for name in (
    "bernoulli", "bernoulli_", "native_dropout", "rand", "rand_like", "randn", "randn_like",
    "normal", "normal_", "uniform_", "randint", "randint_like", "randperm", "exponential_")}


def _first_tensor(tree: Any) -> torch.Tensor | None:
    for t in tree_leaves(tree):
        if isinstance(t, torch.Tensor):
            return t
    return None


def _tensor_bytes(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(tree)
               if isinstance(t, torch.Tensor))


@dataclass(frozen=True)
class StepTimeEstimate:
    """One training step's estimated time (one rank's, for a distributed plan), in seconds.

    Invariant: ``total_s == compute_s + recompute_s + optimizer_s + communication_s``;
    ``retimed(rates)`` prices the same counted ops at other rates without simulating again.
    """

    total_s: float
    compute_s: float
    """Forward and backward of every micro-batch, recomputation excluded."""
    recompute_s: float
    """The checkpointed blocks' forward run again inside backward."""
    optimizer_s: float
    communication_s: float
    ops: int
    """aten ops of forward and backward (recomputation included) plus the optimizer's."""
    flops: int
    bytes: int
    """Read plus written by forward, backward and the optimizer step."""
    rates: MachineRates
    link_bytes_per_s: float | None = None
    counted: tuple[tuple[int, int, bool, str, int], ...] = field(default=(), repr=False)
    """(flops, bytes, recompute, precision, how many ops) of forward and backward (see
    ``OpCounter``)."""
    optimizer_counts: tuple[int, int] = (0, 0)
    """(bytes, ops) of the optimizer step (its price where its optimizer was not timed)."""
    optimizer_work: tuple[str, float, int, int, int] = ("", 0.0, 0, 0, 0)
    """(``optimizer_key``, fp32 parameter elements, parameter tensors, fp16 loss scaling's
    bytes and ops) of this rank's optimizer step: see ``optimizer_work``."""
    comm_bytes: int = 0
    """All-reduce-equivalent payload bytes this rank sends per step."""
    checkpoint_calls: int = 0
    """Checkpointed block calls in the step (blocks times micro-batches), each priced at
    ``rates.checkpoint_call_s`` in ``recompute_s`` beside the ops it recomputes."""

    def retimed(self, rates: MachineRates) -> StepTimeEstimate:
        """The same ops priced at ``rates`` (e.g. what ``refine`` returns)."""
        return _priced(self.counted, self.optimizer_counts, self.comm_bytes, rates,
                       self.link_bytes_per_s, self.checkpoint_calls, self.optimizer_work)


def _op_seconds(flops: int, nbytes: int, precision: str, rates: MachineRates) -> float:
    if precision == "rng":
        compute = flops / rates.random_per_s()
    elif precision.startswith("ew "):
        _, op, dtype, *row = precision.split(" ")
        rate = rates.elements_per_s(op, dtype, int(row[0]) if row else None)
        compute = flops / rate if rate else 0.0
    else:
        kind, _, slices = precision.partition("@")
        compute = (flops / rates.flops_per_s(kind, flops / int(slices or 1)) if flops
                   else 0.0)
    return max(compute, nbytes / rates.memory_bytes_per_s) + rates.op_overhead_s


def _priced(counted: tuple[tuple[int, int, bool, str, int], ...], optimizer: tuple[int, int],
            comm_bytes: int, rates: MachineRates, link: float | None,
            checkpoint_calls: int = 0,
            work: tuple[str, float, int, int, int] = ("", 0.0, 0, 0, 0)) -> StepTimeEstimate:
    compute, recompute = 0.0, checkpoint_calls * rates.checkpoint_call_s
    for flops, nbytes, is_recompute, precision, n in counted:
        seconds = n * _op_seconds(flops, nbytes, precision, rates)
        if is_recompute:
            recompute += seconds
        else:
            compute += seconds
    opt_bytes, opt_ops = optimizer
    key, elements, tensors, extra_bytes, extra_ops = work
    timed = rates.optimizer_seconds(key) if key else None
    if timed is None:
        opt = opt_bytes / rates.memory_bytes_per_s + opt_ops * rates.op_overhead_s
    else:
        opt = (elements * timed[0] + tensors * timed[1]
               + extra_bytes / rates.memory_bytes_per_s + extra_ops * rates.op_overhead_s)
    comm = comm_bytes / link if comm_bytes and link else 0.0
    return StepTimeEstimate(
        total_s=compute + recompute + opt + comm, compute_s=compute, recompute_s=recompute,
        optimizer_s=opt, communication_s=comm, ops=sum(c[4] for c in counted) + opt_ops,
        flops=sum(c[0] * c[4] for c in counted if c[3] != "rng" and not c[3].startswith("ew ")),
        bytes=sum(c[1] * c[4] for c in counted) + opt_bytes, rates=rates,
        link_bytes_per_s=link, counted=counted, optimizer_counts=optimizer,
        optimizer_work=work, comm_bytes=comm_bytes, checkpoint_calls=checkpoint_calls)


def estimate_step_time(model: nn.Module, batch: Batch, plan: Plan, *,
                       loss_fn: LossFn | None = None, graph: Any = None,
                       rates: MachineRates | None = None,
                       link_bytes_per_s: float | None = None) -> StepTimeEstimate:
    """Estimate ``plan``'s training step time for ``model`` on ``batch`` (the global batch)
    without running it: see Note: [the step-time estimate prices the simulated step].

    ``rates`` default to this machine's (``machine_rates()``, cached). A distributed plan
    (``plan.shard.strategy != 'none'``) needs ``link_bytes_per_s``; it is one rank's time on
    its share of the batch. ``model`` and ``batch`` are only read. Costs one fake forward
    and backward (about the memory estimate's time). Raises PlanError when the model cannot
    run on fake tensors, or a distributed plan comes without a link rate.
    """
    from autoscale.runtime._batch import check_batch, rank_share

    batch = check_batch(batch)
    distributed = plan.shard.strategy != "none"
    if distributed and not (link_bytes_per_s and link_bytes_per_s > 0):
        raise PlanError(
            f"plan.shard.strategy={plan.shard.strategy!r} sends gradients between ranks, and "
            f"link_bytes_per_s={link_bytes_per_s!r} says nothing of how fast: pass the "
            "payload rate of one all-reduce, nbytes / WorkerRunner.all_reduce_seconds(nbytes).")
    local = plan
    if distributed:
        batch = rank_share(batch, 0, plan.shard.world_size)
        local = plan.replace(shard=ShardPlan(), compress=CompressPlan())
    counter, params = _count_step(model, batch, local, loss_fn=loss_fn, graph=graph)
    counted = tuple((*key, n) for key, n in sorted(counter.ops.items()))
    opt = optimizer_bytes(params, plan)
    comm = communication_bytes(params, plan) if distributed else 0
    micro_batches = (plan.batch.grad_accum_steps if plan.batch.micro_batch_size is not None
                     else 1)
    return _priced(counted, opt, comm, rates or machine_rates(),
                   link_bytes_per_s if distributed else None,
                   len(plan.checkpoint.names) * micro_batches, optimizer_work(params, plan))


def _count_step(model: nn.Module, batch: Batch, plan: Plan, *, loss_fn: LossFn | None,
                graph: Any) -> tuple[OpCounter, list[nn.Parameter]]:
    """Every micro-batch's forward and backward of the planned step on fake tensors, under
    an OpCounter; with the planned model's trainable parameters (fake)."""
    from autoscale.cost._simulate import fake_step, first_micro_batches
    from autoscale.runtime._batch import split_batch

    # Every micro-batch after the first runs the same ops (the first's, plus adding its
    # gradients to those held): Note: [simulating two micro-batches]. The first two are
    # counted, the second once per later micro-batch. The 0-dim loss total's creation is
    # then counted once a micro-batch, a few scalar ops too many in a step of thousands.
    accum = plan.batch.grad_accum_steps if plan.batch.micro_batch_size is not None else 1
    with fake_step(model, batch, plan, loss_fn=loss_fn, graph=graph) as (result, fake_batch):
        micros = first_micro_batches(fake_batch, plan, 2)
        parts = [m for m, _ in split_batch(micros, plan.batch.micro_batch_size)]
        with OpCounter() as counter:
            result.accumulate(parts[0] if accum > 1 else fake_batch)
        if accum > 1:
            with OpCounter() as later:
                result.accumulate(parts[1])
            for key, n in later.ops.items():
                counter.ops[key] += n * (accum - 1)
    seen: dict[int, nn.Parameter] = {}
    for p in result.model.parameters():
        if p.requires_grad:
            seen.setdefault(id(p), p)
    return counter, list(seen.values())


def optimizer_bytes(params: list[nn.Parameter], plan: Plan) -> tuple[int, int]:
    """(bytes moved, ops) of one optimizer step over ``params`` for ``plan``'s optimizer:
    ``OPTIMIZER_BYTES`` per element, scaled by the parameters' element size for p and g,
    divided among the ranks by zero1/zero2/zero3 (each steps its shard); one op per tensor,
    plus fp16 loss scaling's unscale-and-check (reads and writes every gradient)."""
    total = _moved_bytes(params, _bytes_per_element(plan))
    ops = len(params)
    if plan.precision.mode == "fp16":
        total += sum(2 * p.numel() * p.element_size() for p in params)
        ops *= 2
    if plan.shard.strategy in ("zero1", "zero2", "zero3"):
        total /= plan.shard.world_size
        ops = math.ceil(ops / plan.shard.world_size)
    return int(total), ops


def optimizer_work(params: list[nn.Parameter], plan: Plan
                   ) -> tuple[str, float, int, int, int]:
    """(``optimizer_key``, elements, tensors, extra bytes, extra ops) of one optimizer step
    over ``params`` for ``plan``'s optimizer, priced at the step's timed rates (Note: [the
    optimizer step's price]): elements in fp32 terms (a parameter of another size counts
    by the bytes its p and g move against fp32's), divided among the ranks by
    zero1/zero2/zero3 as ``optimizer_bytes`` divides them; the extra bytes and ops are fp16
    loss scaling's unscale-and-check (read and write every gradient)."""
    opt = plan.optimizer
    per_element = _bytes_per_element(plan)
    elements = _moved_bytes(params, per_element) / per_element
    tensors = len(params)
    extra_bytes = extra_ops = 0
    if plan.precision.mode == "fp16":
        extra_bytes = sum(2 * p.numel() * p.element_size() for p in params)
        extra_ops = len(params)
    if plan.shard.strategy in ("zero1", "zero2", "zero3"):
        ranks = plan.shard.world_size
        elements, extra_bytes = elements / ranks, extra_bytes // ranks
        tensors, extra_ops = math.ceil(tensors / ranks), math.ceil(extra_ops / ranks)
    return (optimizer_key(opt.kind, opt.kernel, opt.kwargs) or "", elements, tensors,
            extra_bytes, extra_ops)


def _bytes_per_element(plan: Plan) -> float:
    """``OPTIMIZER_BYTES`` of ``plan``'s optimizer (SGD without momentum its own)."""
    opt = plan.optimizer
    if opt.kind == "sgd" and not opt.kwargs.get("momentum"):
        return _SGD_PLAIN_BYTES
    return OPTIMIZER_BYTES[opt.kind]


def _moved_bytes(params: list[nn.Parameter], per_element: float) -> float:
    # p and g are read and written at their own size; state stays fp32 (autoscale.optim).
    return sum(p.numel() * (per_element + 3 * (p.element_size() - 4)) for p in params)


def communication_bytes(params: list[nn.Parameter], plan: Plan) -> int:
    """All-reduce-equivalent payload bytes one rank sends per step under ``plan``.

    DDP/zero1 all-reduce the (compressed) gradients once per step (zero1 then broadcasts
    each rank's updated shard: half an all-reduce of the parameters). FSDP2 (zero2/zero3)
    reduce-scatters every micro-batch's gradients (gloo's reduce-scatter is an all-reduce,
    so it is priced as one) and all-gathers the parameters (half an all-reduce each): once
    per step for zero2, in forward and again in backward of every micro-batch for zero3.
    """
    grads = sum(_sent_bytes(p, plan.compress) for p in params)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    micro = plan.batch.grad_accum_steps if plan.batch.micro_batch_size else 1
    strategy = plan.shard.strategy
    if strategy == "ddp":
        return grads
    if strategy == "zero1":
        return grads + param_bytes // 2
    if strategy == "zero2":
        return micro * grads + param_bytes // 2
    return micro * (grads + param_bytes)


def _sent_bytes(p: nn.Parameter, compress: CompressPlan) -> int:
    """Payload bytes of ``p``'s gradient after ``compress`` (passes/compress.py's codecs)."""
    n = p.numel()
    if compress.method == "none":
        return n * p.element_size()
    if compress.method == "powersgd":
        # torch's hook: rank-r factors P (m, r) and Q (n, r) of each matrix that they
        # shrink 2x, in fp32; other tensors whole.
        if p.dim() >= 2:
            rows, cols = p.shape[0], n // p.shape[0]
            factors = (rows + cols) * compress.powersgd_rank
            if 2 * factors < rows * cols:
                return 4 * factors
        return 4 * n
    from autoscale.passes.compress import _codec

    return int(_codec(compress).length(n))


def refine(rates: MachineRates, estimate: StepTimeEstimate, measured_s: float
           ) -> MachineRates:
    """``rates`` scaled so that ``estimate`` (priced at ``rates``) matches one measured step
    of the same plan; communication is left at the link's rate. Use the result to retime or
    estimate the tune's other plans: the scale carries what the calibration run's kernels
    miss on this model (cache effects, Python around the step)."""
    work = estimate.compute_s + estimate.recompute_s + estimate.optimizer_s
    left = measured_s - estimate.communication_s
    if not (work > 0 and left > 0):
        raise PlanError(f"refine needs a positive measured step beyond communication: "
                        f"measured {measured_s!r} s, communication "
                        f"{estimate.communication_s:.3g} s.")
    return rates.scaled(work / left)

