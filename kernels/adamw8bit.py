"""One AdamW step with both moments stored as block-wise quantized 8-bit tensors.

After Dettmers et al., "8-bit Optimizers via Block-wise Quantization" (arXiv 2110.02861):
the flat state of a parameter is cut into blocks of ``block_size`` elements; each block
keeps one fp32 absmax scale and one byte per element for each moment. One step, per
block: dequantize m and v -> AdamW update in fp32 -> requantize m and v with the new
block absmax. Optimizer state is then 2 + 8 / block_size bytes per parameter.

Layout of the state of a parameter with n elements, nb = ceil(n / block_size):
  m_q (nb * block_size,) int8, m_scale (nb,) fp32 (block absmax of m),
  v_q (nb * block_size,) uint8, v_scale (nb,) fp32 (block max of sqrt(v)).
The padding past n stays zero (zero grad and param there), so it never changes a
block's absmax.

Note: [quantization maps]
Both maps are power companding, chosen over bitsandbytes' dynamic tree map because they
are closed-form (a sqrt per element, no 256-entry search), which is what lets the CPU
path stay one memory-bound pass:
  m (signed):   q = round(127 sign(m) (|m| / absmax) ** (1/2)),  m = sign(q) (q/127)**2 absmax
  v (unsigned): q = round(255 (v / absmax) ** (1/4)),            v = (q/255)**4 absmax
(for v the stored scale is sqrt(absmax), see quantize_unsigned).
The second moment needs the wide range: the update divides by sqrt(v), and with a
linear uint8 map every v below absmax/510 of its block becomes 0, so m / (0 + eps)
explodes (the failure Dettmers et al. report; not re-measured here). The 4th-root
map resolves sqrt(v) down to ~4e-6 of the block's largest, and its relative error on
sqrt(v) is about 1/q, i.e. < 1 % for the levels that carry most elements. As a guard we
also zero m wherever v quantizes to 0 (then the update there is exactly 0 instead of
m / eps). Rounding is half away from zero, floor(|y| + 0.5), so the torch reference, the
compiled CPU path and the Triton kernel round identically up to fp32 noise in y.

Non-finite values (Note: [non-finite gradients] in ``kernels/__init__.py``): the update of
p is IEEE arithmetic, so an inf or NaN gradient element makes its param element non-finite;
a block whose new m or sqrt(v) holds an inf or NaN gets codes 0 and both scales NaN, so it
dequantizes to NaN and the block stays NaN at every later step (the block is the unit of
8-bit state, as the element is of fp32 state).

Paths (``kernel=``), and the machines that need them:
  "triton":    CUDA GPUs (``kernels._triton_adamw8bit``, one launch for all tensors).
  "native":    CPUs with a C compiler (``kernels._cpu_adamw8bit``); the fastest CPU path.
  "compiled":  CPUs where the C kernel does not build but inductor does (e.g. a compiler
               without OpenMP, such as Apple clang: inductor runs without it); see Note:
               [compiled CPU path].
  "reference": the spec, and every other device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import torch

from autoscale.errors import KernelUnavailable

from . import _cpu_adamw8bit, _dispatch
from ._adamw8bit_layout import check as _check
from ._adamw8bit_layout import hyper as _hyper
from ._adamw8bit_layout import state_numel
from ._triton_util import HAS_TRITON

__all__ = [
    "KERNELS",
    "Kernel",
    "adamw8bit",
    "adamw8bit_multi",
    "adamw8bit_reference",
    "dequantize_signed",
    "dequantize_unsigned",
    "quantize_signed",
    "quantize_unsigned",
    "state_numel",
]

Kernel = Literal["auto", "triton", "native", "compiled", "reference"]
#: The ``kernel=`` names 8-bit AdamW accepts; "auto" chooses.
KERNELS: tuple[str, ...] = ("auto", "triton", "native", "compiled", "reference")


def quantize_signed(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize blocks ``x`` (nb, B) fp32 to (int8 (nb, B), absmax fp32 (nb,)).

    Invariant: q in [-127, 127]; dequantize_signed(q, s) equals x at 0 and at each
    block's absmax, and is monotone in x.
    """
    absmax = x.abs().amax(dim=1, keepdim=True)
    return _quantize_signed_with(x, absmax).to(torch.int8), absmax.squeeze(1)


def _quantize_signed_with(x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Signed levels as fp32 (cast by the caller): all-float maths vectorizes on CPU."""
    inv = torch.where(absmax > 0, 1.0 / absmax, 0.0)
    y = torch.floor(torch.sqrt(x.abs() * inv) * 127.0 + 0.5).clamp(max=127.0)
    return torch.copysign(y, x)


def dequantize_signed(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse map of :func:`quantize_signed`: (nb, B) int8, (nb,) -> (nb, B) fp32."""
    u = q.float() * (1.0 / 127.0)  # a multiply, not a divide: the CPU path is ALU-bound
    return u * u.abs() * scale.unsqueeze(1)


def quantize_unsigned(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize non-negative blocks ``x`` (nb, B) fp32 to (uint8 (nb, B), scale (nb,)).

    The scale is sqrt(block absmax), i.e. the largest sqrt(v): the step already needs
    sqrt(v), and (v / vmax) ** (1/4) == sqrt(sqrt(v) / sqrt(vmax)) saves a sqrt per
    element. Invariant: q in [0, 255]; 4th-root companding (see the module note).
    """
    sx = torch.sqrt(x)
    smax = sx.amax(dim=1, keepdim=True)
    return _quantize_unsigned_with(sx, smax).to(torch.uint8), smax.squeeze(1)


def _quantize_unsigned_with(sx: torch.Tensor, smax: torch.Tensor) -> torch.Tensor:
    """Unsigned levels of sqrt(v) ``sx`` as fp32 (cast by the caller)."""
    inv = torch.where(smax > 0, 1.0 / smax, 0.0)
    return torch.floor(torch.sqrt(sx * inv) * 255.0 + 0.5).clamp(max=255.0)


def dequantize_unsigned(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse map of :func:`quantize_unsigned`: (nb, B) uint8, (nb,) -> (nb, B) fp32."""
    u = q.float() * (1.0 / 255.0)
    s = u * u * scale.unsqueeze(1)  # sqrt(v)
    return s * s


def _update_blocks(
    p: torch.Tensor,
    g: torch.Tensor,
    mq: torch.Tensor,
    ms: torch.Tensor,
    vq: torch.Tensor,
    vs: torch.Tensor,
    beta1: float | torch.Tensor,
    beta2: float | torch.Tensor,
    eps: float | torch.Tensor,
    decay: float | torch.Tensor,
    step_size: float | torch.Tensor,
    inv_bc2_sqrt: float | torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """The maths of one step on (nb, B) blocks, out of place; fp32 throughout.

    Returns (p_new in p.dtype, mq, ms, vq, vs). Shared by the reference and the
    compiled CPU path, so the two differ only by how inductor orders fp32 ops.
    """
    g32 = g.float()
    m = beta1 * dequantize_signed(mq, ms) + (1.0 - beta1) * g32
    v = beta2 * dequantize_unsigned(vq, vs) + (1.0 - beta2) * g32 * g32
    sv = torch.sqrt(v)
    p32 = p.float() * decay - step_size * m / (sv * inv_bc2_sqrt + eps)
    # A block with an inf or NaN moment: codes 0, scales NaN (module docstring).
    ok = (torch.isfinite(m) & torch.isfinite(sv)).all(dim=1, keepdim=True)
    m_ok, sv_ok = torch.where(ok, m, 0.0), torch.where(ok, sv, 0.0)
    m_max = m_ok.abs().amax(dim=1, keepdim=True)
    sv_max = sv_ok.amax(dim=1, keepdim=True)
    yv = _quantize_unsigned_with(sv_ok, sv_max)
    # Guard (module note): no m where v is 0. Selecting in fp32 and casting once at the
    # end keeps inductor's loop vectorized; int8/uint8 masks measured 2x slower.
    ym = torch.where(yv == 0, 0.0, _quantize_signed_with(m_ok, m_max))
    return (
        p32.to(p.dtype),
        ym.to(torch.int8),
        torch.where(ok, m_max, torch.nan).squeeze(1),
        yv.to(torch.uint8),
        torch.where(ok, sv_max, torch.nan).squeeze(1),
    )


def adamw8bit_reference(
    p: torch.Tensor,
    g: torch.Tensor,
    m_q: torch.Tensor,
    m_scale: torch.Tensor,
    v_q: torch.Tensor,
    v_scale: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    block_size: int,
) -> None:
    """The spec: one AdamW step in place on ``p`` and the quantized state.

    ``step`` is the 1-based count after this step (for bias correction). Maths, per
    element in fp32, as torch.optim.AdamW: p *= 1 - lr*wd; m = b1 m + (1-b1) g;
    v = b2 v + (1-b2) g^2; p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps); then m, v
    are requantized per block with their new absmax.
    """
    _check(p, g, m_q, m_scale, v_q, v_scale, block_size, step)
    _run_reference([[p], [g], [m_q], [m_scale], [v_q], [v_scale]],
                   hyper=_hyper(lr, beta1, beta2, eps, weight_decay, step), block_size=block_size)


# Note: [compiled CPU path]
# Eager torch runs _update_blocks as ~30 separate passes over memory; fused AdamW does
# one. torch.compile (inductor, C++ backend) turns the whole of _update_blocks plus the
# in-place write-back into one OpenMP loop over blocks that reads p, g and the 2 bytes
# of state once and writes them once (the second sweep of a block, after its absmax,
# hits L1). Scalars are passed as one fp32 tensor so a new lr or step never recompiles;
# the block count is marked dynamic so every parameter shape shares one graph per
# (param dtype, block_size). A trailing partial block runs through the same graph on a
# one-block padded copy (nb == 1 is specialised by dynamo: one more compile, once).
# Tensors go in detached, so a Parameter and a scratch clone share a graph. That still
# leaves two graphs per (dtype, block_size), and dynamo's default limit of 8 per function
# would be reached by four such keys in one process (a tuner, a test run), after which
# fullgraph=True fails hard: calls run under a higher limit (_RECOMPILE_LIMIT).
def _step_inplace(
    p: torch.Tensor, g: torch.Tensor, mq: torch.Tensor, ms: torch.Tensor,
    vq: torch.Tensor, vs: torch.Tensor, hp: torch.Tensor,
) -> None:  # fmt: skip
    out = _update_blocks(p, g, mq, ms, vq, vs, hp[0], hp[1], hp[2], hp[3], hp[4], hp[5])
    p.copy_(out[0])
    mq.copy_(out[1])
    ms.copy_(out[2])
    vq.copy_(out[3])
    vs.copy_(out[4])


_COMPILE_OPTIONS: dict[str, Any] = {"cpp.dynamic_threads": True}
_RECOMPILE_LIMIT = 64
_compiled_step: Callable[..., None] | None = None
_compile_failed: str | None = None


def _get_compiled() -> Callable[..., None] | None:
    global _compiled_step, _compile_failed
    if _compiled_step is None and _compile_failed is None:
        try:
            _compiled_step = torch.compile(_step_inplace, fullgraph=True, options=_COMPILE_OPTIONS)
        except Exception as err:  # no compiler on the host: fall back to the reference
            _compile_failed = f"{type(err).__name__}: {err}"
    return _compiled_step


def _adamw8bit_compiled(p: torch.Tensor, g: torch.Tensor, mq: torch.Tensor, ms: torch.Tensor,
                        vq: torch.Tensor, vs: torch.Tensor, *, hp: torch.Tensor,
                        block_size: int, nb: int) -> None:  # fmt: skip
    compiled = _get_compiled()
    if compiled is None:
        raise KernelUnavailable(f"adamw8bit: torch.compile is unavailable ({_compile_failed}); "
                                "use kernel='auto'.")

    def fn(*args: torch.Tensor) -> None:
        with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
            compiled(*(t.detach() for t in args))

    n = p.numel()
    full = n // block_size
    # A param at a nonzero storage offset (a view into a flat buffer) would recompile per
    # offset, see below; such params go through a contiguous copy at offset 0.
    pc = p if p.is_contiguous() and p.storage_offset() == 0 else p.contiguous().clone()
    gc = g if g.is_contiguous() and g.storage_offset() == 0 else g.contiguous().clone()
    if full:
        args = (
            pc.view(-1)[: full * block_size].view(full, block_size),
            gc.view(-1)[: full * block_size].view(full, block_size),
            mq[: full * block_size].view(full, block_size), ms[:full],
            vq[: full * block_size].view(full, block_size), vs[:full],
        )  # fmt: skip
        for t in args:
            torch._dynamo.maybe_mark_dynamic(t, 0)
        fn(*args, hp)
    if nb > full:  # trailing partial block, on a zero-padded copy
        # Copies, not views, of the state: dynamo guards on storage offsets, so views at
        # a new offset per parameter would recompile until the cache limit, then fall
        # back to eager (measured 10-50x slower).
        start, tail = full * block_size, n - full * block_size
        pt = torch.zeros(1, block_size, dtype=p.dtype)
        gt = torch.zeros(1, block_size, dtype=g.dtype)
        pt[0, :tail] = pc.view(-1)[start:]
        gt[0, :tail] = gc.view(-1)[start:]
        st = [mq[start:].clone().view(1, block_size), ms[full:].clone(),
              vq[start:].clone().view(1, block_size), vs[full:].clone()]  # fmt: skip
        fn(pt, gt, *st, hp)
        pc.view(-1)[start:] = pt[0, :tail]
        for dst, src in zip((mq[start:], ms[full:], vq[start:], vs[full:]), st, strict=True):
            dst.copy_(src.view(-1))
    if pc is not p:
        p.copy_(pc)


def adamw8bit(
    p: torch.Tensor,
    g: torch.Tensor,
    m_q: torch.Tensor,
    m_scale: torch.Tensor,
    v_q: torch.Tensor,
    v_scale: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    block_size: int,
    kernel: str = "auto",
) -> str:
    """One 8-bit AdamW step in place on one tensor; see :func:`adamw8bit_multi`."""
    return adamw8bit_multi(
        [p], [g], [m_q], [m_scale], [v_q], [v_scale], lr=lr, beta1=beta1, beta2=beta2,
        eps=eps, weight_decay=weight_decay, step=step, block_size=block_size, kernel=kernel,
    )  # fmt: skip


def adamw8bit_multi(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    m_q: Sequence[torch.Tensor],
    m_scale: Sequence[torch.Tensor],
    v_q: Sequence[torch.Tensor],
    v_scale: Sequence[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    block_size: int,
    kernel: str = "auto",
) -> str:
    """One 8-bit AdamW step in place on every tensor; same maths as the reference.

    All tensors share the hyper-parameters and ``step``. ``kernel``: one of
    :data:`KERNELS` (paths in the module docstring); "auto" takes Triton on CUDA, and on
    CPU the fastest path that agrees with the reference, measured once per process
    (``kernels._dispatch``, the dispatcher of every optimizer kernel). Returns the name of
    the path that ran (the last, if the params mix dtypes).

    Raises ValueError for an unknown kernel or a bad state layout, KernelUnavailable when
    a forced path cannot run here.
    """
    lists = [list(x) for x in (params, grads, m_q, m_scale, v_q, v_scale)]
    if len({len(x) for x in lists}) != 1:
        raise ValueError("adamw8bit_multi: pass one entry per parameter in every list.")
    if kernel not in KERNELS:
        raise ValueError(f"adamw8bit: kernel={kernel!r} is not one of {KERNELS}.")
    for p, g, mq, ms, vq, vs in zip(*lists, strict=True):
        _check(p, g, mq, ms, vq, vs, block_size, step)
    hyper = _hyper(lr, beta1, beta2, eps, weight_decay, step)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(lists[0]):
        groups.setdefault((p.device, p.dtype), []).append(i)
    ran = kernel
    for (device, dtype), idx in groups.items():
        sub = [[x[i] for i in idx] for x in lists]
        impls, why_not = _paths(device, dtype, hyper, block_size)
        ran = _dispatch.run("adamw8bit", kernel, impls, sub, kernels=KERNELS, why_not=why_not,
                            agrees=partial(_agrees, block_size=block_size))  # fmt: skip
    return ran


Lists = Sequence[Sequence[torch.Tensor]]


def _run_reference(lists: Lists, *, hyper: tuple[float, ...], block_size: int) -> None:
    for p, g, mq, ms, vq, vs in zip(*lists, strict=True):
        nb = ms.numel()
        n, padded = p.numel(), nb * block_size
        pf = torch.zeros(padded, dtype=p.dtype, device=p.device)
        gf = torch.zeros(padded, dtype=g.dtype, device=g.device)
        pf[:n] = p.reshape(-1)
        gf[:n] = g.reshape(-1)
        out = _update_blocks(
            pf.view(nb, block_size), gf.view(nb, block_size), mq.view(nb, block_size), ms,
            vq.view(nb, block_size), vs, *hyper,
        )  # fmt: skip
        p.copy_(out[0].reshape(-1)[:n].view_as(p))
        for dst, src in zip((mq, ms, vq, vs), out[1:], strict=True):
            dst.copy_(src.reshape(-1))


def _run_native(lists: Lists, *, hyper: tuple[float, ...], block_size: int) -> None:
    # kernels._dispatch.run hands every path contiguous tensors
    p, g, mq, ms, vq, vs = lists
    _cpu_adamw8bit.step(p, g, mq, ms, vq, vs, hyper, block_size)


def _run_compiled(lists: Lists, *, hyper: tuple[float, ...], block_size: int) -> None:
    hp = torch.tensor(hyper, dtype=torch.float32)
    for p, g, mq, ms, vq, vs in zip(*lists, strict=True):
        _adamw8bit_compiled(p, g, mq, ms, vq, vs, hp=hp, block_size=block_size, nb=ms.numel())


def _run_triton(lists: Lists, *, hyper: tuple[float, ...], block_size: int) -> None:
    from ._triton_adamw8bit import adamw8bit_triton_multi

    p, g, mq, ms, vq, vs = lists
    adamw8bit_triton_multi(p, g, mq, ms, vq, vs, hyper, block_size)


def _paths(device: torch.device, dtype: torch.dtype, hyper: tuple[float, ...], block_size: int
           ) -> tuple[dict[str, Callable[[Lists], None]], dict[str, str]]:  # fmt: skip
    """The paths that can step ``dtype`` params on ``device`` here, and why the others
    cannot (with the fix)."""
    bind: dict[str, Any] = dict(hyper=hyper, block_size=block_size)
    impls: dict[str, Callable[[Lists], None]] = {"reference": partial(_run_reference, **bind)}
    why: dict[str, str] = {}
    if not HAS_TRITON:
        why["triton"] = "kernel='triton' needs the triton package"
    elif dtype not in (torch.float32, torch.bfloat16, torch.float16):
        why["triton"] = f"kernel='triton' takes fp32, bf16 or fp16 params, got {dtype}"
    else:
        impls["triton"] = partial(_run_triton, **bind)
    if device.type != "cpu":
        why["native"] = why["compiled"] = f"a CPU path; got {device.type} tensors"
        return impls, why
    if dtype not in (torch.float32, torch.bfloat16):
        why["native"] = f"kernel='native' takes fp32 or bf16 params, got {dtype}"
    elif block_size > _cpu_adamw8bit.MAX_BLOCK:
        why["native"] = f"block_size {block_size} > {_cpu_adamw8bit.MAX_BLOCK}, its limit"
    elif not _cpu_adamw8bit.available():
        why["native"] = f"the C kernel could not be built ({_cpu_adamw8bit.load_error()})"
    else:
        impls["native"] = partial(_run_native, **bind)
    if _get_compiled() is None:
        why["compiled"] = f"torch.compile is unavailable ({_compile_failed})"
    else:
        impls["compiled"] = partial(_run_compiled, **bind)
    return impls, why


def _codes_agree(outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> bool:
    # Paths order fp32 ops differently (the native one uses 14-bit reciprocal estimates),
    # so a code may move one level where y lands near a rounding boundary (0.1-0.3 % of
    # elements); more is a bug. Judged over all sampled tensors at once, with a floor of
    # 16 elements: bf16 grads repeat values, so flips come in groups on small samples.
    pairs = zip(outs, refs, strict=True)
    diff = torch.cat([(a.int() - b.int()).abs().reshape(-1) for a, b in pairs])
    return diff.numel() == 0 or (
        diff.max().item() <= 1 and (diff > 0).sum().item() <= max(0.01 * diff.numel(), 16)
    )


def _agrees(impl: Callable[[Lists], None], reference: Callable[[Lists], None], lists: Lists,
            *, block_size: int) -> bool:  # fmt: skip
    """Does ``impl`` reproduce ``reference`` on a sample of (clones of) ``lists``? Non-finite
    values must land where the reference puts them (Note: [non-finite gradients])."""
    # The first 16 blocks of the first few tensors, with their state: enough to catch wrong
    # maths, and cheap at start-up even when the first tensor is a large embedding.
    sample: list[list[torch.Tensor]] = [[] for _ in lists]
    for p, g, mq, ms, vq, vs in list(zip(*lists, strict=True))[:4]:
        nb = min(ms.numel(), 16)
        n = min(p.numel(), nb * block_size)
        head = (p.reshape(-1)[:n], g.reshape(-1)[:n], mq[: nb * block_size], ms[:nb],
                vq[: nb * block_size], vs[:nb])  # fmt: skip
        for row, t in zip(sample, head, strict=True):
            row.append(t.detach().clone())
    before = [p.float() for p in sample[0]]
    want = [[t.clone() for t in x] for x in sample]
    reference(want)
    impl(sample)
    for p0, a, b in zip(before, sample[0], want[0], strict=True):
        a32, b32 = a.float(), b.float()
        fin = torch.isfinite(b32)
        if not torch.equal(torch.isfinite(a32), fin):
            return False
        # Judged on the update, not on p: the native path's reciprocal estimates are
        # exact to ~2^-13 of the update, which a p-relative tolerance cannot see.
        err = (a32 - b32)[fin].abs()
        tol = 1e-3 * (b32 - p0)[fin].abs() + 1e-6 + 1e-5 * p0[fin].abs()
        if not bool((err <= tol).all()):
            return False
    scales_ok = all(
        torch.allclose(a, b, rtol=1e-4, atol=1e-12, equal_nan=True)
        for k in (3, 5) for a, b in zip(sample[k], want[k], strict=True)
    )  # fmt: skip
    return scales_ok and all(_codes_agree(sample[k], want[k]) for k in (2, 4))

