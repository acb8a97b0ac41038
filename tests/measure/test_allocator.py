"""AllocatorPeakTracker (autoscale/measure/_allocator.py): CPU peaks from the c10 allocator.

Each peak is checked exactly against a hand count: c10 reports the bytes each storage
asked for, so a small program has one right answer (its 64-byte alignment is not counted).
"""

from __future__ import annotations

import pytest
import torch

from autoscale.measure._allocator import (
    AllocatorEvent,
    AllocatorPeakTracker,
    FsdpSpan,
    _AllocatorTrace,
    profiler_is_free,
    replay,
)
from autoscale.measure._measure import measure
from autoscale.measure._memory import PeakMemoryTracker

F32 = 4
B, D_IN, D_OUT = 64, 32, 16  # as in tests/test_measure.py: every size below differs
W, X, OUT = D_OUT * D_IN * F32, B * D_IN * F32, B * D_OUT * F32  # 2048, 8192, 4096


def _linear(opt_cls: type[torch.optim.Optimizer], *, zero_grad_first: bool = False,
            **opt_kwargs: object):
    model = torch.nn.Linear(D_IN, D_OUT, bias=False)
    opt = opt_cls(model.parameters(), lr=0.1, **opt_kwargs)
    x = torch.randn(B, D_IN)

    def step(batch: torch.Tensor) -> None:
        if zero_grad_first:
            opt.zero_grad(set_to_none=True)  # frees the previous step's grad, a root
        out = model(batch)  # `out` stays referenced until return, through backward
        loss = out.sum()
        loss.backward()
        opt.step()
        if not zero_grad_first:
            opt.zero_grad(set_to_none=True)

    return model, opt, x, step


def test_private_torch_api() -> None:
    # If this fails, torch moved a private API _allocator.py reads (its adapter: the
    # profiler's experimental event tree, allocation fields, record_function markers):
    # CPU peaks from measure() can no longer be trusted. Update _AllocatorTrace.
    assert profiler_is_free()
    trace = _AllocatorTrace()
    trace.start()
    assert not profiler_is_free()
    t = torch.empty(1000)
    ptr = t.untyped_storage().data_ptr()
    _AllocatorTrace.mark("autoscale::root_free::7")
    del t
    allocs, markers, _ = trace.stop()
    assert profiler_is_free()
    mine = sorted(e for e in allocs if e.ptr == ptr)
    assert [e.nbytes for e in mine] == [4000, -4000], allocs
    assert all(isinstance(e, AllocatorEvent) and e.scope_end_ns >= e.time_ns for e in mine)
    assert [m.name for m in markers] == ["autoscale::root_free::7"]
    assert mine[0].time_ns <= markers[0].time_ns <= mine[1].time_ns  # one clock, in order


def test_sgd_step_matches_hand_count() -> None:
    model, opt, x, step = _linear(torch.optim.SGD)
    step(x)
    with AllocatorPeakTracker(roots=(model, opt, x)) as t:
        step(x)
    # Baseline W + x (grads None between steps). Peak inside the weight-grad mm of
    # backward: out, loss (4 B), the ones_like seed (4 B), dW, and the contiguous copy of
    # the seed expanded to (B, D_OUT) that mm makes inside its kernel (the dispatch ledger
    # cannot see it: it sees ops, not what a kernel allocates).
    assert t.baseline_bytes == W + X
    assert t.peak_bytes == W + X + OUT + F32 + F32 + W + OUT == 20488
    assert t.end_bytes == t.baseline_bytes


def test_adamw_step_matches_hand_count() -> None:
    model, opt, x, step = _linear(torch.optim.AdamW, foreach=False)
    step(x)
    state = 2 * W + F32  # exp_avg, exp_avg_sq, a 0-dim fp32 step
    with AllocatorPeakTracker(roots=(model, opt, x)) as t:
        step(x)
    assert t.baseline_bytes == W + X + state
    # Backward peaks at baseline + 2 OUT + W + 8 as for SGD. The step is higher: out,
    # loss, dW, and exp_avg_sq.sqrt() / bc2 (sqrt and quotient, W each), with bc2, a Python
    # float, wrapped in a 0-dim float64 tensor (8 B) and cast to float32 (4 B).
    assert t.peak_bytes == t.baseline_bytes + OUT + F32 + W + 2 * W + 8 + F32 == 24596
    assert t.end_bytes == t.baseline_bytes


def test_a_root_freed_inside_the_region_counts_once_in_every_tracked_step() -> None:
    # zero_grad at the start frees the previous step's grad, which a tracker (the first
    # one) may have seen allocated: the allocator reports that free and the root's weak
    # reference marks it; it must count once. Every tracked step then gives the same peak.
    model, opt, x, step = _linear(torch.optim.SGD, zero_grad_first=True)
    step(x)
    peaks = []
    for _ in range(3):
        with AllocatorPeakTracker(roots=(model, opt, x)) as t:
            step(x)
        assert t.baseline_bytes == t.end_bytes == W + X + W  # W.grad is live at both ends
        peaks.append(t.peak_bytes)
    # The old grad is freed before the new one exists: the same peak as without it.
    assert peaks == [20488] * 3


def test_storage_resize_is_seen() -> None:
    # FSDP2 allocates and frees unsharded parameters with UntypedStorage.resize_, which
    # dispatches no aten op the ledger could see.
    n = 1 << 16
    held = torch.empty(0)
    st = held.untyped_storage()
    for tracker in (AllocatorPeakTracker(roots=(held,)), PeakMemoryTracker(roots=(held,))):
        with tracker:
            st.resize_(n)
            st.resize_(0)
        if isinstance(tracker, AllocatorPeakTracker):
            assert (tracker.baseline_bytes, tracker.peak_bytes, tracker.end_bytes) == (0, n, 0)
        else:
            assert tracker.peak_bytes == 0  # the ledger's blind spot


def test_compiled_code_is_seen() -> None:
    # Inductor fuses the chain into one kernel with one output buffer; eager makes one
    # storage an op. The ledger cannot measure it at all: its TorchDispatchMode makes
    # Dynamo run the function eagerly (then and on later calls), so it is run last.
    n = 1 << 14
    x = torch.randn(n)
    fn = torch.compile(lambda t: ((t * 2 + 1).sin() * 3).cos(), dynamic=False)
    with torch.no_grad():
        fn(x)
        with AllocatorPeakTracker(roots=(x,)) as compiled:
            out = fn(x)
        del out
        with PeakMemoryTracker(roots=(x,)) as ledger:
            out = fn(x)
        del out
    assert compiled.peak_bytes == n * F32 + n * F32  # x and the one fused output
    assert ledger.peak_bytes > compiled.peak_bytes  # eager: 2 live temporaries at a time


def test_replay_ends_a_block_freed_by_an_untraced_thread() -> None:
    # A block allocated at t=10 inside an op ending at t=20, never freed in the trace,
    # its address allocated again at t=50: freed at 20, so the t=30 block does not add.
    allocs = [AllocatorEvent(10, 0xA, 100, 20), AllocatorEvent(30, 0xB, 60, 35),
              AllocatorEvent(40, 0xB, -60, 40), AllocatorEvent(50, 0xA, 100, 55),
              AllocatorEvent(60, 0xA, -100, 60)]
    assert replay(1000, allocs, []) == (1100, 1000)
    # A free whose address no allocation in the trace made is not the region's: dropped.
    assert replay(1000, [AllocatorEvent(5, 0xC, -500, 5)], []) == (1000, 1000)
    # A root (in the baseline, 200 B) freed at t=5, before every allocation.
    assert replay(1000, allocs, [(5, 200)]) == (1000, 800)


def test_replay_frees_an_fsdp_all_gather_output_where_fsdp_let_go_of_it() -> None:
    # Two unit outputs (100 B) allocated inside FSDP::all_gather and never freed in the
    # trace (gloo's thread dropped them): in backward the output is free once its own
    # copy-out ends; in forward FSDP keeps it until the next unit's copy-out starts.
    spans = [FsdpSpan(20, 30, "FSDP::all_gather_copy_out (h.1)", False),
             FsdpSpan(60, 70, "FSDP::all_gather_copy_out (h.0)", True),
             FsdpSpan(80, 90, "FSDP::all_gather_copy_out (h.1)", True)]
    backward = [AllocatorEvent(10, 0xA, 100, 12, gathered_for=" (h.1)"),
                AllocatorEvent(40, 0xB, 7, 41)]
    assert replay(0, backward, [], spans) == (100, 7)  # freed at 30, before the 7 B
    forward = [AllocatorEvent(50, 0xA, 100, 52, gathered_for=" (h.0)"),
               AllocatorEvent(75, 0xB, 7, 76), AllocatorEvent(85, 0xC, 5, 86)]
    assert replay(0, forward, [], spans) == (107, 12)  # held over 75, freed at 80
    # The root's output after the last unit: freed when the root's post-forward ends.
    root = [AllocatorEvent(50, 0xA, 100, 52, gathered_for=" (h.0)"),
            AllocatorEvent(75, 0xB, 7, 76)]
    assert replay(0, root, [], [spans[1], FsdpSpan(71, 74, "FSDP::post_forward", False)]) \
        == (100, 7)
    # No copy-out of its unit followed (or no FSDP ops traced): counted to the end.
    assert replay(0, backward, []) == (107, 107)


def test_measure_falls_back_to_the_ledger_under_a_running_profiler() -> None:
    model, opt, x, step = _linear(torch.optim.SGD)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        m = measure(step, x, model=model, optimizer=opt, warmup=1, iters=1)
    assert m.peak_memory_bytes == 16392  # the ledger's count (tests/test_measure.py)
    assert measure(step, x, model=model, optimizer=opt, warmup=0, iters=1).peak_memory_bytes \
        == 20488


@pytest.mark.parametrize("device", ["cuda", "meta"])
def test_refuses_other_devices(device: str) -> None:
    with pytest.raises(ValueError, match="CPU allocator only"):
        AllocatorPeakTracker(device=device)
