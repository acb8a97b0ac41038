"""AdamW8bit's state through torch.distributed.checkpoint: saved at 2 FSDP2 ranks, loaded
at 2, 1 (unsharded, and FSDP2 on a 1-rank mesh) and 4 ranks, training on as if it had
never stopped (tests/distributed/dcp_worker.py under torchrun, gloo); and the state_dict
forms in this process.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from autoscale.optim import AdamW8bit

WORKER = Path(__file__).parent / "distributed" / "dcp_worker.py"


def _torchrun(out: Path, ranks: int, mode: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={ranks}", str(WORKER), str(out), mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the ranks share 2 cores
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    name = "save.json" if mode == "save" else f"load-{ranks}.json"
    return json.loads((out / name).read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("dcp")
    return out, _torchrun(out, 2, "save")


@pytest.mark.distributed
def test_fsdp2_state_is_saved_as_fp32_dtensors_and_reloads_exactly_at_2_ranks(saved) -> None:
    r = saved[1]
    assert r["moved"] > 0.01  # the params did train, so the equalities below mean something
    # torch AdamW's keys and layout: fp32 moments sharded like the param (DCP saves each
    # rank's shard and can re-shard them); the step counter a plain scalar.
    assert r["saved_keys"] == ["exp_avg", "exp_avg_sq", "step"]
    assert r["saved_types"] == ["DTensor", "Tensor"]
    # Same world size, same blocks: the codes, scales and counters come back bit for bit,
    # so the 3 steps after the load are those of the run that never stopped.
    assert r["state_exact"]
    assert r["vs_continued"] == 0.0


def _check_trains_on(r: dict) -> None:
    assert r["steps"] == [5]  # the 2 saved steps and the 3 after the load
    # Quantizing the checkpoint's moments into this world size's blocks re-rounds each
    # element to within half a level of its new block's map, at most 1/127 of the block's
    # largest moment (the signed map's top level, 2/127 wide): measured 6.0e-3 at 1 rank and
    # 5.6e-3 at 4, over the largest moment of each tensor.
    assert r["requant_error"] <= 1 / 127 + 1e-6
    # After 3 more steps, against the 2-rank run that never stopped (params moved 0.05):
    # measured 8.2e-4 at 1 rank and 9.5e-4 at 4 ranks, less than the 5 steps of a run at
    # that world size that never stopped differ from it (2.3e-3 and 1.5e-3: its blocks are
    # another world size's for all 5 steps). A wrong load (zeroed moments, one rank's shard
    # taken for every rank's) is off by about the move.
    assert r["vs_continued"] <= 3e-3
    assert r["never_stopped_vs_continued"] <= 5e-3


@pytest.fixture(scope="module")
def loaded_at_1(saved) -> dict:
    return _torchrun(saved[0], 1, "load")


@pytest.mark.distributed
@pytest.mark.parametrize("way", ["plain", "fsdp"])
def test_a_2_rank_checkpoint_loads_at_1_rank_and_trains_on(loaded_at_1: dict, way: str) -> None:
    _check_trains_on(loaded_at_1[way])


@pytest.mark.slow
@pytest.mark.distributed
def test_a_2_rank_checkpoint_loads_at_4_ranks_and_trains_on(saved) -> None:
    # 4 gloo ranks on 2 cores: ~10 s.
    out, _ = saved
    _check_trains_on(_torchrun(out, 4, "load")["fsdp"])


def _trained(**kwargs) -> tuple[nn.Module, AdamW8bit]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(37, 91), nn.Tanh(), nn.Linear(91, 5))
    opt = AdamW8bit(model.parameters(), lr=1e-2, block_size=64, min_8bit_size=64,
                    kernel="reference", **kwargs)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(8, 37)).square().mean().backward()
        opt.step()
    return model, opt


def test_fp32_moments_reload_into_the_same_codes_and_scales() -> None:
    model, opt = _trained(state_dict_moments="fp32")
    state = opt.state_dict()
    weight = state["state"][0]
    assert sorted(weight) == ["exp_avg", "exp_avg_sq", "step"]
    assert weight["exp_avg"].shape == model[0].weight.shape
    assert weight["exp_avg"].dtype == torch.float32
    assert "exp_avg_q" in opt.state[model[0].weight]  # the live state is still the codes
    fresh_model = copy.deepcopy(model)
    fresh = AdamW8bit(fresh_model.parameters(), lr=1e-2, block_size=64, min_8bit_size=64,
                      kernel="reference")
    fresh.load_state_dict(state)
    for p, q in zip(model.parameters(), fresh_model.parameters(), strict=True):
        assert opt.state[p].keys() == fresh.state[q].keys()
        for key, value in opt.state[p].items():
            assert torch.equal(value, fresh.state[q][key]), key
    # Unsharded params keep the compact codes by default; the choice survives a pickle.
    _, default = _trained()
    assert "exp_avg_q" in default.state_dict()["state"][0]
    assert pickle.loads(pickle.dumps(opt)).state_dict_moments == "fp32"


def test_codes_saved_for_another_shard_size_are_refused_naming_the_fix() -> None:
    _, opt = _trained(state_dict_moments="codes")
    state = opt.state_dict()  # first weight: 91 x 37 = 3367 elements, 53 blocks of 64
    # A shard of another size (as another world size cuts it): 60 x 37 = 2220, 35 blocks.
    other = nn.Sequential(nn.Linear(37, 60), nn.Tanh(), nn.Linear(60, 5))
    fresh = AdamW8bit(other.parameters(), block_size=64, min_8bit_size=64)
    with pytest.raises(ValueError, match=r"codes of 3392 elements were saved for a shard of "
                                         r"another size .* Save with state_dict_moments='fp32'"):
        fresh.load_state_dict(state)


def test_a_million_moments_dequantized_and_requantized_keep_their_codes_and_scales() -> None:
    from autoscale.optim._adamw8bit_state import _quantized, portable_state

    gen = torch.Generator().manual_seed(0)
    n, block = 1_000_003, 256  # a partial last block
    # Moments as Adam makes them, with magnitudes spread over 6 decades across elements.
    g = torch.randn(n, generator=gen) * 10 ** (3 * torch.rand(n, generator=gen) - 3)
    m = 0.1 * g + 0.01 * torch.randn(n, generator=gen) * g.abs()
    v = 1e-3 * g * g * (1 + torch.rand(n, generator=gen))
    v[5 * block:6 * block] = float("inf")  # a non-finite block: codes 0, NaN scales
    codes = dict(zip(("exp_avg_q", "exp_avg_scale", "exp_avg_sq_q", "exp_avg_sq_scale"),
                     _quantized(m, v, block), strict=True))
    fp32 = portable_state(codes, torch.empty(n), block)
    again = _quantized(fp32["exp_avg"], fp32["exp_avg_sq"], block)
    for (key, value), got in zip(codes.items(), again, strict=True):
        torch.testing.assert_close(got, value, rtol=0, atol=0, equal_nan=True, msg=key)
    assert codes["exp_avg_scale"][5].isnan() and not codes["exp_avg_scale"][4].isnan()
