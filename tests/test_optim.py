"""autoscale.optim classes: drop-in for torch.optim, exact state_dict resume."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from autoscale.kernels import _dispatch, adamw, lamb, lars, sgd
from autoscale.optim._adamw import AdamW
from autoscale.optim._adamw8bit import AdamW8bit
from autoscale.optim._lamb import LAMB
from autoscale.optim._lars import LARS
from autoscale.optim._sgd import SGD


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 20), nn.LayerNorm(20), nn.ReLU(), nn.Linear(20, 3)).to(dtype)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 12, generator=gen).to(next(model.parameters()).dtype)
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()


@pytest.mark.parametrize("kernel", ["reference", "auto"])
def test_adamw_drop_in_for_torch(kernel: str) -> None:
    a, b = _model(), _model()
    _train(a, torch.optim.AdamW(a.parameters(), lr=1e-2, foreach=False), 5, seed=1)
    opt = AdamW(b.parameters(), lr=1e-2, kernel=kernel)
    _train(b, opt, 5, seed=1)
    assert opt.kernel_choice in ("reference", "torch_fused", "native")
    # "reference" uses torch's single-tensor op order; fused/native reorder fp32 ops, which
    # over 5 steps of a tiny model stays within a few ulps.
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hyper", [dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
                                   dict(momentum=0.9, dampening=0.2), dict()])
def test_sgd_drop_in_for_torch(hyper: dict) -> None:
    a, b = _model(), _model()
    _train(a, torch.optim.SGD(a.parameters(), lr=0.1, foreach=False, **hyper), 5, seed=2)
    _train(b, SGD(b.parameters(), lr=0.1, **hyper), 5, seed=2)
    # Same maths; fused/foreach paths reorder at most a couple of fp32 multiply-adds.
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_defaults_match_torch() -> None:
    params = [nn.Parameter(torch.zeros(2))]
    ours, theirs = AdamW(params).defaults, torch.optim.AdamW(params).defaults
    assert ours == theirs
    ours, theirs = SGD(params).defaults, torch.optim.SGD(params).defaults
    assert ours == theirs


@pytest.mark.parametrize("kwargs, match", [
    (dict(amsgrad=True), "amsgrad"),
    (dict(capturable=True), "capturable"),
    (dict(differentiable=True), r"differentiable.*Use torch\.optim\.AdamW for that"),
    (dict(kernel="cuda_magic"), "kernel"),
    (dict(foreach=True, fused=True), "foreach"),
    (dict(betas=(1.0, 0.9)), "betas"),
])
def test_adamw_rejects_unsupported(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AdamW([nn.Parameter(torch.zeros(2))], **kwargs)


@pytest.mark.parametrize("cls", [AdamW, SGD])
def test_fused_and_foreach_flags_pick_the_kernel(cls) -> None:
    # AdamW and SGD have no foreach path: foreach=True asks for torch's fused one.
    for flags in (dict(fused=True), dict(foreach=True)):
        model = _model()
        opt = cls(model.parameters(), lr=1e-2, **flags)
        # Asked for, not measured: auto might pick torch_fused too.
        assert opt._kernel_for(opt.param_groups[0], torch.device("cpu")) == "torch_fused"
        _train(model, opt, 1, seed=0)
        assert opt.kernel_choice == "torch_fused", flags


PATHS = {"AdamW": AdamW, "SGD": SGD, "LAMB": LAMB, "LARS": LARS}


@pytest.mark.parametrize("name", sorted(PATHS))
@pytest.mark.parametrize("kernel", ["torch_fused", "foreach", "native", "compiled", "triton"])
def test_constructor_takes_exactly_the_kernels_its_op_has(name: str, kernel: str) -> None:
    # Every name some op has (kernels._dispatch.KERNELS) is either a path of this op, and
    # the optimizer builds, or is refused at construction naming what it takes.
    cls = PATHS[name]
    op = {"AdamW": adamw, "SGD": sgd, "LAMB": lamb, "LARS": lars}[name]
    assert cls.kernels == op.KERNELS and set(op.KERNELS) <= set(_dispatch.KERNELS)
    params = [nn.Parameter(torch.zeros(2))]
    if kernel in op.KERNELS:
        assert cls(params, kernel=kernel).kernel == kernel
        return
    with pytest.raises(ValueError, match=rf"^{name}: kernel='{kernel}' is not one of "
                                         rf"\('auto', 'triton', .*'reference'\); {name} has no"):
        cls(params, kernel=kernel)


def test_which_op_has_which_path() -> None:
    # The audited lists (each op module's docstring says which machine needs each path).
    assert AdamW.kernels == SGD.kernels == ("auto", "triton", "torch_fused", "native",
                                            "reference")
    assert LAMB.kernels == LARS.kernels == ("auto", "triton", "foreach", "native", "reference")


MAKERS = {
    "AdamW": lambda ps: AdamW(ps, lr=1e-2),
    "SGD": lambda ps: SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    "LAMB": lambda ps: LAMB(ps, lr=1e-2),
    "LARS": lambda ps: LARS(ps, lr=0.5, momentum=0.9, eta=0.02, weight_decay=1e-4),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", MAKERS)
def test_state_dict_resume_is_bit_identical(name: str, dtype: torch.dtype) -> None:
    model = _model(dtype)
    opt = MAKERS[name](model.parameters())
    _train(model, opt, 3, seed=3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    # Keep going in place ...
    _train(model, opt, 2, seed=4)
    # ... and from the checkpoint, in a fresh model and optimizer.
    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = _model(dtype)
    resumed.load_state_dict(ckpt["model"])
    opt2 = MAKERS[name](resumed.parameters())
    opt2.load_state_dict(ckpt["opt"])
    # fp32 state survives the load even for bf16 params; fp64 params keep fp64 moments
    want = torch.float64 if dtype == torch.float64 else torch.float32
    for st in opt2.state.values():
        assert all(v.dtype == (torch.float32 if k == "step" else want)
                   for k, v in st.items() if torch.is_tensor(v))
    _train(resumed, opt2, 2, seed=4)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_loads_torch_adamw_state_dict() -> None:
    a = _model()
    ta = torch.optim.AdamW(a.parameters(), lr=1e-2, foreach=False)
    _train(a, ta, 3, seed=5)
    b = copy.deepcopy(a)
    ours = AdamW(b.parameters(), lr=1e-2, kernel="reference")
    ours.load_state_dict(ta.state_dict())
    _train(a, ta, 2, seed=6)
    _train(b, ours, 2, seed=6)
    # kernel="reference" is torch's single-tensor op order: bit-identical continuation.
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [AdamW, SGD, LAMB, LARS])
def test_pickled_optimizer_keeps_its_kernel_and_steps_on(cls) -> None:
    """torch pickles only defaults/state/param_groups; kernel= must survive too."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(32, 16))
    kernel = "torch_fused" if "torch_fused" in cls.kernels else "foreach"
    opt = cls([p], lr=1e-2, kernel=kernel)
    p.grad = torch.randn_like(p)
    opt.step()
    clone = copy.deepcopy(opt)
    q = clone.param_groups[0]["params"][0]
    q.grad = p.grad.clone()
    opt.step()
    clone.step()
    assert clone.kernel == kernel and clone.kernel_choice == kernel
    assert torch.equal(p, q)


def test_state_is_countable_in_optimizer_state() -> None:
    model = _model(torch.bfloat16)
    opt = AdamW(model.parameters())
    _train(model, opt, 1, seed=0)
    n = sum(p.numel() for p in model.parameters())
    state_bytes = sum(v.numel() * v.element_size() for st in opt.state.values()
                      for k, v in st.items() if k != "step")
    assert state_bytes == 2 * 4 * n  # exp_avg + exp_avg_sq, fp32 for bf16 params


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_exclude_1d_flag(cls) -> None:
    model = _model()
    weights = [p for p in model.parameters() if p.dim() > 1]
    others = [p for p in model.parameters() if p.dim() <= 1]
    opt = cls([{"params": weights}, {"params": others, "exclude_1d": False}], lr=1e-2)
    assert opt.param_groups[0]["exclude_1d"] and not opt.param_groups[1]["exclude_1d"]
    _train(model, opt, 2, seed=0)
    assert opt.kernel_choice in ("reference", "foreach", "native")


@pytest.mark.parametrize("make", [*MAKERS.values(), lambda ps: AdamW8bit(ps, lr=1e-2)],
                         ids=[*MAKERS, "AdamW8bit"])
def test_complex_params_are_refused_not_truncated(make) -> None:
    # The kernels are real-valued: stepping a complex param through them silently zeroed
    # its imaginary part. A clear error with nothing stepped (not even the real param of
    # the group before it) is the contract instead.
    real = nn.Parameter(torch.randn(4))
    real.grad = torch.randn(4)
    p = nn.Parameter(torch.randn(4, dtype=torch.complex64))
    p.grad = torch.randn(4, dtype=torch.complex64)
    before = [real.detach().clone(), p.detach().clone()]
    opt = make([{"params": [real]}, {"params": [p]}])
    with pytest.raises(ValueError, match=r"complex parameters.*view_as_real"):
        opt.step()
    assert torch.equal(real.detach(), before[0]) and torch.equal(p.detach(), before[1])
    assert not opt.state


@pytest.mark.parametrize("kernel", ["auto", "reference", "torch_fused"])
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_fp64_params_keep_fp64_precision(name: str, kernel: str) -> None:
    # torch.optim keeps fp64 state for fp64 params; with fp32 moments the swap drifted
    # ~4e-6 from torch over 20 steps, where fp64 maths agrees to ~1e-15.
    hyper = dict(lr=1e-2) if name == "AdamW" else dict(lr=0.1, momentum=0.9, nesterov=True)
    ours_cls, theirs_cls = (AdamW, torch.optim.AdamW) if name == "AdamW" else (SGD, torch.optim.SGD)
    a, b = _model(torch.float64), _model(torch.float64)
    _train(a, theirs_cls(a.parameters(), foreach=False, **hyper), 20, seed=7)
    opt = ours_cls(b.parameters(), kernel=kernel, **hyper)
    _train(b, opt, 20, seed=7)
    for st in opt.state.values():
        assert all(v.dtype == torch.float64 for k, v in st.items() if k != "step")
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", ["LAMB", "LARS"])
def test_fp64_lamb_lars_paths_agree(name: str) -> None:
    # Every path of an fp64 bucket runs the maths in fp64 (state included), so the
    # foreach path and the reference agree far below fp32's resolution.
    models = [_model(torch.float64) for _ in range(2)]
    opts = [MAKERS[name](m.parameters()) for m in models]
    for opt, kernel in zip(opts, ("reference", "foreach"), strict=True):
        opt.kernel = kernel
    for m, opt in zip(models, opts, strict=True):
        _train(m, opt, 10, seed=8)
    assert [o.kernel_choice for o in opts] == ["reference", "foreach"]
    # Reordered fp64 ops, amplified by 10 trust-ratio steps: measured 4e-12 (fp32: ~1e-6).
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("flags", [dict(fused=True), dict(foreach=True)], ids=["fused", "foreach"])
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_torch_flags_fall_back_where_torch_paths_do_not_apply(name: str, flags: dict) -> None:
    # torch.optim.AdamW(bf16_params, fused=True) steps; the swapped import must too (it
    # raised KernelUnavailable: autoscale's torch paths need fp32/fp64 params), and match
    # the reference. On fp32 the flags still pick torch's path.
    cls = AdamW if name == "AdamW" else SGD
    hyper = dict(lr=1e-2) if name == "AdamW" else dict(lr=0.1, momentum=0.9)
    a, b = _model(torch.bfloat16), _model(torch.bfloat16)
    opt = cls(a.parameters(), **flags, **hyper)
    _train(a, opt, 3, seed=9)
    _train(b, cls(b.parameters(), kernel="reference", **hyper), 3, seed=9)
    assert opt.kernel_choice != "torch_fused"
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=2**-6, atol=1e-3)
    model = _model()
    fp32 = cls(model.parameters(), **flags, **hyper)
    _train(model, fp32, 1, seed=9)
    assert fp32.kernel_choice == "torch_fused"
