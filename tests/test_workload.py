"""Workload scripts for `autoscale tune`."""

from __future__ import annotations

import pytest
import torch

from autoscale import AutoscaleError
from autoscale.search._workload import load_workload


def test_every_example_builds() -> None:
    from pathlib import Path

    for script in sorted((Path(__file__).parents[1] / "examples").glob("*.py")):
        if script.name == "text.py":
            continue
        work = load_workload(script)
        assert isinstance(work.model, torch.nn.Module), script


@pytest.mark.parametrize(("body", "match"), [
    ("x = 1", "defines no build"),
    ("def build(): return 1", "must return"),
    ("def build(): return 'm', (1,)", "not an nn.Module"),
    ("import torch\ndef build(): return torch.nn.Linear(2, 2), {'x': 1}", "holds no tensor"),
    ("import torch\ndef build(): return {'model': torch.nn.Linear(2, 2)}", "needs 'model'"),
])
def test_bad_scripts(tmp_path, body, match) -> None:
    script = tmp_path / "w.py"
    script.write_text(body + "\n")
    with pytest.raises(AutoscaleError, match=match):
        load_workload(script)
