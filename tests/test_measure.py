"""Tests of autoscale/measure/_memory.py (peak-memory tracker) and autoscale/measure/_measure.py.

The CPU peaks below are checked exactly against hand counts: the tracker sees every
aten op, so a small enough program has one right answer.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from autoscale.measure._measure import Measurement, measure
from autoscale.measure._memory import PeakMemoryTracker, live_bytes

F32 = 4  # bytes per float32 element

# Linear(D_IN, D_OUT, bias=False) on a (B, D_IN) batch; sizes picked so that every
# tensor in the hand counts has a different size and a mistake cannot cancel out.
B, D_IN, D_OUT = 64, 32, 16
W_BYTES = D_OUT * D_IN * F32  # 2048: weight, and also its grad / each Adam moment
X_BYTES = B * D_IN * F32  # 8192: the batch
OUT_BYTES = B * D_OUT * F32  # 4096: the model output
# The SGD step's peak as the CPU allocator sees it (tests/measure/test_allocator.py counts it).
SGD_ALLOCATOR_PEAK = 20488


def _linear_setup(opt_cls: type[torch.optim.Optimizer], **opt_kwargs: object):
    torch.manual_seed(0)
    model = torch.nn.Linear(D_IN, D_OUT, bias=False)
    opt = opt_cls(model.parameters(), lr=0.1, **opt_kwargs)
    x = torch.randn(B, D_IN)

    def step(batch: torch.Tensor) -> torch.Tensor:
        out = model(batch)  # `out` stays referenced until return, through backward
        loss = out.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)  # grads are None between steps
        return loss

    return model, opt, x, step


def test_torch_behaviours_the_cpu_tracker_relies_on() -> None:
    # If this fails, torch changed a private behaviour autoscale/measure/_memory.py builds on
    # (see its module docstring): the CPU peak numbers can no longer be trusted.
    from torch.utils._python_dispatch import TorchDispatchMode

    t = torch.randn(8, 8)
    st = t.untyped_storage()
    assert t.untyped_storage() is st, "storage Python object is not preserved"
    assert t[2:].t().untyped_storage() is st, "a view must share its base's storage object"
    freed: list[bool] = []
    ref = weakref.ref(st, lambda _: freed.append(True))
    del st
    gc.collect()
    assert ref() is not None and not freed, "storage object died while its tensor lives"
    del t
    assert freed, "storage object outlived its last tensor"

    seen: list[str] = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    w = torch.randn(4, 3, requires_grad=True)
    with Spy():
        (torch.randn(2, 4) @ w).sum().backward()
    # The weight-grad matmul and AccumulateGrad's detach run inside backward.
    assert seen.count("aten.mm.default") == 2, seen
    assert "aten.detach.default" in seen, seen


def test_sgd_peak_matches_hand_count() -> None:
    model, opt, x, step = _linear_setup(torch.optim.SGD)  # no momentum: no state
    step(x)
    with PeakMemoryTracker(roots=(model, opt, x)) as t:
        step(x)
    # Baseline: W + x (grads are None between steps, SGD keeps no state).
    # Forward: mm -> out; sum -> loss (4 B). mm saves x and W, both already counted.
    # Backward: ones_like seed (4 B); sum's grad is an expand (a view, no storage);
    # mm -> dW (stolen by AccumulateGrad as W.grad). Peak right after that mm:
    #   W + x + out + loss + seed + dW. opt.step is in place; zero_grad frees dW.
    assert t.baseline_bytes == W_BYTES + X_BYTES
    assert t.peak_bytes == W_BYTES + X_BYTES + OUT_BYTES + F32 + F32 + W_BYTES == 16392
    assert t.end_bytes == t.baseline_bytes  # out, loss, dW all freed by the end


def test_adamw_peak_matches_hand_count() -> None:
    # foreach=False: the single-tensor path, whose temporaries are easy to count.
    model, opt, x, step = _linear_setup(torch.optim.AdamW, foreach=False)
    step(x)  # creates the state: exp_avg, exp_avg_sq (W each) and a 0-dim fp32 step
    state = 2 * W_BYTES + F32
    with PeakMemoryTracker(roots=(model, opt, x)) as t:
        step(x)
    assert t.baseline_bytes == W_BYTES + X_BYTES + state
    # Backward ends as in the SGD count (the seed is freed when backward returns), then
    # AdamW computes denom = (exp_avg_sq.sqrt() / bc2).add_(eps): after the div, the
    # sqrt and div results (W each) are both live, with out, loss and dW:
    #   baseline + out + loss + dW + 2 W.
    assert t.peak_bytes == t.baseline_bytes + OUT_BYTES + F32 + W_BYTES + 2 * W_BYTES == 24584
    assert t.end_bytes == t.baseline_bytes


def test_views_and_inplace_ops_are_not_double_counted() -> None:
    n = 1000
    with PeakMemoryTracker(roots=()) as t:
        y = torch.empty(n)  # factory op
        y.fill_(1.0).add_(2.0)
        views = [y[::2], y.view(10, 100).t(), y.unsqueeze(0), *torch.split(y, 100)]
        views[1].mul_(3.0)
        peak_inside = t.peak_bytes
        del y, views
    assert peak_inside == n * F32
    assert t.peak_bytes == n * F32
    assert t.end_bytes == 0


def test_tied_weights_are_counted_once() -> None:
    emb = torch.nn.Embedding(50, 8)
    head = torch.nn.Linear(8, 50, bias=False)
    head.weight = emb.weight  # tied, as in GPT-2
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    # A tensor listed twice and a view of a parameter are the same storage, too.
    roots = (model, [emb.weight, emb.weight[3:]], {"again": model})
    assert live_bytes(roots) == 50 * 8 * F32
    with PeakMemoryTracker(roots=roots) as t:
        pass
    assert t.baseline_bytes == t.peak_bytes == t.end_bytes == 50 * 8 * F32


def test_freed_temporary_drops_out_and_storages_are_recreated() -> None:
    base = torch.zeros(100)
    big, small = 10_000, 500

    def region() -> None:
        tmp = torch.ones(big)
        del tmp  # freed: its bytes leave the running total now
        for _ in range(3):  # freed and re-created: never more than one alive
            s = torch.zeros(small) * 2.0  # zeros then mul: two storages at the mul
            del s

    with PeakMemoryTracker(roots=(base,)) as t:
        region()
    assert t.baseline_bytes == 100 * F32
    assert t.peak_bytes == (100 + big) * F32  # the small pair (1000 elements) is lower
    assert t.end_bytes == t.baseline_bytes


def test_list_outputs_no_grad_and_checkpoint_recompute_are_seen() -> None:
    n = 256
    a, b = torch.zeros(n), torch.zeros(n)
    with PeakMemoryTracker(roots=(a, b)) as t:
        outs = torch._foreach_add([a, b], 1.0)  # a list of two new tensors
    assert t.peak_bytes == 4 * n * F32
    del outs

    # Non-reentrant checkpoint runs forward under no_grad and recomputes it inside
    # backward. Sizes make the recompute the peak: the add's two inputs and its output,
    # (R, D) each, are live together only while it is recomputed (in backward the add
    # passes its grad through, and the expand of the seed is a view).
    r, d = 512, 16
    w1 = torch.randn(d, d, requires_grad=True)
    w2 = torch.randn(d, d, requires_grad=True)
    x = torch.randn(r, d)

    def block(inp: torch.Tensor) -> torch.Tensor:
        return inp @ w1 + inp @ w2

    # Early stop would end the recompute once the saved x, w1, w2 are back, before the add.
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        loss = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False).sum()
    with PeakMemoryTracker(roots=(w1, w2, x, loss)) as t:
        loss.backward()
    assert t.baseline_bytes == (2 * d * d + r * d) * F32 + F32
    # baseline + seed (4 B) + three (R, D) activations; the grads (D, D) come later.
    assert t.peak_bytes == t.baseline_bytes + F32 + 3 * r * d * F32
    assert t.end_bytes == t.baseline_bytes + 2 * d * d * F32  # w1.grad, w2.grad


def test_cpu_peak_agrees_with_torch_mem_tracker() -> None:
    # An independent implementation (a private torch API, used here as a check only).
    mem_tracker = pytest.importorskip(
        "torch.distributed._tools.mem_tracker", reason="MemTracker absent from this torch"
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8), torch.nn.LayerNorm(8)
    )
    opt = torch.optim.AdamW(model.parameters(), foreach=True)
    x = torch.randn(16, 32)

    def step() -> None:
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()

    step()
    reference = mem_tracker.MemTracker()
    reference.track_external(model, opt, x)
    with reference:
        step()
    expected = reference.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    with PeakMemoryTracker(roots=(model, opt, x)) as t:
        step()
    assert t.peak_bytes == expected


def test_measure_cpu() -> None:
    model, opt, x, step = _linear_setup(torch.optim.SGD)
    calls = 0

    def counted_step(batch: tuple[torch.Tensor]) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return step(batch[0])

    warmup, iters = 2, 3
    m = measure(counted_step, (x,), model=model, optimizer=opt, warmup=warmup, iters=iters)
    # Parameters are updated warmup + 1 (tracked step) + iters times; compare with a
    # reference trained that many plain steps (same ops, so bitwise equal).
    assert calls == warmup + 1 + iters
    ref_model, _, ref_x, ref_step = _linear_setup(torch.optim.SGD)
    for _ in range(warmup + 1 + iters):
        ref_step(ref_x)
    torch.testing.assert_close(model.weight, ref_model.weight, rtol=0, atol=0)

    assert isinstance(m, Measurement)
    assert m.device == "cpu" and m.batch_size == B and len(m.step_times_s) == iters
    assert m.step_time_s > 0 and m.samples_per_s > 0
    assert m.step_time_s == sorted(m.step_times_s)[iters // 2]
    assert m.samples_per_s == B / m.step_time_s
    # The same step as test_sgd_peak_matches_hand_count; the batch here is a 1-tuple
    # around the same tensor. measure() reads the CPU allocator (Note: [which CPU tracker]),
    # which also sees what the ledger's count leaves out: the weight-grad mm copies the
    # sum's stride-0 expanded grad, (B, D_OUT), to a contiguous temporary inside the kernel.
    assert m.baseline_bytes == W_BYTES + X_BYTES
    assert m.peak_memory_bytes == 16392 + OUT_BYTES == SGD_ALLOCATOR_PEAK


def test_measure_result_like_object_and_dict_batch() -> None:
    model, opt, x, step = _linear_setup(torch.optim.SGD)

    class ResultLike:  # duck-types autoscale's Result
        def __init__(self) -> None:
            self.model, self.optimizer = model, opt

        def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return step(batch["x"])

    m = measure(ResultLike(), {"x": x}, warmup=1, iters=2)
    assert m.batch_size == B and m.baseline_bytes == W_BYTES + X_BYTES
    assert m.peak_memory_bytes == SGD_ALLOCATOR_PEAK  # model/optimizer came from the object
    assert measure(ResultLike(), {"x": x}, batch_size=7, warmup=0, iters=1).batch_size == 7


def test_the_baseline_counts_held_state_and_a_wrapped_local_optimizer() -> None:
    # ZeroRedundancyOptimizer keeps its shard's state in ``.optim`` and a compressing DDP
    # hook its residuals outside model and optimizer (Result.held_state): both are live
    # between steps, and a baseline that missed them under-read zero1 and compressed plans
    # by the state and the residual (GPT at 2 ranks: 3.12 MiB each).
    model, local, x, step = _linear_setup(torch.optim.Adam)

    class Wrapper(torch.optim.Optimizer):  # ZeroRedundancyOptimizer's shape
        def __init__(self) -> None:
            super().__init__(list(model.parameters()), {})
            self.optim = local

    residual = torch.zeros(1000)

    class ResultLike:
        def __init__(self) -> None:
            self.model, self.optimizer, self.held_state = model, Wrapper(), [residual]

        def step(self, batch: torch.Tensor) -> torch.Tensor:
            return step(batch)

    plain = measure(step, x, model=model, optimizer=local, warmup=1, iters=1)
    wrapped = measure(ResultLike(), x, warmup=1, iters=1)
    assert wrapped.baseline_bytes == plain.baseline_bytes + residual.nbytes
    assert wrapped.peak_memory_bytes == plain.peak_memory_bytes + residual.nbytes
    assert plain.baseline_bytes >= W_BYTES + X_BYTES + 2 * W_BYTES  # Adam's two moments


N_HELD = 1 << 18  # fp32 elements of the held tensor below: 1 MiB


@pytest.mark.parametrize("tracker_cls", ["allocator", "ledger"])
def test_a_root_the_region_drops_is_freed_where_it_is_dropped(tracker_cls: str) -> None:
    # Note: [the tracker does not keep its roots alive]: the tracker reads its roots at the
    # start and lets go of them, so replacing a root inside the region frees the old one
    # there, as without a tracker. Holding them, it read one held tensor high.
    from autoscale.measure._allocator import AllocatorPeakTracker

    cls = AllocatorPeakTracker if tracker_cls == "allocator" else PeakMemoryTracker
    box = [torch.zeros(N_HELD)]
    with cls(roots=[box[0]], device="cpu") as tracker:
        box[0] = torch.zeros(N_HELD)  # the old one is freed here
        scratch = torch.ones(N_HELD)
        del scratch
    assert tracker.baseline_bytes == 4 * N_HELD
    assert tracker.peak_bytes == 2 * 4 * N_HELD, tracker_cls  # held: 3 * 4 * N_HELD
    assert tracker.end_bytes == 4 * N_HELD


def test_measure_frees_a_held_tensor_the_step_replaces() -> None:
    # A compressing DDP hook replaces its residual in the step the tuner measures (DDP's
    # bucket rebuild: Note: [the tracker does not keep its roots alive]); measure() keeps
    # no reference to Result.held_state's list, so the old residual is freed where the
    # step drops it. Kept, it put one residual on the peak (mlp ddp int8, 2 ranks: 83.00 MB
    # measured where the step holds 74.51).
    x = torch.zeros(4)

    class ResultLike:
        model = optimizer = None

        def __init__(self) -> None:
            self.residual = torch.zeros(N_HELD)

        @property
        def held_state(self) -> list[torch.Tensor]:
            return [self.residual]

        def step(self, batch: torch.Tensor) -> None:
            self.residual = torch.zeros(N_HELD)  # the old one is freed here
            scratch = torch.ones(N_HELD)  # the hook's work after the replacement
            del scratch

    m = measure(ResultLike(), x, warmup=0, iters=1)
    assert m.baseline_bytes == 4 * N_HELD + x.nbytes
    assert m.peak_memory_bytes == m.baseline_bytes + 4 * N_HELD


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"iters": 0}, "iters must be >= 1"),
        ({"warmup": -1}, "warmup must be >= 0"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
    ],
)
def test_measure_rejects_bad_options(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        measure(lambda b: None, (torch.zeros(2),), **kwargs)


def test_measure_rejects_bad_step_and_batch() -> None:
    with pytest.raises(TypeError, match="neither callable nor has"):
        measure(42, (torch.zeros(2),))
    with pytest.raises(ValueError, match="pass batch_size="):
        measure(lambda b: None, {"n": 3})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tracker_uses_allocator_peak() -> None:
    dev = torch.device("cuda")
    keep = torch.zeros(1 << 20, device=dev)  # 4 MiB alive before and after
    with PeakMemoryTracker(roots=(keep,)) as t:
        tmp = torch.ones(1 << 22, device=dev)  # 16 MiB, freed inside the region
        del tmp
    assert t.baseline_bytes >= keep.nbytes
    assert t.peak_bytes >= t.baseline_bytes + (1 << 24)
    assert t.end_bytes == t.baseline_bytes
