"""Plan JSON: round-trip, and each refusal names the field."""

from __future__ import annotations

import json
import os

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
    PlanError,
    PlanMismatchError,
    PrecisionPlan,
)
from autoscale.plan._plan import SCHEMA_VERSION


def full_plan() -> Plan:
    model = torch.nn.Linear(4, 3)
    return Plan(
        sections={
            "batch": BatchPlan(micro_batch_size=4, grad_accum_steps=2),
            "precision": PrecisionPlan(mode="bf16"),
            "checkpoint": CheckpointPlan(blocks=("h.0", "h.1")),
            "optimizer": OptimizerPlan(kind="sgd", kernel="torch",
                                       kwargs={"lr": 0.1, "momentum": 0.9}),
        },
        fingerprint=Fingerprint.of(model, "abc123"),
        environment=Environment.current(),
        measured=Measured(samples_per_s=10.5, step_time_s=0.8, peak_memory_bytes=1234,
                          memory_budget_bytes=4096),
    )


def test_round_trip_is_exact(tmp_path) -> None:
    plan = full_plan()
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = Plan.load(path)
    assert loaded == plan
    assert loaded.to_json() == plan.to_json()
    assert loaded.checkpoint.blocks == ("h.0", "h.1")
    assert loaded.batch.micro_batch_size == 4


def test_default_plan_has_every_section() -> None:
    plan = Plan()
    assert plan.batch == BatchPlan() and plan.precision.mode == "fp32"
    assert plan.checkpoint.blocks == () and plan.optimizer.kind == "adamw"
    assert Plan.from_json(plan.to_json()) == plan


def test_replace_changes_one_section_only() -> None:
    plan = full_plan()
    new = plan.replace(precision=PrecisionPlan(mode="fp16"))
    assert new.precision.mode == "fp16" and plan.precision.mode == "bf16"
    assert new.checkpoint == plan.checkpoint and new.fingerprint == plan.fingerprint


def _mutate(path, edit) -> dict:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return data


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.__setitem__("extra", 1), "unknown top-level key"),
    (lambda d: d["sections"]["batch"].__setitem__("micro", 2), "sections.batch has unknown key"),
    (lambda d: d["sections"].__setitem__("warp", {}), "sections.warp is an unknown section"),
    (lambda d: d["sections"]["batch"].__setitem__("micro_batch_size", "4"),
     "sections.batch.micro_batch_size"),
    (lambda d: d["sections"]["batch"].__setitem__("micro_batch_size", 0),
     "batch.micro_batch_size must be >= 1"),
    (lambda d: d["sections"]["batch"].__setitem__("grad_accum_steps", True),
     "sections.batch.grad_accum_steps must be an integer"),
    (lambda d: d["sections"]["precision"].__setitem__("mode", "fp8"),
     "sections.precision.mode='fp8' is not one of"),
    (lambda d: d["sections"]["checkpoint"].__setitem__("blocks", "h.0"),
     "sections.checkpoint.blocks must be a list"),
    (lambda d: d["sections"]["checkpoint"].__setitem__("blocks", ["h.0", "h.0"]),
     "lists a block twice"),
    (lambda d: d["sections"]["optimizer"].__setitem__("state_precision", "int8"),
     "optimizer.state_precision='int8' does not go with kind='sgd'"),
    (lambda d: d["measured"].__setitem__("peak_memory_bytes", -1), "must be >= 0"),
    (lambda d: d["fingerprint"].pop("graph"), "fingerprint.graph is missing"),
    (lambda d: d.__setitem__("schema_version", SCHEMA_VERSION + 1), "upgrade autoscale"),
    (lambda d: d.__setitem__("schema_version", "1"), "schema_version must be an integer"),
])
def test_bad_plan_files_are_refused_naming_the_field(tmp_path, edit, message) -> None:
    path = tmp_path / "plan.json"
    full_plan().save(path)
    _mutate(path, edit)
    with pytest.raises(PlanError, match=message.replace("(", r"\(").replace("[", r"\[")):
        Plan.load(path)


def test_corrupt_and_foreign_files(tmp_path) -> None:
    path = tmp_path / "plan.json"
    path.write_text('{"schema_version": 1, "sections": {')  # truncated
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(path)
    path.write_text('["a", "list"]')
    with pytest.raises(PlanError, match="must be a JSON object"):
        Plan.load(path)
    path.write_bytes(b"\x80\x81\xff")
    with pytest.raises(PlanError, match="not text"):
        Plan.load(path)
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "missing.json")


def test_save_is_atomic_and_leaves_old_file_on_failure(tmp_path, monkeypatch) -> None:
    path = tmp_path / "plan.json"
    full_plan().save(path)
    before = path.read_text()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        Plan().save(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temp file left


def test_fingerprint_names_what_differs() -> None:
    plan = Plan(fingerprint=Fingerprint.of(torch.nn.Linear(4, 3), "g1"))
    plan.check_fingerprint(Fingerprint.of(torch.nn.Linear(4, 3), "g1"))  # same: no error
    with pytest.raises(PlanMismatchError, match=r"'weight' is float32\[5, 4\] in the model"):
        plan.check_fingerprint(Fingerprint.of(torch.nn.Linear(4, 5), "g1"))
    with pytest.raises(PlanMismatchError, match=r"'bias'.*missing"):
        plan.check_fingerprint(Fingerprint.of(torch.nn.Linear(4, 3, bias=False), "g1"))
    with pytest.raises(PlanMismatchError, match="forward graph differs"):
        plan.check_fingerprint(Fingerprint.of(torch.nn.Linear(4, 3), "g2"))


def test_sections_cannot_be_swapped_in_place() -> None:
    plan = Plan()
    with pytest.raises(TypeError):
        plan.sections["batch"] = BatchPlan(micro_batch_size=2, grad_accum_steps=1)
