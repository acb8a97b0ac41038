"""A Plan survives pickling (also into another process), deep copies and JSON: equal after
each, with the same digest; schema-1 files keep loading to the same plan."""

from __future__ import annotations

import base64
import copy
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autoscale import (
    BatchPlan,
    CheckpointPlan,
    Environment,
    Fingerprint,
    Measured,
    OptimizerPlan,
    Plan,
    PrecisionPlan,
)
from autoscale.plan import SchedulePlan

V1_FILE = Path(__file__).with_name("v1_plan.json")


def rich_plan() -> Plan:
    """Every section off its defaults, kwargs with a list and a nested object."""
    return Plan(
        sections={
            "batch": BatchPlan(micro_batch_size=4, grad_accum_steps=2),
            "precision": PrecisionPlan(mode="fp16", init_scale=1024.0),
            "checkpoint": CheckpointPlan(blocks=("h.0", "h.1")),
            "optimizer": OptimizerPlan(kind="adamw", kernel="torch_fused", kwargs={
                "lr": 1e-3, "betas": [0.9, 0.95], "extra": {"nested": [1, 2]}}),
            "schedule": SchedulePlan(warmup_steps=5, decay="cosine", total_steps=50),
        },
        fingerprint=Fingerprint.of(torch.nn.Linear(4, 3), "g1"),
        environment=Environment.current(),
        measured=Measured(samples_per_s=10.5, step_time_s=0.8, peak_memory_bytes=1234),
    )


def assert_same(a: Plan, b: Plan) -> None:
    assert a == b
    assert hash(a) == hash(b)
    assert a.digest() == b.digest()
    assert a.fingerprint_digest() == b.fingerprint_digest()
    assert a.to_json() == b.to_json()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_round_trip(protocol: int) -> None:
    plan = rich_plan()
    loaded = pickle.loads(pickle.dumps(plan, protocol=protocol))
    assert_same(loaded, plan)
    assert loaded.optimizer.kwargs["extra"]["nested"] == (1, 2)


@pytest.mark.distributed
def test_pickle_round_trip_through_another_process(tmp_path: Path) -> None:
    # The child unpickles from stdin, reports digests, and pickles the plan back, as a
    # tuner's worker does. cwd=tmp_path: the source tree must not shadow the installed
    # package in the child.
    plan = rich_plan()
    child = (
        "import base64, pickle, sys\n"
        "plan = pickle.load(sys.stdin.buffer)\n"
        "print(type(plan).__module__, plan.digest(), plan.fingerprint_digest())\n"
        "print(base64.b64encode(pickle.dumps(plan)).decode())\n"
    )
    out = subprocess.run([sys.executable, "-c", child], input=pickle.dumps(plan),
                         capture_output=True, cwd=tmp_path, timeout=120, check=False)
    assert out.returncode == 0, out.stderr.decode()
    first, second = out.stdout.decode().splitlines()
    assert first.split() == ["autoscale.plan._plan", plan.digest(), plan.fingerprint_digest()]
    assert_same(pickle.loads(base64.b64decode(second)), plan)


@pytest.mark.parametrize("how", [copy.copy, copy.deepcopy])
def test_copies_are_equal(how) -> None:
    plan = rich_plan()
    assert_same(how(plan), plan)


def test_json_round_trip_is_equal_and_lists_become_tuples() -> None:
    plan = rich_plan()
    loaded = Plan.from_json(plan.to_json())
    assert_same(loaded, plan)
    assert loaded.optimizer.kwargs["betas"] == (0.9, 0.95)
    assert {plan: "found"}[loaded] == "found"  # hashable: usable as a cache key


def test_half_built_plan_raises_attribute_error_without_recursing() -> None:
    # pickle and copy look attributes up on an instance whose slots are not set yet.
    half = object.__new__(Plan)
    with pytest.raises(AttributeError, match="no section or attribute 'batch'"):
        _ = half.batch
    with pytest.raises(AttributeError):
        _ = half.__deepcopy__


def test_schema_1_file_loads_to_the_same_json_and_digests() -> None:
    # v1_plan.json and the two digests were written by the schema-1 code before plans
    # became FrozenDict-based: the format and the digests must not move.
    text = V1_FILE.read_text()
    plan = Plan.from_json(text)
    assert plan.to_json() == text
    assert plan.digest() == "8a436b94b525"
    assert plan.fingerprint_digest() == "294c72e61fef"
    assert json.loads(text)["sections"]["optimizer"]["kwargs"]["betas"] == [0.9, 0.95]
    assert plan.optimizer.kwargs["betas"] == (0.9, 0.95)
