"""Strided (non-contiguous) params on every optimizer path: a transposed Parameter must
step exactly like its contiguous twin, with its state in the same logical layout.

torch's fused CPU kernels pair elements in memory order and Triton's multi-tensor
kernels address memory linearly, so these paths once gave wrong updates (a grad laid out
unlike its param), state in a different order from the other paths, or refused the
tensor (Triton). Runs under the Triton interpreter (tests/kernels/conftest.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from autoscale.kernels import _dispatch
from autoscale.optim import LAMB, LARS, SGD, AdamW, AdamW8bit

MAKERS = {
    "AdamW": lambda ps, k: AdamW(ps, lr=1e-2, kernel=k),
    "SGD": lambda ps, k: SGD(ps, lr=0.1, momentum=0.9, nesterov=True, kernel=k),
    "LAMB": lambda ps, k: LAMB(ps, lr=1e-2, kernel=k),
    "LARS": lambda ps, k: LARS(ps, lr=0.5, momentum=0.9, eta=0.02, kernel=k),
    "AdamW8bit": lambda ps, k: AdamW8bit(ps, lr=1e-2, min_8bit_size=16, block_size=64, kernel=k),
}
CASES = [(name, k) for name in ("AdamW", "SGD")
         for k in ("torch_fused", "native", "triton")]
CASES += [(name, k) for name in ("LAMB", "LARS") for k in ("foreach", "native", "triton")]
CASES += [("AdamW8bit", k) for k in ("native", "compiled", "triton")]


class Transposed(nn.Module):
    """A linear layer whose weight Parameter is a transposed (strided) view."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(torch.randn(24, 40).t())  # (40, 24), strides (1, 40)
        self.bias = nn.Parameter(torch.randn(40))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t() + self.bias


def _steps(model: nn.Module, opt, n: int, *, manual_grad: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randn(16, 24, generator=gen)
        opt.zero_grad()
        model(x).square().mean().backward()
        if manual_grad:  # a user-assigned grad, contiguous, unlike its param
            for p in model.parameters():
                p.grad = p.grad.contiguous()
        opt.step()


@pytest.mark.parametrize("manual_grad", [False, True], ids=["autograd_grad", "contiguous_grad"])
@pytest.mark.parametrize(("name", "kernel"), CASES)
def test_strided_param_steps_like_its_contiguous_twin(name, kernel, manual_grad, request) -> None:
    if kernel == "triton":
        request.getfixturevalue("interpret")
    strided = Transposed()
    twin = copy.deepcopy(strided)
    twin.weight = nn.Parameter(twin.weight.detach().contiguous())
    assert not strided.weight.is_contiguous()
    opt = MAKERS[name](strided.parameters(), kernel)
    ref = MAKERS[name](twin.parameters(), "reference")
    _steps(strided, opt, 3, manual_grad=manual_grad)
    _steps(twin, ref, 3, manual_grad=manual_grad)
    assert opt.kernel_choice == kernel
    assert not strided.weight.is_contiguous()  # stepped in place, layout kept
    # 8-bit paths may move a code by one level (tests/kernels/test_adamw8bit.py); a
    # permuted or wrong update is off by ~lr or more nearly everywhere.
    tol = dict(rtol=0, atol=3e-3) if name == "AdamW8bit" else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(strided.weight, twin.weight, **tol)
    for key, value in opt.state[strided.weight].items():
        want = ref.state[twin.weight][key]
        assert value.is_contiguous(), key
        if value.is_floating_point() and value.dim() > 0 and name != "AdamW8bit":
            torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6)


def test_torch_state_of_a_strided_param_loads_contiguous_and_resumes() -> None:
    model = Transposed()
    torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    _steps(model, torch_opt, 2, manual_grad=False)
    assert not torch_opt.state[model.weight]["exp_avg"].is_contiguous()  # torch's layout
    ours_model = copy.deepcopy(model)
    ours = AdamW(ours_model.parameters(), lr=1e-2)
    ours.load_state_dict(torch_opt.state_dict())
    assert ours.state[ours_model.weight]["exp_avg"].is_contiguous()
    _dispatch.clear_cache()
    _steps(model, torch_opt, 2, manual_grad=False)
    _steps(ours_model, ours, 2, manual_grad=False)
    torch.testing.assert_close(ours_model.weight, model.weight, rtol=1e-5, atol=1e-6)
