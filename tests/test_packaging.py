"""The wheel installs passes/ and kernels/ as autoscale.passes and autoscale.kernels only."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.distributed
def test_wheel_maps_passes_and_kernels_under_autoscale(tmp_path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, timeout=300)
    (wheel,) = tmp_path.glob("autoscale-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "autoscale/passes/checkpoint.py" in names
    assert "autoscale/kernels/adamw.py" in names
    assert "autoscale/optim/_adamw.py" in names
    top_levels = {n.split("/")[0] for n in names}
    assert top_levels == {"autoscale", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1]
                          + ".dist-info"}, top_levels


def test_installed_package_resolves_the_mapped_folders() -> None:
    import autoscale.kernels
    import autoscale.passes

    assert Path(autoscale.passes.__file__).parent.name in ("passes", "passes")
    assert Path(autoscale.kernels.__file__).parent.name == "kernels"
    assert callable(autoscale.passes.checkpoint_blocks)
