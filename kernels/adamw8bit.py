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
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import torch

from autoscale.errors import KernelUnavailable

from . import _cpu_adamw8bit, _dispatch
from ._triton_util import HAS_TRITON

__all__ = [
    "HAS_TRITON",
    "IMPLS",
    "adamw8bit",
    "adamw8bit_multi",
    "adamw8bit_reference",
    "dequantize_signed",
    "dequantize_unsigned",
    "quantize_signed",
    "quantize_unsigned",
    "state_numel",
]

Impl = Literal["auto", "triton", "native", "compiled", "reference"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def state_numel(numel: int, block_size: int) -> int:
    """Length of the padded quantized state of a parameter: whole blocks."""
    return -(-numel // block_size) * block_size


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
    m_max = m.abs().amax(dim=1, keepdim=True)
    sv_max = sv.amax(dim=1, keepdim=True)
    yv = _quantize_unsigned_with(sv, sv_max)
    # Guard (module note): no m where v is 0. Selecting in fp32 and casting once at the
    # end keeps inductor's loop vectorized; int8/uint8 masks measured 2x slower.
    ym = torch.where(yv == 0, 0.0, _quantize_signed_with(m, m_max))
    return (
        p32.to(p.dtype),
        ym.to(torch.int8),
        m_max.squeeze(1),
        yv.to(torch.uint8),
        sv_max.squeeze(1),
    )


def _hyper(
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int
) -> tuple[float, float, float, float, float, float]:
    """(beta1, beta2, eps, decay, step_size, 1/sqrt(bc2)) as torch.optim.AdamW computes them."""
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    return beta1, beta2, eps, 1.0 - lr * weight_decay, lr / bc1, bc2**-0.5


def _check(p: torch.Tensor, g: torch.Tensor, mq: torch.Tensor, ms: torch.Tensor,
           vq: torch.Tensor, vs: torch.Tensor, block_size: int, step: int) -> int:  # fmt: skip
    """Validate the state layout; return the number of blocks."""
    nb = -(-p.numel() // block_size)
    if g.shape != p.shape:
        raise ValueError(f"grad shape {tuple(g.shape)} != param shape {tuple(p.shape)}.")
    if step < 1:
        raise ValueError(f"step must be >= 1 (bias correction uses 1 - beta**step), got {step}.")
    padded = nb * block_size
    # One flat test first: this runs for every tensor at every step.
    if (mq.dtype == torch.int8 and vq.dtype == torch.uint8 and ms.dtype == torch.float32
            and vs.dtype == torch.float32 and mq.numel() == padded and vq.numel() == padded
            and ms.numel() == nb and vs.numel() == nb and mq.is_contiguous()
            and vq.is_contiguous() and ms.is_contiguous() and vs.is_contiguous()):  # fmt: skip
        return nb
    want = {"m_q": (mq, torch.int8, padded), "v_q": (vq, torch.uint8, padded),
            "m_scale": (ms, torch.float32, nb), "v_scale": (vs, torch.float32, nb)}  # fmt: skip
    for name, (t, dtype, numel) in want.items():
        if t.dtype != dtype or t.numel() != numel or not t.is_contiguous():
            raise ValueError(
                f"{name} must be a contiguous {dtype} tensor of {numel} elements for a "
                f"{p.numel()}-element param with block_size={block_size}; got {t.dtype} "
                f"with {t.numel()}. Allocate it with kernels.adamw8bit.state_numel()."
            )
    return nb


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
    _run_reference(
        [[p], [g], [m_q], [m_scale], [v_q], [v_scale]],
        _hyper(lr, beta1, beta2, eps, weight_decay, step), block_size,
    )  # fmt: skip


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


_COMPILE_OPTIONS: dict = {"cpp.dynamic_threads": True}
_RECOMPILE_LIMIT = 64
_compiled_step = None
_compile_failed: str | None = None


def _get_compiled():  # -> Callable | None
    global _compiled_step, _compile_failed
    if _compiled_step is None and _compile_failed is None:
        try:
            _compiled_step = torch.compile(_step_inplace, fullgraph=True, options=_COMPILE_OPTIONS)
        except Exception as err:  # no compiler on the host: fall back to the reference
            _compile_failed = f"{type(err).__name__}: {err}"
    return _compiled_step


def _adamw8bit_compiled(p, g, mq, ms, vq, vs, *, hp: torch.Tensor, block_size: int, nb: int):
    compiled = _get_compiled()

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
    impl: Impl = "auto",
) -> str:
    """One 8-bit AdamW step in place on one tensor; see :func:`adamw8bit_multi`."""
    return adamw8bit_multi(
        [p], [g], [m_q], [m_scale], [v_q], [v_scale], lr=lr, beta1=beta1, beta2=beta2,
        eps=eps, weight_decay=weight_decay, step=step, block_size=block_size, impl=impl,
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
    impl: Impl = "auto",
) -> str:
    """One 8-bit AdamW step in place on every tensor; same maths as the reference.

    All tensors share the hyper-parameters and ``step``. Paths (``impl``):
    ``"triton"`` (CUDA, or CPU under TRITON_INTERPRET=1), ``"native"`` (the one-pass C
    kernel of ``kernels._cpu_adamw8bit``: one call for all tensors), ``"compiled"``
    (torch.compile, see Note: [compiled CPU path]) and ``"reference"``. ``"auto"``
    takes Triton on CUDA; on CPU it times every available path once per process on
    scratch copies, after checking each against the reference, and keeps the fastest
    (``kernels._dispatch``). Returns the name of the path that ran (the last, if the
    params mix dtypes). Raises KernelUnavailable when a forced path cannot run here.
    """
    lists = [list(x) for x in (params, grads, m_q, m_scale, v_q, v_scale)]
    if len({len(x) for x in lists}) != 1:
        raise ValueError("adamw8bit_multi: pass one entry per parameter in every list.")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}.")
    for p, g, mq, ms, vq, vs in zip(*lists, strict=True):
        _check(p, g, mq, ms, vq, vs, block_size, step)
    hyper = _hyper(lr, beta1, beta2, eps, weight_decay, step)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(lists[0]):
        groups.setdefault((p.device, p.dtype), []).append(i)
    ran = impl
    for (device, dtype), idx in groups.items():
        sub = [[x[i] for i in idx] for x in lists]
        ran = _pick(impl, device, dtype, sub, hyper, block_size)
        _RUNNERS[ran](sub, hyper, block_size)
    return ran


IMPLS: tuple[str, ...] = ("auto", "triton", "native", "compiled", "reference")

Lists = list[list[torch.Tensor]]


def _run_reference(lists: Lists, hyper: tuple[float, ...], block_size: int) -> None:
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


def _run_native(lists: Lists, hyper: tuple[float, ...], block_size: int) -> None:
    params, grads = lists[0], lists[1]
    # The C kernel addresses memory linearly: strided params/grads go through copies.
    pc = [p if p.is_contiguous() else p.contiguous() for p in params]
    gc = [g if g.is_contiguous() else g.contiguous() for g in grads]
    _cpu_adamw8bit.step(pc, gc, *lists[2:], hyper=hyper, block_size=block_size)
    for p, c in zip(params, pc, strict=True):
        if c is not p:
            p.copy_(c)


def _run_compiled(lists: Lists, hyper: tuple[float, ...], block_size: int) -> None:
    hp = torch.tensor(hyper, dtype=torch.float32)
    for p, g, mq, ms, vq, vs in zip(*lists, strict=True):
        _adamw8bit_compiled(p, g, mq, ms, vq, vs, hp=hp, block_size=block_size, nb=ms.numel())


def _run_triton(lists: Lists, hyper: tuple[float, ...], block_size: int) -> None:
    # One launch for every tensor; imported here because that module imports this one.
    from ._triton_adamw8bit import adamw8bit_triton_multi

    adamw8bit_triton_multi(*lists, hyper=hyper, block_size=block_size)


_RUNNERS = {
    "reference": _run_reference,
    "native": _run_native,
    "compiled": _run_compiled,
    "triton": _run_triton,
}


def _available(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if path ``name`` can run on ``dtype`` params on ``device`` here, else why not
    (with the fix)."""
    if name == "reference":
        return None
    if name == "triton":
        if not HAS_TRITON:
            return "impl='triton' needs the triton package; use impl='auto'."
        if not (device.type == "cuda" or _interpreting()):
            return "impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 on CPU."
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"impl='triton' takes fp32, bf16 or fp16 params, got {dtype}; use impl='auto'."
        return None
    if device.type != "cpu":
        return f"impl={name!r} is a CPU path; got {device.type} tensors. Use impl='auto'."
    if name == "native":
        if dtype not in (torch.float32, torch.bfloat16):
            return f"impl='native' takes fp32 or bf16 params, got {dtype}; use impl='auto'."
        if not _cpu_adamw8bit.available():
            return (f"the C kernel could not be built ({_cpu_adamw8bit.load_error()}); "
                    "install gcc or use impl='auto'.")  # fmt: skip
        return None
    if _get_compiled() is None:
        return f"torch.compile is unavailable ({_compile_failed}); use impl='auto'."
    return None


def _codes_agree(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> bool:
    # Paths order fp32 ops differently (the native one uses 14-bit reciprocal estimates),
    # so a code may move one level where y lands near a rounding boundary (0.1-0.3 % of
    # elements); more is a bug. Judged over all sampled tensors at once, with a floor of
    # 16 elements: bf16 grads repeat values, so flips come in groups on small samples.
    pairs = zip(outs, refs, strict=True)
    diff = torch.cat([(a.int() - b.int()).abs().reshape(-1) for a, b in pairs])
    return diff.numel() == 0 or (
        diff.max().item() <= 1 and (diff > 0).sum().item() <= max(0.01 * diff.numel(), 16)
    )


def _agrees(name: str, lists: Lists, hyper: tuple[float, ...], block_size: int) -> bool:
    """Does path ``name`` reproduce the reference on a sample of (clones of) ``lists``?"""
    # The first 16 blocks of the first few tensors, with their state: enough to catch wrong
    # maths, and cheap at start-up even when the first tensor is a large embedding.
    sample: Lists = [[] for _ in lists]
    for p, g, mq, ms, vq, vs in list(zip(*lists, strict=True))[:4]:
        nb = min(ms.numel(), 16)
        n = min(p.numel(), nb * block_size)
        head = (p.reshape(-1)[:n], g.reshape(-1)[:n], mq[: nb * block_size], ms[:nb],
                vq[: nb * block_size], vs[:nb])  # fmt: skip
        for row, t in zip(sample, head, strict=True):
            row.append(t.detach().clone())
    before = [p.float() for p in sample[0]]
    want = [[t.clone() for t in x] for x in sample]
    _run_reference(want, hyper, block_size)
    _RUNNERS[name](sample, hyper, block_size)
    for p0, a, b in zip(before, sample[0], want[0], strict=True):
        # Judged on the update, not on p: the native path's reciprocal estimates are
        # exact to ~2^-13 of the update, which a p-relative tolerance cannot see.
        err = (a.float() - b.float()).abs()
        if not bool((err <= 1e-3 * (b.float() - p0).abs() + 1e-6 + 1e-5 * p0.abs()).all()):
            return False
    scales_ok = all(
        torch.allclose(a, b, rtol=1e-4, atol=1e-12)
        for k in (3, 5) for a, b in zip(sample[k], want[k], strict=True)
    )  # fmt: skip
    return scales_ok and all(_codes_agree(sample[k], want[k]) for k in (2, 4))


def _pick(impl: str, device: torch.device, dtype: torch.dtype, lists: Lists,
          hyper: tuple[float, ...], block_size: int) -> str:  # fmt: skip
    if impl != "auto":
        why = _available(impl, device, dtype)
        if why is not None:
            raise KernelUnavailable(f"adamw8bit: {why}")
        return impl
    if device.type == "cuda" and _available("triton", device, dtype) is None:
        return "triton"
    chosen = _dispatch.cached_choice("adamw8bit", device, dtype)
    if chosen is not None:
        return chosen
    candidates = [
        name for name in ("native", "compiled")
        if _available(name, device, dtype) is None
        and _dispatch.passes_check(
            "adamw8bit", name, lambda name=name: _agrees(name, lists, hyper, block_size))
    ]  # fmt: skip
    # Scratch copies of a prefix of the tensors: timing must not step the real state.
    k = _dispatch.scratch_prefix([p.numel() for p in lists[0]])
    scratch = [[t.detach().clone() for t in x[:k]] for x in lists]
    runners = {
        name: (lambda name=name: _RUNNERS[name](scratch, hyper, block_size))
        for name in [*candidates, "reference"]
    }  # fmt: skip
    return _dispatch.choose("adamw8bit", device, dtype, runners)
