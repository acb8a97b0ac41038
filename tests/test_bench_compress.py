"""bench/bench_compress.py: its table and goal line, loopback smoke run, shaped links."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through it
    spec.loader.exec_module(module)  # importing must not start a run
    return module


@pytest.fixture(scope="module")
def bench():
    return _load("bench_compress")


@pytest.fixture(scope="module")
def netns(bench):
    return bench._netns


def _row(times: list[float], *, sent: int, uncompressed: int, counted: bool,
         wire: int = 0) -> dict:
    return {"times": times, "sent": sent * len(times), "uncompressed": uncompressed * len(times),
            "counted": counted, "wire": wire * len(times), "loss": 2.5}


def _table(none_s: float, int8_s: float) -> dict:
    return {"check": {"bytes": 4e6, "seconds": 0.34, "wire": 4.2e6}, "grad_bytes": 3_272_000,
            "params": 818_000,
            "rows": {"none": _row([none_s] * 3, sent=3_272_000, uncompressed=3_272_000,
                                  counted=False, wire=3_400_000),
                     "int8": _row([int8_s] * 3, sent=830_000, uncompressed=3_272_000,
                                  counted=True, wire=900_000)}}


def test_parse_rate(netns) -> None:
    assert netns.parse_rate("100mbit") == 100e6
    assert netns.parse_rate("1gbit") == 1e9
    assert netns.parse_rate("1.5Mbit") == 1.5e6
    with pytest.raises(ValueError, match="not a tc rate"):
        netns.parse_rate("100mbps")


def test_table_has_ratio_compression_and_link_check(bench) -> None:
    lines = bench.format_table("100mbit", _table(0.4, 0.1))
    text = "\n".join(lines)
    assert "ratio vs none" in lines[1] and "compression" in lines[1]
    int8 = next(line for line in lines if line.startswith("int8"))
    assert "4.00x" in int8  # 0.4 s / 0.1 s
    assert "3.9x" in int8  # 3.272 MB / 0.83 MB
    assert "99 Mbit/s" in text  # 4.2 MB * 8 / 0.34 s
    loop = "\n".join(bench.format_table("loopback", _table(0.05, 0.06)))
    assert "on lo" in loop and "Mbit/s" not in loop


def test_goal_line(bench) -> None:
    assert "MET (best: int8 4.00x)" in bench.goal_line({"100mbit": _table(0.4, 0.1)})
    assert "NOT MET (best: int8 1.25x)" in bench.goal_line({"100mbit": _table(0.5, 0.4)})
    assert "NOT CHECKED" in bench.goal_line({"loopback": _table(0.05, 0.06)})


@pytest.mark.distributed
def test_quick_loopback_run_prints_the_table(bench, capsys) -> None:
    """Two real gloo ranks on lo, one warm-up and one timed step per row."""
    assert bench.main(["--quick", "--methods", "none,int8"]) == 0
    out = capsys.readouterr().out
    assert "torch " in out.splitlines()[0]
    assert "== link: loopback" in out and "ratio vs none" in out
    assert any(line.startswith("none ") and "1.00x" in line for line in out.splitlines())
    if bench.compress_available():
        assert any(line.startswith("int8 ") for line in out.splitlines())
    else:
        assert "skipped int8" in out
    assert "link check: all_reduce" in out and "goal (" in out


def _our_namespaces(netns) -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listing.splitlines()
            if line.startswith(netns.PREFIX)]


@pytest.mark.distributed
def test_shaped_link_is_made_and_torn_down(netns) -> None:
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    made = netns.shaped_link("100mbit", tag="t")
    with pytest.raises(RuntimeError, match="inside"), made as link:
        assert set(link.namespaces) <= set(_our_namespaces(netns))
        show = [*link.exec_prefix(1), "tc", "qdisc", "show", "dev", link.ifnames[1]]
        qdisc = subprocess.run(show, capture_output=True, text=True, check=True).stdout
        assert "tbf" in qdisc and "100Mbit" in qdisc
        raise RuntimeError("inside")  # torn down on an exception too
    assert not set(link.namespaces) & set(_our_namespaces(netns))


@pytest.mark.distributed
def test_stale_namespaces_of_dead_runs_are_cleaned(netns) -> None:
    if netns.unavailable() is not None:
        pytest.skip("network namespaces unavailable")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now names no live process (reuse within the test is negligible)
    name = f"{netns.PREFIX}{dead.pid}-0"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert name in netns.cleanup_stale()
        assert name not in _our_namespaces(netns)
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.distributed
@pytest.mark.slow
def test_100mbit_slows_plain_ddp(bench, tmp_path) -> None:
    """The shaping works: at 100 Mbit/s the link carries no more than its rate, every
    step of plain DDP takes at least its gradients' wire time, more than on loopback."""
    if bench._netns.unavailable() is not None:
        pytest.skip("network namespaces unavailable")
    out = tmp_path / "r.json"
    assert bench.main(["--links", "100mbit,loopback", "--methods", "none", "--warmup", "1",
                       "--rounds", "1", "--steps", "3", "--json", str(out)]) == 0
    tables = json.loads(out.read_text())
    shaped, loop = tables["100mbit"], tables["loopback"]
    assert bench.link_rate(shaped["check"]) < 1.2 * 100e6  # tbf cannot pass more
    none = shaped["rows"]["none"]
    assert none["wire"] / len(none["times"]) >= shaped["grad_bytes"]  # it did cross the veth
    floor = shaped["grad_bytes"] * 8 / 100e6
    assert min(none["times"]) > 0.9 * floor
    assert statistics.median(none["times"]) > statistics.median(loop["rows"]["none"]["times"])
    assert not math.isnan(none["loss"])
