"""The in-process runner freezes the long-lived objects for its trials' collections and
gives them back (Note: [a collection walks only what trials make])."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
import torch

from autoscale.search._workers import InProcessRunner


class _Cycle:
    def __init__(self) -> None:
        self.me = self
        self.tensor = torch.ones(1024)


@pytest.fixture
def thawed() -> Iterator[None]:
    """Nothing frozen during the test (conftest freezes what collection imported)."""
    frozen = gc.get_freeze_count()
    gc.unfreeze()
    yield
    gc.unfreeze()
    if frozen:
        gc.freeze()


def _runner() -> InProcessRunner:
    return InProcessRunner(torch.nn.Linear(2, 2), (torch.randn(2, 2),), loss_fn=None,
                           graph=None, warmup=0, iters=1)


def test_the_runner_freezes_while_open_and_trial_garbage_is_still_collected(thawed
                                                                            ) -> None:
    assert gc.get_freeze_count() == 0
    before = _Cycle()  # made before the runner: frozen with the rest while it is open
    kept = weakref.ref(before)
    with _runner():
        assert gc.get_freeze_count() > 0
        del before
        gc.collect()
        assert kept() is not None, "a frozen cycle is left for after the runner"
        made = _Cycle()  # garbage a trial makes: younger than the freeze
        gone = weakref.ref(made)
        del made
        gc.collect()
        assert gone() is None
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert kept() is None, "thawed, the earlier cycle is collected again"


def test_objects_the_caller_froze_stay_frozen(thawed) -> None:
    gc.freeze()
    frozen = gc.get_freeze_count()
    with _runner():
        assert gc.get_freeze_count() == frozen
    assert gc.get_freeze_count() == frozen
