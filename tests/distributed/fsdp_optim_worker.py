"""Run by tests/test_fsdp_optim.py under torchrun (2 gloo ranks): every optimizer and CPU
kernel path on FSDP2-sharded params, against the same optimizer on the unsharded model.

The test runs it with TRITON_INTERPRET=1, so the Triton paths run too (on CPU, through
the interpreter; auto never picks them there). Rank 0 writes one JSON object to argv[1]:
per case, the largest difference between the sharded and the unsharded params after the
steps, and between a run resumed from a state_dict and the uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from autoscale.optim import LAMB, LARS, SGD, AdamW, AdamW8bit

MAKERS = {
    "AdamW": lambda ps, k: AdamW(ps, lr=1e-2, weight_decay=0.1, kernel=k),
    "SGD": lambda ps, k: SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, kernel=k),
    "LAMB": lambda ps, k: LAMB(ps, lr=1e-2, weight_decay=0.01, kernel=k),
    "LARS": lambda ps, k: LARS(ps, lr=0.5, momentum=0.9, eta=0.02, weight_decay=1e-4, kernel=k),
    "AdamW8bit": lambda ps, k: AdamW8bit(ps, lr=1e-2, min_8bit_size=64, block_size=64, kernel=k),
}
CASES = [("AdamW", k) for k in ("reference", "torch_fused", "native", "triton")]
CASES += [("SGD", k) for k in ("reference", "torch_fused", "native", "triton")]
CASES += [("LAMB", k) for k in ("reference", "foreach", "native", "auto", "triton")]
CASES += [("LARS", k) for k in ("reference", "foreach", "native", "auto", "triton")]
CASES += [("AdamW8bit", k) for k in ("reference", "native", "compiled", "triton")]


def _model() -> nn.Module:
    # 33 rows split 17/16 (uneven shards); the last layer's weight (1, 33) and bias (1,)
    # leave rank 1 an empty shard; LayerNorm and biases are 1-D (excluded by LAMB/LARS).
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 33), nn.LayerNorm(33), nn.Tanh(), nn.Linear(33, 1))


def _shard(model: nn.Module, mesh) -> nn.Module:
    for layer in (model[0], model[3]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)  # the same batch on every rank
    for _ in range(steps):
        x = torch.randn(32, 16, generator=gen)
        y = torch.randn(32, 1, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _full(model: nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor().detach() if hasattr(p, "full_tensor") else p.detach()
            for p in model.parameters()]  # fmt: skip


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def main(out: str) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results = {}
    for name, kernel in CASES:
        sharded = _shard(_model(), mesh)
        opt = MAKERS[name](sharded.parameters(), kernel)
        _train(sharded, opt, 2, seed=1)
        model_sd = copy.deepcopy(sharded.state_dict())
        opt_sd = copy.deepcopy(opt.state_dict())
        _train(sharded, opt, 3, seed=2)

        plain = _model()
        plain_opt = MAKERS[name](plain.parameters(), "reference")
        _train(plain, plain_opt, 2, seed=1)
        _train(plain, plain_opt, 3, seed=2)

        resumed = _shard(_model(), mesh)
        resumed.load_state_dict(model_sd)
        resumed_opt = MAKERS[name](resumed.parameters(), kernel)
        resumed_opt.load_state_dict(opt_sd)
        _train(resumed, resumed_opt, 3, seed=2)

        state = next(iter(opt.state.values()))
        results[f"{name}-{kernel}"] = {
            "kernel": opt.kernel_choice,
            "vs_unsharded": _max_diff(_full(sharded), _full(plain)),
            "resume": _max_diff(_full(resumed), _full(sharded)),
            "moved": _max_diff(_full(sharded), _full(_model())),
            "state_types": sorted({type(v).__name__ for v in state.values()}),
        }
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # Leave without running C++ static destructors: gloo's threads made a rank abort
    # at interpreter exit ("terminate called without an active exception") about one
    # launch in ten, after its work was written (same fix as bench/bench_compress.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
