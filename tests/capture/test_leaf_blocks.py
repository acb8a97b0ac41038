"""Blocks made of torch.nn's own layers, which symbolic_trace keeps whole, are still blocks.

torch.fx.symbolic_trace treats every torch.nn class as a leaf: nn.TransformerEncoder is one
node with its layers hidden inside, an nn.TransformerEncoderLayer in an nn.Sequential is one
node, nn.MultiheadAttention's internals are not nodes. Each repeated layer must still be a
block with its real figures, the same whichever strategy captured it, and checkpointing
those blocks must keep loss and grads.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tests_helpers import grads_of
from torch import nn

from autoscale import CheckpointPlan
from autoscale.capture import _capture as capture_module
from autoscale.capture import capture
from autoscale.passes import checkpoint_blocks

B, T, S, D, HEADS, FF = 2, 8, 6, 32, 2, 64  # batch, target len, memory len, width, heads, ff
F32 = 4  # bytes per float32 element


def _attention_flops(t: int, s: int) -> int:
    """nn.MultiheadAttention on (B, t, D) queries and (B, s, D) keys: projections + sdpa."""
    return (2 * B * t * D * D  # q projection
            + 2 * B * s * D * 2 * D  # k and v projections
            + 4 * B * t * s * D  # Q @ K^T and @ V over all heads
            + 2 * B * t * D * D)  # out projection


_FF_FLOPS = 2 * 2 * B * T * D * FF  # linear1 + linear2
_ENCODER_LAYER_FLOPS = _attention_flops(T, T) + _FF_FLOPS
_DECODER_LAYER_FLOPS = _attention_flops(T, T) + _attention_flops(T, S) + _FF_FLOPS


def _encoder_layer() -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True)


class _Encoder(nn.Module):
    """nn.TransformerEncoder: one leaf node to symbolic_trace, its layers hidden inside."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoder(_encoder_layer(), num_layers=4,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.head(self.encoder(x)).squeeze(-1), y)


class _Sequential(nn.Module):
    """An nn.Sequential of nn.TransformerEncoderLayer: each block is one leaf node."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[_encoder_layer() for _ in range(3)])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.layers(x).mean(-1), y)


class _Decoder(nn.Module):
    """nn.TransformerDecoderLayer blocks, each one leaf node reading x and the memory."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True)
            for _ in range(2))

    def forward(self, x: torch.Tensor, memory: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, memory)
        return F.mse_loss(x.mean(-1), y)


class _AttentionBlock(nn.Module):
    """A custom block around a leaf nn.MultiheadAttention: the graph sees only part of it."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.norm = nn.LayerNorm(D)
        self.fc = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return x + self.fc(a)


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_AttentionBlock() for _ in range(3))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return F.mse_loss(x.mean(-1), y)


def _gpt2() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    tf = pytest.importorskip("transformers")
    config = tf.GPT2Config(vocab_size=64, n_positions=16, n_embd=D, n_layer=2, n_head=HEADS,
                           use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                           bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, 64, (B, T))
    return tf.GPT2LMHeadModel(config), {"input_ids": ids, "labels": ids}


_GPT2_BLOCK_FLOPS = (2 * B * T * D * 3 * D + 4 * B * T * T * D + 2 * B * T * D * D
                     + 2 * 2 * B * T * D * 4 * D)  # c_attn, attention, c_proj, 4x MLP

# name: (build, strategy, block fqns, forward FLOPs per block, input bytes per block: the
# hidden states, plus the memory for a decoder; HF blocks also read position ids and a mask,
# which vary with the transformers version, so for them it is a lower bound)
_CASES: dict[str, tuple[Callable[[], Any], str, list[str], int, int]] = {
    "transformer_encoder": (
        lambda: (_Encoder(), (torch.randn(B, T, D), torch.randn(B, T))), "symbolic_trace",
        [f"encoder.layers.{i}" for i in range(4)], _ENCODER_LAYER_FLOPS, B * T * D * F32),
    "sequential_encoder_layers": (
        lambda: (_Sequential(), (torch.randn(B, T, D), torch.randn(B, T))), "symbolic_trace",
        [f"layers.{i}" for i in range(3)], _ENCODER_LAYER_FLOPS, B * T * D * F32),
    "decoder_layers": (
        lambda: (_Decoder(), (torch.randn(B, T, D), torch.randn(B, S, D), torch.randn(B, T))),
        "symbolic_trace", ["layers.0", "layers.1"], _DECODER_LAYER_FLOPS,
        B * (T + S) * D * F32),  # x and the memory
    "custom_multihead_attention": (
        lambda: (_Custom(), (torch.randn(B, T, D), torch.randn(B, T))), "symbolic_trace",
        [f"blocks.{i}" for i in range(3)], _attention_flops(T, T) + 2 * B * T * D * D,
        B * T * D * F32),
    "hf_gpt2": (_gpt2, "export", ["transformer.h.0", "transformer.h.1"], _GPT2_BLOCK_FLOPS,
                B * T * D * F32),
}


def _loss(model: nn.Module, inputs: Any) -> torch.Tensor:
    if isinstance(inputs, dict):
        return model(**inputs).loss
    return model(*inputs)


@pytest.mark.parametrize("name", list(_CASES))
def test_repeated_layers_are_blocks(name: str) -> None:
    build, strategy, fqns, flops, input_bytes = _CASES[name]
    model, inputs = build()
    graph = capture(model, inputs)
    figures = {b.fqn: (b.activation_bytes, b.input_bytes, b.flops) for b in graph.blocks}
    print(name, graph.strategy, figures)
    assert graph.strategy == strategy
    assert [b.fqn for b in graph.blocks] == fqns
    for block in graph.blocks:
        assert block.flops == flops, block.fqn  # every matmul, attention included
        if name.startswith("hf_"):
            assert input_bytes <= block.input_bytes < 2 * input_bytes, block.fqn
        else:
            assert block.input_bytes == input_bytes, block.fqn
        # A layer allocates far more than its input (q, k, v, attention, ff hidden).
        assert block.activation_bytes > 4 * block.input_bytes, block.fqn
        assert block.param_bytes == sum(p.numel() * p.element_size() for p in
                                        model.get_submodule(block.fqn).parameters())
    assert graph.activation_bytes > sum(b.activation_bytes for b in graph.blocks)
    assert graph.flops >= sum(b.flops for b in graph.blocks)


@pytest.mark.parametrize("name", list(_CASES))
def test_checkpointing_the_captured_blocks_keeps_loss_and_grads(name: str) -> None:
    build, *_ = _CASES[name]
    model, inputs = build()
    fqns = tuple(b.fqn for b in capture(model, inputs).blocks)
    assert fqns
    rewritten = checkpoint_blocks(copy.deepcopy(model), plan=CheckpointPlan(blocks=fqns))

    def saved_bytes(m: nn.Module) -> tuple[torch.Tensor, int]:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = _loss(m, inputs)
        loss.backward()
        return loss, total

    loss_ref, saved_ref = saved_bytes(model)
    loss, saved = saved_bytes(rewritten)
    print(name, fqns, f"saved {saved} bytes vs {saved_ref}")
    # Dropout is 0 and the recompute runs the same CPU kernels on the same inputs: the loss
    # is bit-equal; grads may differ by float reassociation in accumulation only.
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    grads, grads_ref = grads_of(rewritten), grads_of(model)
    assert grads.keys() == grads_ref.keys() and grads
    for key, ref in grads_ref.items():
        torch.testing.assert_close(grads[key], ref, rtol=1e-6, atol=1e-7,
                                   msg=lambda m, key=key: f"{key}: {m}")
    # The blocks hold nearly all activations: recomputing every one of them keeps < 11% here
    # (inputs and outputs only); one block left uncheckpointed keeps > 25%.
    assert saved < 0.2 * saved_ref


def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("strategy turned off by the test")


@pytest.mark.parametrize("name", ["custom_multihead_attention", "decoder_layers"])
def test_block_figures_are_the_same_for_every_strategy(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One model captured by symbolic_trace, export and blocks: the same blocks and totals.

    Tolerance 0: the figures come from one fake eager run whatever the strategy (Note:
    [one source for block figures]); the graphs alone differ (symbolic_trace sees none of
    nn.MultiheadAttention's internals, export sees them as aten ops).
    """
    build, *_ = _CASES[name]
    model, inputs = build()
    graphs = {"symbolic_trace": capture(model, inputs)}
    monkeypatch.setattr(capture_module, "_by_symbolic_trace", _refuse)
    graphs["export"] = capture(model, inputs)
    monkeypatch.setattr(capture_module, "_by_export", _refuse)
    graphs["blocks"] = capture(model, inputs)
    for strategy, graph in graphs.items():
        print(strategy, [(b.fqn, b.activation_bytes, b.input_bytes, b.flops)
                         for b in graph.blocks], graph.activation_bytes, graph.flops)
        assert graph.strategy == strategy
    first = graphs["symbolic_trace"]
    for graph in graphs.values():
        assert graph.blocks == first.blocks
        assert (graph.activation_bytes, graph.flops) == (first.activation_bytes, first.flops)


class _NormBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(self.norm(x))


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_NormBlock() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("strategy", ["symbolic_trace", "export"])
def test_graph_figures_without_a_fake_run(strategy: str) -> None:
    """Where the fake run cannot finish, figures come from the graph's nodes.

    On blocks whose ops are all nodes (Linear, LayerNorm, add), they match the run's: FLOPs
    and input bytes exactly, bytes short only by what LayerNorm keeps for backward and no
    node shows (its mean and rstd, (B, 1) float32 each).
    """
    model, x = _Stack(), torch.randn(B, D)
    args: tuple[Any, ...] = (x,)
    blocks = capture_module.find_blocks(model)
    tracer = {"symbolic_trace": capture_module._by_symbolic_trace,
              "export": capture_module._by_export}[strategy]
    run = capture_module._check_run(model, args, {}, blocks)
    failed = capture_module._Run(run.recorder, run.blocks, run.mode, error="test")
    gm, stats = tracer(model, args, {})
    by_graph = capture_module._from_graph(model, gm, stats, strategy, {}, blocks, failed,
                                          args, {})
    by_run = capture_module._from_graph(model, gm, stats, strategy, {}, blocks, run, args, {})
    print(strategy, by_graph.blocks, by_run.blocks)
    assert [b.fqn for b in by_graph.blocks] == [b.fqn for b in by_run.blocks] == ["layers.0",
                                                                                  "layers.1"]
    for graph_block, run_block in zip(by_graph.blocks, by_run.blocks, strict=True):
        assert graph_block.flops == run_block.flops == 2 * B * D * D
        assert graph_block.input_bytes == run_block.input_bytes == B * D * F32
        assert run_block.activation_bytes - graph_block.activation_bytes == 2 * B * F32
    assert by_graph.activation_bytes == sum(m.bytes for m in by_graph.nodes.values())
