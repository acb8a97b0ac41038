"""Fused optimizer and quantization kernels.

Triton on CUDA; on CPU, the fastest correct path (C loops, torch's fused and foreach ops,
torch.compile), chosen by measurement through one dispatcher (``_dispatch``) and forced by
one option, ``kernel=``. Each op's module lists its paths and the machine that needs each.

Note: [non-finite gradients]
One policy, on every path of every op (reference, foreach, torch_fused, native C,
compiled, Triton), as torch.optim has it: a non-finite value is never clamped, skipped or
made finite. Every path computes its reference's maths in IEEE arithmetic, so an inf or
NaN gradient element makes non-finite exactly what depends on it in the reference:

- AdamW, SGD: the param element and its state elements (elementwise maths).
- LAMB, LARS: also the whole tensor when its norm turns NaN, since the trust ratio of a
  tensor depends on all of its elements (a zero norm still gives ratio 1; a NaN norm
  gives a NaN ratio, never the fallback 1). An inf grad in LARS gives ratio 0 (finite /
  inf) and so moves only the elements that are NaN.
- 8-bit AdamW (``adamw8bit``): the param element; and the quantization block is the unit
  of state, so a block whose new moments hold an inf or NaN gets codes 0 and NaN scales,
  and the whole block of the param turns NaN from the next step on.
- Quantization (``quant``): a block holding an inf or NaN gets codes 0 and scale NaN, so
  it dequantizes to NaN and reaches whoever reads it (the loss scaler's overflow check).
  Its error-feedback residual keeps its previous value: the residual carries rounding
  error between steps, and a poisoned residual would turn every later step NaN after the
  loss scaler has already skipped the overflowed one.

Skipping an overflowed step is the loss scaler's job (``torch.amp.GradScaler`` checks the
grads and does not call ``step()``), as with torch.optim. The C loops are compiled
without -ffinite-math-only (Note: [C kernel flags] in ``_native``), and block maxima are
taken so that a NaN is not dropped (x86 max instructions and ``tl.max`` may drop one).
Tested per path in tests/kernels/test_nonfinite.py.
"""
