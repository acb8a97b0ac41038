"""Run by tests/test_dcp_adamw8bit.py under torchrun (gloo ranks): AdamW8bit on FSDP2
params through torch.distributed.checkpoint, saved at one world size and loaded at another.

``dcp_worker.py DIR save`` (2 ranks): train 2 steps, save model and optimizer with
``dcp.save`` (get_model_state_dict / get_optimizer_state_dict) to DIR/ckpt, train 3 more
steps (the run that never stopped: its full params go to DIR/continued.pt); then a fresh
model and optimizer at 2 ranks load the checkpoint (set_*_state_dict) and train the same 3
steps. Rank 0 writes DIR/save.json.

``dcp_worker.py DIR load`` (1 or 4 ranks): load the checkpoint into a fresh model and
optimizer at this world size and train the same 3 steps. At 1 rank, twice: into an
unsharded model (AdamW8bit(state_dict_moments='fp32'), so that DCP's target has the
checkpoint's keys) and into FSDP2 on a 1-rank mesh. Each next to a run at this world size
that never stopped. Rank 0 writes DIR/load-<world size>.json.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from autoscale.kernels import _cpu_adamw8bit
from autoscale.optim import AdamW8bit

BATCH = 16  # global; each rank takes BATCH / world_size rows
BEFORE, AFTER = 2, 3  # steps before the checkpoint, and after it


def _model(*, sharded: bool) -> nn.Module:
    # FSDP2 cuts dim 0: 33 rows of 16 split 17/16 at 2 ranks (a shard boundary at element
    # 272, not a multiple of the 64-element block) and 9/8/8/8 at 4; the (40, 33) layer is
    # 8-bit too; the head (33 + 1 elements: fp32 moments) leaves rank 1 an empty shard.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 33), nn.LayerNorm(33), nn.Tanh(), nn.Linear(33, 40),
                          nn.Tanh(), nn.Linear(40, 1))
    if sharded:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for i in (0, 3, 5):
            fully_shard(model[i], mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


# The C kernel where it builds (kernel="auto" would time every path, inductor's compile
# included, in each process: seconds for 5 steps of a tiny model); every path steps each
# shard with the same maths.
KERNEL = "native" if _cpu_adamw8bit.available() else "reference"


def _optimizer(model: nn.Module, **kwargs: Any) -> AdamW8bit:
    return AdamW8bit(model.parameters(), lr=1e-2, weight_decay=0.1, block_size=64,
                     min_8bit_size=64, kernel=KERNEL, **kwargs)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int, *,
           sharded: bool) -> None:
    gen = torch.Generator().manual_seed(seed)  # the same global batches on every rank
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    share = BATCH // world
    for _ in range(steps):
        x = torch.randn(BATCH, 16, generator=gen)[rank * share:(rank + 1) * share]
        y = torch.randn(BATCH, 1, generator=gen)[rank * share:(rank + 1) * share]
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _full(model: nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor().detach() if hasattr(p, "full_tensor") else p.detach().clone()
            for p in model.parameters()]  # fmt: skip


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def _save(ckpt: str, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=ckpt)


def _load(ckpt: str, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Load the checkpoint; returns the optimizer target as DCP filled it (the checkpoint's
    fp32 moments, before they are quantized)."""
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=ckpt)
    saved = copy.deepcopy(state["optim"])
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    return saved


def _codes(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t.clone() for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]


def _requant_error(saved: dict[str, Any], opt: AdamW8bit, model: nn.Module) -> float:
    """Largest |moment after load - the checkpoint's|, over the largest |moment| of that
    tensor: how much quantizing into this world size's blocks moved the state."""
    now = get_optimizer_state_dict(model, opt)  # fp32 moments (both ways of load())
    worst = 0.0
    for fqn, st in saved["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = (t.full_tensor() if hasattr(t, "full_tensor") else t
                    for t in (st[key], now["state"][fqn][key]))  # fmt: skip
            if a.numel():
                worst = max(worst, ((a - b).abs().max() / a.abs().max().clamp(min=1e-30)).item())
    return worst


def save(out: Path) -> dict[str, Any]:
    ckpt = str(out / "ckpt")
    model = _model(sharded=True)
    opt = _optimizer(model)
    _train(model, opt, BEFORE, seed=1, sharded=True)
    _save(ckpt, model, opt)
    at_save = _codes(opt)
    _train(model, opt, AFTER, seed=2, sharded=True)
    continued = _full(model)
    if dist.get_rank() == 0:
        torch.save(continued, out / "continued.pt")
    fresh = _model(sharded=True)
    fresh_opt = _optimizer(fresh)
    saved = _load(ckpt, fresh, fresh_opt)
    loaded = _codes(fresh_opt)
    _train(fresh, fresh_opt, AFTER, seed=2, sharded=True)
    state = next(iter(saved["state"].values()))
    return {
        "world_size": dist.get_world_size(),
        "saved_types": sorted({type(v).__name__ for v in state.values()}),
        "saved_keys": sorted(state),
        # Same world size: the same codes, scales and step counters, hence the same steps.
        "state_exact": len(loaded) == len(at_save)
        and all(torch.equal(a, b) for a, b in zip(at_save, loaded, strict=True)),
        "vs_continued": _max_diff(_full(fresh), continued),
        "moved": _max_diff(continued, _full(_model(sharded=False))),
    }


def load(out: Path) -> dict[str, Any]:
    ckpt = str(out / "ckpt")
    continued = torch.load(out / "continued.pt", weights_only=True)
    world = dist.get_world_size()
    ways = {"fsdp": True} if world > 1 else {"plain": False, "fsdp": True}
    results: dict[str, Any] = {"world_size": world}
    for name, sharded in ways.items():
        model = _model(sharded=sharded)
        opt = _optimizer(model, state_dict_moments="auto" if sharded else "fp32")
        saved = _load(ckpt, model, opt)
        error = _requant_error(saved, opt, model)
        _train(model, opt, AFTER, seed=2, sharded=sharded)
        # The same 5 steps at this world size without a checkpoint: its blocks differ from
        # the 2-rank run's for all 5 steps, the loaded run's for the last 3 only.
        plain = _model(sharded=sharded)
        plain_opt = _optimizer(plain)
        _train(plain, plain_opt, BEFORE, seed=1, sharded=sharded)
        _train(plain, plain_opt, AFTER, seed=2, sharded=sharded)
        results[name] = {
            "requant_error": error,
            "vs_continued": _max_diff(_full(model), continued),
            "never_stopped_vs_continued": _max_diff(_full(plain), continued),
            "vs_never_stopped_here": _max_diff(_full(model), _full(plain)),
            "steps": sorted({int(st["step"]) for st in opt.state.values()}),
        }
    return results


def main(out: str, mode: str) -> None:
    dist.init_process_group("gloo")
    path = Path(out)
    results = save(path) if mode == "save" else load(path)
    name = "save.json" if mode == "save" else f"load-{dist.get_world_size()}.json"
    if dist.get_rank() == 0:
        (path / name).write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # Leave without running C++ static destructors: gloo's threads made a rank abort
    # at interpreter exit ("terminate called without an active exception") about one
    # launch in ten, after its work was written (same fix as bench/bench_compress.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
