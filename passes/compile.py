"""torch.compile of the planned model: its forward compiled by inductor, its module tree kept.

Note: [compile the forward, keep the keys]
``torch.compile(model)`` returns an ``OptimizedModule`` whose state_dict keys carry an
``_orig_mod.`` prefix. The pass instead compiles the root's ``forward`` (whatever the
earlier passes left there: the autocast wrapper of the precision pass, the model's own
method) and puts the compiled function back as the instance's ``forward``, as the
checkpoint and precision passes wrap theirs: the module tree, parameter names and
state_dict are the user's. ``fullgraph=True``: Dynamo inlines the whole forward, block
forwards and their ``torch.utils.checkpoint`` wrappers included, into one graph (a model
that needs a graph break fails at its first step with the PassError below), so what runs
is one compiled region, and checkpointed blocks become inductor's recompute regions.

Note: [one compile per Result]
Dynamo caches compiled code on the Python code object it compiled, shared by every
instance of a class, and guards only on what it traced: two models of one class, one
compiled under ``activation_memory_budget=1.0`` and one under 0.5, share the first graph
(measured: no recompile, the second runs the first's partition), and past
``recompile_limit`` (8) variants of one code object Dynamo silently runs eagerly. So each
compiled forward enters through its own copy of :func:`_entry`'s code object: every Result
compiles its own graph under its own budget (its first step pays the compile, as a
production job's does; inductor's on-disk FX graph cache still shortens repeats), and its
cache dies with it.

Note: [the budget is in force when the graph compiles]
Compilation is lazy: it runs inside the first call, on whatever ``torch._functorch.config``
says then. The backend (:class:`_InductorBackend`) is where the graph compiles, so it
patches ``activation_memory_budget`` (the partitioner reads it while splitting the joint
graph into forward and backward) around inductor's ``compile_fx``, for the first call and
any recompile alike; with ``force_non_lazy_backward_lowering`` the backward is compiled
there too instead of at the first backward, so a failure and the whole compile time land
in the first forward call.

Note: [eager RNG in compiled code]
On CPU inductor draws each random number of a dropout mask with its own Philox call,
element by element (``normalized_rand_cpu`` in its C++ prefix), slower than eager's
vectorised ``bernoulli_``: on the GPT example (dropout 0.1) the four fused softmax-dropout
kernels and eight dropout-add-layer-norm kernels took 24 ms of a 70 ms step, where eager's
every dropout took 14 ms, and the compiled step timed 1.05-1.09x eager's. Mode
'inductor-eager-rng' compiles with inductor's ``fallback_random``: the random ops run as
eager's kernels inside the compiled graph, the rest stays fused; that step timed
0.93-0.94x eager's in the same runs. The random ops then draw from torch's generator in
eager's order, so the plan's dropout masks, loss and gradients equal the eager model's
under one seed (tests/passes/test_compile.py). A checkpointed block recomputes its random
ops with the generator state replayed (same masks), paying eager's RNG again, which is
why it is a mode of its own and not the default: the solver times its options under it
(``time_block_options``), and saving dropout's mask (op kind 'dropout'; under this mode a
dropout is split into a bool mask and a recomputed product, Note: [a dropout's mask is
what a checkpoint keeps] in passes/_dropout_mask.py) avoids it.
Not with 'inductor-budget': below budget 1.0 torch's min-cut partitioner recomputed
random ops in the backward, and with eager's kernels they drew new numbers there (the
eager model's loss, gradients off by 0.1 on a dropout GPT, measured; which op, not
traced); inductor's own RNG is seeded and replays them exactly.

Note: [side effects in a checkpointed block under compile]
A checkpointed block whose forward mutates Python state (HuggingFace v5's decoder layers
record their outputs into a context variable for ``output_hidden_states``) cannot be
traced by Dynamo as written: eager checkpointing replays such a mutation in the recompute
and compiled code cannot, so Dynamo refuses it ("HOP: Unsafe side effect"), and every
checkpointed HF Llama plan failed to compile. The mutation there is bookkeeping that the
recompute has no use for, so the compiled call runs with Dynamo's
``skip_fwd_side_effects_in_bwd_under_checkpoint`` (the side effect happens once, in the
forward); the tests hold loss and gradients equal to eager's on the HF models.

Note: [compile and sharding]
Plans with shard.strategy other than 'none' are refused (the plan rule
``compile_one_process`` in autoscale/plan/_compile.py): this pass runs after the shard
pass, on the DDP wrapper or the FSDP2 root, and neither composition is checked against the
untouched model here yet.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from autoscale.capture import ModelGraph
from autoscale.errors import PassError
from autoscale.passes.base import MemoryTerms, PassContext
from autoscale.plan import CompilePlan

__all__ = ["CompilePass", "compile_model"]

_MARK = "_autoscale_compiled"


def compile_model(model: nn.Module, *, plan: CompilePlan) -> nn.Module:
    """Run ``model``'s forward as one inductor-compiled graph, as ``plan.mode`` says.

    Rewrites ``model`` in place (the runtime passes its own copy) and returns it; 'off' is a
    no-op. The graph compiles at the first call, under ``plan.budget`` (Note: [the budget is
    in force when the graph compiles]); a compile failure there raises PassError naming the
    mode and the fix.

    Invariant: loss and gradients equal the eager model's up to inductor's reordering and
    fusion of fp32 arithmetic (tests bound it); parameter names and the state_dict are
    unchanged (Note: [compile the forward, keep the keys]).
    """
    if not plan.active or getattr(model, _MARK, False):
        return model
    if isinstance(model, DistributedDataParallel):
        raise PassError(f"compile.mode={plan.mode!r} under DDP is not supported; set "
                        "compile.mode='off' or shard.strategy='none'.")
    compiled = torch.compile(_fresh_entry(), backend=_backend(plan.budget, plan.eager_rng),
                             fullgraph=True)
    model.forward = functools.partial(_compiled_call, compiled, model.forward, plan.mode,
                                      type(model).__name__)
    setattr(model, _MARK, True)
    return model


def _entry(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return forward(*args, **kwargs)


def _fresh_entry() -> Callable[..., Any]:
    """:func:`_entry` with a code object of its own: Note: [one compile per Result]."""
    code = _entry.__code__.replace()
    return types.FunctionType(code, _entry.__globals__, _entry.__name__)


def _compile_errors() -> tuple[type[BaseException], ...]:
    """What a failed compilation raises: Dynamo's errors (a graph break under fullgraph,
    BackendCompilerFailed and its InductorError, which wrap lowering and C++ build
    failures) and inductor's own compiler checks."""
    from torch._dynamo import exc as dynamo_exc
    from torch._inductor import exc as inductor_exc

    return (dynamo_exc.TorchDynamoException, inductor_exc.InvalidCxxCompiler,
            inductor_exc.CppCompileError)


def _compiled_call(compiled: Callable[..., Any], forward: Callable[..., Any], mode: str,
                   name: str, *args: Any, **kwargs: Any) -> Any:
    from torch._dynamo import config as dynamo_config

    try:
        # Note: [side effects in a checkpointed block under compile]
        with dynamo_config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
            return compiled(forward, *args, **kwargs)
    except _compile_errors() as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise PassError(
            f"compile.mode={mode!r} could not compile {name}'s forward: "
            f"{type(err).__name__}: {first}. Use compile.mode='off' for this model (a "
            "graph break, an op inductor cannot lower, or no working C++ compiler).") from err


@dataclass(frozen=True)
class _InductorBackend:
    """Inductor's ``compile_fx`` under one ``activation_memory_budget``, and with eager's
    random-number kernels where ``eager_rng`` (Note: [eager RNG in compiled code])."""

    budget: float
    eager_rng: bool = False

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
        from torch._functorch import config as functorch_config
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx

        patches: dict[str, Any] = {"fallback_random": self.eager_rng}
        split: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if self.eager_rng:
            # Note: [a dropout's mask is what a checkpoint keeps] (passes/_dropout_mask.py)
            from unittest import mock

            from torch._inductor import decomposition
            from torch._inductor.custom_graph_pass import get_custom_graph_passes

            from autoscale.passes import _dropout_mask

            # Into the table fallback_random selects, for this compile only: passed as
            # compile_fx's ``decompositions`` it would enter inductor's FX-graph cache key,
            # which cannot hash it, and every compile would bypass the cache.
            split = mock.patch.dict(decomposition.decompositions, _dropout_mask.DECOMPOSITIONS)
            patches["joint_custom_pre_pass"] = (
                *get_custom_graph_passes(inductor_config.joint_custom_pre_pass),
                _dropout_mask.RECOMPUTE_DROPOUT_PRODUCT)
        with functorch_config.patch(activation_memory_budget=self.budget,
                                    force_non_lazy_backward_lowering=True), \
                inductor_config.patch(patches), split:
            return compile_fx(gm, list(example_inputs))


@functools.cache
def _backend(budget: float, eager_rng: bool = False) -> _InductorBackend:
    # One object per setting: Dynamo matches a cache entry's backend by identity.
    return _InductorBackend(budget, eager_rng)


def _is_fake(model: nn.Module) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(p, FakeTensor) for p in model.parameters())


class CompilePass:
    """The pipeline entry for :func:`compile_model` (plan section ``compile``)."""

    section = "compile"
    invariant = ("loss and gradients equal the eager model's up to inductor's reordering of "
                 "fp32 arithmetic; state_dict keys unchanged")

    def enabled(self, section: CompilePlan) -> bool:
        return section.active

    def apply(self, model: nn.Module, section: CompilePlan, ctx: PassContext) -> nn.Module:
        """:func:`compile_model`; a no-op on a model whose parameters are fake tensors (the
        cost model's simulated step, autoscale/cost/_simulate.py: Dynamo cannot compile
        under its FakeTensorMode, and the estimate is then eager's)."""
        if _is_fake(model):
            return model
        return compile_model(model, plan=section)

    def memory(self, section: CompilePlan, graph: ModelGraph,
               terms: MemoryTerms) -> MemoryTerms:
        """Unchanged: the estimate of a compiled plan is its eager step's (inductor's
        partitioner saves at most what eager saves at budget 1.0; tests measure the gap)."""
        return terms
