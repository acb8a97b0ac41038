"""Note: [decode on the autograd thread] in passes/compress.py: a compressed DDP hook's
decode runs where the CPU measurement sees its allocations."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_EXTRA = 16 * 2**20  # bytes the patched decode allocates and frees


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(rank: int, port: int, out: str) -> None:
    import autoscale.passes.compress as compress
    from autoscale import CompressPlan, Plan, ShardPlan
    from autoscale.measure._allocator import AllocatorPeakTracker
    from autoscale.runtime import build_result

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    threads: list[bool] = []
    extra = {"on": False}
    decode = compress._Int8.decode_sum

    def watched(self, packed, n):  # the real decode, watched
        threads.append(threading.current_thread() is threading.main_thread())
        if extra["on"]:
            scratch = torch.ones(_EXTRA // 4)
            del scratch
        return decode(self, packed, n)

    compress._Int8.decode_sum = watched
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    plan = Plan(sections={"shard": ShardPlan(strategy="ddp", world_size=2),
                          "compress": CompressPlan(method="int8")})
    result = build_result(plan, model, loss_fn=lambda out, batch: out.square().mean())
    batch = (torch.randn(8, 64),)
    result.step(batch)
    peaks = []
    for on in (False, True):
        extra["on"] = on
        with AllocatorPeakTracker(roots=(result.model, result.optimizer, batch)) as tracker:
            result.step(batch)
        peaks.append(tracker.peak_bytes)
    if rank == 0:
        Path(out).write_text(json.dumps({"main": threads, "peaks": peaks}))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_the_int8_decode_runs_where_the_measurement_sees_it(tmp_path) -> None:
    out = tmp_path / "out.json"
    mp.spawn(_rank, args=(_free_port(), str(out)), nprocs=2)
    got = json.loads(out.read_text())
    assert got["main"] and all(got["main"]), got  # decoded on the thread running backward
    # A tensor made inside the decode moves the measured peak by about its size (less what
    # the step's peak elsewhere held above the decode's moment): the decode's own working
    # memory is measured too. Made on gloo's callback thread, it moved it by 0.
    assert got["peaks"][1] - got["peaks"][0] > 0.9 * _EXTRA, got
