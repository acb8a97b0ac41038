"""Tests for autoscale.capture: strategies, metadata, blocks, model untouched, errors."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from autoscale.capture._capture import capture, find_blocks
from autoscale.capture._fake import fake_mode, is_data_dependent
from autoscale.errors import CaptureError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str, **kwargs):
    """(model, inputs) from examples/<name>.py's build()."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    out = importlib.import_module(name).build(**kwargs)
    return out[0], out[1]


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "ids": {k: id(v) for k, v in model.named_parameters()},
        "requires_grad": {k: v.requires_grad for k, v in model.named_parameters()},
        "training": [m.training for m in model.modules()],
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["ids"] == before["ids"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        torch.testing.assert_close(after["state"][k], v, rtol=0, atol=0)  # bit-exact
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, type(m).__name__


def test_fake_adapter() -> None:
    """Fails loudly if torch moves the private FakeTensor API that _flops wraps."""
    mode = fake_mode()
    x = mode.from_tensor(torch.ones(2, 3))
    with mode:
        y = x @ x.T
    assert type(y).__name__ == "FakeTensor" and y.shape == (2, 2)
    with pytest.raises(Exception) as info, mode:
        bool(x.sum() > 0)
    assert is_data_dependent(info.value)


@pytest.mark.parametrize(("name", "fqns"), [
    ("mlp", [f"net.blocks.{i}" for i in range(4)]),
    ("cnn", [f"blocks.{i}" for i in range(4)]),
    ("gpt", [f"h.{i}" for i in range(4)]),
])
def test_examples_symbolic_trace(name: str, fqns: list[str]) -> None:
    model, inputs = _example(name)
    graph = capture(model, inputs)
    assert graph.strategy == "symbolic_trace" and dict(graph.failures) == {}
    assert [b.fqn for b in graph.blocks] == fqns
    assert graph.param_bytes == _param_bytes(model)
    assert graph.batch_size == inputs[0].shape[0]
    # Every block is the same: same metrics; together they are part of the total.
    assert len({(b.activation_bytes, b.flops, b.input_bytes) for b in graph.blocks}) == 1
    assert 0 < sum(b.activation_bytes for b in graph.blocks) < graph.activation_bytes
    assert graph.blocks[0].input_bytes == inputs[0].shape[0] * _features(model, name) * 4
    assert graph.nodes and all(m.bytes <= m.output_bytes for m in graph.nodes.values())


def _features(model: nn.Module, name: str) -> int:
    """Elements per sample of a block's input activation, for a float32 batch."""
    return {"mlp": 256, "cnn": 32 * 32 * 32, "gpt": 64 * 128}[name]


def test_linear_flops_and_bytes() -> None:
    """A Linear's node: 2*B*in*out FLOPs and B*out*4 new bytes; a view allocates nothing."""
    model, (x, y) = _example("mlp")
    graph = capture(model, (x, y))
    stem = graph.nodes["net_stem"]
    assert stem.flops == 2 * 64 * 64 * 256
    assert stem.shapes == ((64, 256),) and stem.dtypes == ("float32",)
    assert stem.bytes == 64 * 256 * 4 and stem.module == "net.stem" and stem.block is None
    assert graph.blocks[0].flops == 2 * (2 * 64 * 256 * 1024)  # fc1 + fc2
    assert graph.blocks[0].param_bytes == _param_bytes(model.net.blocks[0])
    views = [m for m in capture(*_example("gpt")).nodes.values()
             if m.target in ("view", "transpose")]
    assert views and all(m.bytes == 0 for m in views)


def test_structure_hash_ignores_batch_values() -> None:
    model, (x, y) = _example("mlp", batch_size=8)
    first = capture(model, (x, y)).structure_hash()
    assert capture(model, (x[:4] + 1, y[:4])).structure_hash() == first
    other, inputs = _example("cnn", batch_size=2)
    assert capture(other, inputs).structure_hash() != first


def _tiny_hf(name: str):
    """(model, inputs, expected block fqns) for a tiny HF model built from a config."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 8))
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, use_cache=False)
    if name == "gpt2":
        model, inputs = _example("hf_gpt2", batch_size=2, block_size=16)
        return model, inputs, ["transformer.h.0", "transformer.h.1", "transformer.h.2",
                               "transformer.h.3"]
    if name == "bert":
        model = tf.BertForMaskedLM(tf.BertConfig(vocab_size=64, **common))
        return model, {"input_ids": ids, "labels": ids}, [
            "bert.encoder.layer.0", "bert.encoder.layer.1"]
    if name == "vit":
        config = tf.ViTConfig(image_size=16, patch_size=8, num_labels=3, **common)
        inputs = {"pixel_values": torch.randn(2, 3, 16, 16), "labels": torch.tensor([0, 2])}
        return tf.ViTForImageClassification(config), inputs, [
            "vit.layers.0", "vit.layers.1"]  # transformers v5 names (v4: vit.encoder.layer.N)
    if name == "llama":
        config = tf.LlamaConfig(vocab_size=64, num_key_value_heads=1, **common)
        return tf.LlamaForCausalLM(config), {"input_ids": ids, "labels": ids}, [
            "model.layers.0", "model.layers.1"]
    config = tf.T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                         num_heads=2, use_cache=False, decoder_start_token_id=0)
    return tf.T5ForConditionalGeneration(config), {"input_ids": ids, "labels": ids}, [
        "encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"]


@pytest.mark.parametrize("name", ["gpt2", "bert", "vit", "llama", "t5"])
def test_huggingface_export(name: str) -> None:
    model, inputs, fqns = _tiny_hf(name)
    model.train()
    before = _snapshot(model)
    with _RealCompute() as seen:
        graph = capture(model, inputs)
    assert seen.real == [] and seen.fake > 0  # every matmul ran on fake or meta tensors
    assert graph.strategy == "export"
    assert graph.failures.get("symbolic_trace")
    assert [b.fqn for b in graph.blocks] == fqns
    assert all(model.get_submodule(b.fqn) is not None for b in graph.blocks)
    assert graph.param_bytes == _param_bytes(model)
    assert all(b.flops > 0 and b.input_bytes > 0 and b.activation_bytes > b.input_bytes
               for b in graph.blocks)
    assert sum(b.activation_bytes for b in graph.blocks) < graph.activation_bytes
    assert graph.batch_size == 2
    _assert_unchanged(model, before)


class _RealCompute(TorchDispatchMode):
    """Records each FLOP-counted op (matmul, conv, attention) by the tensors it ran on.

    Pushed outside capture, it sees the ops FakeTensorMode runs on meta tensors and any op
    on real tensors: ``real`` lists the latter, which capture must never run.
    """

    def __init__(self) -> None:
        super().__init__()
        self.real: list[str] = []
        self.fake = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in flop_registry:
            tensors = [t for t in pytree.tree_leaves((args, kwargs))
                       if isinstance(t, torch.Tensor)]
            if any(t.device.type != "meta" and type(t).__name__ != "FakeTensor"
                   for t in tensors):
                self.real.append(str(func))
            else:
                self.fake += 1
        return func(*args, **kwargs)


def test_real_compute_is_seen() -> None:
    """_RealCompute tells a real forward from a capture: the check above can fail."""
    model, inputs, _ = _tiny_hf("gpt2")
    with _RealCompute() as seen:
        model(**inputs)
    assert seen.real and seen.fake == 0


def test_model_unchanged_batchnorm_train_mode() -> None:
    """BatchNorm in train mode: running stats and num_batches_tracked do not move."""
    model, inputs = _example("cnn", batch_size=4)
    model.blocks[1].eval()  # a mixed mode must survive too
    before = _snapshot(model)
    rng = torch.get_rng_state()
    capture(model, inputs)
    _assert_unchanged(model, before)
    assert torch.equal(torch.get_rng_state(), rng)


def test_export_strategy_leaves_batchnorm_alone() -> None:
    """The export strategy on a train-mode BatchNorm model: buffers and flags unchanged."""
    from autoscale.capture._capture import _by_export

    model, inputs = _example("cnn", batch_size=2)
    before = _snapshot(model)
    _gm, stats = _by_export(model, inputs, {})
    assert stats and any(s.flops > 0 for s in stats.values())
    _assert_unchanged(model, before)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(self.norm(x))


class _Out:
    """An output type that torch.export cannot flatten (not a registered pytree)."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class _OpaqueTop(nn.Module):
    """Top level defeats symbolic_trace (iterates a shape) and export (opaque output)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block() for _ in range(3)])

    def forward(self, x: torch.Tensor) -> _Out:
        for _ in range(int(x.shape[0]) // x.shape[0]):
            for layer in self.layers:
                x = layer(x)
        return _Out(x)


def test_blocks_fallback() -> None:
    model = _OpaqueTop()
    x = torch.randn(4, 8)
    before = _snapshot(model)
    graph = capture(model, (x,))
    assert graph.strategy == "blocks"
    assert set(graph.failures) == {"symbolic_trace", "export"}
    assert [b.fqn for b in graph.blocks] == ["layers.0", "layers.1", "layers.2"]
    assert set(graph.block_graphs) == {"layers.0", "layers.1", "layers.2"}
    block = graph.blocks[0]
    assert block.flops == 2 * 4 * 8 * 8 and block.input_bytes == 4 * 8 * 4
    assert block.param_bytes == _param_bytes(model.layers[0])
    assert graph.activation_bytes >= sum(b.activation_bytes for b in graph.blocks) > 0
    assert graph.nodes["layers.0/fc"].flops == 2 * 4 * 8 * 8
    _assert_unchanged(model, before)


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # a Python branch on a tensor value
            return self.fc(x)
        return x


def test_untraceable_model_raises() -> None:
    with pytest.raises(CaptureError) as info:
        capture(_DataDependent(), (torch.randn(2, 8),))
    message = str(info.value)
    for part in ("symbolic_trace:", "export:", "blocks:", "torch.cond"):
        assert part in message
    assert "do not match" not in message


@pytest.mark.parametrize(("inputs", "needle"), [
    ((torch.randn(4, 7), torch.zeros(4, dtype=torch.long)), "do not match"),  # wrong shape
    ((torch.randn(4, 64),), "do not match"),  # missing the labels argument
    ({"x": torch.randn(4, 64), "labels": torch.zeros(4)}, "do not match"),  # wrong kwarg
    ([torch.randn(4, 64), "y"], "tensors only"),
    ("x", "tuple or dict"),
    ((), "tensors only"),
])
def test_bad_inputs_raise_one_clear_error(inputs: object, needle: str) -> None:
    model, _ = _example("mlp")
    with pytest.raises(CaptureError) as info:
        capture(model, inputs)
    assert needle in str(info.value)
    assert "symbolic_trace" not in str(info.value)  # a bad input is not "untraceable"


def test_find_blocks_skips_leaves_and_nesting() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4),
                          nn.ModuleList([_Block(), _Block()]))
    assert [fqn for fqn, _ in find_blocks(model)] == ["2.0", "2.1"]


def test_capture_with_functional_ops() -> None:
    """A plain model with F.linear on raw parameters: FLOPs still counted per node."""

    class Raw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.w)

    graph = capture(Raw(), {"x": torch.randn(3, 8)})
    assert graph.strategy == "symbolic_trace" and graph.flops == 2 * 3 * 8 * 16
    assert graph.blocks == ()
