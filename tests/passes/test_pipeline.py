"""The pass contract: PIPELINE entries keep it, the runtime applies them in order, and
each reports its memory contribution to the cost model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import autoscale.runtime._result as runtime
from autoscale import (
    CheckpointPlan,
    CompilePlan,
    CompressPlan,
    Plan,
    PrecisionPlan,
    ShardPlan,
    capture,
)
from autoscale.cost._cost import estimate_graph
from autoscale.passes import PIPELINE, MemoryTerms, Pass, PassContext
from autoscale.plan._plan import _SECTIONS


def test_every_pipeline_entry_keeps_the_contract() -> None:
    sections = [p.section for p in PIPELINE]
    assert len(set(sections)) == len(sections), "one pass per plan section"
    for rewrite in PIPELINE:
        assert isinstance(rewrite, Pass), type(rewrite).__name__
        assert rewrite.section in _SECTIONS, f"{rewrite.section} is not a plan section"
        assert rewrite.invariant.strip(), f"{type(rewrite).__name__} states no invariant"
        # The section's defaults mean "switched off": an old plan file runs unchanged.
        assert not rewrite.enabled(_SECTIONS[rewrite.section]())


class _Recording:
    """A pass appended to the pipeline that records what the runtime hands it."""

    section = "precision"
    invariant = "records only"

    def __init__(self, calls: list) -> None:
        self.calls = calls

    def enabled(self, section) -> bool:
        return True

    def apply(self, model, section, ctx):
        self.calls.append((model, section, ctx))
        return model

    def memory(self, section, graph, terms):
        return terms


def test_runtime_applies_the_declared_passes_in_order(monkeypatch) -> None:
    from tests_helpers import tiny_gpt

    model, (x, y) = tiny_gpt(dropout=0.0)
    graph = capture(model, (x, y))
    order: list[str] = []
    calls: list = []

    def tracing(rewrite):
        class Traced:
            section, invariant = rewrite.section, rewrite.invariant
            enabled = staticmethod(rewrite.enabled)
            memory = staticmethod(rewrite.memory)

            @staticmethod
            def apply(m, section, ctx):
                order.append(rewrite.section)
                return rewrite.apply(m, section, ctx)
        return Traced()

    monkeypatch.setattr(runtime, "PIPELINE",
                        (*map(tracing, PIPELINE), _Recording(calls)))
    plan = Plan(sections={"checkpoint": CheckpointPlan(blocks=("h.0",)),
                          "precision": PrecisionPlan(mode="bf16")})
    result = runtime.build_result(plan, model, graph=graph)
    assert order == ["checkpoint", "precision"]
    (seen_model, section, ctx), = calls
    assert seen_model is result.model and seen_model is not model  # the runtime's copy
    assert section == plan.precision
    assert isinstance(ctx, PassContext) and ctx.graph is graph
    assert ctx.device == torch.device("cpu") and ctx.process_group is None
    result.step((x, y))  # the rewritten copy trains


def test_passes_switched_off_are_skipped(monkeypatch) -> None:
    from tests_helpers import tiny_gpt

    model, _ = tiny_gpt(dropout=0.0)
    applied: list[str] = []

    class Spy:
        section, invariant = "checkpoint", "spy"

        def enabled(self, section):
            return bool(section.blocks)

        def apply(self, m, section, ctx):
            applied.append("checkpoint")
            return m

        def memory(self, section, graph, terms):
            return terms

    monkeypatch.setattr(runtime, "PIPELINE", (Spy(),))
    runtime.build_result(Plan(), model)
    assert applied == []


@pytest.mark.parametrize("rewrite", PIPELINE, ids=lambda p: p.section)
def test_each_pass_reports_memory_on_the_terms(rewrite) -> None:
    from tests_helpers import tiny_gpt

    model, batch = tiny_gpt(dropout=0.0)
    graph = capture(model, batch)
    terms = MemoryTerms(parameters=10_000, gradients=10_000, optimizer_state=20_000,
                        saved={b.fqn: b.activation_bytes for b in graph.blocks},
                        outside=1000, activation_factor=1.0, temporaries=500)
    off = rewrite.memory(_SECTIONS[rewrite.section](), graph, terms)
    assert off == terms, "a switched-off pass changes nothing"
    on = {"checkpoint": CheckpointPlan(blocks=tuple(b.fqn for b in graph.blocks)),
          "precision": PrecisionPlan(mode="bf16"),
          "shard": ShardPlan(strategy="zero3", world_size=2),
          "compress": CompressPlan(method="int8"),
          "compile": CompilePlan(mode="inductor")}[rewrite.section]
    after = rewrite.memory(on, graph, terms)
    if rewrite.section == "compile":
        # Reported as eager's: inductor's partitioner keeps at most what eager keeps.
        assert after == terms
        return
    if rewrite.section == "compress":
        # Error feedback keeps an fp32 residual of the gradient, and the packed send
        # buffers are temporaries; the forward is untouched.
        assert after.gradients > terms.gradients
        assert after.temporaries > terms.temporaries
        assert after.activations == terms.activations
        return
    if rewrite.section == "shard":
        # Sharding divides static memory across ranks; activations stay per rank.
        assert after.gradients < terms.gradients
        assert after.optimizer_state < terms.optimizer_state
        assert after.activations == terms.activations
        return
    # These passes exist to save activation memory; neither touches static memory.
    assert after.activations < terms.activations
    assert (after.parameters, after.gradients, after.optimizer_state) == (
        terms.parameters, terms.gradients, terms.optimizer_state)


def test_estimate_is_the_pipeline_sum() -> None:
    from tests_helpers import tiny_gpt

    model, batch = tiny_gpt(dropout=0.0)
    graph = capture(model, batch)
    every = tuple(b.fqn for b in graph.blocks)
    plan = Plan(sections={"checkpoint": CheckpointPlan(blocks=every),
                          "precision": PrecisionPlan(mode="bf16")})
    est = estimate_graph(model, graph, plan)
    plain = estimate_graph(model, graph, Plan())
    only_ckpt = estimate_graph(model, graph, dataclasses.replace(plan).replace(
        precision=PrecisionPlan()))
    assert est.total < only_ckpt.total < plain.total
    biggest = max(b.activation_bytes for b in graph.blocks)
    outside = graph.activation_bytes - sum(b.activation_bytes for b in graph.blocks)
    rng = torch.get_rng_state().numel()  # each checkpointed block keeps it for its replay
    kept = outside + sum(b.input_bytes + rng for b in graph.blocks) + biggest
    assert only_ckpt.activations == kept
