"""Per-node metrics on fake tensors: output shapes, dtypes, newly allocated bytes, FLOPs.

Nothing here runs real kernels or allocates real activation memory: every tensor that flows
is a FakeTensor (shape, dtype and storage identity only). Parameters and buffers are swapped
for fake copies with ``torch.func.functional_call``, so in-place updates (BatchNorm running
stats, counters) land on the copies and the user's module is left as it was.

Note: [the fake-tensor adapter]
FakeTensorMode and its exceptions live in ``torch._subclasses``, a private package.
``fake_mode()`` and ``is_data_dependent()`` are the only places that touch it; the test
``test_fake_adapter`` fails loudly if torch moves them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import fx, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count

__all__ = ["OpStats", "RunRecorder", "export_stats", "fake_mode", "fake_run", "fake_state",
           "interpret_stats", "is_data_dependent", "tensor_bytes", "to_fake"]


def fake_mode() -> Any:
    """A fresh FakeTensorMode with static shapes (the adapter for the private API)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    # allow_non_fake_inputs: constants created inside forward (torch.tensor(...)) are real.
    return FakeTensorMode(allow_non_fake_inputs=True)


def is_data_dependent(err: BaseException) -> bool:
    """True when ``err`` says the model branches on tensor values, which fake tensors lack."""
    from torch._subclasses import fake_tensor as ft
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    kinds = (ft.DataDependentOutputException, ft.DynamicOutputShapeException,
             GuardOnDataDependentSymNode)
    return isinstance(err, kinds) or "data-dependent" in str(err).lower()


def to_fake(mode: Any, tree: Any) -> Any:
    """``tree`` with every real tensor replaced by its fake twin in ``mode`` (memoized).

    Tensors that are already fake (recorded during a fake run in ``mode``) pass through.
    """
    from torch._subclasses.fake_tensor import FakeTensor

    def convert(t: torch.Tensor) -> torch.Tensor:
        return t if isinstance(t, FakeTensor) else mode.from_tensor(t)

    return pytree.tree_map_only(torch.Tensor, convert, tree)


def fake_state(module: nn.Module, mode: Any) -> dict[str, torch.Tensor]:
    """Fake copies of ``module``'s parameters and buffers, keyed as functional_call wants."""
    named = chain(module.named_parameters(remove_duplicate=False),
                  module.named_buffers(remove_duplicate=False))
    return {name: mode.from_tensor(t) for name, t in named}


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _new_bytes(out: Any, inputs: Any) -> int:
    """Bytes of the tensors in ``out`` that do not share storage with a tensor in ``inputs``.

    Views and in-place results allocate nothing, so they count 0.
    """
    seen = {StorageWeakRef(t.untyped_storage()) for t in pytree.tree_leaves(inputs)
            if isinstance(t, torch.Tensor)}
    total = 0
    for t in pytree.tree_leaves(out):
        if isinstance(t, torch.Tensor):
            ref = StorageWeakRef(t.untyped_storage())
            if ref not in seen:
                seen.add(ref)
                total += tensor_bytes(t)
    return total


@dataclass(frozen=True, slots=True)
class OpStats:
    """What one graph node produced on the example batch.

    Invariant: ``bytes`` <= sum of the outputs' sizes (aliases of inputs count 0).
    """

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    bytes: int
    """Newly allocated bytes (views and in-place results count 0)."""
    output_bytes: int
    """Full size of the outputs, aliases included."""
    flops: int


def _stats(out: Any, inputs: Any, flops: int) -> OpStats:
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return OpStats(shapes=tuple(tuple(int(s) for s in t.shape) for t in leaves),
                   dtypes=tuple(str(t.dtype).removeprefix("torch.") for t in leaves),
                   bytes=_new_bytes(out, inputs), output_bytes=sum(map(tensor_bytes, leaves)),
                   flops=int(flops))


class _FakeInterpreter(fx.Interpreter):
    """Runs a symbolic_trace graph on fake tensors, one FlopCounterMode over the whole run."""

    def __init__(self, gm: fx.GraphModule, mode: Any, counter: FlopCounterMode) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.mode, self.counter = mode, counter
        self.stats: dict[str, OpStats] = {}

    def run_node(self, n: fx.Node) -> Any:
        before = self.counter.get_total_flops()
        out = super().run_node(n)
        if n.op == "placeholder":
            self.stats[n.name] = _stats(out, out, 0)  # an input: no new bytes
        elif n.op.startswith("call_"):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.stats[n.name] = _stats(out, (args, kwargs),
                                        self.counter.get_total_flops() - before)
        return out

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        return to_fake(self.mode, super().get_attr(target, args, kwargs))

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        # Fake parameters/buffers via functional_call: in-place buffer updates (BatchNorm
        # num_batches_tracked) would otherwise reach the user's real tensors.
        sub = self.fetch_attr(target)
        return torch.func.functional_call(sub, fake_state(sub, self.mode), args, kwargs)


def interpret_stats(gm: fx.GraphModule, args: tuple[Any, ...],
                    mode: Any = None) -> dict[str, OpStats]:
    """Per-node stats (placeholders and calls) of ``gm`` run on ``args`` under fake ``mode``.

    ``args`` may be real or already fake in ``mode``; a fresh mode is made when None.
    """
    mode = mode or fake_mode()
    fake_args = to_fake(mode, args)
    with mode, _flop_counter() as counter:
        interp = _FakeInterpreter(gm, mode, counter)
        interp.run(*fake_args)
    return interp.stats


def _cpu_flash_attention_flops(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """FLOPs of aten._scaled_dot_product_flash_attention_for_cpu (Q @ K^T, then @ V).

    It is the kernel F.scaled_dot_product_attention runs on CPU, fake tensors included;
    torch's flop registry has the CUDA flash kernel's formula only, and the maths is the same.
    """
    return int(sdpa_flop_count(query.shape, key.shape, value.shape))


# FlopCounterMode's custom_mapping passes tensors, not shapes, to formulas marked raw.
_cpu_flash_attention_flops._get_raw = True  # type: ignore[attr-defined]
_EXTRA_FLOPS: dict[Any, Callable[..., int]] = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops,
}


def _flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode that also counts the ops in ``_EXTRA_FLOPS``."""
    return FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS)


def _formula(target: Any) -> Callable[..., Any] | None:
    packet = getattr(target, "overloadpacket", None)
    if packet is None:
        return None
    return _EXTRA_FLOPS.get(packet) or flop_registry.get(packet)


def _registry_flops(target: Any, args: Any, kwargs: Any, out: Any) -> int:
    formula = _formula(target)
    if formula is None:
        return 0
    return int(formula(*args, **kwargs, out_val=out))


def _detect_mode(values: Any) -> Any:
    """The fake mode that made ``values`` (export's node.meta['val']), or a fresh one."""
    for t in pytree.tree_leaves(values):
        mode = getattr(t, "fake_mode", None)
        if mode is not None:
            return mode
    return fake_mode()


def export_stats(gm: fx.GraphModule) -> dict[str, OpStats]:
    """Per-node stats (placeholders and calls) of an exported graph from ``node.meta['val']``.

    FLOPs: the flop_counter formula where the aten op has one; composite ops the training IR
    keeps (aten.linear, aten.scaled_dot_product_attention) are re-run on the fake values
    under FlopCounterMode, which sees the matmuls they decompose into.
    """
    vals = {n: n.meta.get("val") for n in gm.graph.nodes}
    stats = {}
    with _detect_mode(list(vals.values())), _flop_counter() as counter:
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                stats[n.name] = _stats(vals[n], vals[n], 0)
            if not n.op.startswith("call_"):
                continue
            args = fx.node.map_arg(n.args, lambda a: vals.get(a))
            kwargs = fx.node.map_arg(n.kwargs, lambda a: vals.get(a))
            flops = _meta_flops(n.target, args, kwargs, vals[n], counter)
            stats[n.name] = _stats(vals[n], (args, kwargs), flops)
    return stats


def _meta_flops(target: Any, args: Any, kwargs: Any, out: Any, counter: FlopCounterMode) -> int:
    try:
        if _formula(target) is not None:
            return _registry_flops(target, args, kwargs, out)
        schema = getattr(target, "_schema", None)
        if schema is None or schema.is_mutable:  # not aten, or would mutate the meta values
            return 0
        before = counter.get_total_flops()
        target(*args, **kwargs)
        return counter.get_total_flops() - before
    except Exception:  # an op that cannot re-run on its recorded values: count no FLOPs
        return 0


class RunRecorder(TorchDispatchMode):
    """Counts every aten op a forward runs: its name, newly allocated bytes and FLOPs.

    Invariant: ``bytes`` is the sum over ops of outputs that alias no input, i.e. all
    tensors the forward produces (an upper bound of what backward keeps).
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.bytes = 0
        self.flops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append(str(func))
        self.bytes += _new_bytes(out, (args, kwargs))
        # A formula that cannot read these args counts no FLOPs rather than failing the run.
        with suppress(Exception):
            self.flops += _registry_flops(func, args, kwargs, out)
        return out


@contextmanager
def fake_run(model: nn.Module, mode: Any) -> Iterator[Callable[..., Any]]:
    """Yield ``call(args, kwargs)`` that runs ``model`` on fake params and fake inputs."""
    state = fake_state(model, mode)

    def call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return torch.func.functional_call(model, state, to_fake(mode, args),
                                          to_fake(mode, kwargs))

    with mode:
        yield call
