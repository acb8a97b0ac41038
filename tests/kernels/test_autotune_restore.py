"""Autotuning side effects, under Triton's real Autotuner with several configs.

On a GPU the autotuner runs each in-place kernel several times per config to time it;
RESTORE_HOOKS (optimizers) and ``restore_value`` (the quantize residual) must undo every
one of those runs, or the first step after tuning is many steps at once. Under the
interpreter ``tuning_configs`` keeps one config, so the tuner never benchmarks and the
hooks never run in the other tests. Here each kernel's own autotuner (its key, hooks and
restore_value unchanged) gets two configs and a ``do_bench`` that runs the kernel three
times (the CPU has no CUDA events to time with), and one launch must still be one step.
"""

from __future__ import annotations

import pytest
import torch
from _optim_lists import CHUNK, SHAPE_SETS, clone_all, randn_list, zeros_list

from autoscale.kernels import adamw, lamb, lars, quant, sgd
from autoscale.optim import LAMB, LARS, SGD

pytestmark = pytest.mark.usefixtures("interpret")


def _benchmarking(monkeypatch, kernel, calls: list[int]):
    """Make autoscale's own autotuner ``kernel`` benchmark, as on a GPU: two configs (the
    registered one and a copy with other warps) and a ``do_bench`` that runs the kernel 3x.
    Its key, hooks and restore_value stay the production ones."""
    import triton

    def do_bench(fn, quantiles=None, **_):
        for _ in range(3):
            fn()
        calls.append(3)
        t = float(len(calls))  # a different "time" per config: the tuner must pick one
        return [t, t, t] if quantiles else t

    first = kernel.configs[0]
    other = triton.Config(dict(first.kwargs), num_warps=2 * first.num_warps,
                          num_stages=first.num_stages)
    monkeypatch.setattr(kernel, "configs", [first, other])
    # do_bench is a cached_property whose first read looks for a GPU driver: set the
    # instance's slot directly, without reading the old value.
    monkeypatch.setitem(kernel.__dict__, "do_bench", do_bench)
    monkeypatch.setattr(kernel, "cache", {})
    return kernel


@pytest.mark.parametrize("restore", [True, False], ids=["hooks", "no-hooks"])
def test_benchmark_runs_are_undone(monkeypatch, restore: bool) -> None:
    calls: list[int] = []
    tuned = _benchmarking(monkeypatch, adamw._adamw_kernel, calls)
    if not restore:  # the control: without the hooks the benchmark runs must show
        monkeypatch.setattr(tuned, "pre_hook", lambda *a, **k: None)
        monkeypatch.setattr(tuned, "post_hook", lambda *a, **k: None)
    shapes = SHAPE_SETS["mixed"]
    p = randn_list(shapes, torch.float32)
    state = [p, zeros_list(shapes), zeros_list(shapes), [torch.tensor(0.0) for _ in shapes]]
    want = clone_all(state)
    grads = randn_list(shapes, torch.float32)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, maximize=False)
    adamw.adamw(state[0], grads, *state[1:], **hyper, kernel="triton", chunk=CHUNK)
    adamw.adamw_reference(want[0], grads, *want[1:], **hyper)
    assert len(calls) == 2  # both configs were benchmarked
    same = all(torch.allclose(g, w, rtol=1e-5, atol=1e-6)
               for gs, ws in zip(state[:3], want[:3], strict=True)
               for g, w in zip(gs, ws, strict=True))
    assert same is restore


OPTIMIZERS = {
    "sgd": (sgd, ["_sgd_kernel"], lambda ps, k: SGD(ps, lr=0.1, momentum=0.9, kernel=k)),
    "lamb": (lamb, ["_lamb_phase1_kernel", "_lamb_phase2_kernel"],
             lambda ps, k: LAMB(ps, lr=1e-2, kernel=k)),
    "lars": (lars, ["_lars_norms_kernel", "_lars_apply_kernel"],
             lambda ps, k: LARS(ps, lr=0.1, momentum=0.9, kernel=k)),
}


@pytest.mark.parametrize("tune_at", [1, 2], ids=["tuned-at-first-step", "tuned-at-second"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_steps_with_every_kernel_retuned(monkeypatch, name: str, tune_at: int) -> None:
    """Three steps with the optimizer's kernels under the benchmarking autotuner from step
    ``tune_at`` on equal the reference path. Tuning at the second step matters for SGD and
    LARS: their first step overwrites the momentum buffer, so only a later step shows a
    buffer that the hooks failed to restore (as when resuming from a checkpoint)."""
    module, kernels, make = OPTIMIZERS[name]
    calls: list[int] = []
    shapes = SHAPE_SETS["mixed"]
    got = [torch.nn.Parameter(t) for t in randn_list(shapes, torch.float32)]
    want = [torch.nn.Parameter(t.detach().clone()) for t in got]
    opt_got, opt_want = make(got, "triton"), make(want, "reference")
    for step in range(1, 4):
        if step == tune_at:
            for k in kernels:
                _benchmarking(monkeypatch, getattr(module, k), calls)
        for a, b, g in zip(got, want, randn_list(shapes, torch.float32), strict=True):
            a.grad, b.grad = g, g.clone()
        opt_got.step()
        opt_want.step()
    assert calls, "the autotuner never benchmarked"
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def test_quantize_residual_is_restored_by_restore_value(monkeypatch) -> None:
    """The quantize kernel updates the error-feedback residual in place and relies on
    Triton's own ``restore_value=["r_ptr"]`` while tuning; one call is still one update."""
    calls: list[int] = []
    _benchmarking(monkeypatch, quant._quantize_kernel, calls)
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(1000, generator=gen)
    residual = torch.randn(1000, generator=gen) * 1e-2
    want_residual = residual.clone()
    q, s = quant.quantize_with_feedback(grad, residual, 256, kernel="triton")
    want_q, want_s = quant.quantize_with_feedback_reference(grad, want_residual, 256)
    assert len(calls) == 2
    assert torch.equal(q, want_q)
    torch.testing.assert_close(s, want_s)
    torch.testing.assert_close(residual, want_residual, rtol=1e-5, atol=1e-6)
