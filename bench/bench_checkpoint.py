"""Activation checkpointing under a memory budget: autoscale's solver against the usual
alternatives (issue 16's benchmark).

    python bench/bench_checkpoint.py                       # gpt and llama, compile rows
    python bench/bench_checkpoint.py --models gpt          # one model
    python bench/bench_checkpoint.py --quick               # gpt, 2 budgets, no compile rows

Models: examples/gpt.py's GPT (build()'s defaults) and a HuggingFace Llama-style model from
a small LlamaConfig (4 layers, hidden 128, use_cache=False; captured by autoscale.capture,
torch.export with strict=False). Rows per model:

- "no ckpt": the baseline, its activation memory A0 and step time T0.
- "no ckpt again": the baseline built and timed a second time, beside it: how far two
  identical configs land apart in this run (the noise the verdicts state).
- "autoscale f%": ``solve_checkpoint_plan`` at f * the measured no-checkpoint
  activations A0 (the scale every row is judged on; the solver's simulated bytes equal the
  measured ones on GPT and are 3-6% over them on the Llama model, HF's causal mask on fake
  tensors), its options' recompute seconds timed on the model (``time_block_options``),
  built by ``build_result``.
- "autoscale f% ind" (not with --quick): the plan autoscale runs with compile.mode
  'inductor': the solver's policies under torch.compile, solved on options timed under
  inductor (``time_block_options(..., compiled="inductor")``), in its own process (below).
- "autoscale f% rng" (not with --quick): the same with compile.mode 'inductor-eager-rng'
  (dropout drawn by eager's kernels inside the compiled graph: passes/compile.py, Note:
  [eager RNG in compiled code]; a block saving kind 'dropout' keeps its bool masks:
  passes/_dropout_mask.py), solved on options timed under that mode.
- "full ckpt": every block fully checkpointed.
- "compile f": ``torch.compile`` with ``torch._functorch.config.activation_memory_budget
  = f``, as a user runs it.

Every compiled config ("autoscale f% ind" and "rng", "compile f") runs in its own process
(compiled graphs are cached across configs within one process) with its own eager no-ckpt
baseline timed beside it, and its time is the ratio over that baseline: so autoscale's compiled
plans and torch.compile's are measured alike (a config compiled in this process, beside
many others, had timed 5-10% faster relative to the baseline than the same config in a
process of its own). Each runs in ``--processes`` processes (default 3) and its ratio is
their median, printed with their spread (largest minus smallest ratio): one process per
config had put one compiled plan, which the solver chose at two budgets, at 0.82x and 0.87x
in one run (where each process's tensors landed in memory). Configs with the same plan
(the solver often picks one plan at several budgets) are measured once and share the
figures. Compile time (the first step) is reported apart, and warm-up steps run until
three in a row agree within 10%. The eager configs run together in this process.

Activation memory (the column the budgets are judged on) is what the forward keeps for the
backward: live bytes when the loss is computed minus the live state before the step
(params, optimizer state, batch), from the c10 allocator (AllocatorPeakTracker, which also
sees inductor's buffers). It is the quantity both autoscale's budget and torch's
``activation_memory_budget`` are about. The step's peak above the live state
(``measure``'s peak_memory_bytes - baseline_bytes) is printed beside it: it also holds the
gradients and the backward's recompute working set, which no checkpoint policy budgets.

Step time: the median over --repeats interleaved rounds (every config one step a round, the
order rotated each round) on os.cpu_count() torch threads, wall clock. Every eager config
is built afresh each round (a compiled one cannot be without compiling again): one build
each had put two identical no-ckpt configs 6-9% apart on GPT. The machine is shared:
compare rows within one run.

Goals (per budget): the solver's plan within the budget and at least as fast as the
fastest alternative (full ckpt, or compile at any fraction) whose activation memory fits
the same budget; at 50% under 5%
step-time overhead; the solver's activation memory non-increasing as the budget falls
(reported for compile's too). "fits" is strict, in bytes. The solver's figure at a budget
is the fastest of its plans there (eager, under either compile mode) that fits; times
compare as ratios over each process's own no-ckpt step. A verdict slower by less than the
run's noise line, or than the spread of the compared compiled rows' processes (relative
to their ratio) where that is larger, says "tie within noise". The tuner's pick (its
fastest fitting reading, inductor's own partitioner at the same fraction included) is
named beside each verdict.

Note: [a tie is settled head to head]
Each compiled row's ratio is over its own process's baseline, and processes of one config
land up to 10% apart (where their tensors sit in memory), so two plans that do the same
work read as a "tie within noise" at a 5% band. Where the verdict is such a tie between a
compiled solver plan and torch.compile's own budget, both are run again in one process
beside one baseline, interleaved (``duel``), in ``--processes`` processes: the line under
the verdict gives ours/theirs of each (below 1: ours faster) and their median. The
verdict itself is the per-process rows', as before: the head-to-head says how close the
tie is, it does not turn one into a win.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

FRACTIONS = (1.0, 0.75, 0.5, 0.25)
MODELS = ("gpt", "llama")
MIB = 1 << 20


@dataclass
class Row:
    """One configuration's measured figures."""

    label: str
    kind: str  # "none", "noise" (the baseline again), "autoscale", "full" or "compile"
    fraction: float | None
    act_bytes: int
    peak_bytes: int
    step_s: float
    time_ratio: float  # over the no-ckpt step timed in the same process
    compile_s: float | None = None
    policies: str = ""
    error: str | None = None
    spread: float | None = None  # largest minus smallest ratio over the config's processes


def build_model(name: str, *, quick: bool = False) -> tuple[torch.nn.Module, Any]:
    """The model and its batch (the model returns its loss)."""
    if name == "gpt":
        import gpt

        return gpt.build(batch_size=8 if quick else 16)
    if name == "llama":
        import transformers as tf

        torch.manual_seed(0)
        config = tf.LlamaConfig(vocab_size=512, hidden_size=128, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=512, use_cache=False)
        ids = torch.randint(0, 512, (8, 64))
        return tf.LlamaForCausalLM(config), {"input_ids": ids, "labels": ids}
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def activation_bytes(result: Any, batch: Any) -> int:
    """Bytes the forward keeps for the backward (one real training step; see docstring)."""
    from autoscale.measure._allocator import AllocatorPeakTracker
    from autoscale.runtime._batch import call_model, compute_loss

    result.model.train()
    with AllocatorPeakTracker(roots=(result.model, result.optimizer, batch),
                              device="cpu") as tracker:
        loss = compute_loss(result.loss_fn, call_model(result.model, batch), batch)
    loss.backward()
    result.optimizer.step()
    result.optimizer.zero_grad(set_to_none=True)
    return tracker.end_bytes - tracker.baseline_bytes


def peak_bytes(result: Any, batch: Any) -> int:
    """The step's peak above the live state, from ``measure``."""
    from autoscale.measure import measure

    m = measure(result, batch, warmup=0, iters=1)
    return m.peak_memory_bytes - m.baseline_bytes


def settle(result: Any, batch: Any, *, max_steps: int = 12) -> int:
    """Warm-up steps until three in a row agree within 10%; returns how many ran."""
    times: list[float] = []
    while len(times) < max_steps:
        start = time.perf_counter()
        result.step(batch)
        times.append(time.perf_counter() - start)
        last = times[-3:]
        if len(last) == 3 and max(last) <= 1.1 * min(last):
            break
    return len(times)


def interleaved(results: dict[str, Any], batch: Any, repeats: int, *,
                rebuild: dict[str, Any] | None = None) -> dict[str, float]:
    """Median step seconds per config over ``repeats`` rounds, the order rotated. A config
    in ``rebuild`` (label -> a function building it) is built afresh each round and stepped
    once untimed before its timed step: where one build's tensors land in memory had put two
    builds of GPT's no-ckpt plan 6-9% apart for a whole run (bench_estimate rebuilds too)."""
    labels = list(results)
    rebuild = rebuild or {}
    times: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(repeats):
        for label in labels[r % len(labels):] + labels[: r % len(labels)]:
            result = results[label]
            if label in rebuild:
                result = rebuild[label]()
                result.step(batch)
            start = time.perf_counter()
            result.step(batch)
            times[label].append(time.perf_counter() - start)
            del result
    return {label: statistics.median(t) for label, t in times.items()}


def _describe(section: Any) -> str:
    policies = [getattr(b, "policy", "full") for b in section.blocks]
    if not policies:
        return "none"
    return " ".join(f"{p}x{policies.count(p)}" for p in dict.fromkeys(policies))


_SUFFIX = {"inductor": "ind", "inductor-eager-rng": "rng"}
"""Row label suffix of the solver's plans under each compile mode."""


def draws_random(model: torch.nn.Module, batch: Any) -> bool:
    """Whether one training-mode forward of ``model`` draws random numbers (dropout): an op
    the step-time estimate's counter prices as "rng"."""
    from autoscale.cost._time import OpCounter
    from autoscale.runtime._batch import call_model

    counter = OpCounter()
    model.train()
    with torch.no_grad(), counter:
        call_model(model, batch)
    return any(kind == "rng" for *_, kind in counter.ops)


def solver_configs(name: str, fractions: tuple[float, ...], *, quick: bool = False
                   ) -> tuple[dict[str, tuple[str, float | None, Any, str]], Any, Any, Any]:
    """Every config of one model (label -> kind, fraction, Plan, policies): the baseline
    twice, the solver's plans (eager, and under both compile modes unless quick) and full
    ckpt; with the model, its batch and its graph."""
    import autoscale
    from autoscale import CheckpointPlan, Plan
    from autoscale.cost._checkpoint_solver import (
        measure_block_options,
        solve_checkpoint_plan,
        time_block_options,
    )
    from autoscale.plan import CompilePlan

    model, batch = build_model(name, quick=quick)
    graph = autoscale.capture(model, batch)
    # The budgets are fractions of the measured no-ckpt activations, the scale the rows are
    # judged on (the estimate's figure is 5.6% over it on the Llama model: HF's causal mask
    # on fake tensors); the eager solver's simulated bytes are at or above the measured.
    from autoscale.runtime import build_result

    none_est = activation_bytes(build_result(Plan(), model, graph=graph), batch)
    configs: dict[str, tuple[str, float | None, Any, str]] = {
        "no ckpt": ("none", None, Plan(), "none"),
        "no ckpt again": ("noise", None, Plan(), "none")}
    priced = measure_block_options(model, batch, graph)
    eager = time_block_options(model, batch, graph, priced)
    # Without random ops 'inductor-eager-rng' compiles the same code as 'inductor'.
    modes = ("inductor", "inductor-eager-rng") if draws_random(model, batch) else ("inductor",)
    compiled = {}
    for mode in () if quick else modes:
        compiled[mode] = compiled_options(model, batch, graph, mode, priced=priced)
    for f in fractions:
        section = solve_checkpoint_plan(model, batch, graph, int(none_est * f), options=eager)
        configs[f"autoscale {f:.0%}"] = ("autoscale", f, Plan(sections={"checkpoint": section}),
                                         _describe(section))
        for mode, timed in compiled.items():
            section = solve_checkpoint_plan(model, batch, graph, int(none_est * f),
                                            options=timed)
            configs[f"autoscale {f:.0%} {_SUFFIX[mode]}"] = (
                "autoscale", f, Plan(sections={"checkpoint": section,
                                               "compile": CompilePlan(mode=mode)}),
                _describe(section) + f" +{mode}")
    for label, timed in (("eager", eager), *compiled.items()):
        if timed is not None:
            names = ["+".join(o.policy.save) or o.policy.policy for o in timed.blocks[0]]
            seconds = [sum(opts[j].recompute_s for opts in timed.blocks) * 1e3
                       for j in range(len(names))]
            scales = timed.kept_scales or (1.0,) * len(names)
            print(f"{name} options timed {label}: " + ", ".join(
                f"{n} +{t:.1f} ms x{k:.2f} bytes" for n, t, k in zip(names, seconds, scales,
                                                                     strict=True)),
                  flush=True)
    blocks = tuple(b.fqn for b in graph.blocks)
    configs["full ckpt"] = ("full", None,
                            Plan(sections={"checkpoint": CheckpointPlan(blocks=blocks)}),
                            f"fullx{len(blocks)}")
    return configs, model, batch, graph


def compiled_options(model: Any, batch: Any, graph: Any, mode: str, *,
                     priced: Any = None) -> Any:
    """The solver's block options under compile ``mode``, timed under it as the tuner times
    them. ``priced``: eager's simulated options, reused where the mode offers eager's save
    sets ('inductor-eager-rng' adds the mask-saving sets and is simulated afresh)."""
    from autoscale import Plan
    from autoscale.cost._checkpoint_solver import (
        measure_block_options,
        save_sets_for,
        time_block_options,
    )
    from autoscale.plan import CompilePlan

    under = Plan(sections={"compile": CompilePlan(mode=mode)})
    if save_sets_for(mode) == save_sets_for(None):
        options = priced if priced is not None else measure_block_options(model, batch, graph)
    else:
        options = measure_block_options(model, batch, graph, plan=under)
    return time_block_options(model, batch, graph, options, plan=under, compiled=mode)


def eager_rows(configs: dict[str, tuple[str, float | None, Any, str]], model: Any,
               batch: Any, graph: Any, repeats: int) -> list[Row]:
    """The eager configs (no compile section) of one model, timed together in this
    process over the same baseline."""
    from autoscale.runtime import build_result

    configs = {label: c for label, c in configs.items() if not c[2].compile.active}
    results = {label: build_result(c[2], model, graph=graph) for label, c in configs.items()}
    for result in results.values():
        result.step(batch)
        settle(result, batch)
    acts = {label: activation_bytes(r, batch) for label, r in results.items()}
    peaks = {label: peak_bytes(r, batch) for label, r in results.items()}
    steps = interleaved(results, batch, repeats, rebuild={
        label: functools.partial(build_result, c[2], model, graph=graph)
        for label, c in configs.items()})
    return [Row(label, c[0], c[1], acts[label], peaks[label], steps[label],
                steps[label] / steps["no ckpt"], policies=c[3])
            for label, c in configs.items()]


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: one compiled config and an eager baseline timed beside it.

    ``spec``: model, label, kind, fraction, policies, and either ``plan`` (a Plan's dict:
    autoscale's plan, compiled by its compile pass) or ``budget`` (plain ``torch.compile``
    with ``activation_memory_budget`` at that value, as a user runs it)."""
    import torch._functorch.config as functorch_config

    from autoscale import Plan
    from autoscale.runtime import build_result

    model, batch = build_model(spec["model"])
    base = build_result(Plan(), model)
    if spec.get("duel"):
        return duel(spec, model, batch, base)
    if spec.get("plan") is not None:
        compiled = build_result(Plan.from_dict(spec["plan"]), model)
    else:
        functorch_config.activation_memory_budget = spec["budget"]
        compiled = build_result(Plan(), model)
        compiled.model = torch.compile(compiled.model)  # type: ignore[assignment]
    start = time.perf_counter()
    compiled.step(batch)  # compiles here; a failure fails this row alone
    compile_s = time.perf_counter() - start
    settle(compiled, batch)
    settle(base, batch)
    act = activation_bytes(compiled, batch)
    peak = peak_bytes(compiled, batch)
    # The eager baseline is rebuilt each round; the compiled config is not (a new module
    # recompiles), so its processes (``compiled_rows``) stand for its builds.
    steps = interleaved({"base": base, "compiled": compiled}, batch, repeats=spec["repeats"],
                        rebuild={"base": functools.partial(build_result, Plan(), model)})
    return asdict(Row(spec["label"], spec["kind"], spec["fraction"], act, peak,
                      steps["compiled"], steps["compiled"] / steps["base"],
                      compile_s=compile_s, policies=spec["policies"]))


def duel(spec: dict[str, Any], model: Any, batch: Any, base: Any) -> dict[str, Any]:
    """In a fresh process: autoscale's compiled plan (``spec["plan"]``) and torch.compile at
    ``spec["budget"]``, both beside one eager baseline, interleaved: their ratios over it.

    A head-to-head for the budgets whose verdict the per-process rows leave a tie (Note:
    [a tie is settled head to head]). The user's torch.compile is the only plain compile
    in the process, compiled first under its budget; autoscale's compile pass compiles its
    plan under its own (passes/compile.py, Note: [one compile per Result]), so neither
    reuses the other's graph."""
    import torch._functorch.config as functorch_config

    from autoscale import Plan
    from autoscale.runtime import build_result

    theirs = build_result(Plan(), model)
    theirs.model = torch.compile(theirs.model)  # type: ignore[assignment]
    with functorch_config.patch(activation_memory_budget=spec["budget"]):
        theirs.step(batch)
    ours = build_result(Plan.from_dict(spec["plan"]), model)
    ours.step(batch)
    for result in (ours, theirs, base):
        settle(result, batch)
    steps = interleaved({"base": base, "ours": ours, "theirs": theirs}, batch,
                        repeats=spec["repeats"],
                        rebuild={"base": functools.partial(build_result, Plan(), model)})
    return {"ours": steps["ours"] / steps["base"], "theirs": steps["theirs"] / steps["base"]}


def duels(name: str, rows: list[Row], plans: dict[str, Any], repeats: int,
          processes: int) -> dict[float, list[float]]:
    """Budget fraction -> ours/theirs of each head-to-head process, for every budget where
    the solver's fastest fitting plan is compiled, the fastest fitting alternative is
    torch.compile's own budget, and the per-process rows put them within the run's noise
    (Note: [a tie is settled head to head]). Budgets with the same pair share one run."""
    out: dict[float, list[float]] = {}
    runs: dict[str, list[float]] = {}  # one head-to-head per pair, shared by its budgets
    for f, row, best, verdict in _judged(rows):
        if not (verdict == "tie within noise" and best is not None
                and best.kind == "compile" and row.label in plans
                and plans[row.label].compile.active):
            continue
        spec = dict(model=name, duel=True, plan=plans[row.label].to_dict(),
                    budget=best.fraction, repeats=repeats)
        key = json.dumps(spec, sort_keys=True)
        if key not in runs:
            runs[key] = []
            for _ in range(processes):
                got, why = _in_process(spec, 900)
                if got is not None:
                    runs[key].append(got["ours"] / got["theirs"])
                else:
                    print(f"{name}: head to head {row.label} / {best.label}: a process "
                          f"failed: {why}", flush=True)
        if runs[key]:
            out[f] = runs[key]
    return out


def _in_process(spec: dict[str, Any], timeout: float) -> tuple[dict[str, Any] | None, str]:
    """:func:`worker` on ``spec`` in a fresh process: (its JSON reply, "") or (None, why it
    failed: the time limit or the last line of its stderr)."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count() or 1))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return None, (proc.stderr.strip().splitlines() or ["?"])[-1]
    return json.loads(lines[-1]), ""


def worker_row(spec: dict[str, Any], *, timeout: float = 900) -> Row:
    """:func:`worker` in its own process; a failure is a row with its error."""
    got, why = _in_process(spec, timeout)
    if got is None:
        return Row(spec["label"], spec["kind"], spec["fraction"], 0, 0, math.nan, math.nan,
                   policies=spec["policies"], error=why)
    return Row(**got)


def compiled_rows(specs: list[dict[str, Any]], processes: int) -> list[Row]:
    """One row per spec: its config run by :func:`worker_row` in ``processes`` processes,
    the median ratio, step and compile time kept with the ratios' spread; specs of one
    model with the same plan (or the same compile budget) are run once and share figures.
    A config failing in every process is a failed row; failed processes are left out."""
    runs: dict[str, list[Row]] = {}
    out = []
    for spec in specs:
        key = json.dumps([spec["model"], spec.get("plan"), spec.get("budget")], sort_keys=True)
        if key not in runs:
            runs[key] = [worker_row(spec) for _ in range(processes)]
        named = dict(label=spec["label"], kind=spec["kind"], fraction=spec["fraction"],
                     policies=spec["policies"])
        ok = [r for r in runs[key] if r.error is None]
        if not ok:
            out.append(dataclasses.replace(runs[key][0], **named))
            continue
        ratios = [r.time_ratio for r in ok]
        out.append(dataclasses.replace(
            ok[0], **named, time_ratio=statistics.median(ratios),
            step_s=statistics.median(r.step_s for r in ok),
            compile_s=statistics.median(r.compile_s or 0.0 for r in ok),
            spread=max(ratios) - min(ratios)))
    return out


def run(models: tuple[str, ...], fractions: tuple[float, ...], repeats: int, *,
        compile_rows: bool, quick: bool = False, processes: int = 3,
        head_to_head: dict[str, dict[float, list[float]]] | None = None
        ) -> dict[str, list[Row]]:  # fmt: skip
    """Every model's rows: eager ones in this process, each compiled one in its own
    (autoscale's plans under inductor, and torch.compile's own budget). With
    ``head_to_head``, each model's :func:`duels` go into it by model name."""
    out = {}
    for name in models:
        configs, model, batch, graph = solver_configs(name, fractions, quick=quick)
        rows = eager_rows(configs, model, batch, graph, repeats)
        specs = [dict(model=name, label=label, kind=c[0], fraction=c[1], policies=c[3],
                      plan=c[2].to_dict(), repeats=repeats)
                 for label, c in configs.items() if c[2].compile.active]
        if compile_rows:
            specs += [dict(model=name, label=f"compile {f:g}", kind="compile", fraction=f,
                           policies="", budget=f, repeats=repeats) for f in fractions]
        rows += compiled_rows(specs, processes)
        out[name] = rows
        if compile_rows and head_to_head is not None:
            plans = {label: c[2] for label, c in configs.items()}
            head_to_head[name] = duels(name, rows, plans, repeats, processes)
    return out


def fits(row: Row, base: Row) -> bool:
    """Whether the row's activation memory is within its fraction of the baseline's."""
    return row.fraction is not None and row.error is None and \
        row.act_bytes <= row.fraction * base.act_bytes


def _band(noise: float, *rows: Row) -> float:
    """The relative difference below which two rows' times cannot be ordered: the run's
    noise line, or the spread of a compiled row's processes over its ratio if larger (two
    compiled configs whose processes land up to 9% apart are not ordered by a 7% gap)."""
    return max([noise, *((r.spread or 0.0) / r.time_ratio for r in rows
                          if r.time_ratio and math.isfinite(r.time_ratio))])


def _verdict(ours: float, theirs: float, noise: float) -> str:
    """'met' when ours is no slower; 'tie within noise' when slower by less than ``noise``
    (:func:`_band`); else 'missed'."""
    if ours <= theirs:
        return "met"
    return "tie within noise" if ours <= theirs * (1 + noise) else "missed"


def _noise(rows: list[Row]) -> float:
    again = next((r for r in rows if r.kind == "noise"), None)
    return abs(again.time_ratio - 1) if again is not None else 0.0


def _judged(rows: list[Row]) -> list[tuple[float, Row, Row | None, str]]:
    """Per budget fraction where a solver plan fits: (fraction, the solver's fastest
    fitting row, the fastest fitting alternative or None, the verdict word)."""
    base, noise = rows[0], _noise(rows)
    alts = [r for r in rows if r.kind in ("full", "compile") and r.error is None]
    out = []
    for f in sorted({r.fraction for r in rows if r.kind == "autoscale"}, reverse=True):
        budget = f * base.act_bytes  # type: ignore[operator]
        solver = [r for r in rows if r.kind == "autoscale" and r.fraction == f
                  and r.error is None and r.act_bytes <= budget]
        if not solver:
            continue
        row = min(solver, key=lambda r: r.time_ratio)
        best = min((a for a in alts if a.act_bytes <= budget), key=lambda a: a.time_ratio,
                   default=None)
        word = "met" if best is None else _verdict(row.time_ratio, best.time_ratio,
                                                   _band(noise, row, best))
        out.append((f, row, best, word))  # type: ignore[arg-type]
    return out


def goals(rows: list[Row], head_to_head: dict[float, list[float]] | None = None
          ) -> list[str]:  # fmt: skip
    """The issue's goals, each a line: met, a tie within the run's noise, or missed, with
    the numbers. Step times compare as ratios over the no-ckpt step timed in the same
    process. Noise: how far the second no-ckpt row's time lay from the first's.

    The solver's plans (eager, and under either compile mode where measured) are judged
    against every alternative that fits the budget: full checkpointing and torch.compile's
    own budget at any fraction. The tuner's pick at the budget is printed beside it: the
    fastest fitting of its readings of the knob, the solver eager, the solver under
    compile.mode 'inductor' or 'inductor-eager-rng', and inductor's own budget
    (compile.mode 'inductor-budget', the technique of the "compile f" rows, which stand for
    it here)."""
    base = rows[0]
    noise = _noise(rows)
    alts = [r for r in rows if r.kind in ("full", "compile") and r.error is None]
    lines = [f"noise: two identical no-ckpt configs differed by {noise:.1%}"]
    fractions = sorted({r.fraction for r in rows if r.kind == "autoscale"}, reverse=True)
    judged = {j[0]: j for j in _judged(rows)}
    for f in fractions:
        budget = f * base.act_bytes  # type: ignore[operator]
        mine = [r for r in rows if r.kind == "autoscale" and r.fraction == f
                and r.error is None]
        solver = [r for r in mine if r.act_bytes <= budget]
        readings = solver + [r for r in alts if r.kind == "compile" and r.fraction == f
                             and r.act_bytes <= budget]
        picked = min(readings, key=lambda r: r.time_ratio, default=None)
        head = f"budget {f:.0%} ({budget / MIB:.2f} MiB)"
        if not solver:
            over = min(mine, key=lambda r: r.act_bytes)
            lines.append(f"{head}: missed: the solver's plans over the budget (least "
                         f"{over.act_bytes / MIB:.2f} MiB)")
            continue
        _, row, best, word = judged[f]
        if best is None:
            verdict = "met (no alternative fits this budget)"
        else:
            verdict = (f"{word} (band {_band(noise, row, best):.1%}): {row.label} "
                       f"{row.time_ratio:.2f}x at {row.act_bytes / MIB:.2f} MiB vs {best.label} "
                       f"{best.time_ratio:.2f}x at {best.act_bytes / MIB:.2f} MiB")
        pick = "" if picked is None else f"; the tuner's pick: {picked.label}"
        lines.append(f"{head}: solver {verdict}{pick}")
        if head_to_head and f in head_to_head and best is not None:
            ratios = sorted(head_to_head[f])
            lines.append(
                f"  head to head, {row.label} / {best.label} in one process ({len(ratios)} "
                f"processes): median {statistics.median(ratios):.3f} (each: "
                + ", ".join(f"{x:.3f}" for x in ratios) + ")")
        if f == 0.5:
            strict = "met" if row.time_ratio < 1.05 else (
                "tie within noise" if row.time_ratio < 1.05 + _band(noise, row) else "missed")
            lines.append(f"50% under 5% step-time overhead: {strict} ({row.label}, "
                         f"{row.time_ratio - 1:+.1%})")
    ours = [r for r in rows if r.kind == "autoscale" and r.error is None]
    groups = [(label, [r for r in ours if r.label.split()[-1] == suffix
                       or (suffix == "" and r.label.endswith("%"))])
              for label, suffix in (("autoscale", ""), ("autoscale +inductor", "ind"),
                                    ("autoscale +inductor-eager-rng", "rng"))]
    for kind, group in (*groups, ("compile", [a for a in alts if a.kind == "compile"])):
        if len(group) > 1:
            group = sorted(group, key=lambda r: -(r.fraction or 0))
            mono = all(b.act_bytes <= a.act_bytes for a, b in itertools.pairwise(group))
            figures = ", ".join(f"{r.act_bytes / MIB:.2f}" for r in group)
            lines.append(f"{kind} memory monotone in the budget: {'yes' if mono else 'no'} "
                         f"({figures} MiB)")
    return lines


def print_table(name: str, rows: list[Row],
                head_to_head: dict[float, list[float]] | None = None) -> None:
    base = rows[0]
    print(f"\n{name}: A0 {base.act_bytes / MIB:.2f} MiB, T0 {base.step_s * 1e3:.1f} ms")
    header = (f"{'config':26s} {'act MiB':>8s} {'x mem':>6s} {'peak MiB':>8s} {'x peak':>6s} "
              f"{'step ms':>8s} {'x time':>6s} {'spread':>6s} {'fits':>4s} {'compile s':>9s}  "
              "policies")
    print(header)
    print("-" * len(header))
    for r in rows:
        if r.error is not None:
            print(f"{r.label:26s} failed: {r.error}")
            continue
        fit = "-" if r.fraction is None else ("yes" if fits(r, base) else "no")
        comp = "" if r.compile_s is None else f"{r.compile_s:.1f}"
        spread = "" if r.spread is None else f"{r.spread:.2f}"
        print(f"{r.label:26s} {r.act_bytes / MIB:8.2f} {r.act_bytes / base.act_bytes:6.2f} "
              f"{r.peak_bytes / MIB:8.2f} {r.peak_bytes / base.peak_bytes:6.2f} "
              f"{r.step_s * 1e3:8.1f} {r.time_ratio:6.2f} {spread:>6s} {fit:>4s} {comp:>9s}  "
              f"{r.policies}")
    for line in goals(rows, head_to_head):
        print("  " + line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeats", type=int, default=31, help="interleaved timing rounds")
    parser.add_argument("--quick", action="store_true",
                        help="gpt only, budgets 100%% and 50%%, no compile rows")
    parser.add_argument("--no-compile", action="store_true", help="skip the compile rows")
    parser.add_argument("--processes", type=int, default=3,
                        help="processes per compiled config (its ratio is their median)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(os.cpu_count() or 1)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    from autoscale.cost._rates import cpu_model

    models = ("gpt",) if args.quick else tuple(args.models.split(","))
    fractions = (1.0, 0.5) if args.quick else FRACTIONS
    print(f"device: cpu ({cpu_model()}, {os.cpu_count()} cores), "
          f"{torch.get_num_threads()} torch threads; torch {torch.__version__}")
    start = time.perf_counter()
    duelled: dict[str, dict[float, list[float]]] = {}
    report = run(models, fractions, args.repeats,
                 compile_rows=not (args.quick or args.no_compile), quick=args.quick,
                 processes=args.processes, head_to_head=duelled)
    for name, rows in report.items():
        print_table(name, rows, duelled.get(name))
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
