"""Loading a workload script: a Python file whose ``build()`` returns what to train."""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoscale.errors import AutoscaleError
from autoscale.runtime._batch import Batch, LossFn, check_batch

__all__ = ["Workload", "load_workload"]


@dataclass
class Workload:
    model: nn.Module
    example_inputs: Batch
    loss_fn: LossFn | None = None


def load_workload(path: str | os.PathLike[str]) -> Workload:
    """Run ``path`` as a module and call its ``build()``.

    ``build()`` returns ``(model, example_inputs)``, ``(model, example_inputs, loss_fn)``
    or a dict with keys ``model``, ``example_inputs`` and optionally ``loss_fn``. The
    script's folder is on ``sys.path`` while it loads, as for ``python script.py``.
    """
    path = Path(path)
    if not path.is_file():
        raise AutoscaleError(f"workload script {str(path)!r} does not exist.")
    module = _import(path)
    build = getattr(module, "build", None)
    if not callable(build):
        raise AutoscaleError(f"{path} defines no build() function; add `def build(): return "
                             "model, example_inputs[, loss_fn]`.")
    return _unpack(build(), path)


def _import(path: Path) -> Any:
    name = f"autoscale_workload_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise AutoscaleError(f"cannot import {path}: not a Python file.")
    module = importlib.util.module_from_spec(spec)
    # Registered before running, as the import system does: dataclasses and pickling
    # look the defining module up in sys.modules.
    sys.modules[name] = module
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    return module


def _unpack(built: Any, path: Path) -> Workload:
    if isinstance(built, dict):
        unknown = set(built) - {"model", "example_inputs", "loss_fn"}
        if unknown or "model" not in built or "example_inputs" not in built:
            raise AutoscaleError(f"{path}: build() returned a dict with keys {sorted(built)}; "
                                 "it needs 'model', 'example_inputs' and optionally 'loss_fn'.")
        parts = (built["model"], built["example_inputs"], built.get("loss_fn"))
    elif isinstance(built, tuple) and len(built) in (2, 3):
        parts = (*built, None) if len(built) == 2 else built
    else:
        raise AutoscaleError(f"{path}: build() must return (model, example_inputs[, loss_fn]), "
                             f"got {type(built).__name__}.")
    model, inputs, loss_fn = parts
    if not isinstance(model, nn.Module):
        raise AutoscaleError(f"{path}: build()'s model is {type(model).__name__}, not an "
                             "nn.Module.")
    if loss_fn is not None and not callable(loss_fn):
        raise AutoscaleError(f"{path}: build()'s loss_fn is not callable.")
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    return Workload(model, check_batch(inputs), loss_fn)
