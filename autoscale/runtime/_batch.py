"""Batches: validation, splitting into micro-batches, calling the model, finding the loss."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from autoscale.errors import AutoscaleError, CaptureError

Batch = tuple[Any, ...] | dict[str, Any]
LossFn = Callable[[Any, Batch], torch.Tensor]

__all__ = ["Batch", "LossFn", "batch_size", "call_model", "check_batch", "default_loss",
           "rank_share", "split_batch", "to_device"]


def check_batch(batch: Any, *, name: str = "example_inputs") -> Batch:
    """Return ``batch`` as a tuple or dict holding at least one tensor, or raise CaptureError."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, list):
        batch = tuple(batch)
    if isinstance(batch, tuple):
        tensors = [x for x in batch if isinstance(x, torch.Tensor)]
    elif isinstance(batch, Mapping):
        batch = dict(batch)
        if not all(isinstance(k, str) for k in batch):
            raise CaptureError(f"{name} is a dict with non-string keys; use the names of "
                               "forward()'s keyword arguments as keys.")
        tensors = [x for x in batch.values() if isinstance(x, torch.Tensor)]
    else:
        raise CaptureError(
            f"{name} must be a tuple of positional tensors or a dict of keyword tensors for "
            f"model.forward, got {type(batch).__name__}."
        )
    if not tensors:
        raise CaptureError(f"{name} holds no tensor; pass the tensors forward() takes.")
    if tensors[0].dim() == 0:
        raise CaptureError(f"{name}: the first tensor is a scalar; its first dimension must be "
                           "the batch dimension.")
    return batch


def _values(batch: Batch) -> list[Any]:
    return list(batch.values()) if isinstance(batch, dict) else list(batch)


def batch_size(batch: Batch) -> int:
    """Size of dim 0 of the first tensor: the number of samples in the batch."""
    first = next(x for x in _values(batch) if isinstance(x, torch.Tensor))
    return int(first.shape[0])


def split_batch(batch: Batch, micro_batch_size: int | None) -> Iterator[tuple[Batch, int]]:
    """Yield (micro_batch, size) chunks along dim 0; tensors of another length are shared.

    Invariant: concatenating the chunks' batch-dim tensors gives back the batch.
    """
    total = batch_size(batch)
    if micro_batch_size is None or micro_batch_size >= total:
        yield batch, total
        return
    for start in range(0, total, micro_batch_size):
        stop = min(start + micro_batch_size, total)

        def cut(x: Any, start: int = start, stop: int = stop) -> Any:
            is_batched = isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == total
            return x[start:stop] if is_batched else x

        if isinstance(batch, dict):
            yield {k: cut(v) for k, v in batch.items()}, stop - start
        else:
            yield tuple(cut(v) for v in batch), stop - start


def to_device(batch: Batch, device: torch.device) -> Batch:
    def move(x: Any) -> Any:
        return x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x

    if isinstance(batch, dict):
        return {k: move(v) for k, v in batch.items()}
    return tuple(move(v) for v in batch)


def call_model(model: nn.Module, batch: Batch) -> Any:
    return model(**batch) if isinstance(batch, dict) else model(*batch)


def default_loss(output: Any, batch: Batch) -> torch.Tensor:
    """The loss inside ``output``: the output itself if scalar, else ``.loss`` / ``["loss"]``."""
    if isinstance(output, torch.Tensor) and output.numel() == 1:
        return output.reshape(())
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return loss.reshape(())
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
    raise AutoscaleError(
        f"the model returned {type(output).__name__}{'' if shape is None else list(shape)}, "
        "not a scalar loss, and has no .loss / ['loss'] field; pass "
        "loss_fn=lambda output, batch: ... that returns a scalar tensor."
    )


def compute_loss(loss_fn: LossFn, output: Any, batch: Batch) -> torch.Tensor:
    loss = loss_fn(output, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise AutoscaleError(f"loss_fn returned {type(loss).__name__}, not a scalar tensor; "
                             "return e.g. F.cross_entropy(output, batch[1]).")
    if not loss.requires_grad:
        raise AutoscaleError("the loss does not require grad: no parameter of the model "
                             "influences it (all frozen, or computed under no_grad).")
    return loss.reshape(())


def rank_share(batch: Batch, rank: int, world_size: int) -> Batch:
    """This rank's equal share of a global batch: rows ``[rank * B/ws, (rank+1) * B/ws)``.

    Raises ValueError when the batch size is not a multiple of ``world_size``: ranks on
    unequal shares would not average to the whole batch's gradient.
    """
    total = batch_size(batch)
    if total % world_size:
        raise ValueError(f"the batch has {total} samples, which {world_size} ranks cannot share "
                         f"equally; make the batch size a multiple of {world_size}.")
    if world_size == 1:
        return batch
    chunks = list(split_batch(batch, total // world_size))
    return chunks[rank][0]
