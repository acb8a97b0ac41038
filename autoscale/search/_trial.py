"""One measured trial: a plan (or the untouched baseline) built and measured for real.

The same two functions run inside a worker process (autoscale/search/_workers.py) and,
with ``isolate=False``, in the tuner's own process; either way the user's model is only
read: each trial trains a deep copy of it.
"""

from __future__ import annotations

import copy
import gc
from typing import Literal

import torch
from torch import nn

from autoscale.measure import Measurement, measure
from autoscale.plan import OptimizerPlan, Plan
from autoscale.runtime import build_result
from autoscale.runtime._batch import (
    Batch,
    LossFn,
    call_model,
    compute_loss,
    default_loss,
    to_device,
)
from autoscale.runtime._optimizers import build_optimizer

__all__ = ["measure_baseline", "measure_plan"]


def measure_plan(plan: Plan, model: nn.Module, batch: Batch, *, loss_fn: LossFn | None,
                 graph: object, warmup: int, iters: int,
                 device: torch.device | str | None = None) -> Measurement:
    """Build ``plan`` on a copy of ``model`` (moved to ``device`` if given) and measure it."""
    result = build_result(plan, model, loss_fn=loss_fn, graph=graph, device=device)
    try:
        return measure(result, to_device(batch, result.device), warmup=warmup, iters=iters)
    finally:
        del result
        free_memory()


def measure_baseline(model: nn.Module, batch: Batch, *, loss_fn: LossFn | None,
                     optimizer: OptimizerPlan, warmup: int = 1, iters: int = 3,
                     device: torch.device | str | None = None) -> Measurement:
    """Measure the untouched model: a plain loop, whole batch, fp32, no rewrites.

    The optimizer is torch.optim's where it has the kind (its defaults), else autoscale's.
    The model is deep-copied (and moved to ``device`` if given); ``model`` is not changed.
    """
    model = copy.deepcopy(model)
    if device is not None:
        model.to(device)
    kernel: Literal["torch", "auto"] = (
        "torch" if optimizer.kind in ("adamw", "adam", "sgd") else "auto")
    opt = build_optimizer(OptimizerPlan(kind=optimizer.kind, kernel=kernel,
                                        state_precision=optimizer.state_precision,
                                        kwargs=optimizer.kwargs), model.parameters())
    device = next(model.parameters()).device
    loss_fn = loss_fn or default_loss
    batch = to_device(batch, device)

    def step(b: Batch) -> float:
        model.train()
        loss = compute_loss(loss_fn, call_model(model, b), b)
        loss.backward()
        loss = loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    out = measure(step, batch, model=model, optimizer=opt, warmup=warmup, iters=iters)
    free_memory()
    return out


def free_memory(*, collect: bool = False) -> None:
    """Return cached CUDA blocks between trials; with ``collect``, collect reference cycles
    first (after a failed trial, whose traceback holds its tensors).

    A successful trial needs no collection here: measure() collects before the next
    trial's tracked step, and a full gc.collect costs ~0.2 s in a process that has
    imported torch and optuna (4 s of a 21 s GPT tune when it ran after every trial).
    """
    if collect:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
