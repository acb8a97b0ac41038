"""A Plan cannot be changed through anything it holds; each attempt raises and the
digest, fingerprint digest and JSON stay as they were."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from autoscale import CheckpointPlan, Fingerprint, OptimizerPlan, Plan, PlanError
from autoscale.plan import FrozenDict, plan_section
from autoscale.plan import _plan as plan_module
from autoscale.plan._frozen import is_frozen


def sample() -> Plan:
    return Plan(
        sections={"optimizer": OptimizerPlan(kind="sgd", kernel="torch", kwargs={
                      "lr": 0.1, "momentum": 0.9, "extra": {"list": [1, 2]}}),
                  "checkpoint": CheckpointPlan(blocks=("h.0",))},
        fingerprint=Fingerprint.of(torch.nn.Linear(4, 3), "g1"),
    )


def _setitem(m: Any, k: str, v: Any) -> None:
    m[k] = v


def _delitem(m: Any, k: str) -> None:
    del m[k]


# Setting a name that is no field: CPython 3.11's frozen slotted __setattr__ raises
# TypeError (its super() sees the pre-slots class, gh-90562), later versions AttributeError.
NOT_A_FIELD = (AttributeError, TypeError)

MUTATIONS: list[tuple[str, Callable[[Plan], Any], Any]] = [
    ("kwargs[k] = v", lambda p: _setitem(p.optimizer.kwargs, "lr", 1), TypeError),
    ("del kwargs[k]", lambda p: _delitem(p.optimizer.kwargs, "lr"), TypeError),
    ("kwargs.update", lambda p: p.optimizer.kwargs.update(lr=1), AttributeError),
    ("kwargs.pop", lambda p: p.optimizer.kwargs.pop("lr"), AttributeError),
    ("kwargs.clear", lambda p: p.optimizer.kwargs.clear(), AttributeError),
    ("kwargs.setdefault", lambda p: p.optimizer.kwargs.setdefault("x", 1), AttributeError),
    ("kwargs._data", lambda p: setattr(p.optimizer.kwargs, "_data", {}), AttributeError),
    ("kwargs._data del", lambda p: delattr(p.optimizer.kwargs, "_data"), AttributeError),
    ("nested kwargs", lambda p: _setitem(p.optimizer.kwargs["extra"], "list", 0), TypeError),
    ("nested list", lambda p: p.optimizer.kwargs["extra"]["list"].append(3), AttributeError),
    ("optimizer.kwargs = ", lambda p: setattr(p.optimizer, "kwargs", {}), AttributeError),
    ("optimizer.kind = ", lambda p: setattr(p.optimizer, "kind", "adamw"), AttributeError),
    ("optimizer new attr", lambda p: setattr(p.optimizer, "other", 1), NOT_A_FIELD),
    ("fingerprint.parameters[k]",
     lambda p: _setitem(p.fingerprint.parameters, "weight", "x"), TypeError),
    ("fingerprint.graph", lambda p: setattr(p.fingerprint, "graph", "g2"), AttributeError),
    ("checkpoint.blocks", lambda p: p.checkpoint.blocks.append("h.1"), AttributeError),
    ("sections[k] = v", lambda p: _setitem(p.sections, "batch", None), TypeError),
    ("plan.optimizer = ", lambda p: setattr(p, "optimizer", None), NOT_A_FIELD),
    ("plan.sections = ", lambda p: setattr(p, "sections", {}), AttributeError),
    ("batch field", lambda p: setattr(p.batch, "grad_accum_steps", 3), AttributeError),
]


@pytest.mark.parametrize(("what", "mutate", "error"), MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_every_mutation_raises_and_digest_is_unchanged(what, mutate, error) -> None:
    plan = sample()
    before = (plan.digest(), plan.fingerprint_digest(), plan.to_json(), hash(plan))
    with pytest.raises(error):
        mutate(plan)
    assert (plan.digest(), plan.fingerprint_digest(), plan.to_json(), hash(plan)) == before


def test_plan_does_not_alias_the_callers_containers() -> None:
    kwargs: dict[str, Any] = {"lr": 0.1, "betas": [0.9, 0.99], "extra": {"a": [1]}}
    params = {"weight": "float32[3, 4]"}
    plan = Plan(sections={"optimizer": OptimizerPlan(kwargs=kwargs)},
                fingerprint=Fingerprint(parameters=params, graph="g"))
    before = plan.digest(), plan.fingerprint_digest()
    kwargs["lr"] = 1.0
    kwargs["betas"].append(0.5)
    kwargs["extra"]["a"].append(2)
    params["weight"] = "float64[1]"
    assert (plan.digest(), plan.fingerprint_digest()) == before
    assert plan.optimizer.kwargs == {"lr": 0.1, "betas": (0.9, 0.99), "extra": {"a": (1,)}}


def test_everything_reachable_is_frozen() -> None:
    plan = sample()
    assert is_frozen(plan)
    assert isinstance(plan.sections, FrozenDict)
    assert isinstance(plan.optimizer.kwargs, FrozenDict)
    assert isinstance(plan.fingerprint.parameters, FrozenDict)
    for name, section in plan.sections.items():
        assert is_frozen(section), name


def test_values_a_plan_file_cannot_store_are_refused_naming_the_field() -> None:
    with pytest.raises(PlanError, match=r"optimizer\.kwargs\.lr holds Tensor"):
        OptimizerPlan(kwargs={"lr": torch.tensor(0.1)})
    with pytest.raises(PlanError, match=r"optimizer\.kwargs\.extra has the key 1"):
        OptimizerPlan(kwargs={"extra": {1: 2}})
    with pytest.raises(PlanError, match=r"checkpoint\.blocks must be a list of block names"):
        CheckpointPlan(blocks="h.0")  # type: ignore[arg-type]


def test_a_section_typed_with_a_mutable_container_is_refused_at_registration() -> None:
    @dataclass(frozen=True, slots=True)
    class Bad:
        names: list[str] = dataclasses.field(default_factory=list)

    with pytest.raises(TypeError, match=r"bad_section\.names is typed list\[str\]"):
        plan_section("bad_section")(Bad)
    assert "bad_section" not in plan_module._SECTIONS


def test_a_section_that_does_not_freeze_its_mapping_is_caught_by_plan(monkeypatch) -> None:
    @dataclass(frozen=True, slots=True)
    class Lazy:  # Mapping-typed, but forgets freeze_json in __post_init__
        table: Mapping[str, int] = dataclasses.field(default_factory=dict)

    monkeypatch.setitem(plan_module._SECTIONS, "lazy", Lazy)
    with pytest.raises(TypeError, match="plan section 'lazy' holds a mutable value"):
        Plan()
