"""The checkpoint solver is exact (against brute force), its answers fit the budget, and
the activation memory of its plans falls as the budget falls."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from tests_helpers import tiny_gpt

import autoscale
from autoscale import BlockPolicy, CompilePlan, InfeasibleError, Plan
from autoscale.cost._checkpoint_solver import (
    DEFAULT_SAVE_SETS,
    MASK_SAVE_SETS,
    BlockOption,
    CheckpointBudgets,
    measure_block_options,
    sac_op_overhead_s,
    save_sets_for,
    solve_checkpoint,
    solve_checkpoint_plan,
    time_block_options,
)
from autoscale.cost._rates import MachineRates

# Fixed rates: the tests are offline and deterministic (the solver's choice, not the
# machine's speed, is under test).
_RATES = MachineRates(matmul_flops_per_s=1e10, memory_bytes_per_s=1e10, op_overhead_s=1e-6)
_POLICIES = [BlockPolicy("b", "none"), BlockPolicy("b", "full"),
             BlockPolicy("b", "selective", save=("mm",)),
             BlockPolicy("b", "selective", save=("sdpa",))]


def _instance(rng: random.Random, blocks: int = 6, scale: int = 1000
              ) -> list[list[BlockOption]]:
    out = []
    for i in range(blocks):
        opts = []
        for j, p in enumerate(_POLICIES):
            policy = BlockPolicy(f"h.{i}", p.policy, save=p.save)
            opts.append(BlockOption(policy, kept_bytes=rng.randrange(scale),
                                    recompute_s=0.0 if j == 0 else rng.random()))
        out.append(opts)
    return out


def _brute(options: list[list[BlockOption]], budget: int) -> tuple[float, int] | None:
    """(least time, fewest bytes at that time) over every assignment that fits."""
    best: tuple[float, int] | None = None
    for combo in itertools.product(*options):
        kept = sum(o.kept_bytes for o in combo)
        if kept <= budget:
            key = (sum(o.recompute_s for o in combo), kept)
            best = key if best is None or key < best else best
    return best


def test_solver_matches_brute_force_on_200_random_instances() -> None:
    rng = random.Random(0)
    for _ in range(200):
        options = _instance(rng)
        floor = sum(min(o.kept_bytes for o in opts) for opts in options)
        top = sum(max(o.kept_bytes for o in opts) for opts in options)
        budget = rng.randint(floor, top)
        solution = solve_checkpoint(options, budget)
        expected = _brute(options, budget)
        assert expected is not None
        assert solution.margin_bytes == 0  # small integers: the gcd granularity is exact
        assert solution.kept_bytes <= budget
        assert solution.recompute_s == pytest.approx(expected[0], rel=1e-9, abs=1e-12)
        assert [o.policy.fqn for o in solution.options] == [f"h.{i}" for i in range(6)]
        # Random times never tie: the least time fixes the assignment, and its bytes.
        assert solution.kept_bytes == expected[1]


def test_ties_in_time_go_to_the_fewest_bytes() -> None:
    # The monotonicity of kept bytes in the budget (Note: [the checkpoint solver]) rests
    # on this: among the fastest answers, the leanest.
    def opt(fqn: str, policy: str, kept: int, t: float) -> BlockOption:
        return BlockOption(BlockPolicy(fqn, policy), kept_bytes=kept, recompute_s=t)  # type: ignore[arg-type]

    options = [[opt(f"h.{i}", "none", 100, 0.0), opt(f"h.{i}", "full", 30, 0.5)]
               for i in range(2)]
    options.append([opt("h.2", "none", 40, 0.5), opt("h.2", "full", 10, 0.5)])
    solution = solve_checkpoint(options, 1000)
    assert [o.policy.policy for o in solution.options] == ["none", "none", "full"]
    assert solution.kept_bytes == 210


def test_coarse_granularity_fits_and_is_within_its_margin() -> None:
    rng = random.Random(1)
    for _ in range(50):
        options = _instance(rng, scale=10**6)
        floor = sum(min(o.kept_bytes for o in opts) for opts in options)
        top = sum(max(o.kept_bytes for o in opts) for opts in options)
        budget = rng.randint(floor, top)
        solution = solve_checkpoint(options, budget, max_cells=200)
        assert solution.granularity > 1 and solution.margin_bytes == 6 * solution.granularity
        assert solution.kept_bytes <= budget
        tighter = _brute(options, budget - solution.margin_bytes)
        if tighter is not None:  # at least as fast as the exact answer at budget - margin
            assert solution.recompute_s <= tighter[0] + 1e-12


def test_infeasible_budget_names_the_smallest_feasible_one() -> None:
    options = _instance(random.Random(2))
    floor = sum(min(o.kept_bytes for o in opts) for opts in options)
    with pytest.raises(InfeasibleError, match=f"smallest feasible budget is {floor} bytes"):
        solve_checkpoint(options, floor - 1)
    assert solve_checkpoint(options, floor).kept_bytes == floor


def test_measured_activations_fall_with_the_budget_and_fit_it() -> None:
    model, batch = tiny_gpt(dropout=0.1)
    graph = autoscale.capture(model, batch)
    measured = measure_block_options(model, batch, graph, rates=_RATES,
                                     sac_op_overhead=0.0)
    none = autoscale.estimate(model, batch, Plan(), graph=graph).activations
    # The options' bytes are read from the same ledger as the estimate: they add up.
    assert measured.outside_bytes + sum(o[0].kept_bytes for o in measured.blocks) == none
    previous = None
    for fraction in (1.0, 0.75, 0.5, 0.25, 0.15):
        budget = int(none * fraction)
        section = solve_checkpoint(measured.blocks, budget - measured.outside_bytes).plan()
        kept = autoscale.estimate(model, batch, Plan(sections={"checkpoint": section}),
                                  graph=graph).activations
        assert kept <= budget, (fraction, kept, budget)
        assert previous is None or kept <= previous, (fraction, kept, previous)
        previous = kept
    assert section == solve_checkpoint_plan(model, batch, graph, budget, rates=_RATES,
                                            sac_op_overhead=0.0, timed=False)
    with pytest.raises(InfeasibleError, match="smallest feasible budget is"):
        solve_checkpoint_plan(model, batch, graph, measured.outside_bytes, rates=_RATES)


def test_selective_options_cost_less_recompute_than_full() -> None:
    model, batch = tiny_gpt(dropout=0.1)
    graph = autoscale.capture(model, batch)
    # With the mask sets 'inductor-eager-rng' adds, measured here on eager's simulation.
    options = measure_block_options(model, batch, graph, rates=_RATES, sac_op_overhead=0.0,
                                    save_sets=save_sets_for("inductor-eager-rng"))
    assert len(options.blocks[0]) == 2 + len(DEFAULT_SAVE_SETS) + len(MASK_SAVE_SETS)
    for none, full, *selective in options.blocks:
        assert none.recompute_s == 0 and none.kept_bytes > full.kept_bytes
        for option in selective:
            if option.policy.save == ("dropout",):
                # CPU eager runs dropout as bernoulli_ in place: nothing to save, so this
                # option is full checkpointing here (it differs only when compiled).
                assert option.kept_bytes == full.kept_bytes
                assert option.recompute_s == pytest.approx(full.recompute_s)
                continue
            assert 0 < option.recompute_s < full.recompute_s
            assert full.kept_bytes < option.kept_bytes < none.kept_bytes


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_huggingface_solved_plans_fit_fall_and_keep_gradients(name: str) -> None:
    import copy

    import torch
    from tests_helpers import grads_of

    from autoscale.passes import checkpoint_blocks

    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 16))
    if name == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=32,
                                                 vocab_size=64, use_cache=False))
    else:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(
            vocab_size=64, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128, use_cache=False,
            attention_dropout=0.1))
    model.train()
    batch = {"input_ids": ids, "labels": ids}
    graph = autoscale.capture(model, batch)
    none = autoscale.estimate(model, batch, Plan(), graph=graph).activations
    previous = None
    for fraction in (1.0, 0.75, 0.5, 0.25):
        budget = int(none * fraction)
        section = solve_checkpoint_plan(model, batch, graph, budget, rates=_RATES,
                                            sac_op_overhead=0.0)
        kept = autoscale.estimate(model, batch, Plan(sections={"checkpoint": section}),
                                  graph=graph).activations
        assert kept <= budget and (previous is None or kept <= previous), (fraction, kept)
        previous = kept
        rewritten = checkpoint_blocks(copy.deepcopy(model), plan=section)
        losses = []
        for m in (model, rewritten):
            m.zero_grad(set_to_none=True)
            torch.manual_seed(5)
            loss = m(**batch).loss
            loss.backward()
            losses.append(loss)
        torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
        for key, ref in grads_of(model).items():
            torch.testing.assert_close(grads_of(rewritten)[key], ref, rtol=1e-6, atol=1e-7)


def test_selective_dispatch_cost_is_measured_and_charged() -> None:
    overhead = sac_op_overhead_s()
    assert 0.0 <= overhead < float("inf")
    model, batch = tiny_gpt(dropout=0.1)
    graph = autoscale.capture(model, batch)
    free = measure_block_options(model, batch, graph, rates=_RATES, sac_op_overhead=0.0)
    charged = measure_block_options(model, batch, graph, rates=_RATES, sac_op_overhead=1e-5)
    for a, b in zip(free.blocks[0], charged.blocks[0], strict=True):
        extra = b.recompute_s - a.recompute_s
        assert extra > 0 if a.policy.policy == "selective" else extra == 0


def test_a_distributed_plan_is_measured_on_one_rank_share() -> None:
    from autoscale import ShardPlan

    model, batch = tiny_gpt(batch_size=8, dropout=0.1)
    graph = autoscale.capture(model, batch)
    one = measure_block_options(model, batch, graph, rates=_RATES, sac_op_overhead=0.0)
    two = measure_block_options(model, batch, graph, rates=_RATES, sac_op_overhead=0.0,
                                plan=Plan(sections={"shard": ShardPlan(strategy="zero2",
                                                                       world_size=2)}))
    # Half the rows a rank: activations scale with the batch; the RNG state a checkpointed
    # block keeps for its replay does not.
    rng = torch.get_rng_state().numel()

    def scaled(o: BlockOption) -> int:
        return o.kept_bytes - (rng if o.policy.policy != "none" else 0)

    assert [scaled(o) for o in two.blocks[0]] == [scaled(o) // 2 for o in one.blocks[0]]


def test_timing_scales_each_options_prices_by_its_measured_ratio() -> None:
    model, batch = tiny_gpt(dropout=0.1)
    graph = autoscale.capture(model, batch)
    priced = measure_block_options(model, batch, graph, rates=_RATES, sac_op_overhead=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    timed = time_block_options(model, batch, graph, priced)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert timed.ratios is not None and len(timed.ratios) == len(priced.blocks[0])
    for opts, old in zip(timed.blocks, priced.blocks, strict=True):
        for j, (o, p) in enumerate(zip(opts, old, strict=True)):
            assert o.policy == p.policy and o.kept_bytes == p.kept_bytes
            assert o.recompute_s == pytest.approx(p.recompute_s * timed.ratios[j])
        assert opts[0].recompute_s == 0.0
        assert opts[1].recompute_s > 0.0  # full: the block's forward runs again


def test_the_tuners_knob_times_once_and_reuses_the_ratios(monkeypatch) -> None:
    import autoscale.cost._checkpoint_solver as solver
    from autoscale import BatchPlan, PrecisionPlan

    calls = []
    real = solver.time_block_options

    def counted(*args, **kwargs):  # the real timing, counted
        calls.append(kwargs.get("compiled", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(solver, "time_block_options", counted)
    model, batch = tiny_gpt(dropout=0.1)
    graph = autoscale.capture(model, batch)
    budgets = CheckpointBudgets(model, batch, graph)
    budgets.bounds(Plan())
    budgets.section(Plan(sections={"precision": PrecisionPlan(mode="bf16")}), 0.5)
    budgets.section(Plan(sections={"batch": BatchPlan(micro_batch_size=2,
                                                      grad_accum_steps=2)}), 0.5)
    assert calls == [False]
    options = budgets._options[next(iter(budgets._options))][0]
    assert all(o.ratios == options.ratios for o, *_ in budgets._options.values())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["inductor", "inductor-eager-rng"])
def test_compiled_options_are_timed_under_inductor_and_their_plans_fit(mode: str) -> None:
    from autoscale.measure._allocator import AllocatorPeakTracker
    from autoscale.plan import CompilePlan
    from autoscale.runtime import build_result
    from autoscale.runtime._batch import call_model, compute_loss

    model, batch = tiny_gpt(dropout=0.1)
    graph = autoscale.capture(model, batch)
    inductor = Plan(sections={"compile": CompilePlan(mode=mode)})  # type: ignore[arg-type]
    priced = measure_block_options(model, batch, graph, plan=inductor)
    options = time_block_options(model, batch, graph, priced, plan=inductor, compiled=mode)
    assert options.compiled_mode == mode
    assert options.ratios is not None and len(options.ratios) == len(priced.blocks[0])
    assert [o.kept_bytes for o in options.blocks[0]] == [o.kept_bytes for o in priced.blocks[0]]
    # What each option keeps compiled was measured: under inductor's RNG no option keeps
    # more than a little over eager (the RNG states), and selective keeps less; with eager's
    # RNG a recomputed block also keeps what replaying its dropout needs. An option saving
    # kind 'dropout' keeps what eager cannot (CPU eager's dropout is bernoulli_ in place):
    # its masks, or under inductor's RNG native_dropout's outputs, so it has no such bound.
    assert options.kept_scales is not None and len(options.kept_scales) == len(options.ratios)
    bound = 1.2 if mode == "inductor" else 2.0
    for option, scale in zip(options.blocks[0], options.kept_scales, strict=True):
        assert scale > 0 if "dropout" in option.policy.save else 0 <= scale < bound, (
            option.policy, scale)
    none = autoscale.estimate(model, batch, Plan(), graph=graph).activations
    previous = None
    for fraction in (0.75, 0.5, 0.25):
        budget = int(none * fraction)
        section = solve_checkpoint_plan(model, batch, graph, budget, plan=inductor,
                                        options=options)
        result = build_result(inductor.replace(checkpoint=section), model, graph=graph)
        result.step(batch)  # compiles
        with AllocatorPeakTracker(roots=(result.model, result.optimizer, batch)) as tracker:
            loss = compute_loss(result.loss_fn, call_model(result.model, batch), batch)
        kept = tracker.end_bytes - tracker.baseline_bytes
        loss.backward()
        # Each answer was measured compiled by the solver (Note: [kept bytes under
        # inductor]): within the budget as the allocator counts it.
        assert kept <= budget, (fraction, kept, budget)
        assert previous is None or kept <= previous
        previous = kept


def test_mask_save_sets_are_offered_under_eager_rng_alone() -> None:
    """Note: [a dropout's mask is what a checkpoint keeps]: the mask-saving sets differ
    from their twins only under 'inductor-eager-rng'; elsewhere they would only cost time."""
    for mode in (None, "inductor"):
        assert save_sets_for(mode) == DEFAULT_SAVE_SETS
    rng = save_sets_for("inductor-eager-rng")
    assert rng == {**DEFAULT_SAVE_SETS, **MASK_SAVE_SETS}
    assert all("dropout" in save for save in MASK_SAVE_SETS.values())
    model, batch = tiny_gpt(dropout=0.1)
    graph = autoscale.capture(model, batch)
    plan = Plan(sections={"compile": CompilePlan(mode="inductor-eager-rng")})
    names = {o.policy.save for o in measure_block_options(
        model, batch, graph, plan=plan, rates=_RATES, sac_op_overhead=0.0).blocks[0]}
    assert ("dropout",) in names
    names = {o.policy.save for o in measure_block_options(
        model, batch, graph, rates=_RATES, sac_op_overhead=0.0).blocks[0]}
    assert ("dropout",) not in names and len(names) == 1 + len(DEFAULT_SAVE_SETS)


def test_an_options_cost_is_its_paired_difference_not_a_lucky_fastest_step() -> None:
    """Note: [paired option timing]: runs whose every call lands on the machine's state of
    the moment (a slow stretch, one lucky fast call) are compared round by round."""
    from autoscale.cost._checkpoint_solver import _extra_seconds

    rng = random.Random(0)
    calls = itertools.count()
    # The machine's speed wanders by +-20% from call to call; option 1 costs 10% more
    # than the reference, option 2 the same as it; option 2's first timed call is a lucky
    # 50% faster step.
    state = [1.0]

    def run(cost: float, lucky_at: int | None = None):
        def call() -> float:
            n = next(calls)
            if n % 3 == 0:  # a new round: the machine's state for the next three calls
                state[0] = 1.0 + rng.uniform(-0.2, 0.2)
            return cost * state[0] * (0.5 if n == lucky_at else 1.0)
        return call

    # Two untimed calls each (6 calls), then rounds of three: option 2's first timed call
    # is call 8 (the rotation starts with run 0).
    extra = _extra_seconds({0: run(1.0), 1: run(1.1), 2: run(1.0, lucky_at=8)}, 9,
                           reference=0)
    assert extra[0] == 0.0
    assert extra[1] == pytest.approx(0.1, rel=0.25)
    assert abs(extra[2]) < 0.02


def test_a_cost_the_rounds_cannot_tell_from_zero_is_zero() -> None:
    from autoscale.cost._checkpoint_solver import _extra_seconds

    rng = random.Random(1)
    # Option 1 is the reference plus noise of +-5% and no cost of its own; option 2 costs
    # 30% more every round, under the same noise.
    extra = _extra_seconds({0: lambda: 1.0 + rng.uniform(-0.05, 0.05),
                            1: lambda: 1.0 + rng.uniform(-0.05, 0.05),
                            2: lambda: 1.3 + rng.uniform(-0.05, 0.05)}, 10, reference=0)
    assert extra[1] == 0.0
    assert extra[2] == pytest.approx(0.3, abs=0.06)
