"""Multi-tensor tables and the per-tensor reduction between two-phase launches."""

from __future__ import annotations

import torch

from autoscale.kernels._triton_util import per_tensor_sum, tensor_table


def test_per_tensor_sum_adds_each_tensors_chunks_only() -> None:
    # Sizes: several chunks, exactly one chunk, empty, a partial chunk.
    tensors = [torch.randn(n) for n in (1000, 256, 0, 7, 513)]
    table = tensor_table([tensors], chunk=256)
    assert table.max_chunks == 4
    assert table.chunk_pos.tolist() == [0, 1, 2, 3, 0, 0, 0, 1, 2]
    # One row per chunk, as a phase-1 kernel writes them: the chunk's sum and its square.
    rows = []
    for t in tensors:
        for start in range(0, t.numel(), 256):
            part = t[start:start + 256]
            rows.append([part.sum(), part.square().sum()])
    partial = torch.tensor(rows, dtype=torch.float32)
    got = per_tensor_sum(table, partial)
    want = torch.tensor([[t.double().sum(), t.double().square().sum()] for t in tensors])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    assert got[2].tolist() == [0.0, 0.0]  # the empty tensor


def test_per_tensor_sum_of_no_chunks() -> None:
    table = tensor_table([[torch.zeros(0), torch.zeros(0)]], chunk=256)
    assert per_tensor_sum(table, torch.zeros(0, 2)).tolist() == [[0.0, 0.0], [0.0, 0.0]]
