"""The step-time estimate (autoscale/cost/_time.py): the simulated step's FLOPs and the
optimizer's bytes pinned by hand on a stack of Linear layers, its response to the plan's
knobs, and the per-machine calibration cache. No measured time is asserted."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from autoscale import BatchPlan, CheckpointPlan, Plan, PlanError, ShardPlan
from autoscale.cost._rates import MachineRates, cache_path, machine_rates
from autoscale.cost._time import (
    OPTIMIZER_BYTES,
    communication_bytes,
    estimate_step_time,
    optimizer_bytes,
    optimizer_work,
    refine,
)
from autoscale.plan import CompressPlan
from autoscale.runtime._optimizers import optimizer_plan

D, H, L, B = 64, 128, 3, 8
F32 = 4
# Fixed rates, so that the figures do not depend on this machine.
RATES = MachineRates(matmul_flops_per_s=1e10, memory_bytes_per_s=1e10, op_overhead_s=1e-5)


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
def stack() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return Stack(), torch.randn(B, D)


def _plan(**sections: object) -> Plan:
    return Plan(sections={"optimizer": optimizer_plan("adamw", None), **sections})


def _recompute_flops(est) -> int:
    return sum(f * n for f, _, recompute, _, n in est.counted if recompute)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_flops_of_a_linear_stack_equal_the_hand_count(stack, checkpointed) -> None:
    model, batch = stack
    blocks = tuple(f"blocks.{i}" for i in range(L)) if checkpointed else ()
    est = estimate_step_time(model, batch, _plan(checkpoint=CheckpointPlan(blocks=blocks)),
                             rates=RATES)
    matmul = 2 * B * D * H
    forward = L * 2 * matmul
    # Backward: each matmul's weight gradient and input gradient, except the first's input
    # gradient (the batch needs none).
    backward = 2 * forward - matmul
    # Recompute: each block's forward again, up to the last tensor it saved for backward
    # (torch's non-reentrant checkpoint stops there): its first Linear and the ReLU; the
    # second Linear's output is saved by nothing.
    recompute = L * matmul if checkpointed else 0
    assert est.flops == forward + backward + recompute
    assert _recompute_flops(est) == recompute
    assert (est.recompute_s > 0) == checkpointed
    assert est.total_s == pytest.approx(
        est.compute_s + est.recompute_s + est.optimizer_s + est.communication_s)


def test_optimizer_bytes_per_kernel_by_hand(stack) -> None:
    model, _ = stack
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    assert n == L * 2 * D * H
    cases = [
        ("adamw", None, (4 + 4 + 4 + 4) + (4 + 4 + 4)),  # read p g m v, write p m v
        ("sgd", {"lr": 0.1, "momentum": 0.9}, (4 + 4 + 4) + (4 + 4)),
        ("sgd", {"lr": 0.1}, (4 + 4) + 4),
        ("lamb", None, (16 + 12) + (8 + 4)),  # two passes
        ("lars", None, 8 + 20),
        ("adamw8bit", None, (4 + 4 + 1 + 1) + (4 + 1 + 1) + 2 * 2 * 4 / 256),
    ]
    for kind, kwargs, per_element in cases:
        plan = Plan(sections={"optimizer": optimizer_plan(kind, kwargs)})
        moved, ops = optimizer_bytes(params, plan)
        assert moved == int(n * per_element), kind
        assert ops == len(params)
    assert OPTIMIZER_BYTES["adamw"] == 28
    zero2 = _plan(shard=ShardPlan(strategy="zero2", world_size=2))
    assert optimizer_bytes(params, zero2)[0] == n * 28 // 2


def test_a_timed_optimizer_is_priced_per_tensor_and_element(stack) -> None:
    """Where the rates time the plan's optimizer (Note: [the optimizer step's price]), its
    step costs tensors x per-tensor + elements x per-element, divided among zero ranks;
    an optimizer the rates did not time keeps the bytes price."""
    model, batch = stack
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    timed = dataclasses.replace(RATES, optimizers=(("adamw", 2e-9, 5e-6),
                                                   ("sgd-plain", 1e-9, 3e-6)))
    for kind, kwargs, key in (("adamw", None, "adamw"), ("sgd", {"lr": 0.1}, "sgd-plain")):
        plan = _plan(optimizer=optimizer_plan(kind, kwargs))
        assert optimizer_work(params, plan) == (key, n, len(params), 0, 0)
        element_s, tensor_s = timed.optimizer_seconds(key)
        est = estimate_step_time(model, batch, plan, rates=timed)
        assert est.optimizer_s == pytest.approx(n * element_s + len(params) * tensor_s)
        # the bytes price where not timed, and the same counts retimed
        untimed = estimate_step_time(model, batch, plan, rates=RATES)
        moved, ops = optimizer_bytes(params, plan)
        assert untimed.optimizer_s == pytest.approx(moved / 1e10 + ops * 1e-5)
        assert untimed.retimed(timed).optimizer_s == pytest.approx(est.optimizer_s)
    # momentum SGD and a non-default kernel are other keys, not measured here
    sgd = _plan(optimizer=optimizer_plan("sgd", {"lr": 0.1, "momentum": 0.9}))
    assert optimizer_work(params, sgd)[0] == "sgd"
    torch_adamw = _plan(optimizer=optimizer_plan("adamw", None, kernel="torch"))
    assert optimizer_work(params, torch_adamw)[0] == ""
    assert estimate_step_time(model, batch, sgd, rates=timed).optimizer_s == pytest.approx(
        estimate_step_time(model, batch, sgd, rates=RATES).optimizer_s)
    zero2 = _plan(shard=ShardPlan(strategy="zero2", world_size=2))
    assert optimizer_work(params, zero2) == ("adamw", n / 2, (len(params) + 1) // 2, 0, 0)
    # refine's scale reaches the timed rates like every other per-op cost
    assert timed.scaled(2.0).optimizer_seconds("adamw") == pytest.approx((1e-9, 2.5e-6))


def test_the_optimizer_calibration_times_every_key_and_keeps_the_jobs_choices() -> None:
    """Every default optimizer is timed, with positive per-element and per-tensor costs,
    and the kernel paths the calibration chose on its made-up tensors are forgotten: the
    job in the same process chooses its own (Note: [choosing the CPU path by measurement])."""
    from autoscale.cost._rates import _optimizer_calibration, _optimizer_rates
    from autoscale.kernels import _dispatch

    saved = dict(_dispatch._CHOICES)
    _dispatch._CHOICES[("adamw", "cpu", torch.float32)] = "reference"  # as a job's choice
    before = dict(_dispatch._CHOICES)
    try:
        rates = _optimizer_rates()
        assert dict(_dispatch._CHOICES) == before
    finally:
        _dispatch._CHOICES.clear()
        _dispatch._CHOICES.update(saved)
    assert [k for k, _, _ in rates] == list(_optimizer_calibration())
    assert all(element_s > 0 and tensor_s >= 0 for _, element_s, tensor_s in rates)


def test_communication_bytes_follow_the_compressor(stack) -> None:
    model, _ = stack
    params = list(model.parameters())
    grads = sum(p.numel() for p in params) * F32
    ddp = ShardPlan(strategy="ddp", world_size=2)
    assert communication_bytes(params, _plan(shard=ddp)) == grads
    bf16 = _plan(shard=ddp, compress=CompressPlan(method="bf16"))
    assert communication_bytes(params, bf16) == grads // 2
    int8 = communication_bytes(params, _plan(shard=ddp, compress=CompressPlan(method="int8")))
    assert grads / 4.1 < int8 < grads / 3.9  # 1-byte codes plus an fp32 scale per block
    # PowerSGD rank 1: (rows + cols) fp32 per (D, H) matrix.
    psgd = communication_bytes(params, _plan(shard=ddp,
                                             compress=CompressPlan(method="powersgd")))
    assert psgd == L * 2 * (D + H) * F32
    zero3 = _plan(shard=ShardPlan(strategy="zero3", world_size=2))
    assert communication_bytes(params, zero3) == 2 * grads


def test_distributed_plan_needs_a_link_rate(stack) -> None:
    model, batch = stack
    plan = _plan(shard=ShardPlan(strategy="ddp", world_size=2))
    with pytest.raises(PlanError, match="link_bytes_per_s"):
        estimate_step_time(model, batch, plan, rates=RATES)
    slow = estimate_step_time(model, batch, plan, rates=RATES, link_bytes_per_s=1e6)
    fast = estimate_step_time(model, batch, plan, rates=RATES, link_bytes_per_s=1e9)
    assert slow.communication_s == pytest.approx(slow.comm_bytes / 1e6)
    assert slow.total_s > fast.total_s
    alone = estimate_step_time(model, batch, _plan(), rates=RATES)
    assert slow.flops == alone.flops // 2  # one rank's half of the batch


def test_more_micro_batches_and_checkpointing_predict_more(stack) -> None:
    model, batch = stack
    ests = [estimate_step_time(model, batch, _plan(batch=BatchPlan(
        micro_batch_size=B // k, grad_accum_steps=k)), rates=RATES) for k in (1, 2, 4)]
    assert ests[0].ops < ests[1].ops < ests[2].ops
    assert ests[0].total_s < ests[1].total_s < ests[2].total_s
    assert len({e.flops for e in ests}) == 1  # the same maths, split
    whole = estimate_step_time(model, batch, _plan(), rates=RATES)
    ckpt = estimate_step_time(model, batch, _plan(checkpoint=CheckpointPlan(
        blocks=("blocks.0", "blocks.1"))), rates=RATES)
    assert ckpt.total_s > whole.total_s and ckpt.ops > whole.ops


def test_each_checkpointed_block_call_is_priced_once_a_micro_batch(stack) -> None:
    import dataclasses

    model, batch = stack
    calls = dataclasses.replace(RATES, checkpoint_call_s=1e-3)
    section = CheckpointPlan(blocks=("blocks.0", "blocks.1"))
    for k in (1, 4):
        plan = _plan(checkpoint=section, batch=BatchPlan(micro_batch_size=B // k,
                                                         grad_accum_steps=k))
        free = estimate_step_time(model, batch, plan, rates=RATES)
        paid = estimate_step_time(model, batch, plan, rates=calls)
        assert paid.checkpoint_calls == free.checkpoint_calls == 2 * k
        assert paid.recompute_s - free.recompute_s == pytest.approx(2 * k * 1e-3)
        assert paid.total_s - free.total_s == pytest.approx(2 * k * 1e-3)
    # refine scales it with the other per-call costs
    assert calls.scaled(2.0).checkpoint_call_s == pytest.approx(0.5e-3)
    assert 0.0 <= machine_rates().checkpoint_call_s < 0.01  # measured here: ~0.3 ms


def test_refine_scales_the_estimate_onto_a_measurement(stack) -> None:
    model, batch = stack
    est = estimate_step_time(model, batch, _plan(), rates=RATES)
    refined = refine(RATES, est, 3 * est.total_s)
    assert est.retimed(refined).total_s == pytest.approx(3 * est.total_s)
    assert est.retimed(RATES) == est
    with pytest.raises(PlanError, match="refine"):
        refine(RATES, est, 0.0)


def test_machine_rates_are_measured_once_and_cached(tmp_path) -> None:
    first = machine_rates(cache_dir=tmp_path)
    path = cache_path(cache_dir=tmp_path)
    assert path.exists() and [p.name for p in tmp_path.iterdir()] == [path.name]
    written = path.stat().st_mtime_ns
    record = json.loads(path.read_text())
    assert record["key"]["threads"] == torch.get_num_threads()
    assert record["key"]["torch"] == torch.__version__
    # A second measurement would differ in its last digits: equal means read back.
    assert machine_rates(cache_dir=tmp_path) == first
    assert path.stat().st_mtime_ns == written
    path.write_text("{not json")  # a damaged file is measured again and replaced
    again = machine_rates(cache_dir=tmp_path)
    assert json.loads(path.read_text())["rates"]["op_overhead_s"] == again.op_overhead_s
    with pytest.raises(PlanError, match="cuda"):
        machine_rates("cuda", cache_dir=tmp_path)


def test_the_fake_step_counts_the_ops_a_real_step_runs(stack) -> None:
    from autoscale.cost._time import OpCounter
    from autoscale.runtime import build_result

    model, batch = stack
    plan = _plan(checkpoint=CheckpointPlan(blocks=("blocks.1",)))
    est = estimate_step_time(model, batch, plan, rates=RATES)
    result = build_result(plan, model)
    with OpCounter() as counter:
        result.accumulate((batch,))
    assert counter.op_count + est.optimizer_counts[1] == est.ops
    assert sorted((*k, n) for k, n in counter.ops.items()) == list(est.counted)
    # Four micro-batches: the first two are counted, the second once per later one (Note:
    # [simulating two micro-batches]). Every op with FLOPs is counted as the real step
    # runs it; ops without differ by the real step's slicing of the batch into
    # micro-batches and by the 0-dim loss total (measured: 13 of 385 ops, 8% of the bytes).
    plan = plan.replace(batch=BatchPlan(micro_batch_size=B // 4, grad_accum_steps=4))
    est = estimate_step_time(model, batch, plan, rates=RATES)
    with OpCounter() as counter:
        build_result(plan, model).accumulate((batch,))
    estimated = {c[:4]: c[4] for c in est.counted}
    for key, n in counter.ops.items():
        if key[0] > 0:
            assert estimated.get(key) == n, key
    assert abs(est.ops - est.optimizer_counts[1] - counter.op_count) <= 16
    real_bytes = sum(k[1] * n for k, n in counter.ops.items())
    assert est.bytes - est.optimizer_counts[0] == pytest.approx(real_bytes, rel=0.1)


def test_dropout_is_priced_by_the_random_numbers_drawn() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, H), nn.Dropout(0.1), nn.Linear(H, 1))

    def loss_fn(out: torch.Tensor, batch: object) -> torch.Tensor:
        return out.square().mean()

    batch = torch.randn(B, D)
    est = estimate_step_time(model, batch, _plan(), rates=RATES, loss_fn=loss_fn)
    drawn = sum(f * n for f, _, _, kind, n in est.counted if kind == "rng")
    assert drawn == B * H  # one mask of the hidden activations
    slow_rng = MachineRates(RATES.matmul_flops_per_s, RATES.memory_bytes_per_s,
                            RATES.op_overhead_s, random_numbers_per_s=1e3)
    # At 1000 numbers a second the mask alone takes B * H / 1000 s, far above the rest.
    assert est.retimed(slow_rng).compute_s == pytest.approx(B * H / 1e3, rel=1e-2)


def test_a_matmul_is_priced_at_the_rate_of_its_size() -> None:
    curve = (("", 1e6, 1e10), ("", 1e8, 1e11), ("bf16", 1e6, 2e10))
    rates = MachineRates(5e10, 1e10, 1e-6, matmul_curve=curve)
    assert rates.flops_per_s("", 1e5) == 1e10  # clamped below the smallest point
    assert rates.flops_per_s("", 1e7) == pytest.approx(5.5e10)  # halfway in log FLOPs
    assert rates.flops_per_s("", 1e9) == 1e11
    assert rates.flops_per_s("bf16", 1e9) == 2e10
    assert rates.flops_per_s("fp16", 1e7) == 5e10  # no points: the flat rate
    assert rates.scaled(2.0).flops_per_s("", 1e7) == pytest.approx(1.1e11)
    # What the cache hands back (lists from JSON) is the same rates.
    assert MachineRates(5e10, 1e10, 1e-6, matmul_curve=[list(p) for p in curve]) == rates


T, HEADS, C = 16, 2, 8


class _Attention(nn.Module):
    """One causal self-attention of T tokens, HEADS heads of C channels, through
    scaled_dot_product_attention (the CPU's fused kernel); the loss is the output's mean
    square."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(HEADS * C, 3 * HEADS * C, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.view(B, T, HEADS, C).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.square().mean()


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"),
                    reason="this torch has no fused CPU attention kernel")
@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_fused_attention_is_priced_by_its_flops_at_its_own_rates(mode) -> None:
    from autoscale import PrecisionPlan

    torch.manual_seed(0)
    plan = _plan(precision=PrecisionPlan(mode=mode)) if mode != "fp32" else _plan()
    est = estimate_step_time(_Attention(), torch.randn(B, T, HEADS * C), plan, rates=RATES)
    suffix = "-bf16" if mode == "bf16" else ""
    by_kind: dict[str, int] = {}
    for flops, _, _, kind, n in est.counted:
        if kind.startswith("attn"):  # looked up per (sequence, head) slice
            kind, _, slices = kind.partition("@")
            assert int(slices) == B * HEADS
        by_kind[kind] = by_kind.get(kind, 0) + flops * n
    # Two batched matmuls of (T, C) by (C, T) per head forward (QK^T, then by V), five
    # backward (the scores again, then the gradients of the scores, V, Q and K).
    per_matmul = 2 * B * HEADS * T * T * C
    assert by_kind["attn" + suffix] == 2 * per_matmul
    assert by_kind["attn-bwd" + suffix] == 5 * per_matmul
    # Priced on its own curve: a slow attention kernel slows only its share.
    slow = MachineRates(RATES.matmul_flops_per_s, RATES.memory_bytes_per_s,
                        RATES.op_overhead_s, matmul_curve=(("attn-bwd" + suffix, 1.0, 1e3),))
    assert est.retimed(slow).compute_s == pytest.approx(
        est.compute_s + 5 * per_matmul / 1e3, rel=1e-3)
    # at the rate of one slice's FLOPs: twice the sequences are priced at the same rate,
    # where a curve by the call's FLOPs would price them faster
    curve = MachineRates(RATES.matmul_flops_per_s, RATES.memory_bytes_per_s,
                         RATES.op_overhead_s, matmul_curve=(
                             ("attn-bwd" + suffix, 5 * per_matmul / (B * HEADS), 1e3),
                             ("attn-bwd" + suffix, 10 * per_matmul / (B * HEADS), 1e6)))
    assert est.retimed(curve).compute_s == pytest.approx(
        est.compute_s + 5 * per_matmul / 1e3, rel=1e-3)


def test_the_calibration_measures_fused_attention() -> None:
    from autoscale.cost._rates import _attention_step, _timed

    curve: dict[tuple[str, int], float] = {}
    _timed(_attention_step(torch.float32, 32, 16), curve)
    assert {family for family, _ in curve} == {"attn", "attn-bwd"}
    # the points are FLOPs of one (sequence, head) slice: 4 sequences of 4 heads here
    assert {flops for family, flops in curve if family == "attn"} == {2 * 2 * 32 * 32 * 16}
    assert all(rate > 0 for rate in curve.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_pointwise_op_that_computes_is_priced_at_its_measured_element_rate(dtype) -> None:
    """Note: [ops that compute more than they move]: gelu's backward at 1000 elements a
    second takes its elements / 1000 s, in either dtype, where its bytes (half as many in
    bf16) would say far less."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, 1)).to(dtype)

    def loss_fn(out: torch.Tensor, batch: object) -> torch.Tensor:
        return out.float().square().mean()

    batch = torch.randn(B, D, dtype=dtype)
    est = estimate_step_time(model, batch, _plan(), rates=RATES, loss_fn=loss_fn)
    name = str(dtype).removeprefix("torch.")
    kinds = {kind: f * n for f, _, _, kind, n in est.counted if kind.startswith("ew ")}
    assert kinds[f"ew aten.gelu {name}"] == B * H
    assert kinds[f"ew aten.gelu_backward {name}"] == B * H
    slow = dataclasses.replace(RATES, elementwise=(
        ("aten.gelu_backward", name, 1e3), ("aten.gelu", "float16", 1.0)))
    # Only gelu's backward in this dtype is slowed (the fp16 entry matches nothing here).
    assert est.retimed(slow).compute_s - est.compute_s == pytest.approx(
        B * H / 1e3, rel=1e-2)
    # Unmeasured: the bytes decide, as before.
    assert est.flops == estimate_step_time(model, batch, _plan(), rates=RATES,
                                           loss_fn=loss_fn).flops


def test_the_calibration_measures_element_rates_and_they_scale_and_round_trip() -> None:
    from autoscale.cost._rates import ELEMENTWISE_OPS, _elementwise_rates

    measured = _elementwise_rates(1e-6)
    seen = {(op, dtype) for op, dtype, _ in measured}
    for op in ("aten.gelu_backward", "aten._softmax", "aten.native_layer_norm_backward"):
        assert op in ELEMENTWISE_OPS
        assert {(op, "float32"), (op, "bfloat16")} <= seen
    assert all(rate > 0 for _, _, rate in measured)
    rates = dataclasses.replace(RATES, elementwise=measured)
    again = MachineRates(**json.loads(json.dumps(dataclasses.asdict(rates))))
    assert again == rates
    assert rates.scaled(2.0).elements_per_s("aten.gelu", "float32") == pytest.approx(
        2 * rates.elements_per_s("aten.gelu", "float32"))
    assert rates.elements_per_s("aten.gelu", "float64") is None


def test_a_softmax_is_priced_at_the_rate_for_its_rows() -> None:
    """Note: [a softmax's rate goes by its rows]: the softmax family's rate is
    interpolated (log scale, clamped) between its rates on rows of 64 and of 512; other
    ops ignore the row length."""
    from autoscale.cost._rates import ROW_OPS, SHORT_ROW
    from autoscale.cost._time import price_key

    op = "aten._safe_softmax"
    assert op in ROW_OPS and SHORT_ROW == 64
    rates = dataclasses.replace(RATES, elementwise=(
        (op, "float32", 8e8), (f"{op}@64", "float32", 2e8), ("aten.gelu", "float32", 1e9)))
    assert rates.elements_per_s(op, "float32", 64) == pytest.approx(2e8)
    assert rates.elements_per_s(op, "float32", 16) == pytest.approx(2e8)  # clamped
    assert rates.elements_per_s(op, "float32", 4096) == pytest.approx(8e8)
    assert rates.elements_per_s(op, "float32", 181) == pytest.approx(5e8, rel=0.01)  # halfway
    assert rates.elements_per_s(op, "float32") == 8e8
    assert rates.elements_per_s("aten.gelu", "float32", 64) == 1e9
    x = torch.randn(32, 64)
    out = torch.ops.aten._safe_softmax.default(x, -1)
    assert price_key(torch.ops.aten._safe_softmax.default, (x, -1), {}, out) == (
        x.numel(), f"ew {op} float32 64")
    from autoscale.cost._time import _op_seconds

    seconds = _op_seconds(x.numel(), 0, f"ew {op} float32 64", rates)
    assert seconds == pytest.approx(x.numel() / 2e8 + RATES.op_overhead_s)
    from autoscale.cost._rates import _elementwise_rates

    measured = {(o, d) for o, d, _ in _elementwise_rates(1e-6)}
    assert {(f"{o}@64", "float32") for o in ROW_OPS} <= measured
