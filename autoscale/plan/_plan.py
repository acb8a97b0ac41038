"""The plan: what to do to a model, saved as a small JSON file that reproduces a run.

A plan is a set of *sections*, one per concern (batch, precision, checkpoint, optimizer,
and whatever later passes add). Each section is a frozen dataclass registered with
:func:`plan_section`; :class:`Plan` holds one instance of every registered section, so a
new pass adds its own section without touching the others or this file. Sections are
read as attributes: ``plan.batch.micro_batch_size``.

Besides the knobs, a plan carries the fingerprint of the model it was made for, the
environment it was measured on and the measured figures, so that a plan is refused on
another model and its numbers can be checked.

A plan is immutable all the way down (sections are frozen dataclasses, mappings
are FrozenDicts, lists are tuples), so its digest names it for good; it pickles (the
tuner sends plans to worker processes), deep-copies and round-trips through JSON, equal
after each. Rules across fields and sections live in :mod:`autoscale.plan._rules`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import tempfile
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, get_args, get_origin

import torch
from torch import nn

from autoscale.errors import PlanError, PlanMismatchError
from autoscale.plan._fields import from_json_dataclass, to_json_value
from autoscale.plan._frozen import FrozenDict, freeze_json, is_frozen
from autoscale.plan._rules import check_plan

__all__ = [
    "SCHEMA_VERSION",
    "BatchPlan",
    "BlockPolicy",
    "CheckpointPlan",
    "Environment",
    "Fingerprint",
    "Measured",
    "OpKind",
    "OptimizerPlan",
    "Plan",
    "PrecisionPlan",
    "SchedulePlan",
    "plan_section",
]

SCHEMA_VERSION = 1
"""Bumped when a plan file's meaning changes; files with a newer version are refused."""

_SECTIONS: dict[str, type] = {}
"""Section name -> its class; the one registry of sections (a Plan holds one of each)."""

_OMIT_DEFAULT: set[str] = set()
"""Sections left out of the JSON and the digest while at their defaults (plan_section)."""

_T = TypeVar("_T")
_MUTABLE = (dict, list, set)


def plan_section(name: str, *, omit_default: bool = False
                 ) -> Callable[[type[_T]], type[_T]]:
    """Register a frozen dataclass as the plan section ``name``.

    Every field needs a default, so that a plan written before the section existed
    still loads (with the section at its defaults, i.e. the pass switched off). Field
    types name immutable containers only (``tuple[...]``, ``Mapping[...]``, which the
    section freezes in ``__post_init__`` with :func:`freeze_json`), so a plan stays
    immutable and hashable.

    ``omit_default=True`` leaves the section out of ``to_json`` and ``digest`` while it
    equals its defaults, so that a section added after schema 1 does not change the file
    or the digest of a plan that does not use it (tests/plan/v1_plan.json pins both).
    """

    def register(cls: type[_T]) -> type[_T]:
        if name in _SECTIONS and _SECTIONS[name] is not cls:
            raise ValueError(f"plan section {name!r} is already registered by {_SECTIONS[name]}")
        if not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):  # type: ignore[attr-defined]
            raise TypeError(f"plan section {name!r} must be a @dataclass(frozen=True)")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise TypeError(f"plan section {name}.{f.name} needs a default")
            if _names_mutable(hints[f.name]):
                raise TypeError(f"plan section {name}.{f.name} is typed {hints[f.name]}; plans "
                                "are immutable: use tuple[...] or Mapping[...] and freeze it in "
                                "__post_init__ (autoscale.plan._frozen.freeze_json).")
        _SECTIONS[name] = cls
        if omit_default:
            _OMIT_DEFAULT.add(name)
        return cls

    return register


def _names_mutable(hint: Any) -> bool:
    if hint in _MUTABLE or get_origin(hint) in _MUTABLE:
        return True
    return any(_names_mutable(arg) for arg in get_args(hint))


def _freeze_field(obj: Any, name: str, path: str) -> None:
    # object.__setattr__: the dataclass is frozen; this runs once, in __post_init__.
    object.__setattr__(obj, name, freeze_json(getattr(obj, name), path))


@plan_section("batch")
@dataclass(frozen=True, slots=True)
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
@dataclass(frozen=True, slots=True)
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


OpKind = Literal["mm", "addmm", "bmm", "sdpa", "conv", "softmax", "layer_norm", "gelu", "silu",
                 "dropout"]
"""Short, stable names of the op kinds a selective policy may save; each stands for a few
aten overload packets (autoscale.passes.checkpoint.OP_KINDS maps them)."""

_OP_KINDS: tuple[str, ...] = get_args(OpKind)


@dataclass(frozen=True, slots=True)
class BlockPolicy:
    """How one block is checkpointed.

    In JSON, a block at ``full`` is written as its bare name (the schema-1 form) and a
    ``selective`` one as ``{"fqn": ..., "policy": "selective", "save": [...]}``.
    """

    fqn: str
    """The block's fully qualified name, e.g. "h.0"."""
    policy: Literal["none", "full", "selective"] = "selective"
    """none: activations saved as usual. full: only the block's inputs kept, the whole
    forward recomputed in backward. selective: the outputs of the ops in ``save`` kept,
    every other op recomputed."""
    save: tuple[OpKind, ...] = ()
    """For ``selective``: the op kinds whose outputs are saved (OpKind), e.g.
    ("mm", "addmm", "sdpa"); empty for the other policies."""

    def __post_init__(self) -> None:
        if not isinstance(self.fqn, str) or not self.fqn:
            raise PlanError(f"checkpoint block policy has fqn={self.fqn!r}; use the block's "
                            "FQN as in capture(model, inputs).blocks.")
        if self.policy not in ("none", "full", "selective"):
            raise PlanError(f"checkpoint.{self.fqn}.policy={self.policy!r} is not one of "
                            "['none', 'full', 'selective'].")
        if isinstance(self.save, str):
            raise PlanError(f"checkpoint.{self.fqn}.save must be a list of op kinds, got the "
                            f"string {self.save!r}; use ({self.save!r},).")
        _freeze_field(self, "save", f"checkpoint.{self.fqn}.save")
        bad = [kind for kind in self.save if kind not in _OP_KINDS]
        if bad:
            raise PlanError(f"checkpoint.{self.fqn}.save holds unknown op kind(s) {bad}; "
                            f"known: {list(_OP_KINDS)}.")
        if len(set(self.save)) != len(self.save):
            raise PlanError(f"checkpoint.{self.fqn}.save lists an op kind twice: "
                            f"{list(self.save)}.")
        if self.policy != "selective" and self.save:
            raise PlanError(f"checkpoint.{self.fqn} has policy={self.policy!r} with save="
                            f"{list(self.save)}; save is for policy 'selective' only: drop it "
                            "or set policy='selective'.")


@plan_section("checkpoint")
@dataclass(frozen=True, slots=True)
class CheckpointPlan:
    """Activation checkpointing per block: full (recompute the whole block in backward) or
    selective (keep the outputs of chosen op kinds, recompute the rest).

    Invariant: ``blocks`` holds each block once, as its bare name when its policy is
    ``full`` and as a :class:`BlockPolicy` when ``selective``; blocks at ``none`` are left
    out. So a schema-1 file (names only) loads and means what it did, and two plans that
    mean the same are equal (and share a digest).
    """

    blocks: tuple[str | BlockPolicy | Mapping[str, Any], ...] = ()
    """The checkpointed blocks: an FQN string means full checkpointing, e.g. ("h.0",
    BlockPolicy("h.1", "selective", save=("mm", "sdpa"))); a BlockPolicy's JSON object is
    taken too (and checked field by field). After construction: strings and BlockPolicy."""

    def __post_init__(self) -> None:
        if isinstance(self.blocks, str):
            raise PlanError(f"checkpoint.blocks must be a list of block names, got the string "
                            f"{self.blocks!r}; use ({self.blocks!r},).")
        entries = [_normal_entry(entry, f"checkpoint.blocks[{i}]")
                   for i, entry in enumerate(self.blocks)]
        kept = [e for e in entries if e is not None]
        object.__setattr__(self, "blocks", tuple(kept))
        names = [e if isinstance(e, str) else e.fqn for e in kept]
        if len(set(names)) != len(names):
            raise PlanError(f"checkpoint.blocks lists a block twice: {list(names)}.")

    @classmethod
    def of(cls, policies: Mapping[str, str | BlockPolicy]) -> CheckpointPlan:
        """A plan from block FQN -> "none" | "full" | a BlockPolicy (whose fqn must match)."""
        entries: list[str | BlockPolicy] = []
        for fqn, policy in policies.items():
            if isinstance(policy, BlockPolicy):
                if policy.fqn != fqn:
                    raise PlanError(f"checkpoint policy for {fqn!r} names fqn={policy.fqn!r}; "
                                    "they must agree.")
                entries.append(policy)
            else:
                entries.append(BlockPolicy(fqn, policy))  # type: ignore[arg-type]
        return cls(blocks=tuple(entries))

    @property
    def names(self) -> tuple[str, ...]:
        """FQNs of every checkpointed block (full or selective), in plan order."""
        return tuple(self.policies)

    @property
    def policies(self) -> FrozenDict[str, BlockPolicy]:
        """Block FQN -> its BlockPolicy, for every checkpointed block; others are 'none'."""
        out: dict[str, BlockPolicy] = {}
        for entry in self.blocks:
            policy = BlockPolicy(entry, "full") if isinstance(entry, str) else entry
            assert isinstance(policy, BlockPolicy)  # __post_init__ normalised every entry
            out[policy.fqn] = policy
        return FrozenDict(out)

    def policy(self, fqn: str) -> BlockPolicy:
        """The policy of block ``fqn`` ('none' when the plan does not list it)."""
        return self.policies.get(fqn) or BlockPolicy(fqn, "none")


def _normal_entry(entry: Any, path: str) -> str | BlockPolicy | None:
    """A checkpoint.blocks entry in its one canonical form (CheckpointPlan's invariant)."""
    if isinstance(entry, Mapping):
        # A JSON object that is no valid BlockPolicy (the field's type let it through):
        # from_json_dataclass names the bad key or value.
        entry = from_json_dataclass(BlockPolicy, dict(entry), path)
    if isinstance(entry, str):
        if not entry:
            raise PlanError("checkpoint.blocks holds an empty name; use the block's FQN.")
        return entry
    if not isinstance(entry, BlockPolicy):
        raise PlanError(f"checkpoint.blocks must hold block names (strings) or BlockPolicy "
                        f"entries, got {entry!r}.")
    if entry.policy == "none":
        return None
    return entry.fqn if entry.policy == "full" else entry


@plan_section("optimizer")
@dataclass(frozen=True, slots=True)
class OptimizerPlan:
    """Which optimizer runs the step, with which kernel and state precision."""

    kind: Literal["adamw", "adam", "sgd", "lamb", "lars", "adamw8bit"] = "adamw"
    """The update rule."""
    kernel: Literal[
        "auto", "torch", "triton", "torch_fused", "foreach", "native", "compiled", "reference"
    ] = "auto"
    """'torch' uses torch.optim; the others use autoscale.optim with that kernel choice
    (kind 'adam' has only torch.optim.Adam, which 'auto' builds too). Which kernels go with
    which kind: autoscale.plan._rules.OPTIMIZER_TABLE."""
    state_precision: Literal["fp32", "int8"] = "fp32"
    """int8 stores both Adam moments block-quantized (kind 'adamw8bit' only)."""
    kwargs: Mapping[str, Any] = field(default_factory=FrozenDict)
    """Constructor arguments (lr, weight_decay, betas, ...), as JSON values, frozen: a
    FrozenDict whose lists are tuples (torch.optim takes tuples for betas)."""

    def __post_init__(self) -> None:
        # kind x kernel x state_precision is a cross-field rule: autoscale.plan._rules.
        _freeze_field(self, "kwargs", "optimizer.kwargs")


@plan_section("schedule")
@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What identifies the model a plan was made for (not its values)."""

    parameters: Mapping[str, str]
    """Parameter FQN -> 'dtype[shape]' for every parameter (tied weights once), frozen."""
    graph: str
    """Hash of the captured graph's structure (op sequence), independent of batch values."""

    def __post_init__(self) -> None:
        _freeze_field(self, "parameters", "fingerprint.parameters")

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


# The field Environment.torch hides the module in that class's annotations.
_TorchDevice = torch.device


@dataclass(frozen=True, slots=True)
class Environment:
    """Where the plan's figures were measured."""

    torch: str = ""
    """torch.__version__."""
    device: str = ""
    """The CUDA device's name, or 'cpu: <processor> x<cores>'."""
    world_size: int = 1
    """Ranks of the run (1 without torch.distributed)."""
    python: str = ""
    """platform.python_version()."""
    autoscale: str = ""
    """autoscale.__version__."""

    @classmethod
    def current(cls, device: _TorchDevice | str = "cpu") -> Environment:
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


@dataclass(frozen=True, slots=True)
class Measured:
    """Figures measured for this plan (and for the untouched baseline) in one run."""

    samples_per_s: float
    """Training throughput of the plan."""
    step_time_s: float
    """Seconds per optimizer step."""
    peak_memory_bytes: int
    """Peak memory of a step (CUDA allocator, or the CPU live-tensor tracker)."""
    memory_budget_bytes: int | None = None
    """The budget the plan was tuned for; None without one."""
    baseline_samples_per_s: float | None = None
    """Throughput of the untouched model in the same run."""
    baseline_peak_memory_bytes: int | None = None
    """Peak memory of the untouched model in the same run."""
    batch_size: int | None = None
    """Samples per step the figures were measured with (the global batch across ranks)."""
    comm_bytes_per_step: int | None = None
    """Bytes a rank sent in gradient collectives per step (multi-rank plans)."""
    baseline_comm_bytes_per_step: int | None = None
    """The same for the baseline (plain DDP: every gradient byte, all-reduced)."""
    convergence_loss: float | None = None
    """Lossy plans (compression, 8-bit state): the mean loss over the tail of the
    convergence guardrail's A/B run (autoscale/_api.py, Note: [the convergence
    guardrail]); None where the plan has no lossy knob."""
    convergence_exact_loss: float | None = None
    """The same for the plan's exact twin, from the same weights, seed and batch."""
    convergence_tolerance: float | None = None
    """The largest relative gap between the two that the guardrail accepted."""
    convergence_steps: int | None = None
    """Steps of each A/B run."""

    def __post_init__(self) -> None:
        if self.samples_per_s < 0 or self.step_time_s < 0 or self.peak_memory_bytes < 0:
            raise PlanError("measured figures must be >= 0.")


#: Measured fields added after schema 1, written only when set, so a schema-1 file
#: round-trips to the same text.
_MEASURED_LATER = ("comm_bytes_per_step", "baseline_comm_bytes_per_step",
                   "convergence_loss", "convergence_exact_loss", "convergence_tolerance",
                   "convergence_steps")


def _measured_json(measured: Measured | None) -> Any:
    data = to_json_value(measured)
    if isinstance(data, dict):
        for key in _MEASURED_LATER:
            if data.get(key) is None:
                data.pop(key, None)
    return data


def _default_sections() -> dict[str, Any]:
    return {name: cls() for name, cls in _SECTIONS.items()}


@dataclass(frozen=True, slots=True)
class Plan:
    """An immutable training plan; ``plan.<section>`` reads a section.

    Invariants: holds exactly one instance of every registered section, each valid on its
    own, and satisfies every rule of autoscale.plan._rules; nothing reachable from it can
    change (so ``digest()`` never does); ``to_json``/``from_json``, pickle and deepcopy
    each give an equal plan with the same digest.
    """

    sections: Mapping[str, Any] = field(default_factory=_default_sections)
    """Section name -> section; missing sections take their defaults (a FrozenDict)."""
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
        for name, section in filled.items():
            if not is_frozen(section):
                # A section class that does not freeze its containers: a bug in that class.
                raise TypeError(f"plan section {name!r} holds a mutable value ({section!r}); "
                                "its __post_init__ must freeze it with freeze_json.")
        object.__setattr__(self, "sections", FrozenDict(filled))
        check_plan(self)

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails. pickle and copy probe names (__setstate__,
        # __deepcopy__, ...) on instances whose slots are not set yet; object.__getattribute__
        # reads the slot without coming back here (self.sections would recurse).
        try:
            sections = object.__getattribute__(self, "sections")
        except AttributeError:
            sections = {}
        if name in sections:
            return sections[name]
        raise AttributeError(f"Plan has no section or attribute {name!r}; sections are "
                             f"{sorted(_SECTIONS)}.")

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
            "measured": _measured_json(self.measured),
            "sections": {name: to_json_value(s) for name, s in self._written().items()},
        }

    def _written(self) -> dict[str, Any]:
        """The sections that the JSON and the digest hold (plan_section's omit_default)."""
        return {name: s for name, s in self.sections.items()
                if not (name in _OMIT_DEFAULT and s == _SECTIONS[name]())}

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
        knobs = json.dumps({n: to_json_value(s) for n, s in self._written().items()},
                           sort_keys=True)
        return hashlib.sha256(knobs.encode()).hexdigest()[:12]


def _optional(cls: type, raw: Any, path: str) -> Any:
    return None if raw is None else from_json_dataclass(cls, raw, path)
