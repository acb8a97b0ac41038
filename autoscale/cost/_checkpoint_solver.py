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

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from autoscale.cost._rates import MachineRates, machine_rates
from autoscale.errors import InfeasibleError, PlanError
from autoscale.plan import BlockPolicy, CheckpointPlan, Plan

__all__ = [
    "DEFAULT_SAVE_SETS",
    "BlockOption",
    "BlockOptions",
    "CheckpointBudgets",
    "CheckpointSolution",
    "measure_block_options",
    "sac_op_overhead_s",
    "solve_checkpoint",
    "solve_checkpoint_plan",
]

DEFAULT_SAVE_SETS: Mapping[str, tuple[str, ...]] = {
    "matmuls+attention": ("mm", "addmm", "bmm", "sdpa"),
    "matmuls": ("mm", "addmm"),
    "attention": ("bmm", "sdpa", "softmax"),
}
"""The selective options offered per block besides none and full: saved op kinds."""

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


def measure_block_options(model: nn.Module, batch: Any, graph: Any, *,
                          plan: Plan | None = None,
                          save_sets: Mapping[str, tuple[str, ...]] = DEFAULT_SAVE_SETS,
                          loss_fn: Any = None, rates: MachineRates | None = None,
                          sac_op_overhead: float | None = None) -> BlockOptions:
    """Measure each block's options on fake tensors (no real compute; ``model`` is only
    read): kept bytes from the storage ledger, recompute seconds priced at ``rates``
    (default: this machine's, :func:`machine_rates`), a selective option's seconds with
    its dispatch cost per op in forward and recompute (``sac_op_overhead``, default
    :func:`sac_op_overhead_s`; Note: [selective checkpointing's dispatch cost]).
    ``plan``'s other sections (precision, micro-batches) apply; its checkpoint section is
    replaced by each option in turn. For a distributed plan the figures are one rank's,
    on its share of ``batch`` (the global batch).
    """
    plan, batch = _one_rank(plan or Plan(), batch)
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
        from autoscale.cost._time import _LOW, _RANDOM, _first_tensor, _op_seconds, _tensor_bytes

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.enabled or self.block is None or func.namespace == "prim":
            return out
        packet, first = func._overloadpacket, _first_tensor(out)
        flops, precision = 0, ""
        formula = flop_registry.get(packet)
        if formula is not None:
            flops = int(formula(*args, **kwargs, out_val=out))
            precision = _LOW.get(first.dtype, "") if first is not None else ""
        elif packet in _RANDOM and first is not None:
            flops, precision = first.numel(), "rng"
        nbytes = 0 if func.is_view else _tensor_bytes((args, kwargs)) + _tensor_bytes(out)
        self.ops[self.block].append((packet, _op_seconds(flops, nbytes, precision, self.rates)))
        return out


def solve_checkpoint_plan(model: nn.Module, batch: Any, graph: Any, budget_bytes: int, *,
                          plan: Plan | None = None,
                          save_sets: Mapping[str, tuple[str, ...]] = DEFAULT_SAVE_SETS,
                          loss_fn: Any = None, rates: MachineRates | None = None,
                          sac_op_overhead: float | None = None,
                          options: BlockOptions | None = None) -> CheckpointPlan:
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
    (what :func:`measure_block_options` returns), reused instead of measured again.
    """
    plan = plan or Plan()
    measured = options or measure_block_options(
        model, batch, graph, plan=plan, save_sets=save_sets, loss_fn=loss_fn, rates=rates,
        sac_op_overhead=sac_op_overhead)
    fqns = [b.fqn for b in graph.blocks]

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
    no real compute).
    """

    def __init__(self, model: nn.Module, batch: Any, graph: Any, *, loss_fn: Any = None) -> None:
        self._model, self._batch, self._graph, self._loss_fn = model, batch, graph, loss_fn
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
        key = repr((plan.batch, plan.precision, plan.shard))
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
        key = repr((plan.batch, plan.precision, plan.shard))
        _, floor, ceiling = self._measured(key, plan.replace(checkpoint=CheckpointPlan()))
        return floor, ceiling

    def _measured(self, key: str, plan: Plan) -> tuple[BlockOptions, int, int]:
        if key not in self._options:
            options = measure_block_options(self._model, self._batch, self._graph, plan=plan,
                                            loss_fn=self._loss_fn)
            inside = [(opts[0].kept_bytes, min(o.kept_bytes for o in opts))
                      for opts in options.blocks]
            self._options[key] = (options,
                                  options.outside_bytes + sum(low for _, low in inside),
                                  options.outside_bytes + sum(none for none, _ in inside))
        return self._options[key]
