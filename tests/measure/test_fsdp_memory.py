"""Per-rank CPU peak of an FSDP2 zero3 step (2 gloo ranks) against a hand count.

tests/distributed/memory_worker.py runs the step under torchrun and counts it by hand;
FSDP2 allocates and frees unsharded parameters with UntypedStorage.resize_, which the
dispatch ledger cannot see and the allocator tracker can.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parents[1] / "distributed" / "memory_worker.py"


def _run(tmp_path: Path, mode: str) -> dict:
    out = tmp_path / f"{mode}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKER), str(out), mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 ranks on 2 cores
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.distributed
def test_zero3_peak_per_rank_matches_the_hand_count(tmp_path: Path) -> None:
    got, ledger = _run(tmp_path, "allocator"), _run(tmp_path, "ledger")
    unit = got["P"]  # one block's unsharded weight, 1 MiB
    for rank, ledger_rank in zip(got["ranks"], ledger["ranks"], strict=True):
        hand = rank["hand"]
        peaks = [t["peak"] for t in rank["allocator"]]
        for t in rank["allocator"]:
            assert t["baseline"] == hand["baseline"]
        # Measured 20 B over the hand count: the loss and other 0-dim temporaries. In
        # about 1 tracked step of 6, gloo's worker thread releases an all-gather output
        # after the main thread let go, untraced; the tracker places its free where FSDP
        # let go of it (Note: [frees on untraced threads]). Before it did, that step read
        # one unit (1 MiB) over.
        for peak in [*peaks, rank["measure"]["peak"]]:
            assert 0 <= peak - hand["peak"] <= 64, (peaks, hand)
        # The ledger is off by three units here: it sees the unsharded weights when an op
        # reads them but not their resize_(0) after the block, so they stay "live".
        assert ledger_rank["ledger"]["peak"] - hand["peak"] >= 2 * unit
