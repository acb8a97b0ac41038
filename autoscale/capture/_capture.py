"""Capture a model as a torch.fx graph with per-node metadata and its repeated blocks.

``capture(model, example_inputs)`` tries, in order:

1. ``symbolic_trace``: torch.fx.symbolic_trace; a Python-level graph (call_module nodes).
2. ``export``: torch.export.export(strict=False); an aten graph. HuggingFace models land
   here: their forward does things symbolic_trace cannot proxy.
3. ``blocks``: run the whole model once on fake tensors, record each repeated block's
   inputs, and capture each block on its own (symbolic_trace, then export).

Metadata comes from FakeTensor propagation (autoscale.capture._fake): no real compute and no
real activation memory. Capture never changes the user's model: parameters, buffers,
training flags, hooks and identity are as before, and so is the global RNG state.

Note: [one source for block figures]
Every capture starts with one fake eager run of the whole model (``_check_run``) with
hooks on the repeated blocks; it counts each aten op the forward dispatches. The totals and
every BlockInfo come from that run whatever the strategy, so they agree across strategies
and see inside modules the graph keeps whole: symbolic_trace leaves torch.nn's own layers
(nn.TransformerEncoder, nn.MultiheadAttention, nn.Dropout's mask) as one call_module node
whose internals it never shows, and a block inside such a leaf has no node at all. The graph
gives ``nodes``, the per-node view. Only when the fake run stops on a value-dependent op
and a tracer still captures the model do the figures come from the graph's nodes.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import fx, nn

from autoscale.capture._blocks import (
    BlockInfo,
    BlockRun,
    block_infos,
    find_blocks,
    record_blocks,
    unique_bytes,
)
from autoscale.capture._fake import (
    OpStats,
    RunRecorder,
    export_stats,
    fake_mode,
    fake_run,
    interpret_stats,
    is_data_dependent,
    to_fake,
)
from autoscale.errors import CaptureError

__all__ = ["BlockInfo", "ModelGraph", "NodeMeta", "capture", "find_blocks"]

Strategy = Literal["symbolic_trace", "export", "blocks"]
_FIX = ("Pass the tensors forward() takes, as a tuple of positional tensors or a dict of "
        "keyword tensors, with the shapes and dtypes it expects.")


@dataclass(frozen=True, slots=True)
class NodeMeta:
    """One graph node's outputs on the example batch (FakeTensor propagation).

    Invariant: ``bytes <= output_bytes``; views and in-place ops have ``bytes == 0``;
    placeholders (inputs) have ``bytes == 0`` and ``flops == 0``.
    """

    op: str
    """fx opcode: placeholder, call_function, call_method or call_module."""
    target: str
    """What the node calls: an aten op, a qualified function name or a module FQN."""
    shapes: tuple[tuple[int, ...], ...]
    """Shape of each tensor output, in pytree order."""
    dtypes: tuple[str, ...]
    """Dtype of each tensor output, e.g. "float32"."""
    bytes: int
    """Bytes this node newly allocates (outputs that alias no input)."""
    output_bytes: int
    """Full size of the outputs, aliases included."""
    flops: int
    """Forward FLOPs (matmul-like ops and attention; 2*M*N*K for a matmul)."""
    module: str | None
    """FQN of the innermost module the node ran in, None at the top level or unknown."""
    block: str | None
    """FQN of the repeated block the node belongs to, or None."""


@dataclass(frozen=True, slots=True, eq=False)
class ModelGraph:
    """A captured model: graph, per-node metadata, repeated blocks and totals.

    Invariants: ``strategy`` is the first strategy that worked and ``failures`` holds one
    short reason per strategy tried before it; ``activation_bytes >= sum of the blocks'``;
    ``blocks``, ``activation_bytes`` and ``flops`` are the same for every strategy that
    captures the model (see Note: [one source for block figures]); for strategy "blocks",
    ``gm`` is the first block's graph, ``block_graphs`` holds every captured block and node
    names in ``nodes`` are "<block fqn>/<node>".
    """

    gm: fx.GraphModule
    strategy: Strategy
    failures: Mapping[str, str]
    nodes: Mapping[str, NodeMeta]
    """Per-node view of ``gm``; a leaf module's call is one node holding only its outputs."""
    blocks: tuple[BlockInfo, ...]
    """Every repeated block the forward called, in module order."""
    param_bytes: int
    """Unique parameters of the model, numel * element_size."""
    buffer_bytes: int
    activation_bytes: int
    """All tensor bytes the forward produces on the example batch, inside leaf modules too."""
    flops: int
    """Forward FLOPs on the example batch."""
    batch_size: int
    """Dim 0 of the first input tensor."""
    block_graphs: Mapping[str, fx.GraphModule] = field(default_factory=dict)
    structure: tuple[str, ...] = ()
    """One line per op ("opcode target"), in order; no shapes, no values."""

    def structure_hash(self) -> str:
        """sha256 of the strategy and op sequence: equal for the same code at any batch size."""
        text = "\n".join((self.strategy, *self.structure))
        return hashlib.sha256(text.encode()).hexdigest()


def capture(model: nn.Module,
            example_inputs: tuple[torch.Tensor, ...] | dict[str, torch.Tensor]) -> ModelGraph:
    """Capture ``model`` run on ``example_inputs`` as a graph with metadata.

    Raises:
        CaptureError: ``example_inputs`` is not a tuple/dict of tensors or does not fit
            ``model.forward`` (one message naming the problem), or no strategy captured it
            (the message lists each strategy's reason).

    Invariant: ``model`` (parameters, buffers, training flags, hooks) and the CPU RNG
    state are unchanged when this returns or raises.
    """
    args, kwargs = _split_inputs(example_inputs)
    _check_signature(model, args, kwargs)
    blocks = find_blocks(model)
    with _unchanged(model):
        run = _check_run(model, args, kwargs, blocks)
        failures: dict[str, str] = {}
        tracers: tuple[tuple[Strategy, _Tracer], ...] = (
            ("symbolic_trace", _by_symbolic_trace), ("export", _by_export))
        for name, strategy in tracers:
            try:
                gm, stats = strategy(model, args, kwargs)
            except Exception as err:  # any tracer failure means: try the next strategy
                failures[name] = _reason(err)
                continue
            return _from_graph(model, gm, stats, name, failures, blocks, run, args, kwargs)
        try:
            return _by_blocks(model, run, blocks, failures, args, kwargs)
        except _Failed as err:
            failures["blocks"] = str(err)
    listed = "; ".join(f"{k}: {v}" for k, v in failures.items())
    raise CaptureError(
        f"could not capture {type(model).__name__}. {listed}. Fix: make forward traceable by "
        "torch.export (no Python branches on tensor values: use torch.where or torch.cond), "
        "or keep the repeated layers in an nn.ModuleList so they can be captured one by one."
    )


class _Failed(Exception):
    """A strategy failed for a reason worth reporting as is."""


def _reason(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= 200 else text[:197] + "..."


def _split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, tuple | list):
        args, kwargs = tuple(example_inputs), {}
    elif isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
        bad = [k for k in kwargs if not isinstance(k, str)]
        if bad:
            raise CaptureError(f"example_inputs has non-string keys {bad}; use the names of "
                               "forward()'s keyword arguments as keys.")
    else:
        raise CaptureError(f"example_inputs must be a tuple or dict of tensors, got "
                           f"{type(example_inputs).__name__}. {_FIX}")
    values = [*args, *kwargs.values()]
    odd = [type(v).__name__ for v in values if not isinstance(v, torch.Tensor)]
    if not values or odd:
        raise CaptureError(f"example_inputs must hold tensors only, got "
                           f"{odd or 'nothing'}. {_FIX}")
    if values[0].dim() == 0:
        raise CaptureError("example_inputs: the first tensor is a scalar; its dim 0 must be "
                           "the batch dimension.")
    return args, kwargs


def _check_signature(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):  # builtins without a signature: the fake run will tell
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as err:
        raise CaptureError(f"example_inputs do not match {type(model).__name__}.forward"
                           f"{sig}: {err}. {_FIX}") from err


@contextmanager
def _unchanged(model: nn.Module) -> Iterator[None]:
    """Restore every module's training flag and the CPU RNG state on exit.

    Tracers may flip modes or draw random numbers (dropout under fake tensors); the
    parameters and buffers themselves are only ever read, or swapped for fake copies.
    """
    modes = [(m, m.training) for m in model.modules()]
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            for m, training in modes:
                m.training = training


@dataclass
class _Run:
    """What one fake forward of the whole model did; ``error`` when it could not finish."""

    recorder: RunRecorder
    blocks: dict[str, BlockRun]
    mode: Any
    error: str | None = None


def _check_run(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
               blocks: list[tuple[str, nn.Module]]) -> _Run:
    """Run ``model`` once on fake tensors, recording totals and each block's inputs.

    Raises CaptureError when the inputs do not fit; a model that branches on tensor
    values cannot run on fake tensors, which is "untraceable", not a bad input.
    """
    mode, recorder = fake_mode(), RunRecorder()
    with record_blocks(blocks, recorder) as records:
        try:
            with fake_run(model, mode) as call, recorder:
                call(args, kwargs)
        except Exception as err:
            if not is_data_dependent(err):
                raise CaptureError(f"example_inputs do not match {type(model).__name__}"
                                   f".forward: {_reason(err)}. {_FIX}") from err
            return _Run(recorder, records, mode, error=_reason(err))
    return _Run(recorder, records, mode)


_Tracer = Callable[[nn.Module, tuple[Any, ...], dict[str, Any]],
                   tuple[fx.GraphModule, dict[str, OpStats]]]


def _by_symbolic_trace(model: nn.Module, args: tuple[Any, ...],
                       kwargs: dict[str, Any]) -> tuple[fx.GraphModule, dict[str, OpStats]]:
    sig = inspect.signature(model.forward)
    bound = sig.bind(*args, **kwargs)
    # Arguments the caller left out keep their defaults as constants: traced as proxies,
    # `if targets is None` would take the wrong branch.
    concrete = {k: p.default for k, p in sig.parameters.items()
                if k not in bound.arguments and p.default is not inspect.Parameter.empty}
    gm = fx.symbolic_trace(model, concrete_args=concrete or None)
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    values = {**dict(bound.arguments), **concrete}
    flat = tuple(values[str(t).lstrip("*")] for t in placeholders)
    return gm, interpret_stats(gm, flat)


def _by_export(model: nn.Module, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> tuple[fx.GraphModule, dict[str, OpStats]]:
    ep = torch.export.export(model, args, kwargs or None, strict=False)
    gm = ep.module()
    return gm, export_stats(gm)


def _module_path(node: fx.Node, prefix: str = "") -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    paths = []
    for value in stack.values():
        path = str(value[0]) if isinstance(value, tuple) else str(value)
        paths.append(f"{prefix}.{path}".strip(".") if prefix else path)
    if prefix and prefix not in paths:
        paths.insert(0, prefix)
    return paths


def _target_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    if hasattr(target, "overloadpacket"):  # aten OpOverload: "aten.mm.default"
        return str(target)
    module = getattr(target, "__module__", None) or ""
    return f"{module}.{getattr(target, '__qualname__', getattr(target, '__name__', target))}"


def _node_metas(gm: fx.GraphModule, stats: Mapping[str, OpStats], block_fqns: set[str],
                prefix: str = "") -> dict[str, NodeMeta]:
    metas = {}
    for node in gm.graph.nodes:
        s = stats.get(node.name)
        if s is None:
            continue
        path = _module_path(node, prefix)
        block = next((p for p in path if p in block_fqns), None)
        metas[node.name] = NodeMeta(
            op=node.op, target=_target_name(node), shapes=s.shapes, dtypes=s.dtypes,
            bytes=s.bytes, output_bytes=s.output_bytes, flops=s.flops,
            module=path[-1] if path else None, block=block)
    return metas


def _structure(gm: fx.GraphModule) -> tuple[str, ...]:
    lines = []
    for node in gm.graph.nodes:
        name = _target_name(node)
        if node.op == "call_module":
            name += f" {type(gm.get_submodule(str(node.target))).__qualname__}"
        lines.append(f"{node.op} {name}")
    return tuple(lines)


def _block_infos_from_graph(gm: fx.GraphModule, nodes: Mapping[str, NodeMeta],
                            blocks: list[tuple[str, nn.Module]]) -> tuple[BlockInfo, ...]:
    """BlockInfo of each block from the graph's nodes tagged with it (used without a fake run).

    A block's inputs are the nodes outside it that its nodes read; a leaf module's
    internals are not nodes, so what they allocate is missing here.
    """
    members: dict[str, list[fx.Node]] = {fqn: [] for fqn, _ in blocks}
    for node in gm.graph.nodes:
        meta = nodes.get(node.name)
        if meta is not None and meta.block is not None and meta.op != "placeholder":
            members[meta.block].append(node)
    infos = []
    for fqn, module in blocks:
        inside = set(members[fqn])
        outside = {a for n in inside for a in n.all_input_nodes
                   if a not in inside and a.op != "get_attr" and a.name in nodes}
        infos.append(BlockInfo(
            fqn=fqn, class_name=type(module).__name__, param_bytes=unique_bytes(
                module.parameters()),
            activation_bytes=sum(nodes[n.name].bytes for n in inside),
            input_bytes=sum(nodes[a.name].output_bytes for a in outside),
            flops=sum(nodes[n.name].flops for n in inside)))
    return tuple(infos)


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    first = next(t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
    return int(first.shape[0])


def _from_graph(model: nn.Module, gm: fx.GraphModule, stats: Mapping[str, OpStats],
                strategy: Strategy, failures: dict[str, str],
                blocks: list[tuple[str, nn.Module]], run: _Run, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> ModelGraph:
    """A ModelGraph of ``gm``; blocks and totals from ``run`` when it finished.

    See Note: [one source for block figures].
    """
    nodes = _node_metas(gm, stats, {fqn for fqn, _ in blocks})
    if run.error is None:
        infos = block_infos(run.blocks, blocks)
        activation_bytes, flops = run.recorder.bytes, run.recorder.flops
    else:
        called = [(fqn, m) for fqn, m in blocks
                  if any(n.block == fqn for n in nodes.values())]
        infos = _block_infos_from_graph(gm, nodes, called)
        activation_bytes = sum(m.bytes for m in nodes.values())
        flops = sum(m.flops for m in nodes.values())
    return ModelGraph(
        gm=gm, strategy=strategy, failures=MappingProxyType(dict(failures)),
        nodes=MappingProxyType(nodes), blocks=infos,
        param_bytes=unique_bytes(model.parameters()),
        buffer_bytes=unique_bytes(model.buffers()),
        activation_bytes=activation_bytes, flops=flops, batch_size=_batch_size(args, kwargs),
        structure=_structure(gm))


def _capture_block(block: nn.Module, rec: BlockRun,
                   mode: Any) -> tuple[fx.GraphModule, dict[str, OpStats]]:
    """One block's graph on its recorded (fake) inputs: symbolic_trace, then export."""
    try:
        bound = inspect.signature(block.forward).bind(*rec.args, **rec.kwargs)
        gm = fx.symbolic_trace(block)
        flat = tuple(bound.arguments[str(n.target)] for n in gm.graph.nodes
                     if n.op == "placeholder")
        return gm, interpret_stats(gm, flat, mode)
    except Exception:  # fall through to export, as for the whole model
        pass
    with mode:
        args, kwargs = to_fake(mode, (rec.args, rec.kwargs))
    gm = torch.export.export(block, args, kwargs or None, strict=False).module()
    return gm, export_stats(gm)


def _by_blocks(model: nn.Module, run: _Run, blocks: list[tuple[str, nn.Module]],
               failures: dict[str, str], args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> ModelGraph:
    if run.error is not None:
        raise _Failed(f"the model does not run on fake tensors ({run.error})")
    if not blocks:
        raise _Failed("no repeated blocks (same-structure children of an nn.ModuleList or "
                      "nn.Sequential) to capture one by one")
    fqns = {fqn for fqn, _ in blocks}
    graphs: dict[str, fx.GraphModule] = {}
    nodes: dict[str, NodeMeta] = {}
    reasons: list[str] = []
    for fqn, block in blocks:
        rec = run.blocks.get(fqn)
        if rec is None:  # never called in forward: nothing to measure
            continue
        try:
            gm, stats = _capture_block(block, rec, run.mode)
        except Exception as err:  # report below if no block at all could be captured
            reasons.append(f"{fqn}: {_reason(err)}")
            continue
        graphs[fqn] = gm
        nodes.update({f"{fqn}/{k}": v for k, v in _node_metas(gm, stats, fqns, fqn).items()})
    if not graphs:
        raise _Failed("no block could be captured on its own: " + "; ".join(reasons[:2]))
    first = next(iter(graphs.values()))
    return ModelGraph(
        gm=first, strategy="blocks", failures=MappingProxyType(dict(failures)),
        nodes=MappingProxyType(nodes),
        blocks=block_infos(run.blocks, [(f, b) for f, b in blocks if f in graphs]),
        param_bytes=unique_bytes(model.parameters()),
        buffer_bytes=unique_bytes(model.buffers()), activation_bytes=run.recorder.bytes,
        flops=run.recorder.flops, batch_size=_batch_size(args, kwargs),
        block_graphs=MappingProxyType(graphs), structure=tuple(run.recorder.ops))
