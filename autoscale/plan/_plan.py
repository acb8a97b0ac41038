"""The plan: what to do to a model, saved as a small JSON file that reproduces a run.

A plan is a set of *sections*, one per concern (batch, precision, checkpoint, optimizer,
and whatever later passes add). Each section is a frozen dataclass registered with
:func:`plan_section`; :class:`Plan` holds one instance of every registered section, so a
new pass adds its own section without touching the others or this file. Sections are
read as attributes: ``plan.batch.micro_batch_size``.

Besides the knobs, a plan carries the fingerprint of the model it was made for, the
environment it was measured on and the measured figures, so that a plan is refused on
another model and its numbers can be checked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from autoscale.errors import PlanError, PlanMismatchError
from autoscale.plan._fields import from_json_dataclass, to_json_value

__all__ = [
    "SCHEMA_VERSION",
    "BatchPlan",
    "CheckpointPlan",
    "Environment",
    "Fingerprint",
    "Measured",
    "OptimizerPlan",
    "Plan",
    "PrecisionPlan",
    "SchedulePlan",
    "plan_section",
]

SCHEMA_VERSION = 1
"""Bumped when a plan file's meaning changes; files with a newer version are refused."""

_SECTIONS: dict[str, type] = {}


def plan_section(name: str):
    """Register a frozen dataclass as the plan section ``name``.

    Every field needs a default, so that a plan written before the section existed
    still loads (with the section at its defaults, i.e. the pass switched off).
    """

    def register(cls: type) -> type:
        if name in _SECTIONS and _SECTIONS[name] is not cls:
            raise ValueError(f"plan section {name!r} is already registered by {_SECTIONS[name]}")
        for f in dataclasses.fields(cls):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise TypeError(f"plan section {name}.{f.name} needs a default")
        _SECTIONS[name] = cls
        cls.section_name = name
        return cls

    return register


@plan_section("batch")
@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's batch is split into micro-batches."""

    micro_batch_size: int | None = None
    """Samples per forward/backward; None runs the whole batch at once."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step, for the batch size the plan was made for
    (micro_batch_size * grad_accum_steps == that batch size). A batch of another size is
    split into micro-batches of micro_batch_size all the same."""

    def __post_init__(self) -> None:
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise PlanError(
                f"batch.micro_batch_size must be >= 1 or null, got {self.micro_batch_size}."
            )
        if self.grad_accum_steps < 1:
            raise PlanError(f"batch.grad_accum_steps must be >= 1, got {self.grad_accum_steps}.")
        if self.micro_batch_size is None and self.grad_accum_steps != 1:
            raise PlanError(
                "batch.grad_accum_steps must be 1 when micro_batch_size is null; set "
                "micro_batch_size to the per-step batch divided by grad_accum_steps."
            )


@plan_section("precision")
@dataclass(frozen=True)
class PrecisionPlan:
    """Mixed precision: parameters and optimizer state stay fp32 in every mode."""

    mode: Literal["fp32", "bf16", "fp16"] = "fp32"
    """fp32: no autocast. bf16: autocast to bfloat16. fp16: autocast to float16 with
    dynamic loss scaling (torch.amp.GradScaler)."""
    init_scale: float = 2.0**16
    """Initial loss scale for fp16; ignored otherwise."""

    def __post_init__(self) -> None:
        if not self.init_scale > 0:
            raise PlanError(f"precision.init_scale must be > 0, got {self.init_scale}.")


@plan_section("checkpoint")
@dataclass(frozen=True)
class CheckpointPlan:
    """Full activation checkpointing of whole blocks (recompute in backward)."""

    blocks: tuple[str, ...] = ()
    """Fully qualified names of the blocks to checkpoint, e.g. ("h.0", "h.1")."""

    def __post_init__(self) -> None:
        if len(set(self.blocks)) != len(self.blocks):
            raise PlanError(f"checkpoint.blocks lists a block twice: {list(self.blocks)}.")
        for name in self.blocks:
            if not name:
                raise PlanError("checkpoint.blocks holds an empty name; use the block's FQN.")


@plan_section("optimizer")
@dataclass(frozen=True)
class OptimizerPlan:
    """Which optimizer runs the step, with which kernel and state precision."""

    kind: Literal["adamw", "adam", "sgd", "lamb", "lars", "adamw8bit"] = "adamw"
    """The update rule."""
    kernel: Literal[
        "auto", "torch", "triton", "torch_fused", "foreach", "native", "compiled", "reference"
    ] = "auto"
    """'torch' uses torch.optim; the others use autoscale.optim with that kernel choice."""
    state_precision: Literal["fp32", "int8"] = "fp32"
    """int8 stores both Adam moments block-quantized (kind 'adamw8bit' only)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Constructor arguments (lr, weight_decay, betas, ...), as JSON values."""

    def __post_init__(self) -> None:
        if (self.state_precision == "int8") != (self.kind == "adamw8bit"):
            raise PlanError(
                f"optimizer.state_precision={self.state_precision!r} does not go with "
                f"kind={self.kind!r}: int8 state is kind 'adamw8bit', every other kind is fp32."
            )
        if self.kernel == "torch" and self.kind in ("lamb", "lars", "adamw8bit"):
            raise PlanError(
                f"optimizer.kernel='torch' has no {self.kind!r}; use kernel='auto'."
            )


@plan_section("schedule")
@dataclass(frozen=True)
class SchedulePlan:
    """Large-batch learning-rate rules (survey section 3): scaling and warm-up.

    The optimizer's ``lr`` is taken as tuned for ``base_batch_size``; with a scaling rule
    it is rescaled to ``batch_size`` once, at build time. Warm-up then ramps it linearly
    from ~0 over ``warmup_steps`` optimizer steps, then holds it (constant) or decays it
    to ``min_factor`` by ``total_steps`` (cosine).
    """

    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    """linear: lr * batch/base (Goyal et al.); sqrt: lr * sqrt(batch/base) (for Adam-type)."""
    base_batch_size: int | None = None
    """Batch size the optimizer's lr was tuned for; required with a scaling rule."""
    batch_size: int | None = None
    """Batch size this plan trains with; required with a scaling rule."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up; 0 disables warm-up."""
    decay: Literal["constant", "cosine"] = "constant"
    """What follows warm-up."""
    total_steps: int | None = None
    """Steps to the end of the cosine decay; required with decay='cosine'."""
    min_factor: float = 0.0
    """Final lr of the cosine decay as a fraction of the peak lr."""

    def __post_init__(self) -> None:
        if self.lr_scaling != "none" and not (self.base_batch_size and self.batch_size):
            raise PlanError(
                f"schedule.lr_scaling={self.lr_scaling!r} needs schedule.base_batch_size and "
                "schedule.batch_size (the batch the lr was tuned for and the one trained with)."
            )
        for name in ("base_batch_size", "batch_size", "total_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise PlanError(f"schedule.{name} must be >= 1 or null, got {value}.")
        if self.warmup_steps < 0:
            raise PlanError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}.")
        if self.decay == "cosine" and self.total_steps is None:
            raise PlanError("schedule.decay='cosine' needs schedule.total_steps.")
        if self.total_steps is not None and self.total_steps < self.warmup_steps:
            raise PlanError(f"schedule.total_steps={self.total_steps} is shorter than "
                            f"schedule.warmup_steps={self.warmup_steps}.")
        if not 0.0 <= self.min_factor <= 1.0:
            raise PlanError(f"schedule.min_factor must be in [0, 1], got {self.min_factor}.")

    @property
    def active(self) -> bool:
        return self.warmup_steps > 0 or self.decay != "constant"


@dataclass(frozen=True)
class Fingerprint:
    """What identifies the model a plan was made for (not its values)."""

    parameters: dict[str, str]
    """Parameter FQN -> 'dtype[shape]' for every parameter (tied weights once)."""
    graph: str
    """Hash of the captured graph's structure (op sequence), independent of batch values."""

    @classmethod
    def of(cls, model: nn.Module, graph_structure: str) -> Fingerprint:
        params = {
            name: f"{str(p.dtype).removeprefix('torch.')}{list(p.shape)}"
            for name, p in model.named_parameters()
        }
        return cls(parameters=params, graph=graph_structure)

    def differences(self, other: Fingerprint, *, limit: int = 5) -> list[str]:
        """Human-readable differences from ``other`` (the model at hand), at most ``limit``."""
        diffs = []
        for name in sorted(self.parameters.keys() - other.parameters.keys()):
            diffs.append(f"parameter {name!r} ({self.parameters[name]}) is missing in the model")
        for name in sorted(other.parameters.keys() - self.parameters.keys()):
            diffs.append(f"the model has parameter {name!r} ({other.parameters[name]}) "
                         "that the plan does not know")
        for name in sorted(self.parameters.keys() & other.parameters.keys()):
            if self.parameters[name] != other.parameters[name]:
                diffs.append(f"parameter {name!r} is {other.parameters[name]} in the model "
                             f"but {self.parameters[name]} in the plan")
        if not diffs and self.graph != other.graph:
            diffs.append("the parameters match but the forward graph differs "
                         f"(plan {self.graph[:12]}, model {other.graph[:12]})")
        more = len(diffs) - limit
        return diffs[:limit] + ([f"... and {more} more"] if more > 0 else [])


@dataclass(frozen=True)
class Environment:
    """Where the plan's figures were measured."""

    torch: str = ""
    device: str = ""
    world_size: int = 1
    python: str = ""
    autoscale: str = ""

    @classmethod
    def current(cls, device: torch.device | str = "cpu") -> Environment:
        from autoscale import __version__

        device = torch.device(device)
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
        else:
            name = f"cpu: {platform.processor() or platform.machine()} x{os.cpu_count()}"
        world = torch.distributed.get_world_size() if (
            torch.distributed.is_available() and torch.distributed.is_initialized()) else 1
        return cls(torch=torch.__version__, device=name, world_size=world,
                   python=platform.python_version(), autoscale=__version__)


@dataclass(frozen=True)
class Measured:
    """Figures measured for this plan (and for the untouched baseline) in one run."""

    samples_per_s: float
    step_time_s: float
    peak_memory_bytes: int
    memory_budget_bytes: int | None = None
    baseline_samples_per_s: float | None = None
    baseline_peak_memory_bytes: int | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.samples_per_s < 0 or self.step_time_s < 0 or self.peak_memory_bytes < 0:
            raise PlanError("measured figures must be >= 0.")


def _default_sections() -> dict[str, Any]:
    return {name: cls() for name, cls in _SECTIONS.items()}


@dataclass(frozen=True)
class Plan:
    """An immutable training plan; ``plan.<section>`` reads a section.

    Invariant: holds exactly one instance of every registered section, each valid on its
    own. ``to_json``/``from_json`` round-trip to an equal plan.
    """

    sections: Mapping[str, Any] = field(default_factory=_default_sections)
    fingerprint: Fingerprint | None = None
    environment: Environment | None = None
    measured: Measured | None = None
    schema_version: int = SCHEMA_VERSION

    _reserved: ClassVar[frozenset[str]] = frozenset(
        {"sections", "fingerprint", "environment", "measured", "schema_version"})

    def __post_init__(self) -> None:
        filled = _default_sections()
        for name, section in dict(self.sections).items():
            if name not in _SECTIONS:
                raise PlanError(
                    f"plan has an unknown section {name!r}; known: {sorted(_SECTIONS)}."
                )
            if not isinstance(section, _SECTIONS[name]):
                raise PlanError(f"plan section {name!r} must be a {_SECTIONS[name].__name__}.")
            filled[name] = section
        object.__setattr__(self, "sections", types_mapping(filled))

    def __getattr__(self, name: str) -> Any:
        sections = object.__getattribute__(self, "sections")
        if name in sections:
            return sections[name]
        raise AttributeError(f"Plan has no section or attribute {name!r}")

    def replace(self, **changes: Any) -> Plan:
        """A copy with some sections (by name) or top-level fields replaced."""
        sections = dict(self.sections)
        top = {}
        for key, value in changes.items():
            if key in self._reserved:
                top[key] = value
            else:
                sections[key] = value
        return dataclasses.replace(self, sections=sections, **top)

    # -- JSON -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "fingerprint": to_json_value(self.fingerprint),
            "environment": to_json_value(self.environment),
            "measured": to_json_value(self.measured),
            "sections": {name: to_json_value(s) for name, s in self.sections.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        """Build a plan from parsed JSON; refuses unknown keys, bad types and values."""
        if not isinstance(data, dict):
            raise PlanError(f"a plan must be a JSON object, got {type(data).__name__}.")
        version = data.get("schema_version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise PlanError(f"schema_version must be an integer, got {version!r}; "
                            "this does not look like an autoscale plan file.")
        if version > SCHEMA_VERSION:
            raise PlanError(
                f"schema_version={version} is newer than this autoscale understands "
                f"({SCHEMA_VERSION}); upgrade autoscale to load this plan."
            )
        if version < 1:
            raise PlanError(f"schema_version must be >= 1, got {version}.")
        unknown = sorted(set(data) - {"schema_version", "fingerprint", "environment",
                                      "measured", "sections"})
        if unknown:
            raise PlanError(f"plan has unknown top-level key(s) {unknown}; remove them.")
        raw_sections = data.get("sections", {})
        if not isinstance(raw_sections, dict):
            raise PlanError("sections must be a JSON object.")
        sections = {}
        for name, raw in raw_sections.items():
            if name not in _SECTIONS:
                raise PlanError(f"sections.{name} is an unknown section; known: "
                                f"{sorted(_SECTIONS)}. Upgrade autoscale or remove it.")
            sections[name] = from_json_dataclass(_SECTIONS[name], raw, f"sections.{name}")
        return cls(
            sections=sections,
            fingerprint=_optional(Fingerprint, data.get("fingerprint"), "fingerprint"),
            environment=_optional(Environment, data.get("environment"), "environment"),
            measured=_optional(Measured, data.get("measured"), "measured"),
            schema_version=version,
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PlanError(f"the plan is not valid JSON ({err}); the file is corrupted or "
                            "not a plan. Re-create it with `autoscale tune`.") from err
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan atomically: a reader sees the old file or the new, never half."""
        path = Path(path)
        text = self.to_json()
        fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as err:
            raise PlanError(f"plan file {str(path)!r} does not exist; create one with "
                            "`autoscale tune` or Plan.save().") from err
        except UnicodeDecodeError as err:
            raise PlanError(f"plan file {str(path)!r} is not text; it is corrupted or not "
                            "a plan.") from err
        try:
            return cls.from_json(text)
        except PlanError as err:
            raise PlanError(f"{path}: {err}") from err

    def check_fingerprint(self, current: Fingerprint) -> None:
        """Raise PlanMismatchError naming what differs if the plan is for another model."""
        if self.fingerprint is None:
            return
        diffs = self.fingerprint.differences(current)
        if diffs:
            raise PlanMismatchError(
                "this plan was made for a different model: " + "; ".join(diffs)
                + ". Re-tune for this model (autoscale.optimize or `autoscale tune`)."
            )

    def fingerprint_digest(self) -> str:
        """Short hash of the model fingerprint ('none' without one), e.g. for study names."""
        if self.fingerprint is None:
            return "none"
        text = json.dumps(to_json_value(self.fingerprint), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def digest(self) -> str:
        """Short hash of the knobs only (not figures), e.g. for naming."""
        knobs = json.dumps({n: to_json_value(s) for n, s in self.sections.items()},
                           sort_keys=True)
        return hashlib.sha256(knobs.encode()).hexdigest()[:12]


def _optional(cls: type, raw: Any, path: str) -> Any:
    return None if raw is None else from_json_dataclass(cls, raw, path)


def types_mapping(d: dict[str, Any]) -> Mapping[str, Any]:
    """A read-only view, so a frozen plan's sections cannot be swapped in place."""
    import types

    return types.MappingProxyType(d)
