"""Cross-field rules: every optimizer (kind, kernel, state_precision) a plan accepts builds
and steps; every one it refuses is refused at load, naming the field."""

from __future__ import annotations

import itertools
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

from autoscale import OptimizerPlan, Plan, PlanError
from autoscale.errors import KernelUnavailable
from autoscale.kernels import _cpu_adamw8bit, _cpu_optim
from autoscale.kernels._triton_util import triton_usable
from autoscale.plan import OPTIMIZER_TABLE, plan_rule
from autoscale.plan import _rules as rules_module
from autoscale.runtime._optimizers import build_optimizer

_HINTS = typing.get_type_hints(OptimizerPlan)
KINDS = typing.get_args(_HINTS["kind"])
KERNELS = typing.get_args(_HINTS["kernel"])
PRECISIONS = typing.get_args(_HINTS["state_precision"])
COMBINATIONS = list(itertools.product(KINDS, KERNELS, PRECISIONS))


def accepted(kind: str, kernel: str, precision: str) -> bool:
    return OPTIMIZER_TABLE[kind][0] == precision and kernel in OPTIMIZER_TABLE[kind][1]


def plan_dict(kind: str, kernel: str, precision: str) -> dict:
    return {"schema_version": 1, "sections": {"optimizer": {
        "kind": kind, "kernel": kernel, "state_precision": precision}}}


def runs_on_this_cpu(kind: str, kernel: str) -> bool:
    """Whether the kernel's dispatcher can run this path on CPU tensors in this process."""
    if kernel == "triton":
        return triton_usable(torch.device("cpu"))
    if kernel == "native":
        return (_cpu_adamw8bit if kind in ("adamw", "adamw8bit") else _cpu_optim).available()
    return True


def one_step(optimizer: OptimizerPlan) -> torch.optim.Optimizer:
    model = torch.nn.Linear(4, 3)
    opt = build_optimizer(optimizer, model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    before = model.weight.detach().clone()
    opt.step()
    assert not torch.equal(model.weight, before), "the step did not move the weights"
    return opt


def _kwargs(kind: str) -> dict:
    # min_8bit_size=1: the Linear's 12 weights take the 8-bit path, not plain fp32 state.
    return {"min_8bit_size": 1, "block_size": 64} if kind == "adamw8bit" else {}


def test_table_agrees_with_the_field_types() -> None:
    assert set(OPTIMIZER_TABLE) == set(KINDS)
    for kind, (precision, kernels) in OPTIMIZER_TABLE.items():
        assert precision in PRECISIONS, kind
        assert set(kernels) <= set(KERNELS), kind
    # Every kernel value is valid for some kind, every kind has 'auto'.
    assert {k for _, ks in OPTIMIZER_TABLE.values() for k in ks} == set(KERNELS)
    assert all("auto" in ks for _, ks in OPTIMIZER_TABLE.values())


def test_table_lists_exactly_the_kernels_each_optimizer_takes() -> None:
    # The table derives from the kernel modules' KERNELS; the optim classes take the same
    # lists, so a plan names a kernel= exactly when the optimizer it builds accepts it.
    import autoscale.optim as optim

    classes = {"adamw": optim.AdamW, "sgd": optim.SGD, "lamb": optim.LAMB, "lars": optim.LARS,
               "adamw8bit": optim.AdamW8bit}
    for kind, cls in classes.items():
        torch_row = ("torch",) if hasattr(torch.optim, cls.__name__) else ()
        assert OPTIMIZER_TABLE[kind][1] == (*torch_row, *cls.kernels), kind


@pytest.mark.parametrize(("kind", "kernel", "precision"), COMBINATIONS)
def test_each_combination_builds_and_steps_or_is_refused_at_load(kind, kernel, precision):
    if not accepted(kind, kernel, precision):
        with pytest.raises(PlanError, match=r"optimizer\.(kernel|state_precision)=") as err:
            Plan.from_dict(plan_dict(kind, kernel, precision))
        assert "Set state_precision=" in str(err.value) or "Use kernel='auto'" in str(err.value)
        # build_optimizer holds an OptimizerPlan made outside a Plan to the same table.
        with pytest.raises(PlanError, match=r"optimizer\.(kernel|state_precision)="):
            build_optimizer(OptimizerPlan(kind=kind, kernel=kernel, state_precision=precision),
                            torch.nn.Linear(2, 2).parameters())
        return
    plan = Plan.from_dict(plan_dict(kind, kernel, precision))
    optimizer = OptimizerPlan(kind=kind, kernel=kernel, state_precision=precision,
                              kwargs=_kwargs(kind))
    assert plan.optimizer == OptimizerPlan(kind=kind, kernel=kernel, state_precision=precision)
    if not runs_on_this_cpu(kind, kernel):
        # The plan is valid (the path exists for the kind); this machine lacks it, and the
        # dispatcher says so, naming the op. The Triton paths step in the interpreter test
        # below.
        with pytest.raises(KernelUnavailable, match=rf"^{kind}: "):
            one_step(optimizer)
        return
    one_step(optimizer)


@pytest.mark.distributed
def test_triton_combinations_step_under_the_interpreter(tmp_path: Path) -> None:
    # TRITON_INTERPRET must be set before triton is imported: a fresh process, run
    # outside the source tree so that the installed package is imported.
    triton_rows = [(k, p) for k, (p, ks) in OPTIMIZER_TABLE.items() if "triton" in ks]
    assert len(triton_rows) == 5
    child = (
        "import torch\n"
        "from autoscale import OptimizerPlan\n"
        "from autoscale.runtime._optimizers import build_optimizer\n"
        f"for kind, precision in {triton_rows!r}:\n"
        "    model = torch.nn.Linear(4, 3)\n"
        "    kw = {'min_8bit_size': 1, 'block_size': 64} if kind == 'adamw8bit' else {}\n"
        "    opt = build_optimizer(OptimizerPlan(kind=kind, kernel='triton',\n"
        "        state_precision=precision, kwargs=kw), model.parameters())\n"
        "    model(torch.randn(2, 4)).sum().backward()\n"
        "    opt.step()\n"
        "    print(kind, opt.kernel_choice)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:-1] == [f"{kind} triton" for kind, _ in triton_rows]


def test_adam_with_auto_loads_and_builds_torch_adam() -> None:
    plan = Plan.from_dict(plan_dict("adam", "auto", "fp32"))
    assert type(one_step(plan.optimizer)) is torch.optim.Adam


@pytest.mark.parametrize(("section", "message"), [
    ({"kind": "lamb", "kernel": "torch"},
     "optimizer.kernel='torch' has no 'lamb' path (kernel='torch' is torch.optim"),
    ({"kind": "lamb", "kernel": "torch_fused"},
     "optimizer.kernel='torch_fused' has no 'lamb' path; kind='lamb' takes kernel in"),
    ({"kind": "adamw8bit", "state_precision": "fp32"},
     "optimizer.state_precision='fp32' does not go with kind='adamw8bit'"),
    ({"kind": "sgd", "state_precision": "int8"}, "or kind='adamw8bit'"),
])
def test_refusals_name_field_value_and_fix(section, message) -> None:
    with pytest.raises(PlanError, match=message.replace("(", r"\(")):
        Plan.from_dict({"schema_version": 1, "sections": {"optimizer": section}})


def test_rules_run_on_every_plan_built(monkeypatch) -> None:
    seen = []

    def no_fp16(plan: Plan) -> None:
        seen.append(plan.precision.mode)
        if plan.precision.mode == "fp16":
            raise PlanError("precision.mode='fp16' is refused by this test rule; use bf16.")

    monkeypatch.setattr(rules_module, "_RULES", dict(rules_module._RULES))
    plan_rule(no_fp16)
    plan = Plan()
    with pytest.raises(PlanError, match="refused by this test rule"):
        plan.replace(precision=plan.precision.__class__(mode="fp16"))
    with pytest.raises(PlanError, match="refused by this test rule"):
        Plan.from_dict({"schema_version": 1, "sections": {"precision": {"mode": "fp16"}}})
    assert seen == ["fp32", "fp16", "fp16"]
