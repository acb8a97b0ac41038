"""A trial whose worker stopped before its first heartbeat is failed, not waited for."""
from __future__ import annotations

import datetime

import optuna
from optuna.trial import TrialState

from autoscale.search._study import counted_trials, fail_orphans, open_study


def _running(study: optuna.Study, *, age_s: float) -> int:
    """A RUNNING trial started ``age_s`` ago, as a worker that just called ask() leaves it."""
    start = datetime.datetime.now() - datetime.timedelta(seconds=age_s)
    template = optuna.trial.create_trial(state=TrialState.RUNNING, params={}, distributions={})
    template.datetime_start = start
    return study._storage.create_new_trial(study._study_id, template_trial=template)


def test_only_an_unstamped_trial_older_than_the_grace_period_is_failed(tmp_path) -> None:
    study = open_study(storage=str(tmp_path / "s.db"), study_name="s", seed=0, heartbeat_s=1)
    orphan = _running(study, age_s=60)
    young = _running(study, age_s=0)  # its worker may be about to stamp it
    alive = _running(study, age_s=60)
    study._storage.record_heartbeat(alive)  # a live worker's trial: its stale check's job

    numbers = {t._trial_id: t.number for t in study.get_trials(deepcopy=False)}
    assert fail_orphans(study) == [numbers[orphan]]
    states = {t._trial_id: t.state for t in study.get_trials(deepcopy=False)}
    assert states == {orphan: TrialState.FAIL, young: TrialState.RUNNING,
                      alive: TrialState.RUNNING}
    failed = study._storage.get_trial(orphan)
    assert failed.user_attrs == {"interrupted": True}
    assert counted_trials(study) == 0, "an interrupted trial counts towards the total"
    assert not study.get_trials(states=(TrialState.WAITING,)), "an orphan was queued again"
    assert fail_orphans(study) == []


def test_a_leaving_worker_does_not_wait_for_an_orphan(tmp_path) -> None:
    import threading

    from autoscale.search._study import _settle

    study = open_study(storage=str(tmp_path / "s.db"), study_name="s", seed=0, heartbeat_s=1)
    orphan = _running(study, age_s=1)  # goes past the 3 s grace period while we wait
    done = threading.Event()
    threading.Thread(target=lambda: (_settle(study, lambda: None), done.set()),
                     daemon=True).start()
    # Before the fix it waited the full settle bound (600 s) for a trial nobody ran.
    assert done.wait(timeout=120), "the leaving worker waited for a trial with no worker"
    assert study._storage.get_trial(orphan).state == TrialState.FAIL


def test_the_sampler_is_tpe_or_random_and_a_typo_is_refused(tmp_path) -> None:
    import pytest
    import torch

    import autoscale
    from autoscale.errors import TunerError

    assert isinstance(open_study(storage=None, study_name="r", seed=1, sampler="random").sampler,
                      optuna.samplers.RandomSampler)
    assert isinstance(open_study(storage=None, study_name="t", seed=1).sampler,
                      optuna.samplers.TPESampler)
    with pytest.raises(TunerError, match="sampler='grid' is not one of"):
        autoscale.optimize(torch.nn.Linear(2, 2), (torch.randn(4, 2),), trials=0,
                           sampler="grid")
