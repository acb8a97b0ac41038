"""autoscale report: a stored study's figures as PNG and HTML, from a real tune."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

import autoscale
from autoscale.errors import TunerError
from autoscale.search._report import pareto_front, write_report


@dataclass(frozen=True)
class P:
    samples_per_s: float
    peak: int


def test_the_pareto_front_keeps_only_undominated_plans() -> None:
    points = [P(10, 100), P(20, 200), P(15, 250), P(30, 300), P(5, 90), P(30, 310)]
    assert pareto_front(points) == [P(5, 90), P(10, 100), P(20, 200), P(30, 300)]


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    from tests_helpers import tiny_gpt

    folder = tmp_path_factory.mktemp("study")
    model, batch = tiny_gpt(batch_size=8)
    storage = str(folder / "study.db")
    # The pareto objective (Note: [the pareto objective]): the report's figures must draw a
    # two-objective study, and the front is checked below.
    result = autoscale.optimize(model, batch, trials=4, storage=storage, isolate=False,
                                precisions=("fp32",), iters=1, objective="pareto",
                                memory_budget="64MiB")
    return storage, result


def test_the_pareto_objective_searches_both_and_returns_the_front(stored) -> None:
    import optuna

    storage, result = stored
    report = result.report
    assert report.objective == "pareto"
    study = optuna.load_study(study_name=report.study_name, storage=f"sqlite:///{storage}")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    measured = [t for t in study.trials if "peak_memory_bytes" in t.user_attrs
                and "repeat_of" not in t.user_attrs]
    # Each measured trial reported both objectives: its throughput and its measured peak.
    assert measured and all(t.values[1] == t.user_attrs["peak_memory_bytes"] for t in measured)
    front = report.front
    assert front and all(r.feasible for r in front)
    points = [r for r in report.trials if r.state == "measured" and r.feasible]
    for r in front:  # no trial of the run beats a front member on both counts
        assert not any(q.samples_per_s > r.samples_per_s
                       and q.peak_memory_bytes < r.peak_memory_bytes for q in points)
    # The plan applied is the fastest that fits, as under the throughput objective.
    assert result.plan.measured.peak_memory_bytes <= report.memory_budget
    # A stored study made for one objective is not resumed for the other.
    from tests_helpers import tiny_gpt

    model, batch = tiny_gpt(batch_size=8)
    with pytest.raises(TunerError, match="objective='pareto'"):
        autoscale.optimize(model, batch, trials=4, storage=storage, isolate=False,
                           study_name=report.study_name, precisions=("fp32",),
                           memory_budget="64MiB")
    with pytest.raises(TunerError, match="objective='fastest' is not one of"):
        autoscale.optimize(model, batch, trials=1, isolate=False, objective="fastest")


def test_a_tuned_study_gives_every_figure_as_png_and_html(stored, tmp_path) -> None:
    import optuna

    storage, result = stored
    study = optuna.load_study(study_name=result.report.study_name,
                              storage=f"sqlite:///{storage}")
    files = write_report(study, tmp_path / "report")
    assert {"pareto", "estimate", "history"} <= set(files.png) == set(files.html)
    for path in files.png.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for path in files.html.values():
        assert "plotly" in path.read_text()
    # Every measured trial is on the estimate plot: the HTML carries their plans.
    page = files.html["estimate"].read_text()
    measured = [t for t in study.trials if "peak_memory_bytes" in t.user_attrs
                and "repeat_of" not in t.user_attrs]
    assert measured and all(json.dumps(t.user_attrs["plan"], sort_keys=True)[:20]
                            .replace('"', '\\"') in page for t in measured)
    assert not list((tmp_path / "report").glob(".*"))  # no temporary file left


def test_the_cli_names_the_study_to_pick_when_a_storage_holds_several(stored, tmp_path,
                                                                      ) -> None:
    import optuna

    from autoscale.cli import _load_study

    storage, _ = stored
    optuna.create_study(study_name="another", storage=f"sqlite:///{storage}")
    with pytest.raises(TunerError, match="pick one with --study"):
        _load_study(storage, None)
    with pytest.raises(TunerError, match="no study 'nope'"):
        _load_study(storage, "nope")
    with pytest.raises(TunerError, match="no study storage"):
        _load_study(str(tmp_path / "missing.db"), None)
