"""Gradient compression over real bandwidth-limited links: where does it pay?

    python bench/bench_compress.py                        # 100mbit, 1gbit, loopback (~70 s)
    python bench/bench_compress.py --links 100mbit        # one link
    python bench/bench_compress.py --quick                # loopback, 1 step: a smoke test

Two gloo ranks train examples/gpt.py's GPT (build()'s default config: 0.82M parameters,
3.3 MB of fp32 gradients; 8 rows a rank, one CPU thread each) data-parallel through
autoscale: ``build_result(plan, model, graph=capture(model, batch))`` with a plan of
``ShardPlan(strategy="ddp", world_size=2)`` and a ``CompressPlan`` per row. At 100 Mbit/s
one uncompressed all-reduce of the gradients takes ~280 ms against ~50 ms of compute, so
communication dominates there; at 1 Gbit/s they are comparable; on loopback it is nearly
free, and compression only adds its encode/decode time.

Links. A shaped link is two network namespaces joined by a veth pair with the same tbf
qdisc on both ends (tc shapes only what a device sends; netem is absent on these machines),
made by bench/_netns.py; rank r runs under ``ip netns exec`` in its namespace with
``GLOO_SOCKET_IFNAME`` its end of the veth and ``MASTER_ADDR`` rank 0's address. Under each
link's table a "link check" line gives a raw gloo all_reduce's time and the bytes rank 0's
veth sent for it: the rate the link really carries. "loopback" runs both ranks in the host
namespace on ``lo``. Without root (or iproute2) the benchmark says why and runs loopback only.

Rows. "none" is plain DDP; "bf16", "int8" (error feedback), "topk" (error feedback,
--topk-ratio of the entries) and "powersgd" (--powersgd-rank) are autoscale's compression
pass (passes/compress.py); "torch-powersgd" is torch's own ``powerSGD_hook`` registered on
the same DDP model, a reference for autoscale's PowerSGD (not counted for the goal). Rows
of the compression pass are skipped, with a note, while autoscale has no ``CompressPlan``.

Protocol. Every row's model is built in the same pair of processes from the same weights;
after --warmup steps each, the rows take turns in --rounds rounds of --steps steps, so
every row meets the same machine and link state (Note: [interleaved timing] in
bench/bench_optim_cpu.py). A step starts after a barrier and is timed on rank 0; the table
prints its median. "ratio vs none" is none's median over the row's (>1: faster). "sent MB"
is what the row hands to the collectives per step (compress.comm_stats' bytes_sent, the
gradient bytes for none); "compression" is bytes_uncompressed over bytes_sent; "wire MB"
is what rank 0's veth sent per step, TCP/IP headers included (shaped links only). "loss"
is the row's last training loss (one step, dropout on, the same batch every step): a
sanity check that it trains, not a comparison of quality (tests/passes/ bound that). The
last line says whether the goal holds: at 100mbit the best compressor is >= 1.5x faster
than none.

Noise: the timings are only as quiet as the machine; on a shared 2-core VM another job's
processes raised the compressed rows at 100mbit from ~62 ms to ~113 ms in one run (none
was hit less, in proportion), so compare rows within one run and rerun when the load
average (uptime) is not near 0. --json keeps every step's time on both ranks.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _netns  # noqa: E402
from bench_large_batch import cpu_name  # noqa: E402  (one CPU-model probe for bench/)

GOAL_LINK = "100mbit"
GOAL_SPEEDUP = 1.5
LINKS = ("100mbit", "1gbit", "loopback")
METHODS = ("none", "bf16", "int8", "topk", "powersgd", "torch-powersgd")
PASS_METHODS = ("bf16", "int8", "topk", "powersgd")  # autoscale's compression pass
WORLD = 2


def device_line() -> str:
    """CPU model, cores, threads per rank, torch version."""
    return (f"device: cpu ({cpu_name()}, {os.cpu_count()} cores), 1 torch thread per rank, "
            f"{WORLD} gloo ranks; torch {torch.__version__}")


def compress_available() -> bool:
    """Whether autoscale has the compression pass's plan section yet."""
    import autoscale

    return hasattr(autoscale, "CompressPlan")


# ---------------------------------------------------------------------------------------
# Rank worker: runs inside a namespace (or on loopback), writes rank 0's figures as JSON.


def _tx_bytes(ifname: str | None) -> int:
    if ifname is None or ifname == "lo":  # lo carries the whole host's traffic
        return 0
    return int(Path(f"/sys/class/net/{ifname}/statistics/tx_bytes").read_text())


def _plan(method: str, args: argparse.Namespace) -> Any:
    import autoscale
    from autoscale import Plan, ShardPlan

    sections: dict[str, Any] = {"shard": ShardPlan(strategy="ddp", world_size=WORLD)}
    if method in PASS_METHODS:
        options: dict[str, Any] = {"method": method}
        if method in ("int8", "topk"):
            options["error_feedback"] = True
        if method == "topk":
            options["topk_ratio"] = args.topk_ratio
        if method == "powersgd":
            options["powersgd_rank"] = args.powersgd_rank
        sections["compress"] = autoscale.CompressPlan(**options)
    return Plan(sections=sections)


def _build(method: str, model: torch.nn.Module, graph: Any, args: argparse.Namespace) -> Any:
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
    from torch.nn.parallel import DistributedDataParallel

    from autoscale.runtime import build_result

    result = build_result(_plan(method, args), model, graph=graph)
    if method == "torch-powersgd":
        # start_powerSGD_iter=2: torch's default (1000) all-reduces uncompressed for the
        # first 1000 steps; 2 is the least it accepts with error feedback and warm start.
        state = psgd.PowerSGDState(process_group=None,
                                   matrix_approximation_rank=args.powersgd_rank,
                                   start_powerSGD_iter=2)
        ddp = result.model
        assert isinstance(ddp, DistributedDataParallel)  # shard.strategy ddp wraps it
        ddp.register_comm_hook(state, psgd.powerSGD_hook)
    return result


def _comm_counts(result: Any, grad_bytes: int) -> tuple[int, int] | None:
    """(bytes_sent, bytes_uncompressed) so far, from the compression pass where it runs."""
    try:
        from autoscale.passes.compress import comm_stats
    except ImportError:
        return None
    stats = comm_stats(result.model)
    if stats is None:
        return None
    return int(stats.bytes_sent), int(stats.bytes_uncompressed)


@dataclass
class _Row:
    times: list[float]
    wire: int = 0
    sent: int = 0
    uncompressed: int = 0
    counted: bool = False  # the pass's counters ran (else sent is the gradient bytes)
    loss: float = float("nan")


def _timed_step(result: Any, batch: Any, row: _Row, ifname: str | None,
                grad_bytes: int) -> None:
    import torch.distributed as dist

    dist.barrier()  # both ranks start the step together: the time is the step's own
    tx0, counts0 = _tx_bytes(ifname), _comm_counts(result, grad_bytes)
    start = time.perf_counter()
    row.loss = result.step(batch)
    row.times.append(time.perf_counter() - start)
    counts1 = _comm_counts(result, grad_bytes)
    row.wire += _tx_bytes(ifname) - tx0
    if counts0 is not None and counts1 is not None:
        row.counted = True
        row.sent += counts1[0] - counts0[0]
        row.uncompressed += counts1[1] - counts0[1]
    else:
        row.sent += grad_bytes
        row.uncompressed += grad_bytes


def _link_check(ifname: str | None, megabytes: float) -> dict[str, float]:
    """Time a raw all_reduce of ``megabytes`` (best of 3) and count what rank 0 sent."""
    import torch.distributed as dist

    tensor = torch.ones(max(1, int(megabytes * 1e6 / 4)))
    dist.all_reduce(tensor)  # connects every pair before timing
    best, wire = float("inf"), 0
    for _ in range(3):
        dist.barrier()
        tx0, start = _tx_bytes(ifname), time.perf_counter()
        dist.all_reduce(tensor)
        elapsed = time.perf_counter() - start
        if elapsed < best:
            best, wire = elapsed, _tx_bytes(ifname) - tx0
    return {"bytes": tensor.numel() * 4, "seconds": best, "wire": wire}


def worker(args: argparse.Namespace) -> int:
    """One rank: build every row's model, time them in interleaved rounds, write JSON."""
    import gpt
    import torch.distributed as dist

    import autoscale

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
    rank = dist.get_rank()
    ifname = os.environ.get("GLOO_SOCKET_IFNAME")
    check = _link_check(ifname, args.check_mb)
    model, batch = gpt.build(batch_size=args.batch * WORLD)
    local = tuple(t.chunk(WORLD)[rank] for t in batch)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    graph = autoscale.capture(model, batch)
    results = {m: _build(m, model, graph, args) for m in args.methods}
    for result in results.values():
        for _ in range(args.warmup):
            result.step(local)
    rows = {m: _Row(times=[]) for m in results}
    for _ in range(args.rounds):
        for method, result in results.items():
            for _ in range(args.steps):
                _timed_step(result, local, rows[method], ifname, grad_bytes)
    # Each rank's veth counts only what that rank sent; both go in the JSON.
    wires: list[Any] = [None] * WORLD
    dist.all_gather_object(wires, {m: r.wire for m, r in rows.items()})
    times: list[Any] = [None] * WORLD
    dist.all_gather_object(times, {m: r.times for m, r in rows.items()})
    if rank == 0:
        out = {"check": check, "grad_bytes": grad_bytes,
               "params": sum(p.numel() for p in model.parameters()),
               "rows": {m: dict(vars(r), wire_by_rank=[w[m] for w in wires],
                                times_by_rank=[t[m] for t in times])
                        for m, r in rows.items()}}
        Path(args.out).write_text(json.dumps(out))
    del results  # the DDP reducers and their comm hooks go before their process group
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------------------
# Driver: one pair of rank processes per link, then the tables.


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker_argv(args: argparse.Namespace, methods: Sequence[str], out: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--rank-worker", "--out", str(out),
            "--methods", ",".join(methods), "--batch", str(args.batch),
            "--warmup", str(args.warmup), "--rounds", str(args.rounds),
            "--steps", str(args.steps), "--topk-ratio", str(args.topk_ratio),
            "--powersgd-rank", str(args.powersgd_rank), "--check-mb", str(args.check_mb),
            "--timeout", str(args.timeout)]


def _launch(argv: list[str], prefixes: Sequence[list[str]], ifnames: Sequence[str],
            master: str, timeout: float) -> None:
    """Start both ranks (``prefixes[r] + argv``), wait, raise with stderr if one fails."""
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                   MASTER_ADDR=master, MASTER_PORT=str(port),
                   GLOO_SOCKET_IFNAME=ifnames[rank], OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(prefixes[rank] + argv, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    failures = []
    try:
        for rank, proc in enumerate(procs):
            _, err = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                failures.append(f"rank {rank} exited {proc.returncode}:\n{err[-3000:]}")
    except subprocess.TimeoutExpired:
        failures.append(f"the ranks did not finish within {timeout:.0f} s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if failures:
        raise RuntimeError("a benchmark rank failed; " + "\n".join(failures))


def run_link(link: str, args: argparse.Namespace, methods: Sequence[str]) -> dict[str, Any]:
    """Rank 0's JSON for one link: 'loopback' or a tc rate such as '100mbit'."""
    with tempfile.TemporaryDirectory(prefix="bench_compress") as tmp:
        out = Path(tmp) / "rank0.json"
        argv = _worker_argv(args, methods, out)
        limit = args.timeout * 2
        if link == "loopback":
            _launch(argv, [[], []], ["lo", "lo"], "127.0.0.1", limit)
        else:
            with _netns.shaped_link(link, queue_ms=args.queue_ms) as net:
                _launch(argv, [net.exec_prefix(r) for r in range(WORLD)], net.ifnames,
                        net.addrs[0], limit)
        return dict(json.loads(out.read_text()))


def _median_ms(row: dict[str, Any]) -> float:
    return statistics.median(row["times"]) * 1e3


def format_table(link: str, data: dict[str, Any]) -> list[str]:
    """The table for one link, its link-check line, as printed lines."""
    rows = data["rows"]
    base = _median_ms(rows["none"]) if "none" in rows else float("nan")
    steps = len(next(iter(rows.values()))["times"]) if rows else 0
    lines = [f"== link: {link}  (median of {steps} steps per row)",
             f"{'method':<15} {'step ms':>8} {'ratio vs none':>14} {'sent MB':>8} "
             f"{'compression':>11} {'wire MB':>8} {'loss':>7}"]
    shaped = link != "loopback"
    for method, row in rows.items():
        n = len(row["times"])
        ms = _median_ms(row)
        sent = f"{row['sent'] / n / 1e6:8.3f}" if row["counted"] or method == "none" else \
            f"{'-':>8}"
        ratio = f"{row['uncompressed'] / row['sent']:10.1f}x" if row["counted"] and \
            row["sent"] else f"{'-':>11}"
        wire = f"{row['wire'] / n / 1e6:8.3f}" if shaped else f"{'-':>8}"
        speedup = f"{base / ms:13.2f}x" if "none" in rows else f"{'-':>14}"
        lines.append(f"{method:<15} {ms:8.1f} {speedup} {sent} {ratio} {wire} "
                     f"{row['loss']:7.3f}")
    check = data["check"]
    where = " on lo"
    if shaped:
        where = (f"; rank 0 sent {check['wire'] / 1e6:.2f} MB on the veth: "
                 f"{link_rate(check) / 1e6:.0f} Mbit/s")
    lines.append(f"link check: all_reduce of {check['bytes'] / 1e6:.1f} MB took "
                 f"{check['seconds'] * 1e3:.1f} ms{where}")
    return lines


def link_rate(check: dict[str, float]) -> float:
    """Bits per second rank 0's veth carried during the link check's all_reduce."""
    return check["wire"] * 8 / check["seconds"]


def goal_line(tables: dict[str, dict[str, Any]]) -> str:
    """MET / NOT MET: the best compression-pass row's speedup at GOAL_LINK."""
    what = f"goal (best compressor >= {GOAL_SPEEDUP}x faster than none at {GOAL_LINK})"
    data = tables.get(GOAL_LINK)
    candidates = [m for m in PASS_METHODS if data and m in data["rows"]]
    if data is None or "none" not in data["rows"] or not candidates:
        return f"{what}: NOT CHECKED (no {GOAL_LINK} table with none and a compressor)"
    base = _median_ms(data["rows"]["none"])
    best = max(candidates, key=lambda m: base / _median_ms(data["rows"][m]))
    speedup = base / _median_ms(data["rows"][best])
    verdict = "MET" if speedup >= GOAL_SPEEDUP else "NOT MET"
    return f"{what}: {verdict} (best: {best} {speedup:.2f}x)"


def _methods(requested: Sequence[str]) -> tuple[list[str], str | None]:
    if compress_available():
        return list(requested), None
    kept = [m for m in requested if m not in PASS_METHODS]
    skipped = [m for m in requested if m in PASS_METHODS]
    note = (f"skipped {', '.join(skipped)}: autoscale has no CompressPlan yet "
            "(passes/compress.py)") if skipped else None
    return kept, note


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--links", default=",".join(LINKS),
                        help="comma-separated tc rates (100mbit, 1gbit, ...) and/or loopback")
    parser.add_argument("--methods", default=",".join(METHODS), help=", ".join(METHODS))
    parser.add_argument("--batch", type=int, default=8, help="rows per rank")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="steps per row per round")
    parser.add_argument("--topk-ratio", type=float, default=0.01)
    parser.add_argument("--powersgd-rank", type=int, default=4)
    parser.add_argument("--check-mb", type=float, default=4.0,
                        help="size of the raw all_reduce of the link check")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per link")
    parser.add_argument("--quick", action="store_true",
                        help="loopback, 1 warm-up step, 1 timed step: a smoke test")
    parser.add_argument("--queue-ms", type=float, default=100.0,
                        help="tbf queue of a shaped link, in ms of traffic at its rate")
    parser.add_argument("--json", help="also write every link's raw figures to this file")
    parser.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown --methods {unknown}; choose from {', '.join(METHODS)}")
    if args.rank_worker:
        # Note: [rank shutdown] About one rank in ten aborted after its work was done
        # ("terminate called without an active exception", SIGABRT: a C++ thread still
        # joinable when the interpreter's finalizers destroyed it). Everything is written
        # and the group destroyed by now, so the rank leaves without finalizers.
        code = worker(args)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if args.quick:
        args.links, args.warmup, args.rounds, args.steps = "loopback", 1, 1, 1
        args.check_mb = 0.5
    return drive(args, print)


def drive(args: argparse.Namespace, emit: Callable[[str], None]) -> int:
    """Run every link of ``args.links`` and emit the tables and the goal line."""
    emit(device_line())
    links = [link for link in args.links.split(",") if link]
    if any(link != "loopback" for link in links):
        reason = _netns.unavailable()
        if reason is not None:
            emit(f"network namespaces unavailable ({reason}): running loopback only")
            links = ["loopback"]
    methods, note = _methods(args.methods)
    if note:
        emit(note)
    tables: dict[str, dict[str, Any]] = {}
    for link in links:
        start = time.perf_counter()
        tables[link] = run_link(link, args, methods)
        if link == links[0]:
            data = tables[link]
            emit(f"model: examples/gpt.py build(), {data['params'] / 1e6:.2f}M params, "
                 f"{data['grad_bytes'] / 1e6:.2f} MB fp32 gradients; {args.batch} rows/rank")
        emit("")
        for line in format_table(link, tables[link]):
            emit(line)
        emit(f"({time.perf_counter() - start:.0f} s)")
    emit("")
    emit(goal_line(tables))
    if args.json:
        Path(args.json).write_text(json.dumps(tables, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
