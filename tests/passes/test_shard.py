"""shard_model: each rank on its half of the batch trains like one process on all of it.

The distributed tests run tests/distributed/shard_worker.py under torchrun with 2 gloo
ranks (one torchrun for every case); the rest run in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import autoscale
from autoscale import (
    CheckpointPlan,
    PassError,
    Plan,
    PlanError,
    PrecisionPlan,
    ShardPlan,
    capture,
)
from autoscale.cost._cost import estimate_graph
from autoscale.passes.shard import shard_units
from autoscale.runtime import build_result

WORKER = Path(__file__).parents[1] / "distributed" / "shard_worker.py"
CASES = ["ddp", "zero1", "zero1-adamw-autoscale", "zero2", "zero3", "ddp-micro-ckpt",
         "zero3-micro-ckpt-adamw", "ddp-bf16", "zero1-bf16", "zero2-bf16", "zero3-bf16",
         "zero2-offload", "zero3-offload", "ddp-fp16", "zero2-fp16", "zero3-fp16"]
OVERFLOW = ["overflow/zero2-fp16", "overflow/zero3-fp16"]
STRATEGIES = ["ddp", "zero1", "zero2", "zero3"]


def _torchrun(out: Path, ranks: int, mode: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={ranks}", str(WORKER), str(out), mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the ranks share 2 cores
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return _torchrun(tmp_path_factory.mktemp("shard") / "results.json", 2, "train")


@pytest.mark.distributed
def test_every_case_ran(results: dict) -> None:
    assert sorted(results) == sorted(CASES + OVERFLOW + [f"memory/{s}" for s in STRATEGIES]
                                     + ["memory/ddp-accumulate"]
                                     + [f"batch-norm/{s}-bf16" for s in ("ddp", "zero2",
                                                                         "zero3")])


@pytest.mark.distributed
def test_fsdp2_bf16_keeps_batch_norm_weights_fp32(results: dict) -> None:
    # CPU batch_norm refuses bf16 weights beside fp32 running statistics; the batch-norm
    # layers are fp32 units of their own (Note: [batch norm under FSDP2's low precision])
    # and train like DDP under autocast within bf16's rounding (the same tolerance as the
    # bf16 cases above).
    ddp = results["batch-norm/ddp-bf16"]
    for strategy in ("zero2", "zero3"):
        torch.testing.assert_close(results[f"batch-norm/{strategy}-bf16"], ddp,
                                   rtol=3e-2, atol=1e-6)


def _check_trains_like_one_process(r: dict, *, mode: str = "fp32") -> None:
    assert r["moved"] > 0.01  # the params did train, so equality below means something
    # fp32 throughout; the only difference from one process is the order of the sums (the
    # halves' gradients averaged by the all-reduce / reduce-scatter, micro-batches
    # accumulated, ZeRO's broadcast of each owner's update): measured <= 2.1e-7 on the
    # params and 2.1e-7 (relative) on the loss after 5 steps, SGD or AdamW, offload or not.
    # Ranks that skip the gradient reduction are off by ~0.16 (tried: DDP always under
    # no_sync, FSDP2 with set_requires_gradient_sync(False)).
    # Under bf16 the weight-gradient matmuls round in bf16 (eps 7.8e-3) over 8 rows per
    # rank instead of 16, and the error grows over the 5 steps: measured after 5 steps,
    # autocast under DDP/zero1 4.7e-3 on the params and 1.3e-2 (relative) on the loss;
    # FSDP2's bf16 params under autocast 4.5e-3 and 1.1e-2, as close as DDP's.
    # Under fp16 (eps 9.8e-4, against one process under fp16 autocast and GradScaler at the
    # same initial scale, no step skipped by either): DDP 5.2e-4 on the params and 4.6e-4
    # (relative) on the loss; FSDP2's fp16 params 1.0e-3 and 8.0e-4 (its root LayerNorm's
    # weight and every bias are fp16 too, where autocast alone keeps them fp32).
    rtol, params_tol = {"fp32": (1e-5, 1e-5), "bf16": (3e-2, 1e-2),
                        "fp16": (3e-3, 3e-3)}[mode]
    torch.testing.assert_close(r["losses"], r["ref_losses"], rtol=rtol, atol=1e-6)
    assert r["vs_plain"] <= params_tol
    assert r["keys_kept"]  # Result.state_dict has the user's keys, no "module." prefix


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES)
def test_two_ranks_train_like_one_process_on_the_whole_batch(results: dict, case: str) -> None:
    mode = case.rsplit("-", 1)[-1]
    _check_trains_like_one_process(results[case],
                                   mode=mode if mode in ("bf16", "fp16") else "fp32")


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["zero1", "zero1-adamw-autoscale", "zero1-bf16"])
def test_zero1_shards_the_optimizer_and_its_state_dict_round_trips(results: dict,
                                                                   case: str) -> None:
    r = results[case]
    assert (r["wrapper"], r["optimizer"]) == ("DistributedDataParallel",
                                              "ZeroRedundancyOptimizer")
    # Result.state_dict consolidates every rank's share: every parameter's state, in torch's
    # format (a torch.optim optimizer loads it); through torch.save/load into a fresh
    # result, one more step on each gives the same parameters, exactly.
    assert r["full_state"]
    assert r["resumed_vs_trained"] == 0.0
    assert r["state_unchanged"]  # load_state_dict did not write into the caller's dict
    # full_optimizer_state empties ZeRO's private copy of the gathered states (if torch
    # renames it, this fails and the copy would stay on the host between checkpoints).
    assert r["consolidated_dropped"]


@pytest.mark.distributed
def test_per_rank_peak_falls_from_ddp_to_zero3_and_matches_the_estimate(results: dict
                                                                        ) -> None:
    measured = [results[f"memory/{s}"]["measured"] for s in STRATEGIES]
    # AdamW, 6 MiB of parameters, 2 ranks (P params, S = 2P state, G = P gradients):
    # ddp P+G+S (25.1 MiB measured), zero1 P+G+S/2 (19.6), zero2 P/2+S/2 + the whole
    # unsharded model from forward to backward (17.2), zero3 the same with two or three
    # blocks unsharded at a time (15.1).
    assert measured == sorted(measured, reverse=True)
    assert len(set(measured)) == 4
    for strategy in STRATEGIES:
        r = results[f"memory/{strategy}"]
        # Measured est/measured: ddp 0.97, zero1 0.94 (the estimate leaves out AdamW's two
        # temporaries the size of the largest parameter), zero2 1.19 (it counts the sharded
        # gradients while the unsharded model is live, as with micro-batches; with one
        # micro-batch they come after), zero3 1.06-1.10.
        ratio = r["estimate"] / r["measured"]
        assert 0.85 <= ratio <= 1.25, (strategy, ratio)
        # autoscale.estimate inside a process group (an estimate in a torchrun job, never
        # the tuner's: the unsharded step with the pass's per-rank terms) within 10%.
        simulated = r["simulated"] / r["measured"]
        assert 0.90 <= simulated <= 1.10, (strategy, simulated)
        # Where the estimating process has no process group (the tuner, `autoscale
        # estimate`), zero2/zero3 run their FSDP2 units in the simulation (Note:
        # [simulating FSDP2]): measured exact on most runs. The profiler's reading of a
        # rank's peak is an upper bound, high on one rank at times (shard_worker's Note:
        # seen 16.37 MiB on one rank, 15.86 on the other and in the estimate; and 17.43
        # against 15.87 and an estimate of 15.86), and the two ranks' steps are the same,
        # so the estimate is held to the lower reading, within 2%.
        estimate = autoscale.estimate(*_memory_model(), Plan.from_dict(r["plan"])).total
        if strategy in ("zero2", "zero3"):
            assert 0.98 <= estimate / min(r["per_rank"]) <= 1.02, (strategy, estimate, r)


def _memory_model() -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """shard_worker's memory model and global batch, built as its _memory builds them."""
    sys.path.insert(0, str(WORKER.parent))
    import shard_worker

    torch.manual_seed(0)
    model = shard_worker.Net(width=256, depth=6)
    return model, (torch.randn(shard_worker.BATCH, 6), torch.randn(shard_worker.BATCH, 1))


@pytest.mark.distributed
def test_ddp_with_micro_batches_holds_the_gradients_beside_the_buckets(results: dict
                                                                      ) -> None:
    # Under no_sync autograd keeps the gradients apart from DDP's buckets until the last
    # micro-batch's hooks copy them in. The simulated estimate counts both (before it did,
    # it was 14-16% under on the GPT example at 2 ranks; tests/passes' 6 MiB Net: see the
    # figures this prints on failure).
    r = results["memory/ddp-accumulate"]
    assert 0.95 <= r["simulated"] / r["measured"] <= 1.05, r


@pytest.mark.distributed
def test_each_strategy_wraps_as_planned(results: dict) -> None:
    assert results["ddp"]["wrapper"] == "DistributedDataParallel"
    assert results["ddp"]["optimizer"] == "SGD"
    for case in ("zero2", "zero3", "zero3-bf16", "zero3-offload"):
        # FSDP2 makes each wrapped module an instance of an FSDP<Class> subclass: the root,
        # each block, the input layer and the head; the LayerNorm stays with the root.
        assert results[case]["wrapper"] == "FSDPNet"
        assert results[case]["block_types"] == ["FSDPBlock", "FSDPBlock"]
        assert results[case]["units"] == ["", "blocks.0", "blocks.1", "head", "inp"]
    # Between forward and backward a zero2 block keeps its unsharded params; a zero3 block
    # is back to its DTensor shard (reshard_after_forward=True).
    assert results["zero2"]["block_weight_after_forward"] == ["Parameter"]
    assert results["zero3"]["block_weight_after_forward"] == ["DTensor"]


def test_shard_plan_round_trips_through_json() -> None:
    plan = Plan(sections={"shard": ShardPlan(strategy="zero3", world_size=4)})
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.digest() == plan.digest()
    assert again.shard.reshard_after_forward and not ShardPlan().reshard_after_forward
    assert json.loads(plan.to_json())["sections"]["shard"]["strategy"] == "zero3"
    # Sharding off, the section is not written: a plan file (and digest) from before the
    # section existed is unchanged, and loads with sharding off.
    data = json.loads(Plan().to_json())
    assert "shard" not in data["sections"]
    assert Plan.from_dict(data).shard == ShardPlan()


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(strategy="ddp"), r"shard.strategy='ddp' needs shard.world_size >= 2, got 1"),
    (dict(world_size=0), r"shard.world_size must be >= 1, got 0"),
    (dict(strategy="ddp", world_size=2, bucket_cap_mb=0), r"shard.bucket_cap_mb must be >= 1"),
])
def test_bad_shard_plans_are_refused_naming_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        ShardPlan(**kwargs)


def test_unknown_strategy_in_a_file_is_refused() -> None:
    data = json.loads(Plan().to_json())
    data["sections"]["shard"] = {"strategy": "zero4", "world_size": 2}
    with pytest.raises(PlanError, match=r"sections.shard.strategy='zero4' is not one of"):
        Plan.from_dict(data)


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2", "zero3"])
@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_every_strategy_takes_every_precision(strategy: str, mode: str) -> None:
    Plan(sections={"shard": ShardPlan(strategy=strategy, world_size=2),
                   "precision": PrecisionPlan(mode=mode)})


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["ddp-fp16", "zero2-fp16", "zero3-fp16"])
def test_fp16_scales_the_loss_with_a_scaler_for_the_strategy(results: dict, case: str) -> None:
    # DDP's gradients are whole on every rank, so each rank's GradScaler finds the same
    # infs; FSDP2's are shards, whose found_inf ShardedGradScaler all-reduces.
    want = "GradScaler" if case.startswith("ddp") else "ShardedGradScaler"
    assert results[case]["scaler"] == want
    assert results[case]["scale"] == 2.0**8  # no step skipped: the figures above compare


@pytest.mark.distributed
@pytest.mark.parametrize("case", OVERFLOW)
def test_an_inf_in_one_ranks_shard_makes_every_rank_skip_the_step(results: dict,
                                                                 case: str) -> None:
    ranks = results[case]["ranks"]
    # Only rank 1's own shards held an inf when the unscale began (step 1 of 0, 1, 2) ...
    assert [r["saw_inf"] for r in ranks] == [[False, False, False], [False, True, False]]
    # ... yet both ranks skipped that step, and only it, and halved the scale together.
    # (A rank that stepped alone would leave one parameter's shards from two models.)
    for r in ranks:
        assert r["scaler"] == "ShardedGradScaler"
        assert r["moved"] == [True, False, True]
        assert r["scales"] == [2.0**8, 2.0**7, 2.0**7]


def test_a_cpu_fp16_plan_under_fsdp_gets_a_sharded_scaler(one_rank_group) -> None:
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    from autoscale.passes.shard import grad_scaler

    fp16, bf16 = PrecisionPlan(mode="fp16", init_scale=512.0), PrecisionPlan(mode="bf16")
    zero3 = ShardPlan(strategy="zero3", world_size=2)
    scaler = grad_scaler(fp16, zero3, device_type="cpu")
    assert isinstance(scaler, ShardedGradScaler) and scaler.get_scale() == 512.0
    assert scaler.process_group is one_rank_group  # the default group when none is given
    ddp = grad_scaler(fp16, ShardPlan(strategy="ddp", world_size=2), device_type="cpu")
    assert type(ddp) is torch.amp.GradScaler
    assert grad_scaler(bf16, zero3, device_type="cpu") is None


def test_two_ranks_have_no_integer_reshard() -> None:
    # FSDP2's integer reshard_after_forward needs a proper divisor of the world size:
    # none exists for 2 ranks (the 4-rank run below uses 2).
    with pytest.raises(PlanError, match=r"shard.reshard_to=2 must divide world_size=2"):
        ShardPlan(strategy="zero3", world_size=2, reshard_to=2)


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_resharded_to_pairs_of_four_ranks_trains_like_one_process(tmp_path) -> None:
    # 4 gloo ranks on 2 cores: ~23 s.
    r = _torchrun(tmp_path / "reshard.json", 4, "reshard")["zero3-reshard2"]
    _check_trains_like_one_process(r)
    assert r["units"] == ["", "blocks.0", "blocks.1", "head", "inp"]


def test_units_are_blocks_then_untied_embeddings_and_heads() -> None:
    from tests_helpers import tiny_gpt

    model, batch = tiny_gpt(dropout=0.0)
    graph = capture(model, batch)
    units = shard_units(model, graph)
    blocks = [b.fqn for b in graph.blocks]
    assert units[:len(blocks)] == blocks
    # The token embedding and the head share one weight (GPT-2's tying): FSDP2 needs them
    # in one unit, so both stay with the root; the position embedding is its own unit;
    # the final LayerNorm stays with the root.
    assert units[len(blocks):] == ["wpe"]
    assert shard_units(model, None) == []


def test_a_shard_plan_without_a_process_group_names_the_fix() -> None:
    from tests_helpers import tiny_gpt

    assert not torch.distributed.is_initialized()
    model, _ = tiny_gpt(dropout=0.0)
    plan = Plan(sections={"shard": ShardPlan(strategy="ddp", world_size=2)})
    with pytest.raises(PassError, match=r"needs torch.distributed: run the job under torchrun "
                                        r"--nproc-per-node 2 .*init_process_group"):
        build_result(plan, model)


def test_sharding_divides_gradients_and_state_by_the_world_size() -> None:
    from tests_helpers import tiny_gpt

    model, batch = tiny_gpt(dropout=0.0)
    graph = capture(model, batch)
    every = tuple(b.fqn for b in graph.blocks)

    def estimate(strategy: str, world_size: int = 4, **kwargs):
        shard = ShardPlan(strategy=strategy, world_size=world_size, **kwargs)
        return estimate_graph(model, graph, Plan(sections={"shard": shard}))

    plain, ddp, zero1 = estimate("none", 1), estimate("ddp"), estimate("zero1")
    zero2, zero3 = estimate("zero2"), estimate("zero3")
    # Per rank: DDP replicates (its buckets are the gradients); zero1 shards the state only.
    assert (ddp.parameters, ddp.gradients, ddp.optimizer_state) == (
        plain.parameters, plain.gradients, plain.optimizer_state)
    assert (zero1.parameters, zero1.gradients) == (ddp.parameters, ddp.gradients)
    assert zero1.optimizer_state == plain.optimizer_state // 4
    for sharded in (zero2, zero3):
        assert sharded.gradients == plain.gradients // 4
        assert sharded.optimizer_state == plain.optimizer_state // 4
        assert sharded.activations == ddp.activations
    # zero2 keeps every unsharded parameter live from forward to backward; zero3 only the
    # root's own and two blocks (the running one and the prefetched one). Both hold two
    # blocks' gradient bytes unsharded (the running unit's, the last reduce-scatter's input).
    biggest = max(b.param_bytes for b in graph.blocks)
    own = graph.param_bytes - sum(b.param_bytes for b in graph.blocks)
    assert zero2.parameters == plain.parameters // 4 + graph.param_bytes
    assert zero3.parameters == plain.parameters // 4 + own + 2 * biggest
    assert zero3.temporaries == zero2.temporaries == ddp.temporaries + 2 * biggest
    assert zero3.total < zero2.total < ddp.total
    assert zero1.total < ddp.total
    # reshard_to=2 of 4 ranks: each block also keeps a half shard from forward to backward.
    pairs = estimate("zero3", reshard_to=2)
    blocks = sum(b.param_bytes for b in graph.blocks)
    assert pairs.parameters == zero3.parameters + blocks // 2
    # Offload on a CPU machine: the host is the device, nothing leaves the budget.
    assert estimate("zero3", offload=True) == zero3
    # Checkpointing composes: it still lowers the activations under sharding.
    ckpt = estimate_graph(model, graph, Plan(sections={
        "shard": ShardPlan(strategy="zero3", world_size=4),
        "checkpoint": CheckpointPlan(blocks=every)}))
    assert ckpt.activations < zero3.activations


@pytest.fixture
def one_rank_group():
    """A real 1-rank gloo group in this process (HashStore: no port), destroyed after."""
    torch.distributed.init_process_group("gloo", rank=0, world_size=1,
                                         store=torch.distributed.HashStore())
    try:
        yield torch.distributed.group.WORLD
    finally:
        torch.distributed.destroy_process_group()


def test_a_plan_for_another_world_size_is_refused(one_rank_group) -> None:
    from tests_helpers import tiny_gpt

    model, _ = tiny_gpt(dropout=0.0)
    plan = Plan(sections={"shard": ShardPlan(strategy="zero2", world_size=2)})
    # build_result finds the initialized default group by itself.
    with pytest.raises(PassError, match=r"shard.world_size=2 but the process group has 1 "
                                        r"ranks; run with torchrun --nproc-per-node 2"):
        build_result(plan, model)
