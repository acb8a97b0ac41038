"""Each block's checkpoint policy under an activation budget, chosen exactly.

Note: [the checkpoint solver]
The problem is a multiple-choice knapsack: block i has options j (none, full, selective
with a few saved op sets), each keeping ``w_ij`` activation bytes and costing ``t_ij``
seconds of recompute in backward; pick one option per block with ``sum w <= B`` and the
least ``sum t``. It is NP-hard in general but pseudo-polynomial in B, and it is solved
here by dynamic programming over bytes, not by an ILP: the DP needs no solver package,
its answer is exact and reproducible (no solver tolerances or time limits), and with the
tens of blocks and a handful of options a model has it runs in milliseconds.

Bytes are counted in units of a granularity ``g``: first the gcd of every option's bytes
(tensor sizes share large powers of two), which loses nothing, so the DP is exact; only
if ``B / g`` would exceed ``max_cells`` is ``g`` made coarser (a multiple of the gcd).
Each option's bytes are rounded *up* to a multiple of ``g``, so every answer fits the
real budget; what rounding can cost is optimality, bounded: the answer's recompute time
is at most the exact optimum's for the budget ``B - N * g`` (N blocks, each rounded by
less than ``g``). ``CheckpointSolution.margin_bytes`` is that ``N * g`` (0 when exact).

Among the assignments of least time, the DP takes the one keeping the fewest (rounded)
bytes, so the kept bytes never rise when the budget falls: a lower budget either keeps
the previous answer (if it still fits, it is still optimal) or one keeping less.
solve_checkpoint_plan then simulates the answer as a whole and solves again on a lower
budget should the blocks not add up (below).

Complexity: O(N * K * B/g) time, vectorised over B/g in torch tensors (K options a block), and
O(N * B/g) bytes for the choice table (one int8 a cell).

The options' figures come from the model (:func:`measure_block_options`): kept bytes by
simulating the forward on fake tensors with the measurement's storage ledger, one run per
option applied to every block, and each block's share read between its forward hooks;
recompute seconds by pricing each block's forward ops (FLOPs from torch's flop counter,
bytes read and written) at this machine's rates (autoscale.cost._rates.machine_rates),
as the step-time estimate prices them, plus, for a selective option, its policy's
Python dispatch cost on every op of the block in forward and recompute (Note: [selective
checkpointing's dispatch cost]). That attribution assumes the blocks are additive:
a block's option does not change what its neighbours keep, which holds when a block's
input is kept whatever it does (the residual stream of a transformer).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from autoscale.cost._rates import MachineRates, machine_rates
from autoscale.errors import InfeasibleError, PlanError
from autoscale.plan import BlockPolicy, CheckpointPlan, Plan

__all__ = [
    "DEFAULT_SAVE_SETS",
    "MASK_SAVE_SETS",
    "BlockOption",
    "BlockOptions",
    "CheckpointBudgets",
    "CheckpointSolution",
    "measure_block_options",
    "sac_op_overhead_s",
    "save_sets_for",
    "scaled_options",
    "solve_checkpoint",
    "solve_checkpoint_plan",
    "time_block_options",
]

DEFAULT_SAVE_SETS: Mapping[str, tuple[str, ...]] = {
    "matmuls+attention": ("mm", "addmm", "bmm", "sdpa"),
    "matmuls+attention+dropout": ("mm", "addmm", "bmm", "sdpa", "dropout"),
    "matmuls": ("mm", "addmm"),
    "attention": ("bmm", "sdpa", "softmax"),
}
"""The selective options offered per block besides none and full: saved op kinds."""

MASK_SAVE_SETS: Mapping[str, tuple[str, ...]] = {
    "matmuls+dropout": ("mm", "addmm", "dropout"),
    "attention+dropout": ("bmm", "sdpa", "softmax", "dropout"),
    "dropout": ("dropout",),
}
"""Offered besides ``DEFAULT_SAVE_SETS`` under compile mode 'inductor-eager-rng' alone,
where saving kind 'dropout' keeps a bool mask instead of replaying eager's RNG (Note: [a
dropout's mask is what a checkpoint keeps] in passes/_dropout_mask.py); 'dropout' alone
recomputes all but the masks, full checkpointing without the replay. Elsewhere they only
cost time to measure: in CPU eager kind 'dropout' saves nothing (each is its twin without
it), and under inductor's own RNG it saves dropout's float outputs."""


def save_sets_for(mode: str | None) -> Mapping[str, tuple[str, ...]]:
    """The save sets the solver offers for blocks run under compile ``mode`` (None:
    eager): ``DEFAULT_SAVE_SETS``, with ``MASK_SAVE_SETS`` under 'inductor-eager-rng'."""
    if mode == "inductor-eager-rng":
        return {**DEFAULT_SAVE_SETS, **MASK_SAVE_SETS}
    return DEFAULT_SAVE_SETS


_MAX_CELLS = 1 << 18
_TIME_TIE = 1e-12  # relative: sums of the same floats in another order differ by ulps


@dataclass(frozen=True)
class BlockOption:
    """One way to checkpoint one block, with what it keeps and what it costs."""

    policy: BlockPolicy
    kept_bytes: int
    """Activation bytes the block keeps from its forward to its backward."""
    recompute_s: float
    """Seconds of forward recomputed in backward (0 for policy 'none')."""


@dataclass(frozen=True)
class CheckpointSolution:
    """The option chosen for every block (in the order given), and their totals."""

    options: tuple[BlockOption, ...]
    kept_bytes: int
    recompute_s: float
    granularity: int
    """Bytes per DP cell; every option's bytes were rounded up to a multiple of it."""
    margin_bytes: int
    """0 when the answer is exact; else the answer is at least as fast as the exact
    optimum for ``budget - margin_bytes`` (Note: [the checkpoint solver])."""

    def plan(self) -> CheckpointPlan:
        """The checkpoint plan section of this solution."""
        return CheckpointPlan(blocks=tuple(o.policy for o in self.options))


def solve_checkpoint(options: Sequence[Sequence[BlockOption]], budget_bytes: int, *,
                     max_cells: int = _MAX_CELLS) -> CheckpointSolution:
    """The option of every block such that the kept bytes sum to at most ``budget_bytes``
    and the recompute seconds sum to the least (ties: the fewest bytes).

    Exact when every option's bytes are multiples of a granularity with at most
    ``max_cells`` cells under the budget; otherwise within ``margin_bytes`` as stated in
    Note: [the checkpoint solver]. Raises InfeasibleError naming the smallest feasible
    budget (every block at its leanest option) when even that does not fit.
    """
    if any(not opts for opts in options):
        raise PlanError("solve_checkpoint: a block has no options; give each block at "
                        "least its 'none' option.")
    if any(len(opts) > 127 for opts in options):
        raise PlanError("solve_checkpoint: more than 127 options for a block; offer fewer "
                        "selective save sets.")
    floor = sum(min(o.kept_bytes for o in opts) for opts in options)
    if floor > budget_bytes:
        raise InfeasibleError(
            f"no checkpoint policies fit an activation budget of {budget_bytes} bytes: the "
            f"smallest feasible budget is {floor} bytes (every block at its leanest option). "
            "Raise the budget, or save memory elsewhere (micro-batches, lower precision).")
    g = _granularity(options, budget_bytes, max_cells)
    cap = budget_bytes // g
    best, choice = _knapsack(options, g, cap)
    least = float(best.min())
    if not math.isfinite(least):  # fits in bytes, not once rounded up: the leanest
        picked = [min(opts, key=lambda o: (o.kept_bytes, o.recompute_s)) for opts in options]
    else:
        cell = int(torch.nonzero(best <= least + abs(least) * _TIME_TIE)[0, 0])
        picked = []
        for i in reversed(range(len(options))):
            option = options[i][int(choice[i, cell])]
            picked.append(option)
            cell -= -(-option.kept_bytes // g)
        picked.reverse()
    exact = all(o.kept_bytes % g == 0 for opts in options for o in opts)
    return CheckpointSolution(
        options=tuple(picked), kept_bytes=sum(o.kept_bytes for o in picked),
        recompute_s=sum(o.recompute_s for o in picked), granularity=g,
        margin_bytes=0 if exact else len(options) * g)


def _granularity(options: Sequence[Sequence[BlockOption]], budget: int, max_cells: int) -> int:
    g = 0
    for opts in options:
        for o in opts:
            g = math.gcd(g, o.kept_bytes)
    g = max(g, 1)
    if budget // g + 1 > max_cells:
        g *= -(-budget // (g * (max_cells - 1)))
    return g


def _knapsack(options: Sequence[Sequence[BlockOption]], g: int, cap: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """best[c]: least time with rounded bytes exactly c; choice[i, c]: block i's option."""
    # torch (float64 on the CPU) rather than numpy: one vectorised array library, and the
    # one autoscale already depends on.
    best = torch.full((cap + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    choice = torch.zeros((len(options), cap + 1), dtype=torch.int8)
    for i, opts in enumerate(options):
        nxt = torch.full((cap + 1,), math.inf, dtype=torch.float64)
        for j, option in enumerate(opts):
            w = -(-option.kept_bytes // g)
            if w > cap:
                continue
            cand = torch.full((cap + 1,), math.inf, dtype=torch.float64)
            cand[w:] = best[: cap + 1 - w] + option.recompute_s
            better = cand < nxt
            nxt[better] = cand[better]
            choice[i, better] = j
        best = nxt
    return best, choice


def sac_op_overhead_s() -> float:
    """Seconds selective checkpointing adds per op of a block and per pass over it (its
    policy runs in a Python TorchDispatchMode for every op in forward and again in the
    recompute), measured once per process (~0.1 s) on a chain of tiny ops, where nothing
    else costs: selective against full checkpointing of the same function.

    Note: [selective checkpointing's dispatch cost]
    On the GPT example on this 2-core CPU a step with every block selective took 14.5 ms
    against 7.9 ms fully checkpointed and 4.4 ms with none: on small ops the per-op
    Python cost outweighs what saving the matmuls spares, so the solver must see it.
    """
    return _sac_overhead_cached()


@functools.lru_cache(maxsize=1)
def _sac_overhead_cached() -> float:
    import time

    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    from autoscale.passes.checkpoint import selective_policy

    n = 200
    x = torch.ones(4, requires_grad=True)

    def chain(t: torch.Tensor) -> torch.Tensor:
        for _ in range(n):
            t = t * 1.0001
        return t.sum()

    context = functools.partial(create_selective_checkpoint_contexts, selective_policy(()))

    def seconds(**kwargs: Any) -> float:
        best = math.inf
        for _ in range(5):
            start = time.perf_counter()
            checkpoint(chain, x, use_reentrant=False, **kwargs).backward()
            best = min(best, time.perf_counter() - start)
        return best

    seconds()  # warm-up
    return max(seconds(context_fn=context) - seconds(), 0.0) / (2 * (n + 1))


@dataclass(frozen=True)
class BlockOptions:
    """Every block's options, measured on the model (:func:`measure_block_options`)."""

    blocks: tuple[tuple[BlockOption, ...], ...]
    """Per block (graph order): none, full, then one selective option per save set."""
    outside_bytes: int
    """Activation bytes the forward keeps outside every block (embeddings, head, loss):
    the same whatever the blocks do."""
    ratios: tuple[float, ...] | None = None
    """Per option (in block order), the measured/priced ratio its recompute seconds were
    scaled by (:func:`time_block_options`); None: as priced."""
    kept_scales: tuple[float, ...] | None = None
    """Per option, what the blocks keep under inductor over what they keep eager, measured
    with the option on every block (:func:`time_block_options` with ``compiled``); None:
    not measured, the eager bytes stand (Note: [kept bytes under inductor])."""
    compiled_mode: str | None = None
    """The compile mode the options were timed under ('inductor', 'inductor-eager-rng'),
    and that a solution on ``kept_scales`` is compiled and measured in; None: eager."""


def measure_block_options(model: nn.Module, batch: Any, graph: Any, *,
                          plan: Plan | None = None,
                          save_sets: Mapping[str, tuple[str, ...]] | None = None,
                          loss_fn: Any = None, rates: MachineRates | None = None,
                          sac_op_overhead: float | None = None) -> BlockOptions:
    """Measure each block's options on fake tensors (no real compute; ``model`` is only
    read): kept bytes from the storage ledger, recompute seconds priced at ``rates``
    (default: this machine's, :func:`machine_rates`), a selective option's seconds with
    its dispatch cost per op in forward and recompute (``sac_op_overhead``, default
    :func:`sac_op_overhead_s`; Note: [selective checkpointing's dispatch cost]).
    ``plan``'s other sections (precision, micro-batches) apply; its checkpoint section is
    replaced by each option in turn. For a distributed plan the figures are one rank's,
    on its share of ``batch`` (the global batch). ``save_sets``: the selective options
    (default: :func:`save_sets_for` the compile mode ``plan``'s blocks run under).
    """
    plan, batch = _one_rank(plan or Plan(), batch)
    if save_sets is None:
        save_sets = save_sets_for(_solver_mode(plan))
    fqns = [b.fqn for b in graph.blocks]
    if not fqns:
        raise PlanError("the model has no repeated blocks to checkpoint (capture found none); "
                        "checkpointing needs blocks (children of a ModuleList/Sequential).")
    rates = rates or machine_rates()
    overhead = sac_op_overhead_s() if sac_op_overhead is None else sac_op_overhead
    kinds: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
        "none": ("none", None, ()), "full": ("full", None, ())}
    for name, save in save_sets.items():
        kinds[name] = ("selective", name, tuple(save))
    kept: dict[str, dict[str, int]] = {}
    total_none = 0
    ops: dict[str, list[tuple[Any, float]]] = {}
    for name, (policy, _, save) in kinds.items():
        section = CheckpointPlan.of({f: BlockPolicy(f, policy, save=save)  # type: ignore[arg-type]
                                     for f in fqns})
        run = _fake_forward(model, batch, plan.replace(checkpoint=section), fqns, loss_fn,
                            rates, count_ops=name == "none")
        kept[name] = run.kept
        if name == "none":
            total_none, ops = run.total, run.ops
    return BlockOptions(
        blocks=tuple(tuple(BlockOption(BlockPolicy(f, policy, save=save),  # type: ignore[arg-type]
                                       kept[name][f],
                                       _recompute_s(ops[f], policy, save, overhead))
                           for name, (policy, _, save) in kinds.items()) for f in fqns),
        outside_bytes=max(total_none - sum(kept["none"].values()), 0))


def time_block_options(model: nn.Module, batch: Any, graph: Any, options: BlockOptions, *,
                       plan: Plan | None = None, loss_fn: Any = None, rounds: int = 10,
                       compiled: bool | str = False) -> BlockOptions:
    """``options`` with each option's recompute seconds refined by timing it for real on
    the model's first block (Note: [timing the options on one block]).

    One real forward (no grad) records the first block's inputs under ``plan``'s
    precision and micro-batch; then forward and backward of that block alone run under
    each option in ``rounds`` interleaved rounds, and an option's cost is the median over
    the rounds of its time less the unchecked block's in the same round (Note: [paired
    option timing]). Every block's priced seconds for an option are
    scaled by that option's measured/priced ratio on the first block. ``model`` is not
    changed (a copy is timed). A block whose forward cannot be replayed alone leaves
    ``options`` as priced.

    ``compiled``: timed under inductor as a plan with that compile mode runs (True:
    'inductor'; or a mode of autoscale.plan.SOLVER_MODES) (Note: [options under
    inductor]): each option applied to every block and the whole model compiled (one
    compile per option), its cost the step's forward and backward over the unchecked
    compiled model's, spread over the blocks by their prices. What each
    option keeps compiled is measured too (``kept_scales``, None if the profiler is taken);
    the options' ``kept_bytes`` stay the simulated eager ones, an upper bound on it.
    """
    import copy

    from autoscale.runtime._batch import call_model, split_batch

    plan, batch = _one_rank(plan or Plan(), batch)
    first = graph.blocks[0].fqn if graph.blocks else None
    if first is None or not options.blocks:
        return options
    if compiled:
        return _time_compiled(model, batch, graph, options, plan=plan, loss_fn=loss_fn,
                              rounds=rounds, mode=_compiled_mode(compiled))
    from autoscale.plan import CompilePlan
    from autoscale.runtime import build_result

    # Eager: the inputs are recorded by a hook that stops the forward (inside a compiled
    # forward Dynamo would trace the hook and the exception).
    result = build_result(plan.replace(checkpoint=CheckpointPlan(), compile=CompilePlan()),
                          copy.deepcopy(model), loss_fn=loss_fn, inplace=True)
    block = result.model.get_submodule(first)
    seen: dict[str, Any] = {}

    class _Stop(Exception):
        pass

    def grab(_m: nn.Module, args: Any, kwargs: Any) -> None:
        seen.update(args=args, kwargs=kwargs, autocast=(
            torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        raise _Stop

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    micro, _ = next(iter(split_batch(batch, plan.batch.micro_batch_size)))
    try:
        with torch.no_grad():
            call_model(result.model, micro)
    except _Stop:
        pass
    except Exception:  # the priced figures stand; timing is a refinement
        return options
    finally:
        handle.remove()
    if not seen:
        return options
    from autoscale.passes.checkpoint import checkpointed_forward_of

    forwards = {i: (block.forward if o.policy.policy == "none"
                    else checkpointed_forward_of(block, o.policy))
                for i, o in enumerate(options.blocks[0])}
    enabled, dtype = seen["autocast"]

    def inputs() -> list[Any]:
        return [a.detach().requires_grad_(a.is_floating_point())
                if isinstance(a, torch.Tensor) else a for a in seen["args"]]

    def forward(f: Any, args: list[Any]) -> torch.Tensor:
        with torch.autocast("cpu", dtype=dtype, enabled=enabled):
            out = f(*args, **seen["kwargs"])
        return out if isinstance(out, torch.Tensor) else next(
            t for t in (out.values() if isinstance(out, dict) else out)
            if isinstance(t, torch.Tensor))

    def once(f: Any) -> float:
        args = inputs()
        start = time.perf_counter()
        tensor = forward(f, args)
        tensor.backward(torch.ones_like(tensor))
        return time.perf_counter() - start

    none = next((i for i, o in enumerate(options.blocks[0]) if o.policy.policy == "none"),
                None)
    if none is None:
        return options
    try:
        extra = _extra_seconds({i: functools.partial(once, f) for i, f in forwards.items()},
                               rounds, reference=none)
    except Exception:  # as above
        return options
    return scaled_options(options, tuple(
        max(extra[i], 0.0) / o.recompute_s if o.recompute_s > 0 else 1.0
        for i, o in enumerate(options.blocks[0])))


def _compiled_mode(compiled: bool | str) -> str:
    from autoscale.plan import SOLVER_MODES

    mode = "inductor" if compiled is True else compiled
    if mode not in SOLVER_MODES:
        raise PlanError(f"compiled={compiled!r}: the solver's options time under one of "
                        f"{list(SOLVER_MODES)} (or True for 'inductor').")
    return str(mode)


def _time_compiled(model: nn.Module, batch: Any, graph: Any, options: BlockOptions, *,
                   plan: Plan, loss_fn: Any, rounds: int, mode: str = "inductor"
                   ) -> BlockOptions:
    """:func:`time_block_options` under compile ``mode``: each option on every block, the
    whole model compiled (Note: [options under inductor])."""
    from autoscale.plan import CompilePlan
    from autoscale.runtime import build_result
    from autoscale.runtime._batch import call_model, compute_loss, split_batch

    fqns = [b.fqn for b in graph.blocks]
    micro, _ = next(iter(split_batch(batch, plan.batch.micro_batch_size)))
    plan = plan.replace(compile=CompilePlan(mode=mode))  # type: ignore[arg-type]
    results = {}
    for j, o in enumerate(options.blocks[0]):
        section = CheckpointPlan() if o.policy.policy == "none" else CheckpointPlan(
            blocks=tuple(dataclasses.replace(o.policy, fqn=f) for f in fqns))
        results[j] = build_result(plan.replace(checkpoint=section), model, loss_fn=loss_fn)

    def loss_of(j: int) -> torch.Tensor:
        result = results[j]
        return compute_loss(result.loss_fn, call_model(result.model, micro), micro)

    def once(j: int) -> float:
        start = time.perf_counter()
        loss_of(j).backward()
        took = time.perf_counter() - start
        results[j].model.zero_grad(set_to_none=True)
        return took

    none = next(j for j, o in enumerate(options.blocks[0]) if o.policy.policy == "none")
    try:
        extra = _extra_seconds({j: functools.partial(once, j) for j in results}, rounds,
                               reference=none)
    except Exception:  # the priced figures stand; timing is a refinement
        return options
    priced = [sum(opts[j].recompute_s for opts in options.blocks) for j in results]
    timed = dataclasses.replace(scaled_options(options, tuple(
        max(extra[j], 0.0) / priced[j] if priced[j] > 0 else 1.0
        for j in results)), compiled_mode=mode)
    kept = {j: _kept_compiled(results[j], micro) for j in results}
    if any(k is None for k in kept.values()):
        return timed
    scales = []
    for j in results:
        eager = sum(opts[j].kept_bytes for opts in options.blocks)
        compiled = max(kept[j] - options.outside_bytes, 0)  # type: ignore[operator]
        scales.append(compiled / eager if eager > 0 else 1.0)
    return dataclasses.replace(timed, kept_scales=tuple(scales))


def _kept_compiled(result: Any, micro: Any) -> int | None:
    """Bytes a built (and already compiled) ``result`` keeps from its forward to its
    backward on ``micro``, from the c10 allocator (it sees inductor's buffers); None when
    the profiler is taken or the step fails."""
    from autoscale.measure._allocator import AllocatorPeakTracker, profiler_is_free
    from autoscale.runtime._batch import call_model, compute_loss

    if not profiler_is_free():
        return None
    try:
        with AllocatorPeakTracker(roots=(result.model, micro), device="cpu") as tracker:
            loss = compute_loss(result.loss_fn, call_model(result.model, micro), micro)
        loss.backward()
    except Exception:  # a refinement: the eager bytes stand
        return None
    finally:
        result.model.zero_grad(set_to_none=True)
    return tracker.end_bytes - tracker.baseline_bytes


def _measured_compiled(model: nn.Module, batch: Any, plan: Plan, loss_fn: Any) -> int | None:
    """What ``plan`` (compile.mode 'inductor') keeps for the backward, measured: built,
    compiled by one forward and backward, then one forward under the allocator tracker."""
    from autoscale.runtime import build_result
    from autoscale.runtime._batch import call_model, compute_loss, split_batch

    micro, _ = next(iter(split_batch(batch, plan.batch.micro_batch_size)))
    try:
        result = build_result(plan, model, loss_fn=loss_fn)
        compute_loss(result.loss_fn, call_model(result.model, micro), micro).backward()
        result.model.zero_grad(set_to_none=True)
    except Exception:  # the eager bytes stand
        return None
    return _kept_compiled(result, micro)


def _extra_seconds(runs: Mapping[int, Any], rounds: int, *, reference: int
                   ) -> dict[int, float]:
    """Each run's seconds over the ``reference`` run's (Note: [paired option timing]):
    every run called twice untimed (a compiled run compiles in its first), then ``rounds``
    rounds of one call each in an order rotated each round; per run, the median over the
    rounds of its time less the reference's time in the same round, or 0.0 where that
    median is within two standard errors of zero (the solver then prefers the option
    keeping fewer bytes among costs the timing cannot tell apart from none)."""
    for run in runs.values():
        run()
        run()
    order = list(runs)
    times: dict[int, list[float]] = {k: [] for k in order}
    for r in range(rounds):
        for k in order[r % len(order):] + order[: r % len(order)]:
            times[k].append(runs[k]())
    out = {}
    for k in order:
        diffs = [a - b for a, b in zip(times[k], times[reference], strict=True)]
        mid = statistics.median(diffs)
        # The median's standard error, from the rounds' spread (MAD scaled to a standard
        # deviation, times 1.25 for a median): a cost within two of them of zero is zero.
        spread = 1.4826 * statistics.median(abs(d - mid) for d in diffs)
        out[k] = 0.0 if abs(mid) <= 2 * 1.25 * spread / math.sqrt(len(diffs)) else mid
    return out


# Note: [paired option timing]
# An option's cost is its step less the unchecked step. Taken as the fastest of each over
# the rounds (as before), two of the same Llama options under inductor came out 0.0 and
# 8.6 ms apart in one bench run, and three timings of the options in one process put full
# checkpointing at 3.7, 6.8 and 8.7 ms (once at 0.0): one lucky fastest step moves an
# option's whole figure. The difference taken within each round (the same moment of the
# machine) and its median over the rounds put full at 7.6, 8.8 and 7.9 ms and the twins
# at 0.0/0.0, 0.0/0.0 and 0.3/0.9 in three timings (10 rounds each). At the 25% budget
# the solver's Llama plan had followed the noise: full blocks where full had timed cheap
# (0.96x the eager step, 1.047x torch.compile's own at 0.25 head to head), selective
# attention where it had not (0.92x against 0.96x). A cost the rounds cannot tell from
# zero counts as zero: with paired medians alone, selective checkpointing that saves the
# matmuls and attention timed +0.2 ms on Llama, within its noise, and at the 100% budget
# the solver kept every activation (no checkpointing, 21.68 MiB) instead of 14.55 MiB at
# the same speed.


def scaled_options(options: BlockOptions, ratios: tuple[float, ...]) -> BlockOptions:
    """``options`` with option j's recompute seconds times ``ratios[j]`` in every block
    (the options come in the same order in every block)."""
    return dataclasses.replace(options, ratios=ratios, blocks=tuple(
        tuple(dataclasses.replace(o, recompute_s=o.recompute_s * ratios[j])
              for j, o in enumerate(opts)) for opts in options.blocks))


# Note: [options under inductor]
# Under torch.compile the options cost and keep other amounts: inductor fuses the recomputed
# pointwise ops (and dropout's random numbers) into the backward's kernels and the Python
# dispatch of the selective policy is gone. Measured on the GPT example, 2 threads, every
# block under one option: full +2.65 ms a block (eager +8.8), selective saving matmuls and
# attention -1.3 ms, saving the matmuls +0.7, saving attention +1.0 with 9.2 MiB kept in
# all where eager keeps 14. So a compiled plan's policies are solved on options timed under
# inductor, and on what they keep under it, each answer checked by measuring it (Note:
# [kept bytes under inductor]). On the whole model, not one block:
# timed on the first block alone, compiled, full checkpointing cost 0.1 ms where it costs
# 2.65 in the whole compiled model, and ranked the options in another order. One compile
# per option (a few seconds each here); the tuner pays it once per tune, and only where
# the search includes compile mode 'inductor'.

# Note: [timing the options on one block]
# The priced recompute seconds (FLOPs and bytes at the calibrated rates, a per-op dispatch
# cost for selective options) rank the options wrongly here: on the GPT example, 2
# threads, every block's options timed in whole steps cost +8.8 ms a block fully
# checkpointed and +9.5 to +10.7 ms selective, where the prices said 3.2 ms and 2.8 to 3.8
# ms. Dropout's random numbers (recomputed by every option: 20% of the step here) and the
# selective policy's Python dispatch on real ops (2.75 ms a block in the profile, against
# the 0.3 ms the tiny-op probe predicts) make selective slower than full, yet the priced
# solver chose selective blocks (at 50% of the activations two selective and one full:
# 1.51x the uncheckpointed step in one run; its timed answers, three full blocks or one
# selective and two full as the timing's noise falls, measured 1.30-1.42x in four). Timing
# the first block alone under each option (a few ms each) gives the real ratios; each
# option's per-block prices are scaled by its measured/priced ratio, so blocks of other
# sizes keep their priced proportions. The tuner times once, before any trial runs (no
# trial shares the CPU with it).


def _one_rank(plan: Plan, batch: Any) -> tuple[Plan, Any]:
    """A distributed plan's one rank, as the simulated step takes it: rank 0's share of the
    batch, unsharded (sharding moves parameters and gradients, not activations)."""
    from autoscale.plan import CompressPlan, ShardPlan
    from autoscale.runtime._batch import rank_share

    if plan.shard.strategy == "none":
        return plan, batch
    return (plan.replace(shard=ShardPlan(), compress=CompressPlan()),
            rank_share(batch, 0, plan.shard.world_size))


def _recompute_s(ops: list[tuple[Any, float]], policy: str, save: tuple[str, ...],
                 overhead: float) -> float:
    from autoscale.passes.checkpoint import OP_KINDS

    if policy == "none":
        return 0.0
    saved = frozenset().union(*(OP_KINDS[k] for k in save))
    seconds = sum(t for packet, t in ops if packet not in saved)
    return seconds + (2 * len(ops) * overhead if policy == "selective" else 0.0)


@dataclass
class _Run:
    kept: dict[str, int]
    total: int
    ops: dict[str, list[tuple[Any, float]]]


def _fake_forward(model: nn.Module, batch: Any, plan: Plan, fqns: list[str], loss_fn: Any,
                  rates: MachineRates, *, count_ops: bool) -> _Run:
    """One forward of ``plan`` on fake tensors: bytes each block leaves live (read
    between its pre- and post-forward hooks), all bytes live after the loss, and (with
    ``count_ops``) each block's forward ops with their priced seconds."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from autoscale.cost._simulate import _fake_batch, _fake_copy, _rng_states_counted
    from autoscale.measure._memory import PeakMemoryTracker
    from autoscale.runtime import build_result
    from autoscale.runtime._batch import call_model, compute_loss, split_batch

    mode = FakeTensorMode()
    fake_model, fake_batch = _fake_copy(model, mode), _fake_batch(batch, mode)
    run = _Run(kept={}, total=0, ops={f: [] for f in fqns})
    with mode:
        result = build_result(plan, fake_model, loss_fn=loss_fn, inplace=True)
        micro, _ = next(iter(split_batch(fake_batch, plan.batch.micro_batch_size)))
        result.model.train()
        roots = (result.model, fake_batch)
        # A checkpointed block keeps the CPU RNG state it replays in recompute (5056 bytes,
        # made outside the dispatcher): counted, or tight budgets are missed by that much.
        with PeakMemoryTracker(roots=roots, device="cpu", fake=True) as tracker, \
                _OpPrices(rates, run.ops, enabled=count_ops) as prices, \
                _rng_states_counted(tracker):
            handles = _block_hooks(result.model, fqns, tracker, run.kept, prices)
            try:
                loss = compute_loss(result.loss_fn, call_model(result.model, micro), micro)
            finally:
                for h in handles:
                    h.remove()
            run.total = tracker.current_bytes - tracker.baseline_bytes
        del loss
    return run


def _block_hooks(model: nn.Module, fqns: list[str], tracker: Any, kept: dict[str, int],
                 prices: _OpPrices) -> list[Any]:
    handles = []
    for fqn in fqns:
        block = model.get_submodule(fqn)
        start: dict[str, int] = {}

        def pre(_m: nn.Module, _args: Any, fqn: str = fqn, start: dict[str, int] = start
                ) -> None:
            start["bytes"] = tracker.current_bytes
            prices.block = fqn

        def post(_m: nn.Module, _args: Any, _out: Any, fqn: str = fqn,
                 start: dict[str, int] = start) -> None:
            kept[fqn] = kept.get(fqn, 0) + tracker.current_bytes - start["bytes"]
            prices.block = None

        handles += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
    return handles


class _OpPrices(TorchDispatchMode):
    """Records each op run inside a block as (overload packet, seconds at ``rates``),
    priced as the step-time estimate prices ops (autoscale.cost._time._op_seconds)."""

    def __init__(self, rates: MachineRates, ops: dict[str, list[tuple[Any, float]]], *,
                 enabled: bool) -> None:
        super().__init__()
        self.rates, self.ops, self.enabled = rates, ops, enabled
        self.block: str | None = None

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        from autoscale.cost._time import _op_seconds, _tensor_bytes, price_key

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.enabled or self.block is None or func.namespace == "prim":
            return out
        packet = func._overloadpacket
        flops, precision = price_key(func, args, kwargs, out)
        nbytes = 0 if func.is_view else _tensor_bytes((args, kwargs)) + _tensor_bytes(out)
        self.ops[self.block].append((packet, _op_seconds(flops, nbytes, precision, self.rates)))
        return out


def solve_checkpoint_plan(model: nn.Module, batch: Any, graph: Any, budget_bytes: int, *,
                          plan: Plan | None = None,
                          save_sets: Mapping[str, tuple[str, ...]] | None = None,
                          loss_fn: Any = None, rates: MachineRates | None = None,
                          sac_op_overhead: float | None = None,
                          options: BlockOptions | None = None,
                          timed: bool = True, compiled: bool | str = False) -> CheckpointPlan:
    """The checkpoint section that keeps the forward's activations (as
    ``autoscale.estimate(...).activations`` counts them: inside blocks and out) within
    ``budget_bytes`` at the least recompute time: :func:`measure_block_options`, then
    :func:`solve_checkpoint` on the budget left after the bytes kept outside the blocks.

    Invariant: the returned plan's simulated forward keeps at most ``budget_bytes``. The
    per-block figures assume the blocks are additive (Note: [the checkpoint solver]);
    where mixed policies keep a few bytes more than their sum (measured: +0.2% on HF GPT-2
    at a quarter of its activations), the solved plan is simulated and solved again on a
    budget lowered by the excess. Raises InfeasibleError naming the smallest feasible
    budget when none fits. ``options``: the blocks' options already measured for ``plan``
    (what :func:`measure_block_options` returns), reused instead of measured again;
    otherwise they are measured and, with ``timed``, their recompute seconds refined by
    timing the first block for real (:func:`time_block_options`; ``compiled``: timed
    under inductor, for a plan with compile.mode 'inductor', or the mode it names).

    Options timed under inductor come with what each keeps compiled (``kept_scales``):
    then the blocks are solved on those bytes, and each answer is compiled and its kept
    bytes measured for real, solved again on a budget lowered by any excess (at most three
    times; Note: [kept bytes under inductor]); if none fits, the eager bytes, an upper
    bound under inductor, decide as above. Invariant then:
    the returned plan's compiled forward keeps at most ``budget_bytes``, as measured (or,
    on that fallback, as the eager simulation bounds it).
    """
    plan = plan or Plan()
    measured = options
    if measured is None:
        if save_sets is None:
            save_sets = save_sets_for(_compiled_mode(compiled) if compiled
                                      else _solver_mode(plan))
        measured = measure_block_options(
            model, batch, graph, plan=plan, save_sets=save_sets, loss_fn=loss_fn,
            rates=rates, sac_op_overhead=sac_op_overhead)
        if timed or compiled:
            measured = time_block_options(model, batch, graph, measured, plan=plan,
                                          loss_fn=loss_fn, compiled=compiled)
    fqns = [b.fqn for b in graph.blocks]
    if measured.kept_scales is not None:
        section = _solve_compiled(model, batch, budget_bytes, plan, measured, loss_fn)
        if section is not None:
            return section

    def simulated(section: CheckpointPlan) -> int:
        local, share = _one_rank(plan.replace(checkpoint=section), batch)
        run = _fake_forward(model, share, local, fqns, loss_fn, rates or machine_rates(),
                            count_ops=False)
        return run.total

    leanest = CheckpointPlan(blocks=tuple(
        min(opts, key=lambda o: (o.kept_bytes, o.recompute_s)).policy
        for opts in measured.blocks))
    floor = sum(min(o.kept_bytes for o in opts) for opts in measured.blocks)
    inside = budget_bytes - measured.outside_bytes
    while inside >= floor:
        section = solve_checkpoint(measured.blocks, inside).plan()
        kept = simulated(section)
        if kept <= budget_bytes:
            return section
        inside -= kept - budget_bytes
    smallest = simulated(leanest)
    if smallest <= budget_bytes:
        return leanest
    raise InfeasibleError(
        f"no checkpoint policies fit an activation budget of {budget_bytes} bytes: the "
        f"smallest feasible budget is {smallest} bytes (every block at its leanest option, "
        f"{measured.outside_bytes} bytes of it kept outside the blocks). Raise the budget, "
        "or save memory elsewhere (micro-batches, lower precision).")


def _solve_compiled(model: nn.Module, batch: Any, budget_bytes: int, plan: Plan,
                    options: BlockOptions, loss_fn: Any, *, tries: int = 3
                    ) -> CheckpointPlan | None:
    """The solver on the bytes the options keep under inductor, each answer measured
    compiled (Note: [kept bytes under inductor]); None when no answer fit in ``tries``."""
    from autoscale.plan import CompilePlan

    assert options.kept_scales is not None
    scales = options.kept_scales
    blocks = tuple(tuple(dataclasses.replace(o, kept_bytes=math.ceil(o.kept_bytes * scales[j]))
                         for j, o in enumerate(opts)) for opts in options.blocks)
    floor = sum(min(o.kept_bytes for o in opts) for opts in blocks)
    inside = budget_bytes - options.outside_bytes
    compiled = plan.replace(compile=CompilePlan(
        mode=options.compiled_mode or "inductor"))  # type: ignore[arg-type]
    for _ in range(tries):
        if inside < floor:
            return None
        section = solve_checkpoint(blocks, inside).plan()
        kept = _measured_compiled(model, batch, compiled.replace(checkpoint=section), loss_fn)
        if kept is None:
            return None
        if kept <= budget_bytes:
            return section
        inside -= kept - budget_bytes
    return None


# Note: [kept bytes under inductor]
# Inductor keeps less than eager for the same policies: its partitioner recomputes fused
# pointwise ops and saves smaller tensors, and a selective block keeps what its saved
# matmuls produce and little else (GPT example: every block selective, saving matmuls and
# attention, kept 20.7 MiB compiled where eager keeps 37.5). Solving on the eager bytes
# (an upper bound) checkpointed more than a budget needs: at 25% of GPT's activations it
# chose two blocks fully recomputed and kept 9.7 MiB of 12.5. So the compiled timing also
# measures what each option keeps with every block under it, and scales that option's
# per-block eager bytes by the ratio (what is kept outside the blocks is taken as eager's).
# Mixed options do not add up exactly under inductor's partitioner (scaled bytes alone gave
# a plan 6% over at 25%: 13.2 MiB for 12.5), so each answer is compiled and measured, and
# solved again on a budget lowered by the excess, as the eager path does with its
# simulation. Measuring costs one compile per answer (a few seconds here). The tuner's knob
# does not measure: each trial measures its plan anyway, so it solves on the eager bytes.


class CheckpointBudgets:
    """The tuner's checkpoint knob: a fraction ``f`` in [0, 1] turned into every block's
    policy by the exact solver.

    Note: [the checkpoint knob]
    ``f`` places the solver's activation budget between the least the checkpoint policies
    can keep (``floor``: every block at its leanest option, plus what the forward keeps
    outside the blocks) and what no checkpointing keeps (``ceiling``):
    ``floor + f * (ceiling - floor)``. So f=1 is no checkpointing, f=0 the leanest
    policies, and every f in between is feasible, where a fraction of the no-checkpoint
    memory alone would leave the range below ``floor / ceiling`` (a fifth to a twentieth
    of it on the example models) infeasible. The bytes depend on the rest of the plan
    (micro-batch size, precision, one rank's share of the batch), so the blocks' options
    are measured once per such combination and each solved section is kept, per
    combination and fraction: a tune pays about half a second per new one (fake tensors,
    no real compute). The options' recompute seconds are timed on the first block once,
    for the first combination asked (Note: [timing the options on one block]), and its
    measured/priced ratios scale the prices of every later combination.
    """

    def __init__(self, model: nn.Module, batch: Any, graph: Any, *, loss_fn: Any = None,
                 timed: bool = True) -> None:
        self._model, self._batch, self._graph, self._loss_fn = model, batch, graph, loss_fn
        self._timed = timed
        self._ratios: dict[str | None, tuple[float, ...] | None] = {}
        self._options: dict[str, tuple[BlockOptions, int, int]] = {}
        self._sections: dict[tuple[str, float], CheckpointPlan] = {}

    def section(self, plan: Plan, fraction: float) -> CheckpointPlan:
        """The checkpoint section for ``plan`` (its checkpoint section ignored) whose
        simulated forward keeps at most ``floor + fraction * (ceiling - floor)`` bytes at
        the least recompute time; ``fraction >= 1`` gives no checkpointing at all."""
        if not 0.0 <= fraction <= 1.0:
            raise PlanError(f"the checkpoint budget fraction must be in [0, 1], got "
                            f"{fraction!r}.")
        if fraction >= 1.0:
            return CheckpointPlan()
        key = _combination(plan)
        cached = self._sections.get((key, fraction))
        if cached is not None:
            return cached
        rest = plan.replace(checkpoint=CheckpointPlan())
        options, floor, ceiling = self._measured(key, rest)
        section = solve_checkpoint_plan(
            self._model, self._batch, self._graph, int(floor + fraction * (ceiling - floor)),
            plan=rest, loss_fn=self._loss_fn, options=options)
        self._sections[(key, fraction)] = section
        return section

    def bounds(self, plan: Plan) -> tuple[int, int]:
        """(floor, ceiling) activation bytes for ``plan``'s other sections."""
        key = _combination(plan)
        _, floor, ceiling = self._measured(key, plan.replace(checkpoint=CheckpointPlan()))
        return floor, ceiling

    def _measured(self, key: str, plan: Plan) -> tuple[BlockOptions, int, int]:
        if key not in self._options:
            options = measure_block_options(self._model, self._batch, self._graph, plan=plan,
                                            loss_fn=self._loss_fn)
            # Timed once (eager, and once compiled), on the first combination asked (the
            # tuner's untouched plan, before any trial runs); later ones reuse its ratios
            # rather than time beside a trial.
            compiled = _solver_mode(plan)
            if compiled in self._ratios:
                ratios = self._ratios[compiled]
                if ratios is not None:
                    options = scaled_options(options, ratios)
            elif self._timed or compiled:
                options = time_block_options(self._model, self._batch, self._graph, options,
                                             plan=plan, loss_fn=self._loss_fn,
                                             compiled=compiled or False)
                # Each trial measures its own plan: the knob solves on the eager bytes
                # (Note: [kept bytes under inductor]).
                options = dataclasses.replace(options, kept_scales=None)
                self._ratios[compiled] = options.ratios
            inside = [(opts[0].kept_bytes, min(o.kept_bytes for o in opts))
                      for opts in options.blocks]
            self._options[key] = (options,
                                  options.outside_bytes + sum(low for _, low in inside),
                                  options.outside_bytes + sum(none for none, _ in inside))
        return self._options[key]


def _solver_mode(plan: Plan) -> str | None:
    """The compile mode the plan's checkpoint policies run under, None for eager (and for
    'inductor-budget', whose checkpointing is inductor's own)."""
    from autoscale.plan import SOLVER_MODES

    return plan.compile.mode if plan.compile.mode in SOLVER_MODES else None


def _combination(plan: Plan) -> str:
    """What the blocks' options depend on besides the checkpoint section: micro-batch,
    precision, one rank's share, and which compile mode (if any) runs them."""
    return repr((plan.batch, plan.precision, plan.shard, _solver_mode(plan)))
