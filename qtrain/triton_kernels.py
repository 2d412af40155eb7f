"""Triton kernels for RMSNorm and SwiGLU (silu(gate)·up), forward and backward, one launch each.

Why: on a CUDA GPU, transformers' RMSNorm launches ~8 small kernels forward and ~12 backward (upcast, square,
mean, rsqrt, multiply, downcast, ...), and silu·up 2 and 4; each reads and writes a full (tokens × hidden)
tensor. One kernel per direction reads the inputs once and writes the outputs once. `qtrain.fused` uses these
when the tensors are on a GPU and Triton can be imported.

Numerics: the same operations as the PyTorch modules (`LlamaRMSNorm`, `act_fn(gate) * up`) and their autograd
backward, in fp32 with the same roundings to 16 bits in between, so the results match theirs up to the last
bits of rsqrt/exp and the order of the row sums. x is (N, H), weight (H,), all contiguous; dtypes bf16, fp16,
fp32 (a product of two of them is exact in fp32, so "fp32 product, one rounding" is torch's 16-bit multiply):

- RMSNorm forward: rstd = rsqrt(mean(x32²) + eps) (fp32, per row); n = (x32·rstd) rounded to x.dtype;
  y = w·n rounded to promote_types(w.dtype, x.dtype).
- RMSNorm backward (no weight gradient: the weight is frozen): gn = gy·w rounded to y's dtype, then to x's
  dtype (autograd's mul and cast backward); g = gn in fp32; gx = rstd·g − x32·rstd³·sum(g·x32)/H.
- SwiGLU forward: s = silu(gate32) rounded; out = s·up rounded.
- SwiGLU backward: g_s = gy·up rounded, g_up = gy·s rounded, g_gate = g_s·σ·(1 + gate·(1 − σ)) rounded
  (torch's silu_backward), with σ = sigmoid(gate32).

The kernels are defined on first use (`_kernels`), so importing this module needs no Triton, and Triton's
interpreter can run them on CPU tensors in tests: TRITON_INTERPRET=1 must be set before the @triton.jit
decorators run, Triton's own (tl.sum's) at `import triton` included, so in a process of its own.
"""

from __future__ import annotations

import contextlib
import functools
from types import SimpleNamespace

import torch

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SWIGLU_BLOCK = 1024  # elements per program of the elementwise SwiGLU kernels
_MAX_BLOCK_H = 65536  # one row must fit one program's registers


@functools.cache
def available() -> bool:
    """Whether Triton can be imported."""
    try:
        import triton  # noqa: F401
    except ImportError:  # the plain PyTorch path then
        return False
    return True


@functools.cache
def _kernels() -> SimpleNamespace:
    """Import Triton and define the kernels (once); see the module docstring for why not at import time."""
    global tl  # the kernels find `tl` among the module's globals (the interpreter looks nowhere else)
    import triton
    import triton.language as tl

    @triton.jit
    def rms_norm_fwd(X, W, Y, RSTD, H, eps, BLOCK_H: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # int64: rows × H may pass 2³¹
        cols = tl.arange(0, BLOCK_H)
        mask = cols < H
        x = tl.load(X + row * H + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
        n = (x * rstd).to(X.dtype.element_ty).to(tl.float32)  # the module rounds to x's dtype before the weight
        tl.store(Y + row * H + cols, (w * n).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def rms_norm_bwd(GY, X, RSTD, W, GX, H, BLOCK_H: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_H)
        mask = cols < H
        gy = tl.load(GY + row * H + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row * H + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        # Gradient of n: autograd rounds gy·w to y's dtype (mul backward), then to x's (cast backward); y's is x's
        # or fp32, where the fp32 product is already rounded, so one rounding to x's dtype is the same.
        g = (gy * w).to(X.dtype.element_ty).to(tl.float32)
        c = tl.sum(g * x, axis=0) / H
        gx = rstd * g - x * (rstd * rstd * rstd) * c
        tl.store(GX + row * H + cols, gx.to(GX.dtype.element_ty), mask=mask)

    @triton.jit
    def swiglu_fwd(G, U, OUT, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(OUT.dtype.element_ty).to(tl.float32)  # torch's silu formula, rounded
        tl.store(OUT + offs, (s * u).to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def swiglu_bwd(GY, G, U, GG, GU, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        gy = tl.load(GY + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        dt = GG.dtype.element_ty
        e = tl.exp(-g)
        s = (g / (1.0 + e)).to(dt).to(tl.float32)  # silu(gate) as the forward kept it
        sig = 1.0 / (1.0 + e)
        g_s = (gy * u).to(dt).to(tl.float32)
        tl.store(GU + offs, (gy * s).to(dt), mask=mask)
        tl.store(GG + offs, (g_s * sig * (1.0 + g * (1.0 - sig))).to(dt), mask=mask)

    return SimpleNamespace(rms_norm_fwd=rms_norm_fwd, rms_norm_bwd=rms_norm_bwd, swiglu_fwd=swiglu_fwd,
                           swiglu_bwd=swiglu_bwd)


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it t's (several GPUs in one process)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _row_settings(h: int) -> tuple[int, int]:
    """(BLOCK_H, num_warps) for rows of h elements: a whole row per program, more warps for longer rows."""
    block = 1 << (h - 1).bit_length()  # triton.next_power_of_2
    if block > _MAX_BLOCK_H:
        raise ValueError(f"hidden size {h} is over the {_MAX_BLOCK_H} a row kernel supports")
    warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, warps


def _blocks(numel: int) -> tuple[int]:
    """The grid of an elementwise kernel: one program per _SWIGLU_BLOCK elements."""
    return (-(-numel // _SWIGLU_BLOCK),)


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        assert t.is_contiguous() and t.dtype in _DTYPES, f"need contiguous bf16/fp16/fp32, got {t.dtype}"


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x (N, H) with weight (H,): (y (N, H) in promote_types(weight, x), rstd (N,) fp32)."""
    _check(x, weight)
    n, h = x.shape
    assert weight.shape == (h,), f"weight {tuple(weight.shape)} for hidden size {h}"
    y = torch.empty((n, h), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    block, warps = _row_settings(h)
    if n:
        with _on_device(x):
            _kernels().rms_norm_fwd[(n,)](x, weight, y, rstd, h, float(eps), BLOCK_H=block, num_warps=warps)
    return y, rstd


def rms_norm_backward(gy: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Gradient of x (N, H, x's dtype) from gy (N, H, y's dtype) and the forward's rstd (N,); none for weight."""
    _check(gy, x, rstd, weight)
    n, h = x.shape
    assert gy.shape == x.shape and gy.dtype == torch.promote_types(weight.dtype, x.dtype) and rstd.shape == (n,)
    gx = torch.empty_like(x)
    block, warps = _row_settings(h)
    if n:
        with _on_device(x):
            _kernels().rms_norm_bwd[(n,)](gy, x, rstd, weight, gx, h, BLOCK_H=block, num_warps=warps)
    return gx


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise over same-shape, same-dtype tensors."""
    _check(gate, up)
    assert gate.shape == up.shape and gate.dtype == up.dtype
    out = torch.empty_like(gate)
    numel = gate.numel()
    if numel:
        with _on_device(gate):
            _kernels().swiglu_fwd[_blocks(numel)](gate, up, out, numel, BLOCK=_SWIGLU_BLOCK)
    return out


def swiglu_backward(gy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (of gate, of up) of silu(gate) * up, from the output's gradient gy."""
    _check(gy, gate, up)
    assert gy.shape == gate.shape == up.shape and gy.dtype == gate.dtype == up.dtype
    g_gate, g_up = torch.empty_like(gate), torch.empty_like(up)
    numel = gate.numel()
    if numel:
        with _on_device(gate):
            _kernels().swiglu_bwd[_blocks(numel)](gy, gate, up, g_gate, g_up, numel, BLOCK=_SWIGLU_BLOCK)
    return g_gate, g_up
