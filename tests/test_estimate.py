"""autoscale.estimate: the planned step simulated on fake tensors (Note: [the estimate is
a simulated step]), pinned by hand on a stack of Linear layers and against the CPU
allocator's measured peak on the GPT example, plan by plan."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoscale
from autoscale import BatchPlan, CheckpointPlan, Plan, PlanError, PrecisionPlan
from autoscale.measure import measure
from autoscale.runtime import build_result
from autoscale.runtime._optimizers import optimizer_plan

D, H, L, B = 128, 256, 3, 8
F32 = 4


class Stack(nn.Module):
    """L blocks of bias-free Linear(D, H), ReLU, Linear(H, D); the loss is the output's
    mean square."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(D, H, bias=False), nn.ReLU(), nn.Linear(H, D, bias=False))
            for _ in range(L))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x.square().mean()


@pytest.fixture(scope="module")
def stack():
    torch.manual_seed(0)
    return Stack(), torch.randn(B, D)


def _measured(plan: Plan, model: nn.Module, batch) -> int:
    result = build_result(plan, model)
    return measure(result, batch, warmup=1, iters=1).peak_memory_bytes


@pytest.mark.parametrize("checkpointed", [False, True])
def test_a_linear_stack_is_counted_byte_for_byte(stack, checkpointed) -> None:
    model, batch = stack
    blocks = tuple(f"blocks.{i}" for i in range(L)) if checkpointed else ()
    plan = Plan(sections={"optimizer": optimizer_plan("adamw", None),
                          "checkpoint": CheckpointPlan(blocks=blocks)})
    est = autoscale.estimate(model, batch, plan)
    weights = L * 2 * D * H * F32
    assert est.method == "simulated"
    assert est.parameters == weights and est.gradients == weights
    assert est.optimizer_state == 2 * weights + 2 * L * F32  # exp_avg, exp_avg_sq, steps
    assert est.batch == B * D * F32
    # Kept for backward, besides the batch: each block's output (the next block's input,
    # or square()'s for the last) and the 0-dim loss; unless checkpointed, also each
    # block's ReLU output (saved by ReLU and by the second Linear: one storage).
    saved = L * B * D * F32 + F32
    if not checkpointed:
        saved += L * B * H * F32
    else:  # and the CPU RNG state each checkpointed block replays in its recompute
        saved += L * torch.get_rng_state().numel()
    assert est.activations == saved
    assert est.total == _measured(plan, model, batch)


_GPT_PLANS = {
    "default": {},
    "every block checkpointed": {"checkpoint": "every"},
    "bf16": {"precision": PrecisionPlan(mode="bf16")},
    "micro-batches of 2": {"batch": BatchPlan(micro_batch_size=2, grad_accum_steps=4)},
    "8-bit AdamW": {"optimizer": optimizer_plan("adamw8bit", None)},
    "SGD with momentum": {"optimizer": optimizer_plan("sgd", {"lr": 0.1, "momentum": 0.9})},
}
_FAST = ("default", "every block checkpointed", "SGD with momentum")


@pytest.fixture(scope="module")
def gpt():
    from tests_helpers import tiny_gpt

    model, batch = tiny_gpt(batch_size=8)
    return model, batch, autoscale.capture(model, batch)


@pytest.mark.parametrize("name", [n if n in _FAST else pytest.param(n, marks=pytest.mark.slow)
                                  for n in _GPT_PLANS])
def test_the_gpt_examples_peak_is_the_measured_one(gpt, name) -> None:
    model, batch, graph = gpt
    sections = dict(_GPT_PLANS[name])
    if sections.get("checkpoint") == "every":
        sections["checkpoint"] = CheckpointPlan(blocks=tuple(b.fqn for b in graph.blocks))
    plan = Plan(sections=sections)
    est = autoscale.estimate(model, batch, plan, graph=graph)
    # The same ledger on the same ops: byte for byte (the allocator's own peak).
    assert est.total == _measured(plan, model, batch), name
    assert est.phase == "forward/backward"


def test_a_plan_for_another_model_is_refused(stack) -> None:
    from tests_helpers import tiny_gpt

    model, batch = stack
    other, other_batch = tiny_gpt(batch_size=8)
    plan = autoscale.optimize(other, other_batch, trials=0).plan
    with pytest.raises(PlanError, match="another model"):
        autoscale.estimate(model, batch, plan)


def test_a_model_that_cannot_run_on_fake_tensors_gets_one_clear_error() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.lin(x)
            return y[y > 0].sum() if bool((y > 0).any()) else y.sum()  # data decides

    model = DataDependent()
    with pytest.raises(PlanError, match="could not simulate"):
        autoscale.estimate(model, torch.randn(2, 4), Plan(),
                           graph=autoscale.capture(nn.Linear(4, 1), torch.randn(2, 4)))


@pytest.mark.parametrize("mode", ["fp32", pytest.param("fp16", marks=pytest.mark.slow)])
def test_convolution_workspaces_are_probed_and_counted(mode) -> None:
    import cnn

    from autoscale.cost._simulate import _WORKSPACE_CACHE

    model, batch = cnn.build(batch_size=4)
    plan = Plan(sections={"precision": PrecisionPlan(mode=mode)})
    est = autoscale.estimate(model, batch, plan)
    got = _measured(plan, model, batch)
    # oneDNN's convolution buffers live inside one op: only the probe sees them (measured
    # at 5% of this step in fp32, 30% in fp16); the ledger alone is that much under.
    assert any(extra > 0 for extra in _WORKSPACE_CACHE.values())
    assert abs(est.total - got) <= 0.001 * got, (est.total, got)


def test_8bit_adamw_state_is_counted_byte_for_byte(stack) -> None:
    model, batch = stack
    plan = Plan(sections={"optimizer": optimizer_plan("adamw8bit", None)})
    est = autoscale.estimate(model, batch, plan)
    n = D * H  # elements of each of the 2 * L weights: whole 256-element blocks
    # Two 1-byte moments per element, one fp32 scale per 256 elements for each, and the
    # fp32 step count. (Against the measured peak: the GPT case, -m slow.)
    assert est.optimizer_state == 2 * L * (2 * n + 2 * (n // 256) * F32 + F32)


@pytest.mark.distributed
def test_compressed_ddp_plans_peaks_are_the_measured_ones_at_two_ranks(tmp_path) -> None:
    # The mlp example under ddp int8 and bf16, measured as the tuner measures them (two
    # gloo worker processes, one warm-up step: the step in which DDP rebuilds its bucket
    # and the int8 hook replaces its residual). int8 measured 83.00 MB against the
    # estimate's 74.44 while the measurement kept the replaced residual live (Note: [the
    # tracker does not keep its roots alive]); 74.51 since. bf16 measured 46.80 MB against
    # 38.62 while its hook's fp32 copy of the bucket was guessed as the largest block
    # (Note: [a DDP comm hook's peak]); the estimate reads 46.73 since. powersgd, measured
    # once torch's hook compresses (the runner warms it up 3 steps), measured 59.61 MB
    # against 47.16 while the hook's two bucket copies were guessed as the largest block;
    # the estimate reads 59.55 since.
    import mlp

    from autoscale import CompressPlan, ShardPlan
    from autoscale.plan import Fingerprint
    from autoscale.search._workers import WorkerRunner, pickle_workload

    model, batch, loss_fn = mlp.build(batch_size=64)
    graph = autoscale.capture(model, batch)
    fingerprint = Fingerprint.of(model, graph.structure_hash())
    plans = {m: Plan(sections={"shard": ShardPlan(strategy="ddp", world_size=2),
                               "compress": CompressPlan(method=m)}, fingerprint=fingerprint)
             for m in ("int8", "bf16", "powersgd")}
    with WorkerRunner(pickle_workload(model, batch, loss_fn, tmp_path),
                      device=torch.device("cpu"),
                      fingerprint=plans["int8"].fingerprint_digest(), warmup=1, iters=1,
                      world_size=2) as runner:
        for method, plan in plans.items():
            est = autoscale.estimate(model, batch, plan, graph=graph, loss_fn=loss_fn).total
            peak = runner.measure(plan).peak_memory_bytes
            # The codec's working memory is probed in this process, the step measured in
            # another: within 0.5% (measured -0.09%, -0.14%, -0.11%); what was missed was
            # 10%, 17% and 21% of the peak.
            assert abs(est / peak - 1) < 0.005, (method, est, peak)


@pytest.mark.parametrize("method", ["int8", "topk"])
def test_a_compressed_reduce_scatters_codec_is_live_only_while_it_runs(method) -> None:
    # Note: [a compressed reduce-scatter's working memory]: under zero3 the int8/top-k
    # codec's working memory is held during each unit's reduce-scatter, not through the
    # step. With a batch whose saved activations make the peak (the start of backward,
    # before any unit is reduced), compression adds only its residuals (the whole fp32
    # gradient). Added to the whole step, the codec put the largest block's gradient on
    # this peak too (262144 bytes); on six models at 2 ranks zero3 int8 read 0.6-3.8% high.
    from autoscale import CompressPlan, ShardPlan

    torch.manual_seed(0)
    model, batch = Stack(), torch.randn(2048, D)
    graph = autoscale.capture(model, batch)
    shard = ShardPlan(strategy="zero3", world_size=2)
    plain = autoscale.estimate(model, batch, Plan(sections={"shard": shard}), graph=graph)
    est = autoscale.estimate(model, batch, Plan(sections={
        "shard": shard, "compress": CompressPlan(method=method)}), graph=graph)
    assert est.residuals == L * 2 * D * H * F32
    assert est.total == plain.total + est.residuals, method
