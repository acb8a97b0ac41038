"""Every Triton launch runs with its tensors' device current (``_triton_util.on_device``).

Triton launches on the current CUDA device; the multi-tensor kernels get raw addresses,
so params on cuda:1 in a process whose current device is cuda:0 need the switch. No GPU
here: the test records the device each launch asked for (CPU under the interpreter) and
checks what the guard is for a CUDA device without entering it.
"""

from __future__ import annotations

import contextlib

import torch

from autoscale.kernels import _triton_util, quant
from autoscale.optim import AdamW


def test_guard_for_a_cuda_device_switches_to_it() -> None:
    guard = _triton_util.on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(_triton_util.on_device(torch.device("cpu")), contextlib.nullcontext)


def test_every_launch_asks_for_its_tensors_device(interpret, monkeypatch) -> None:
    seen: list[torch.device] = []

    def record(device: torch.device) -> contextlib.AbstractContextManager:
        seen.append(device)
        return contextlib.nullcontext()

    monkeypatch.setattr(_triton_util, "on_device", record)
    monkeypatch.setattr(quant, "on_device", record)
    p = torch.nn.Parameter(torch.randn(300))
    p.grad = torch.randn(300)
    AdamW([p], kernel="triton").step()
    quant.quantize_with_feedback(torch.randn(300), torch.zeros(300), kernel="triton")
    assert seen == [torch.device("cpu")] * 2
