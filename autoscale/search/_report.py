"""Plots of a stored tuning study, as PNG (matplotlib) and HTML (plotly).

Note: [why Optuna's visualization]
Optuna's visualization module draws the optimization history and the parameter
importances from any stored study, with a matplotlib back end (static PNG for a report or
a pull request) and a plotly back end (interactive HTML: hover a point to see its plan).
Two figures are autoscale's own, drawn with the same two libraries, because they read
what autoscale stores on each trial rather than Optuna's objective: the memory/throughput
trade-off with its Pareto front and the budget, and the cost model's estimate against the
measured peak. matplotlib and plotly are optional (``pip install autoscale[report]``).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from autoscale.errors import TunerError

__all__ = ["ReportFiles", "pareto_front", "write_report"]

_MIB = 2**20


@dataclass(frozen=True)
class _Point:
    number: int
    samples_per_s: float
    peak: int
    estimate: int | None
    plan: str


@dataclass(frozen=True)
class ReportFiles:
    """What write_report wrote: one PNG and one HTML per figure, by figure name."""

    png: dict[str, Path]
    html: dict[str, Path]


def _measured(study: optuna.Study) -> list[_Point]:
    points = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        peak = t.user_attrs.get("peak_memory_bytes")
        if peak is None or not t.values or not t.values[0] or "repeat_of" in t.user_attrs:
            continue
        plan = json.dumps(t.user_attrs.get("plan", {}), sort_keys=True)
        points.append(_Point(t.number, float(t.values[0]), int(peak),
                             t.user_attrs.get("estimated_bytes"), plan))
    return points


def pareto_front(points: list[Any]) -> list[Any]:
    """The points no other point beats on both throughput (higher) and peak (lower),
    lowest peak first."""
    front = [p for p in points
             if not any(q.samples_per_s >= p.samples_per_s and q.peak <= p.peak
                        and (q.samples_per_s, q.peak) != (p.samples_per_s, p.peak)
                        for q in points)]
    return sorted(front, key=lambda p: p.peak)


def write_report(study: optuna.Study, out_dir: str | os.PathLike[str], *,
                 budget: int | None = None) -> ReportFiles:
    """Write the study's figures to ``out_dir``: the Pareto front of throughput against
    peak memory, the optimization history, the parameter importances, and the estimate
    against the measured peak; each as PNG and HTML. Files are written atomically.

    Raises TunerError when the study has no measured trial, or when matplotlib or plotly
    is missing (with the install command).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a server or in CI
        import matplotlib.pyplot as plt
        import plotly.graph_objects as go
    except ImportError as err:
        raise TunerError(f"autoscale report needs matplotlib and plotly ({err.name} is "
                         "missing): pip install 'autoscale[report]'.") from err
    points = _measured(study)
    if not points:
        raise TunerError(f"study {study.study_name!r} has no measured trial to plot; run "
                         "autoscale tune with this --storage first.")
    budget = budget if budget is not None else study.user_attrs.get("memory_budget_bytes")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png: dict[str, Path] = {}
    html: dict[str, Path] = {}
    figures = {"pareto": _pareto(points, budget, plt, go),
               "estimate": _estimates(points, plt, go)}
    figures.update(_optuna_figures(study))
    for name, (fig_png, fig_html) in figures.items():
        if fig_png is not None:
            png[name] = _save(out / f"{name}.png", lambda p, f=fig_png: f.savefig(
                p, dpi=120, bbox_inches="tight", format="png"))
            plt.close(fig_png)
        if fig_html is not None:
            html[name] = _save(out / f"{name}.html", lambda p, f=fig_html: f.write_html(
                p, include_plotlyjs="cdn", full_html=True))
    return ReportFiles(png, html)


def _save(path: Path, write: Any) -> Path:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _pareto(points: list[_Point], budget: int | None, plt: Any, go: Any) -> tuple[Any, Any]:
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    fits = [p for p in points if budget is None or p.peak <= budget]
    over = [p for p in points if budget is not None and p.peak > budget]
    ax.scatter([p.peak / _MIB for p in fits], [p.samples_per_s for p in fits],
               c="tab:blue", label="measured, fits the budget")
    if over:
        ax.scatter([p.peak / _MIB for p in over], [p.samples_per_s for p in over],
                   c="tab:gray", marker="x", label="measured, over the budget")
    ax.plot([p.peak / _MIB for p in front], [p.samples_per_s for p in front], "-o",
            c="tab:orange", label="Pareto front")
    if budget is not None:
        ax.axvline(budget / _MIB, c="tab:red", ls="--", label=f"budget {budget / _MIB:.1f} MiB")
    for p in front:
        ax.annotate(f"#{p.number}", (p.peak / _MIB, p.samples_per_s),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("peak memory per device (MiB)")
    ax.set_ylabel("throughput (samples/s)")
    ax.set_title("throughput against peak memory, every measured plan")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    page = go.Figure()
    page.add_trace(go.Scatter(
        x=[p.peak / _MIB for p in points], y=[p.samples_per_s for p in points],
        mode="markers", name="measured", text=[f"#{p.number} {p.plan}" for p in points]))
    page.add_trace(go.Scatter(x=[p.peak / _MIB for p in front],
                              y=[p.samples_per_s for p in front], mode="lines+markers",
                              name="Pareto front"))
    if budget is not None:
        page.add_vline(x=budget / _MIB, line_dash="dash", annotation_text="budget")
    page.update_layout(xaxis_title="peak memory per device (MiB)",
                       yaxis_title="throughput (samples/s)",
                       title="throughput against peak memory")
    return fig, page


def _estimates(points: list[_Point], plt: Any, go: Any) -> tuple[Any, Any]:
    have = [p for p in points if p.estimate]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    xs = [p.peak / _MIB for p in have]
    ys = [(p.estimate or 0) / _MIB for p in have]
    ax.scatter(xs, ys, c="tab:blue")
    title = "cost model: estimate against measurement"
    if have:
        lo, hi = min(xs + ys) * 0.95, max(xs + ys) * 1.05
        ax.plot([lo, hi], [lo, hi], c="tab:gray", ls="--", label="estimate = measured")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.legend(fontsize=8)
        errors = sorted(abs(y / x - 1) for x, y in zip(xs, ys, strict=True))
        title += (f"\n{len(errors)} plans: median |error| {errors[len(errors) // 2]:.1%}, "
                  f"largest {errors[-1]:.1%}")
    ax.set_xlabel("measured peak (MiB)")
    ax.set_ylabel("estimated peak (MiB)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    page = go.Figure(go.Scatter(x=xs, y=ys, mode="markers",
                                text=[f"#{p.number} {p.plan}" for p in have]))
    page.update_layout(xaxis_title="measured peak (MiB)", yaxis_title="estimated peak (MiB)",
                       title="cost model: estimate against measurement")
    return fig, page


def _optuna_figures(study: optuna.Study) -> dict[str, tuple[Any, Any]]:
    """History and importances from Optuna's own plots (importances need two or more
    distinct measured plans and a varied parameter; left out otherwise)."""
    import warnings

    from optuna import visualization as vis
    from optuna.visualization import matplotlib as vis_mpl

    out: dict[str, tuple[Any, Any]] = {}
    # A pareto study has two objectives; both plots are drawn for throughput.
    target: dict[str, Any] = ({} if len(study.directions) == 1 else
                              {"target": lambda t: t.values[0], "target_name": "samples/s"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib back end experimental
        out["history"] = (vis_mpl.plot_optimization_history(study, **target).figure,
                          vis.plot_optimization_history(study, **target))
        with contextlib.suppress(ValueError, RuntimeError, ZeroDivisionError):
            out["importance"] = (vis_mpl.plot_param_importances(study, **target).figure,
                                 vis.plot_param_importances(study, **target))
    return out
