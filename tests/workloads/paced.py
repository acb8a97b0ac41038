"""ranked.py's model at one rank, whose steps take a set time when ``PACED_STEP_S`` is set.

The many-workers test kills a worker in the middle of a measurement. The model alone
measures in a fraction of a second, so a kill aimed at a running measurement would often
land after it ended; ``PACED_STEP_S`` (seconds a step, spread over its micro-batches) makes
the killed worker's measurements last seconds. The pause is in the loss function, which
runs eagerly after the model, so the captured graph and the study's fingerprint are the
same with or without it.
"""

from __future__ import annotations

import os
import time

import torch
from ranked import Ranked
from torch._subclasses.fake_tensor import is_fake

_STEP_S = float(os.environ.get("PACED_STEP_S", "0"))
_ROWS = 8


def _paced_loss(output: torch.Tensor, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if _STEP_S and not is_fake(output):  # the cost model's simulation is not paced
        time.sleep(_STEP_S * batch[0].shape[0] / _ROWS)
    return output


def build():
    torch.manual_seed(0)
    return Ranked(), (torch.randn(_ROWS, 16), torch.randn(_ROWS)), _paced_loss
