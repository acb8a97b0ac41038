"""The ``autoscale`` command: tune, show, estimate, bench, report, dashboard.

Typer gives typed options and help text from the signatures; rich draws the progress bar
and the tables. Both are small, widely used and keep this file about commands, not
argument parsing or terminal rendering.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from autoscale._units import format_bytes

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fit a PyTorch training job to a memory budget and make it fast.")
console = Console()

Script = Annotated[Path, typer.Argument(help="Python file defining build() -> (model, "
                                        "example_inputs[, loss_fn]).")]


def main() -> None:
    """Entry point: run the app, turning autoscale's errors into one red line and exit 1."""
    from autoscale.errors import AutoscaleError

    try:
        app()
    except AutoscaleError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False)
        sys.exit(1)


def _plan_summary(plan) -> str:
    micro = plan.batch.micro_batch_size
    parts = [f"micro={micro or 'all'}x{plan.batch.grad_accum_steps}",
             plan.precision.mode, f"ckpt={_checkpoint_summary(plan.checkpoint)}"]
    if plan.optimizer.kind != "adamw" or plan.optimizer.kernel not in ("auto", "torch"):
        parts.append(f"{plan.optimizer.kind}/{plan.optimizer.kernel}")
    if plan.shard.strategy != "none":
        parts.append(f"{plan.shard.strategy}x{plan.shard.world_size}")
        if plan.compress.method != "none":
            parts.append(f"comm={plan.compress.method}")
    if plan.compile.active:
        budget = plan.compile.activation_memory_budget
        parts.append(plan.compile.mode + (f"@{budget:g}" if budget is not None else ""))
    return " ".join(parts)


def _checkpoint_summary(section) -> str:
    """'0', or how many blocks are fully ('4f') and selectively ('2s') checkpointed."""
    kinds = [p.policy for p in section.policies.values()]
    full, selective = kinds.count("full"), kinds.count("selective")
    parts = [f"{full}f"] * bool(full) + [f"{selective}s"] * bool(selective)
    return "+".join(parts) or "0"


@app.command()
def tune(
    script: Script,
    budget: Annotated[str | None, typer.Option(help="Memory budget, e.g. 8GiB.")] = None,
    trials: Annotated[int, typer.Option(help="Trials to run (0: defaults, no search).")] = 20,
    out: Annotated[Path, typer.Option(help="Where to write the plan (atomically).")] = Path(
        "plan.json"),
    storage: Annotated[str | None, typer.Option(help="Optuna storage: a SQLite path or a "
                                                "database URL; resumes a stored study.")] = None,
    study_name: Annotated[str | None, typer.Option(help="Study name in the storage.")] = None,
    optimizer: Annotated[str, typer.Option(help="adamw, adam, sgd, lamb, lars, adamw8bit.")
                         ] = "adamw",
    allow_optimizer: Annotated[list[str] | None, typer.Option(
        help="Also let the search try this optimizer (repeatable).")] = None,
    precision: Annotated[list[str] | None, typer.Option(
        help="Precisions the search may use (repeatable); default fp32 and bf16, plus fp16 on "
             "CUDA.")] = None,
    seed: Annotated[int, typer.Option(help="Sampler seed.")] = 0,
    sampler: Annotated[str, typer.Option(
        help="tpe (Optuna's TPE, reads the memory constraint) or random.")] = "tpe",
    objective: Annotated[str, typer.Option(
        help="throughput (the fastest plan that fits) or pareto (search throughput and peak "
             "memory together; the Pareto table lists the trade-off).")] = "throughput",
    trial_timeout: Annotated[float | None, typer.Option(
        help="Seconds a measured trial may take before its worker is killed and the trial "
             "fails; default 10x the baseline's measurement, at least 60.")] = None,
    isolate: Annotated[bool, typer.Option(
        help="Measure each trial in a worker process (--no-isolate: in this process, for "
             "debugging; a crash then ends the sweep).")] = True,
    nproc: Annotated[int, typer.Option(
        help="Ranks of the data-parallel job to plan: each trial runs as this many "
             "processes, each on 1/nproc of the example batch; the search adds sharding "
             "(ddp, zero1/2/3) and gradient compression.")] = 1,
    heartbeat: Annotated[float, typer.Option(
        help="Seconds between a running trial's heartbeats in a stored study; a trial "
             "whose worker died is failed after 3 missed beats and run again once.")] = 10.0,
    compress: Annotated[list[str] | None, typer.Option(
        help="Gradient compression the search may try with --nproc > 1 (repeatable): none, "
             "bf16, fp16, int8, topk, powersgd; default all but fp16.")] = None,
    compile_modes: Annotated[list[str] | None, typer.Option(
        "--compile", help="torch.compile modes the search may try (repeatable): off, "
        "inductor (the checkpoint solver's policies compiled), inductor-eager-rng (the same, "
        "dropout drawn by eager's kernels: faster on CPU), inductor-budget (inductor's "
        "own activation budget at the checkpoint knob); default off only. Compile time is "
        "reported apart from step time.")] = None,
) -> None:
    """Search for the fastest plan that fits the budget and write it to OUT.

    Ctrl-C stops the sweep and its workers; with --storage, the same command resumes it
    up to --trials, keeping every finished trial and measuring none twice.
    """
    from autoscale._api import optimize_script

    if not console.is_terminal:
        # A log or a pipe: rich would wrap the tables at 80 columns.
        console.width = max(console.width, 140)
    progress = Progress(TextColumn("[bold]tuning"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("{task.description}"), console=console)
    with progress:
        task = progress.add_task("capturing, measuring the baseline", total=max(trials, 1))

        def on_trial(record) -> None:
            shown = (f"{record.samples_per_s:.1f}/s" if record.samples_per_s else record.state)
            progress.update(task, completed=record.counted,
                            description=f"#{record.number} {_plan_summary(record.plan)}: {shown}")

        try:
            result = optimize_script(
                script, memory_budget=budget, trials=trials, storage=storage,
                study_name=study_name, seed=seed, sampler=sampler, objective=objective,
                optimizer=optimizer,
                allowed_optimizers=allow_optimizer,
                precisions=tuple(precision) if precision else None, on_trial=on_trial,
                isolate=isolate, trial_timeout=trial_timeout, world_size=nproc,
                compressors=tuple(compress) if compress else None, heartbeat_s=heartbeat,
                compile_modes=tuple(compile_modes) if compile_modes else None)
        except KeyboardInterrupt:
            progress.stop()
            again = ("run the same command to resume it" if storage else
                     "pass --storage study.db to make a sweep resumable")
            console.print(f"[bold]interrupted[/]: the workers were stopped and {out} was not "
                          f"written; {again}.", highlight=False)
            # Leave at once: the study is committed and the workers are stopped, and the
            # interpreter's teardown after a Ctrl-C hung (60 s, after this line was printed)
            # or aborted ("terminate called after throwing an instance of 'python_error'")
            # in about 1 CI run of 4, a cause not found in 30 runs outside CI.
            _leave_now(130)
    report = result.report
    if report.trials:
        console.print(_trials_table(report))
        if failures := _failures(report):
            console.print(failures, highlight=False, soft_wrap=True)
    elif report.best is not None:  # a resumed study that already held every trial
        console.print(f"the study already holds {trials} trials; none run again")
    for note in report.notes:
        console.print(note, highlight=False, soft_wrap=True)
    if report.best is not None:
        console.print(_comparison_table(report, result.plan))
        if (front := _pareto_table(report, result.plan)) is not None:
            console.print(front)
    result.plan.save(out)
    console.print(f"plan written to [bold]{out}[/] (capture: {report.capture_strategy})")


def _trials_table(report) -> Table:
    repeats = sum(1 for r in report.trials if r.is_repeat)
    caption = (f"{repeats} repeated proposal(s) of a tried plan reused its figures"
               if repeats else None)  # fmt: skip
    table = Table(title="trials", caption=caption)
    for col in ("#", "plan", "samples/s", "peak", "estimate", "fits", "state"):
        table.add_column(col, justify="right" if col not in ("plan", "state") else "left",
                         no_wrap=col == "plan")
    for r in report.trials:
        if r.is_repeat:
            continue
        table.add_row(str(r.number), _plan_summary(r.plan),
                      f"{r.samples_per_s:.1f}" if r.samples_per_s else "-",
                      format_bytes(r.peak_memory_bytes) if r.peak_memory_bytes else "-",
                      format_bytes(r.estimated_bytes), "yes" if r.feasible else "no",
                      r.state)
    return table


def _failures(report) -> str | None:
    """Each failed trial's reason on a line of its own: the one thing to read in full."""
    lines = [f"  #{r.number} {_plan_summary(r.plan)}: {r.note}" for r in report.trials
             if r.state == "failed"]
    return "failed trials:\n" + "\n".join(lines) if lines else None


def _baseline_name(report) -> str:
    if report.world_size > 1:
        return f"baseline (plain DDP x{report.world_size})"
    return "baseline (untouched)"


def _comparison_table(report, plan) -> Table:
    base, best = report.baseline, report.best
    budget = format_bytes(report.memory_budget) if report.memory_budget else "none"
    from autoscale._api import _CONFIRM_ROUNDS, _FINALISTS

    # See Note: [confirming the winner] in autoscale/_api.py.
    lines = []
    if report.world_size > 1:
        lines.append("sent/step: bytes a rank hands to the gradient reduction per step "
                     "(FSDP2's parameter all-gathers not counted)")
    if best.convergence_loss is not None:
        gap = best.convergence_loss / best.convergence_exact_loss - 1
        lines.append(f"convergence check (lossy knobs): loss {best.convergence_loss:.4f} vs "
                     f"{best.convergence_exact_loss:.4f} exact after {best.convergence_steps} "
                     f"steps, {gap:+.2%} (tolerance {best.convergence_tolerance:.0%})")
    caption = "\n".join(lines) or None
    table = Table(title=f"best plan vs untouched baseline (budget {budget}); the {_FINALISTS} "
                        f"fastest trials and the baseline re-measured in turn, median of "
                        f"{_CONFIRM_ROUNDS} rounds", caption=caption)
    ranks = report.world_size > 1
    cols = ["", "samples/s", "step ms", "peak memory", "fits budget"]
    if ranks:
        cols.append("sent/step")
    for col in cols:
        table.add_column(col, justify="left" if not col else "right")

    def sent(n: int | None) -> list[str]:
        return [format_bytes(n) if n is not None else "-"] if ranks else []

    def fits(peak: int) -> str:
        return "yes" if report.memory_budget is None or peak <= report.memory_budget else "no"

    table.add_row(_baseline_name(report), f"{base.samples_per_s:.1f}",
                  f"{base.step_time_s * 1e3:.1f}", format_bytes(base.peak_memory_bytes),
                  fits(base.peak_memory_bytes), *sent(base.comm_bytes_per_step))
    table.add_row(f"autoscale plan: {_plan_summary(plan)}", f"{best.samples_per_s:.1f}",
                  f"{best.step_time_s * 1e3:.1f}", format_bytes(best.peak_memory_bytes),
                  fits(best.peak_memory_bytes), *sent(best.comm_bytes_per_step))
    ratio = []
    if ranks and best.comm_bytes_per_step and base.comm_bytes_per_step:
        ratio = [f"{best.comm_bytes_per_step / base.comm_bytes_per_step:.2f}x"]
    elif ranks:
        ratio = [""]
    table.add_row("ratio (plan / baseline)", f"{report.speedup:.2f}x",
                  f"{best.step_time_s / base.step_time_s:.2f}x", f"{report.memory_ratio:.2f}x", "",
                  *ratio)
    return table


def pareto_rows(report) -> list[Any]:
    """The measured feasible trials (repeats left out) that no other such trial beats on
    both throughput (higher) and peak memory (lower), lowest peak first (Report.front)."""
    from autoscale._api import pareto_records

    return list(pareto_records(report.trials))


def _pareto_table(report, plan) -> Table | None:
    """The Pareto front of the trials against the baseline, the chosen plan marked; None
    when no trial was measured (a resumed study that ran nothing)."""
    rows = pareto_rows(report)
    if not rows:
        return None
    base = report.baseline
    chosen = plan.digest()
    marked = any(r.plan.digest() == chosen for r in rows)
    # Note: [front figures] each trial was measured once, during the search; the baseline
    # is the confirmed median of the table above, so these ratios are indicative only.
    caption = ("samples/s and peak: each trial's one measurement in the search; ratios to the "
               "baseline re-measured above")
    if not marked:
        caption += ("\nthe chosen plan is not on this front: its confirmed figures above beat "
                    "these single measurements")
    table = Table(title=f"Pareto front of the measured trials: throughput vs peak memory "
                        f"({len(rows)} of {len(report.trials)} trials)", caption=caption)
    for col in ("", "#", "plan", "samples/s", "vs baseline", "peak", "vs baseline", "fits"):
        table.add_column(col, justify="left" if col in ("", "plan") else "right",
                         no_wrap=col == "plan")
    for r in rows:
        ratio = f"{r.samples_per_s / base.samples_per_s:.2f}x" if base else "-"
        peak_ratio = f"{r.peak_memory_bytes / base.peak_memory_bytes:.2f}x" if base else "-"
        fits = report.memory_budget is None or r.peak_memory_bytes <= report.memory_budget
        table.add_row("chosen" if r.plan.digest() == chosen else "", str(r.number),
                      _plan_summary(r.plan), f"{r.samples_per_s:.1f}", ratio,
                      format_bytes(r.peak_memory_bytes), peak_ratio, "yes" if fits else "no",
                      style="bold" if r.plan.digest() == chosen else None)
    return table


@app.command()
def show(plan_path: Annotated[Path, typer.Argument(help="A plan file.")]) -> None:
    """Print a plan readably."""
    from autoscale import Plan

    plan = Plan.load(plan_path)
    table = Table(title=f"{plan_path} (schema {plan.schema_version})", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for name, section in plan.sections.items():
        for f in dataclasses.fields(section):
            table.add_row(f"{name}.{f.name}", _show_value(getattr(section, f.name)))
    if plan.measured is not None:
        m = plan.measured
        table.add_row("measured.samples_per_s", f"{m.samples_per_s:.2f}")
        table.add_row("measured.peak_memory", format_bytes(m.peak_memory_bytes))
        if m.memory_budget_bytes:
            table.add_row("measured.budget", format_bytes(m.memory_budget_bytes))
        if m.baseline_samples_per_s:
            table.add_row("baseline.samples_per_s", f"{m.baseline_samples_per_s:.2f} "
                          f"(plan {m.samples_per_s / m.baseline_samples_per_s:.2f}x)")
        if m.baseline_peak_memory_bytes:
            table.add_row("baseline.peak_memory", format_bytes(m.baseline_peak_memory_bytes))
    if plan.environment is not None:
        env = plan.environment
        table.add_row("environment", f"{env.device}; torch {env.torch}; world {env.world_size}")
    if plan.fingerprint is not None:
        table.add_row("model", f"{len(plan.fingerprint.parameters)} parameter tensors; "
                      f"graph {plan.fingerprint.graph[:12]}")
    console.print(table)


def _show_value(value: object) -> str:
    if isinstance(value, tuple) and len(value) > 6:
        return f"{list(value[:3])} ... {len(value)} in all"
    return str(list(value) if isinstance(value, tuple) else value)


@app.command()
def estimate(
    script: Script,
    plan_path: Annotated[Path | None, typer.Option("--plan", help="Plan to estimate; "
                                                   "default: the default plan.")] = None,
) -> None:
    """Print the cost model's memory breakdown for a plan, without running it."""
    import autoscale
    from autoscale.search._workload import load_workload

    work = load_workload(script)
    plan = autoscale.Plan.load(plan_path) if plan_path else autoscale.Plan()
    try:
        est = autoscale.estimate(work.model, work.example_inputs, plan, loss_fn=work.loss_fn)
    except autoscale.PlanError as err:
        console.print(f"[bold red]error[/]: {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    ranks = plan.shard.world_size if plan.shard.strategy != "none" else 1
    where = f"per rank of {ranks}" if ranks > 1 else "one device"
    table = Table(title=f"estimated peak memory of one training step ({where}; the step "
                        "simulated on fake tensors)")
    table.add_column("category")
    table.add_column("bytes", justify="right")
    rows = (("parameters and buffers", est.parameters), ("gradients", est.gradients),
            ("optimizer state", est.optimizer_state), ("batch", est.batch),
            ("activations saved for backward", est.activations),
            ("peak temporaries", est.temporaries),
            ("communication buffers", est.comm_buffers),
            ("error-feedback residuals", est.residuals))
    for name, value in rows:
        table.add_row(name, format_bytes(value))
    table.add_row(f"predicted peak (in {est.phase})", format_bytes(est.total), style="bold")
    console.print(table)
    console.print("the peak is not the sum of the rows: gradients grow while activations are "
                  "freed in backward", highlight=False)


@app.command()
def bench(
    script: Script,
    plan_path: Annotated[Path, typer.Option("--plan", help="The plan to measure.")],
    repeats: Annotated[int, typer.Option(help="Interleaved measurements of each.")] = 3,
    iters: Annotated[int, typer.Option(help="Timed steps per measurement.")] = 5,
) -> None:
    """Re-measure a plan against the untouched baseline in the same run (medians)."""
    import statistics

    import autoscale
    from autoscale.search._trial import measure_baseline
    from autoscale.search._workload import load_workload

    work = load_workload(script)
    plan = autoscale.Plan.load(plan_path)
    result = autoscale.apply(plan, work.model, work.example_inputs, loss_fn=work.loss_fn)
    base_runs, plan_runs = [], []
    for _ in range(repeats):  # interleaved, so drift on a shared machine hits both alike
        base_runs.append(measure_baseline(work.model, work.example_inputs,
                                          loss_fn=work.loss_fn, optimizer=plan.optimizer,
                                          iters=iters))
        plan_runs.append(autoscale.measure(result, work.example_inputs, iters=iters))
    table = Table(title=f"{script}: plan vs untouched baseline, median of {repeats}")
    for col in ("", "samples/s", "step ms", "peak memory"):
        table.add_column(col, justify="left" if not col else "right")
    rows = {}
    for name, runs in (("baseline (untouched)", base_runs), ("autoscale plan", plan_runs)):
        rows[name] = (statistics.median(r.samples_per_s for r in runs),
                      statistics.median(r.step_time_s for r in runs),
                      max(r.peak_memory_bytes for r in runs))
        sps, st, peak = rows[name]
        table.add_row(name, f"{sps:.1f}", f"{st * 1e3:.1f}", format_bytes(peak))
    (b_sps, b_st, b_peak), (p_sps, p_st, p_peak) = rows.values()
    table.add_row("ratio (plan / baseline)", f"{p_sps / b_sps:.2f}x", f"{p_st / b_st:.2f}x",
                  f"{p_peak / b_peak:.2f}x")
    console.print(table)



@app.command("apply")
def apply_plan(
    script: Script,
    plan_path: Annotated[Path, typer.Argument(help="The plan file autoscale tune wrote.")],
    steps: Annotated[int, typer.Option(min=1, help="Training steps to run.")] = 5,
) -> None:
    """Apply a saved plan to the workload and train STEPS steps, with no search.

    The production entry: the plan's schema, model fingerprint and world size are checked
    (another model or world size is refused), another device or torch version warns.
    Under torchrun each rank trains on its share of the example batch; the process group
    is joined from torchrun's environment (gloo on CPU, NCCL on CUDA) unless the script
    already did.
    """
    import autoscale
    from autoscale import _cli_apply as run
    from autoscale.search._workload import load_workload

    work = load_workload(script)
    ranks = run.join_ranks(work.model)
    # Only rank 0 prints, or torchrun interleaves N copies of every table.
    out = console if ranks.rank == 0 else Console(quiet=True)
    if not out.is_terminal:
        out.width = max(out.width, 140)
    try:
        plan = autoscale.Plan.load(plan_path)
        result, warned = run.applied(plan, work, ranks)
        out.print(run.validation_table(plan_path, plan, result, ranks))
        for text in warned:
            out.print(f"[yellow]warning:[/] {text}", highlight=False, soft_wrap=True)
        trained = run.train(result, work.example_inputs, ranks, steps)
    finally:
        run.leave_ranks(ranks)
    out.print(run.steps_table(trained))
    out.print(run.summary_table(trained, plan, ranks))
    if ranks.world > 1:
        # Leave without tearing down: freeing the DDP Reducer (with the GIL held) destroys
        # the gloo process group, whose destructor joins gloo's worker threads, and a
        # worker still releasing a finished all-reduce's tensors waits for the GIL:
        # deadlock (a rank hung in ~ProcessGroupGloo, its worker in
        # ConcretePyInterpreterVTable::decref). The tuner's workers leave the same way.
        _leave_now(0)


def _leave_now(code: int) -> None:
    """End the process with ``code`` once stdout and stderr are flushed, skipping the
    interpreter's teardown (atexit handlers, object finalizers); for a command whose work
    is written and whose teardown can hang (the callers say why)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


Storage = Annotated[str, typer.Argument(help="The study's Optuna storage: a SQLite path "
                                        "(study.db) or a database URL.")]
StudyName = Annotated[str | None, typer.Option(
    "--study", help="Study name; default: the storage's only study.")]


def _load_study(storage: str, study: str | None):
    import optuna

    from autoscale.errors import TunerError
    from autoscale.search._study import storage_url

    url = storage_url(storage) or storage
    if "://" in storage or Path(storage).exists():
        names = [s.study_name for s in optuna.get_all_study_summaries(url)]
    else:
        raise TunerError(f"no study storage at {storage!r}; pass the --storage that "
                         "autoscale tune wrote.")
    if study is None:
        if len(names) != 1:
            raise TunerError(f"{storage!r} holds {len(names)} studies ({', '.join(names)}); "
                             "pick one with --study NAME.")
        study = names[0]
    elif study not in names:
        raise TunerError(f"{storage!r} has no study {study!r}; it holds: {', '.join(names)}.")
    return optuna.load_study(study_name=study, storage=url)


@app.command()
def report(
    storage: Storage,
    study: StudyName = None,
    out: Annotated[Path, typer.Option(help="Folder for the PNG and HTML files.")] = Path(
        "autoscale-report"),
) -> None:
    """Write a stored study's plots (Pareto front, history, importances, estimate vs
    measured) as PNG and HTML."""
    from autoscale.search._report import write_report

    loaded = _load_study(storage, study)
    files = write_report(loaded, out)
    table = Table(title=f"study {loaded.study_name!r}: {len(loaded.trials)} trials")
    for col in ("figure", "png", "html"):
        table.add_column(col)
    for name in sorted(set(files.png) | set(files.html)):
        table.add_row(name, str(files.png.get(name, "-")), str(files.html.get(name, "-")))
    console.print(table)


@app.command()
def dashboard(
    storage: Storage,
    port: Annotated[int, typer.Option(help="Port on localhost.")] = 8080,
) -> None:
    """Open optuna-dashboard on the study storage (where optuna-dashboard is installed)."""
    import shutil
    import subprocess

    from autoscale.errors import TunerError
    from autoscale.search._study import storage_url

    exe = shutil.which("optuna-dashboard")
    if exe is None:
        raise TunerError("optuna-dashboard is not installed: pip install optuna-dashboard, "
                         "then run this again (or autoscale report for static plots).")
    url = storage_url(storage)
    console.print(f"optuna-dashboard on http://127.0.0.1:{port} (Ctrl-C to stop)")
    raise typer.Exit(subprocess.call([exe, url or storage, "--host", "127.0.0.1",
                                      "--port", str(port)]))


if __name__ == "__main__":
    main()
