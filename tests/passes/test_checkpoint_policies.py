"""Per-block checkpoint policies (none / full / selective) keep loss and gradients equal
to the untouched model's, on the GPT example and HuggingFace GPT-2, Llama and BERT."""

from __future__ import annotations

import copy
import json
from typing import Any, get_args

import pytest
import torch
from tests_helpers import grads_of, tiny_gpt

import autoscale
from autoscale import BlockPolicy, CheckpointPlan, Plan, PlanError
from autoscale.passes import checkpoint_blocks
from autoscale.passes.checkpoint import OP_KINDS
from autoscale.plan import OpKind

MATMULS_ATTENTION = ("mm", "addmm", "bmm", "sdpa")
_SAVE_SETS = {"matmuls+attention": MATMULS_ATTENTION, "matmuls": ("mm", "addmm"),
              "attention": ("bmm", "sdpa", "softmax"), "nothing": ()}


def _plan(blocks: list[str], policy: str, save: tuple[str, ...] = ()) -> CheckpointPlan:
    return CheckpointPlan.of({b: BlockPolicy(b, policy, save=save)  # type: ignore[arg-type]
                              for b in blocks})


def _hf(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor], list[str]]:
    """A tiny HF model from a config, dropout on, with its block FQNs."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 8))
    common: dict[str, Any] = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, use_cache=False, vocab_size=64)
    if name == "gpt2":
        config = tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=16, vocab_size=64,
                               use_cache=False, resid_pdrop=0.1, attn_pdrop=0.1, embd_pdrop=0.1)
        model, blocks = tf.GPT2LMHeadModel(config), ["transformer.h.0", "transformer.h.1"]
    elif name == "llama":
        config = tf.LlamaConfig(num_key_value_heads=1, attention_dropout=0.1, **common)
        model, blocks = tf.LlamaForCausalLM(config), ["model.layers.0", "model.layers.1"]
    else:
        config = tf.BertConfig(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                               **common)
        model, blocks = tf.BertForMaskedLM(config), ["bert.encoder.layer.0",
                                                     "bert.encoder.layer.1"]
    model.train()
    return model, {"input_ids": ids, "labels": ids}, blocks


def _loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    if isinstance(batch, dict):
        return model(**batch).loss
    return model(*batch)


def _check_equal(model: torch.nn.Module, batch: Any, plan: CheckpointPlan) -> None:
    rewritten = checkpoint_blocks(copy.deepcopy(model), plan=plan)
    torch.manual_seed(123)
    loss_ref = _loss(model, batch)
    loss_ref.backward()
    torch.manual_seed(123)
    loss = _loss(rewritten, batch)
    loss.backward()
    # The recompute runs the same kernels on the same inputs with the replayed RNG state,
    # and saved outputs are the forward's own tensors: equal to rounding, so tight bounds.
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    ref, got = grads_of(model), grads_of(rewritten)
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-7,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert model.state_dict().keys() == rewritten.state_dict().keys()
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("save", list(_SAVE_SETS.values()), ids=list(_SAVE_SETS))
def test_selective_gpt_equals_untouched_with_dropout(save: tuple[str, ...]) -> None:
    model, batch = tiny_gpt(dropout=0.2)
    _check_equal(model, batch, _plan(["h.0", "h.1", "h.2"], "selective", save))


def test_mixed_policies_gpt_equal_untouched() -> None:
    model, batch = tiny_gpt(dropout=0.2)
    plan = CheckpointPlan.of({"h.0": "full", "h.1": "none",
                              "h.2": BlockPolicy("h.2", "selective", save=("mm", "addmm"))})
    assert plan.names == ("h.0", "h.2")
    _check_equal(model, batch, plan)


@pytest.mark.parametrize("policy", [
    # none and full are the schema-1 behaviour (tests/passes/test_checkpoint.py covers full
    # on GPT); selective is the new path, so it alone runs by default.
    pytest.param("none", marks=pytest.mark.slow), pytest.param("full", marks=pytest.mark.slow),
    "selective"])
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_huggingface_models_equal_untouched(name: str, policy: str) -> None:
    model, batch, blocks = _hf(name)
    save = MATMULS_ATTENTION if policy == "selective" else ()
    _check_equal(model, batch, _plan(blocks, policy, save))


def _example(name: str) -> tuple[torch.nn.Module, Any, Any, list[str], tuple[str, ...]]:
    """An example model at a small batch: (model, batch, loss_fn, block FQNs, the op kinds
    a selective policy saves in its blocks)."""
    import importlib

    module = importlib.import_module(name)
    if name == "hf_gpt2":
        pytest.importorskip("transformers")
        model, batch = module.build(batch_size=2, block_size=32)
        return model, batch, None, [f"transformer.h.{i}" for i in range(4)], MATMULS_ATTENTION
    built = module.build(batch_size=4)
    model, batch, loss_fn = (*built, None)[:3]
    blocks, save = {"mlp": ("net.blocks", ("mm", "addmm")), "cnn": ("blocks", ("conv",)),
                    "gpt": ("h", MATMULS_ATTENTION)}[name]
    return model, batch, loss_fn, [f"{blocks}.{i}" for i in range(4)], save


@pytest.mark.parametrize("policy", ["full", "selective"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "gpt", "hf_gpt2"])
def test_every_example_model_keeps_loss_grads_and_buffers(name: str, policy: str) -> None:
    """Every block of every example checkpointed: loss, gradients and buffers (the CNN's
    BatchNorm running statistics, Note: [a recompute does not count a batch twice]) equal
    the untouched model's after two training steps' forward and backward."""
    model, batch, loss_fn, blocks, save = _example(name)
    model.train()
    rewritten = checkpoint_blocks(copy.deepcopy(model),
                                  plan=_plan(blocks, policy, save if policy == "selective"
                                             else ()))
    for step in range(2):
        losses = []
        for m in (model, rewritten):
            torch.manual_seed(step)
            out = m(**batch) if isinstance(batch, dict) else m(*batch)
            loss = (out.loss if hasattr(out, "loss") else
                    loss_fn(out, batch) if loss_fn is not None else out)
            loss.backward()
            losses.append(loss)
        torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    ref, got = grads_of(model), grads_of(rewritten)
    assert ref.keys() == got.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-6, atol=1e-7,
                                   msg=lambda m, key=key: f"{key}: {m}")
    ref_buffers, got_buffers = dict(model.named_buffers()), dict(rewritten.named_buffers())
    assert ref_buffers.keys() == got_buffers.keys()
    for key, buffer in ref_buffers.items():
        torch.testing.assert_close(got_buffers[key], buffer, rtol=0, atol=0,
                                   msg=lambda m, key=key: f"{key}: {m}")
    assert model.state_dict().keys() == rewritten.state_dict().keys()


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_a_recompute_leaves_cumulative_norm_statistics_alone(policy: str) -> None:
    # momentum=None (a cumulative average over num_batches_tracked) and an InstanceNorm
    # tracking statistics: after two steps the same buffers as the untouched model's.
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(
        torch.nn.Conv1d(4, 4, 3, padding=1), torch.nn.BatchNorm1d(4, momentum=None),
        torch.nn.InstanceNorm1d(4, track_running_stats=True), torch.nn.ReLU())
        for _ in range(2)])
    rewritten = checkpoint_blocks(copy.deepcopy(model),
                                  plan=_plan(["0", "1"], policy,
                                             ("conv",) if policy == "selective" else ()))
    for step in range(2):
        x = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(step))
        for m in (model, rewritten):
            m(x).square().mean().backward()
    for key, buffer in model.named_buffers():
        torch.testing.assert_close(dict(rewritten.named_buffers())[key], buffer, rtol=0,
                                   atol=0, msg=lambda m, key=key: f"{key}: {m}")
    assert int(dict(rewritten.named_buffers())["0.1.num_batches_tracked"]) == 2


def test_selective_composes_with_autocast() -> None:
    # The precision pass enters autocast around the root forward; the recompute in
    # backward must run under the same autocast state as the forward did.
    model, batch = tiny_gpt(dropout=0.2)
    rewritten = checkpoint_blocks(copy.deepcopy(model),
                                  plan=_plan(["h.0", "h.1", "h.2"], "selective", ("mm",)))
    losses = []
    for m in (model, rewritten):
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(*batch)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    for name, ref in grads_of(model).items():
        torch.testing.assert_close(grads_of(rewritten)[name], ref, rtol=1e-5, atol=1e-6)


def test_selective_keeps_fewer_bytes_than_none_more_than_full() -> None:
    # autoscale.estimate runs the real pass on fake tensors with the measurement's own
    # storage ledger (byte-exact against the allocator on this model).
    model, batch = tiny_gpt(dropout=0.1)
    graph = autoscale.capture(model, batch)
    blocks = [b.fqn for b in graph.blocks]

    def activations(section: CheckpointPlan) -> int:
        plan = Plan(sections={"checkpoint": section})
        return autoscale.estimate(model, batch, plan, graph=graph).activations

    none, full = activations(CheckpointPlan()), activations(_plan(blocks, "full"))
    selective = {k: activations(_plan(blocks, "selective", s)) for k, s in _SAVE_SETS.items()
                 if s}
    assert all(full < kept < none for kept in selective.values()), (none, full, selective)
    # More kinds saved never keeps fewer bytes.
    assert selective["matmuls"] <= selective["matmuls+attention"]


def test_graph_estimate_orders_policies() -> None:
    from autoscale.cost._cost import estimate_graph

    model, batch = tiny_gpt()
    graph = autoscale.capture(model, batch)
    blocks = [b.fqn for b in graph.blocks]

    def activations(section: CheckpointPlan) -> int:
        return estimate_graph(model, graph, Plan(sections={"checkpoint": section})).activations

    none, full = activations(CheckpointPlan()), activations(_plan(blocks, "full"))
    assert full < activations(_plan(blocks, "selective", ("mm", "addmm"))) < none


def test_old_blocks_only_plan_json_loads_and_builds_the_same_model() -> None:
    model, batch = tiny_gpt(dropout=0.2)
    text = Plan(sections={"checkpoint": CheckpointPlan(blocks=("h.0", "h.2"))}).to_json()
    data = json.loads(text)
    assert data["sections"]["checkpoint"] == {"blocks": ["h.0", "h.2"]}  # schema-1 form
    loaded = Plan.from_json(text)
    assert loaded.to_json() == text
    assert dict(loaded.checkpoint.policies) == {"h.0": BlockPolicy("h.0", "full"),
                                                "h.2": BlockPolicy("h.2", "full")}
    # An explicit full policy is the same plan, not merely an equivalent one.
    assert loaded.checkpoint == CheckpointPlan.of({"h.0": "full", "h.1": "none",
                                                   "h.2": "full"})
    _check_equal(model, batch, loaded.checkpoint)


def test_policies_round_trip_through_json_with_the_same_digest() -> None:
    section = CheckpointPlan(blocks=("h.0", BlockPolicy("h.1", "selective", save=("mm", "sdpa"))))
    plan = Plan(sections={"checkpoint": section})
    loaded = Plan.from_json(plan.to_json())
    assert loaded == plan and loaded.digest() == plan.digest()
    assert loaded.checkpoint.policy("h.1").save == ("mm", "sdpa")
    assert loaded.checkpoint.policy("h.9").policy == "none"


@pytest.mark.parametrize(("entry", "message"), [
    ({"fqn": "h.0", "policy": "selective", "save": ["matmul"]},
     r"save\[0\]='matmul' is not one of \['mm'"),
    ({"fqn": "h.0", "policy": "full", "save": ["mm"]}, "save is for policy 'selective' only"),
    ({"fqn": "h.0", "policy": "partial"}, r"policy='partial' is not one of"),
    ({"fqn": "h.0", "keep": ["mm"]}, r"unknown key\(s\) \['keep'\]"),
])
def test_bad_policy_in_json_is_refused_naming_the_value(entry: dict[str, Any],
                                                        message: str) -> None:
    data = json.loads(Plan().to_json())
    data["sections"]["checkpoint"] = {"blocks": [entry]}
    with pytest.raises(PlanError, match=message):
        Plan.from_dict(data)


def test_bad_policy_in_python_is_refused() -> None:
    with pytest.raises(PlanError, match=r"unknown op kind\(s\) \['linear'\]; known: \['mm'"):
        BlockPolicy("h.0", "selective", save=("linear",))  # type: ignore[arg-type]
    with pytest.raises(PlanError, match="lists a block twice"):
        CheckpointPlan(blocks=("h.0", BlockPolicy("h.0", "selective", save=("mm",))))
    with pytest.raises(PlanError, match="must agree"):
        CheckpointPlan.of({"h.0": BlockPolicy("h.1", "full")})


def test_op_kinds_name_aten_packets_and_match_the_plan() -> None:
    assert set(OP_KINDS) == set(get_args(OpKind))
    assert all(packets for packets in OP_KINDS.values())  # every kind resolves in this torch


@pytest.mark.distributed
def test_mixed_policies_compose_with_ddp_and_fsdp2(tmp_path) -> None:
    # 2 gloo ranks, each on its half of the batch, against plain torch on all of it: the
    # same losses and, after 3 SGD steps, the same parameters (gathered under FSDP2).
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[2]
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node=2", str(root / "tests/distributed/checkpoint_policies_worker.py"),
           str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the ranks share 2 cores
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert sorted(results) == ["ddp", "zero2", "zero3"]
    for case, r in results.items():
        # fp32 sums over two half-batches instead of one batch: a few ulps of the loss
        # (~4.6 here); the params moved ~0.29, so 1e-6 is 5 orders below the change.
        assert r["loss_diff"] < 1e-5 and r["param_diff"] < 1e-6 < r["moved"], (case, r)


def test_selective_peak_estimate_equals_the_measured_peak() -> None:
    # The ledger the estimate simulates with is the one measure() counts real storages
    # with; selective checkpointing's cached outputs are storages like any other.
    from autoscale.runtime import build_result

    model, batch = tiny_gpt(dropout=0.1)
    graph = autoscale.capture(model, batch)
    plan = Plan(sections={"checkpoint": CheckpointPlan.of({
        "h.0": "full", "h.1": BlockPolicy("h.1", "selective", save=("mm", "addmm"))})})
    result = build_result(plan, model)
    measured = autoscale.measure(result.step, batch, model=result.model,
                                 optimizer=result.optimizer, warmup=1, iters=1)
    assert measured.peak_memory_bytes == autoscale.estimate(model, batch, plan,
                                                            graph=graph).peak_bytes
