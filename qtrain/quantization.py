"""The quantization seam: the only module that imports bitsandbytes' layers and quantization functions
(`qtrain.optimizers` wraps its optimizers).

Everything else (PEFT methods, export, the planner) sees a linear layer through four calls:

    quantize_linear(linear, spec)   -> a frozen bnb Linear4bit / Linear8bitLt subclass holding the same weight
    dequantized_weight(layer)       -> the dense (out, in) weight the layer actually multiplies by
    matmul_weight(layer, dtype)     -> the same, for one matmul right away (the fused training paths)
    dequantize_once()               -> a context in which each layer is dequantized once and reused (tiled MLP)
    linear_product / linear_input_grad -> x·Wᵀ + b and gy·W with that weight (every fused path's frozen part)
    is_linear(module)               -> plain, 4-bit or 8-bit linear?
    weight_nbytes(layer)            -> bytes the stored weight takes (packed data + quantization constants)

so M PEFT methods × N storage formats cost M + N code. Quantization is an explicit call on a real tensor,
never a side effect of `.to()`.

The layers `quantize_linear` makes are bnb's classes (state dicts, FSDP and every `isinstance` see bnb's)
with qtrain's forward, `FrozenMatmul`: y = x·Wᵀ + b with W dequantized by `matmul_weight` in forward and again
in backward, nothing saved. It is the frozen base's part of the fused LoRA path, so every other method, the
composed modules and evaluation multiply by the same weight in the same dtype as LoRA's training does, and on
CPU they get its reused buffer too (bnb's CPU layers write a fresh dense weight per call). It replaces bnb's
forward where bnb's would differ: 8-bit everywhere (bnb's own layer quantizes the activations to int8 outside
training, ~1 % error against the weight trained with), 4-bit on CPU and in compiled graphs; 4-bit on an
accelerator otherwise keeps bnb's forward (the same dequantize-and-multiply, with its single-token inference
kernel). On CPUs with AVX512-BF16 bnb's `Linear4bit` would also repack its weight into another layout the
first time it ran in eval mode without gradients (other numerics, a mutated base); `quantize_linear` switches
that off.

In a compiled graph (`qtrain.compiled`) a small weight is dequantized by torch operators the compiler fuses
(`_dequantize_4bit_torch`), and a big one is multiplied by the `qtrain::frozen_mm` operator, which holds its
dense weight only inside (`IN_GRAPH_MAX_BYTES` says why).
"""

from __future__ import annotations

import copy
import ctypes
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

import bitsandbytes as bnb
from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib
from bitsandbytes.functional import (QuantState, dequantize_4bit, dequantize_blockwise, get_4bit_type, get_ptr,
                                     int8_vectorwise_quant, quantize_4bit, quantize_blockwise)

from qtrain.memory import IN_GRAPH_MAX_BYTES as _PLANNED_IN_GRAPH_MAX_BYTES
from qtrain.numerics import matmul_dtype


@dataclass(frozen=True)
class QuantSpec:
    """How to store frozen linear weights. `bits=None` keeps them in `compute_dtype`."""

    bits: int | None  # 4, 8 or None
    quant_type: str = "nf4"  # nf4 | fp4 (4-bit only)
    double_quant: bool = True  # quantize the per-block absmax constants too (4-bit only)
    blocksize: int = 64
    compute_dtype: torch.dtype = torch.float32
    quant_storage: torch.dtype = torch.uint8  # a float dtype here lets FSDP shard 4-bit weights (FSDP-QLoRA)


class FrozenMatmul(torch.autograd.Function):
    """y = x·Wᵀ + bias over a frozen quantized `layer`, multiplied in `dtype`; returned in x's dtype (as bnb's
    4-bit layer does). W comes from `matmul_weight` in forward and again in backward: nothing is saved."""

    @staticmethod
    def forward(ctx, x, bias, layer: nn.Module, dtype: torch.dtype):
        with torch.autocast(x.device.type, enabled=False):  # dtypes are explicit here
            y = linear_product(x.reshape(-1, x.shape[-1]).to(dtype), layer, bias, dtype)  # (N, out)
        ctx.layer, ctx.dtype, ctx.x_shape, ctx.x_dtype = layer, dtype, x.shape, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        # never `.to()` to the dtype it has: that returns the tensor itself, and torch 2.11's compiler then takes
        # the output for one of the intermediates the traced forward hands its backward, and differentiates it
        # with a zero gradient (every input gradient through a compiled base layer was zero; fixed by 2.13)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        need_x, need_bias = ctx.needs_input_grad[:2]
        with torch.autocast(gy.device.type, enabled=False):
            gy2 = gy.reshape(-1, gy.shape[-1]).to(ctx.dtype)  # (N, out)
            gx = linear_input_grad(gy2, ctx.layer, ctx.dtype).reshape(ctx.x_shape).to(ctx.x_dtype) if need_x else None
            gb = gy2.sum(0).to(ctx.bias_dtype) if need_bias else None
        return gx, gb, None, None


class Linear4bit(bnb.nn.Linear4bit):
    """bnb's 4-bit layer; on CPU, and in a compiled graph (where a big weight must go through
    `qtrain::frozen_mm`, not be dequantized in the graph), it multiplies through `FrozenMatmul` (module
    docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" and not torch.compiler.is_compiling():
            return super().forward(x)
        return FrozenMatmul.apply(x, self.bias, self, matmul_dtype(x, self.compute_dtype))


class Linear8bitLt(bnb.nn.Linear8bitLt):
    """bnb's 8-bit layer multiplying through `FrozenMatmul` on every device (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FrozenMatmul.apply(x, self.bias, self, matmul_dtype(x))


LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def bits_of(module: nn.Module) -> int | None:
    if isinstance(module, bnb.nn.Linear4bit):
        return 4
    if isinstance(module, bnb.nn.Linear8bitLt):
        return 8
    return None


def quantize_linear(linear: nn.Linear, spec: QuantSpec) -> nn.Module:
    """Return a frozen layer computing `linear` with its weight stored as `spec` says.

    The input layer must hold a real (not meta) weight; it is not modified. With `spec.bits=None` the result
    is a plain frozen `nn.Linear` in `spec.compute_dtype`.
    """
    weight = linear.weight.detach()
    out_features, in_features = weight.shape
    has_bias = linear.bias is not None
    if spec.bits is None:
        layer = nn.Linear(in_features, out_features, bias=has_bias, device="meta")
        layer.weight = nn.Parameter(weight.to(spec.compute_dtype), requires_grad=False)
    elif spec.bits == 4:
        layer = Linear4bit(
            in_features, out_features, bias=has_bias, compute_dtype=spec.compute_dtype,
            compress_statistics=spec.double_quant, quant_type=spec.quant_type, device="meta",
        )
        packed, state = _quantize_4bit(weight.contiguous(), spec)
        layer.weight = bnb.nn.Params4bit(
            packed, requires_grad=False, quant_state=state, blocksize=spec.blocksize,
            compress_statistics=spec.double_quant, quant_type=spec.quant_type, quant_storage=spec.quant_storage,
            module=layer, bnb_quantized=True,
        )
        layer.quant_state = state  # the layer's copy: FSDP's gathered weight is a plain tensor (qtrain.sharding)
        layer.support_avx512bf16_for_cpu = False  # keep one numeric path for train and eval (module docstring)
    elif spec.bits == 8:
        layer = Linear8bitLt(
            in_features, out_features, bias=has_bias, has_fp16_weights=False, threshold=0.0, device="meta",
        )
        cb, scb, _ = int8_vectorwise_quant(weight.contiguous().to(torch.float16))
        param = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False)
        param.CB, param.SCB = cb, scb
        layer.weight = param
        layer.state.SCB = scb  # the layer's copy: FSDP's gathered weight is a plain tensor (qtrain.sharding)
    else:
        raise AssertionError(f"unsupported bits {spec.bits}")
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().to(spec.compute_dtype), requires_grad=False)
    return layer


_QUANTIZE_CHUNK = 1 << 18  # weights per pass on CPU: the pass's fp32 copies (1 MiB each) stay in cache


def _quantize_4bit(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, QuantState]:
    """bnb's `quantize_4bit(weight, ...)`, bit for bit. On CPU bnb quantizes the whole weight at once through fp32
    copies of it and `torch.bucketize` (1.1 s for a 7B MLP weight on this project's CPU, and ~0.5 GB of
    transient copies); here the same operations run over cache-sized chunks of whole blocks, the code of each
    value counted as how many of the 15 midpoints between codes it exceeds (what `bucketize` returns): ~2x
    faster, a few MB of transients. Elsewhere, or where a partial block or an odd count would need bnb's
    padding, bnb's own function."""
    n, blocksize = weight.numel(), spec.blocksize
    if weight.device.type != "cpu" or n % blocksize or n % 2:
        return quantize_4bit(weight, blocksize=blocksize, compress_statistics=spec.double_quant,
                             quant_type=spec.quant_type, quant_storage=spec.quant_storage)
    code = get_4bit_type(spec.quant_type, device=weight.device)
    order = torch.argsort(code)
    midpoints = ((code[order[:-1]] + code[order[1:]]) / 2).tolist()  # ascending
    flat = weight.reshape(-1)
    packed = torch.empty(n // 2, dtype=torch.uint8)
    absmax = torch.empty(n // blocksize, dtype=torch.float32)
    for start in range(0, n, _QUANTIZE_CHUNK):
        x = flat[start:start + _QUANTIZE_CHUNK].float().view(-1, blocksize)  # (blocks, blocksize)
        am = x.abs().amax(-1)
        absmax[start // blocksize:start // blocksize + am.numel()] = am
        x = torch.clamp(x * (1.0 / am.clamp(min=1e-38).view(-1, 1)), -1, 1).view(-1)
        q = (x > midpoints[0]).to(torch.uint8)
        for m in midpoints[1:]:
            q += x > m
        if spec.quant_type != "nf4":  # fp4's codes are not sorted: rank -> code index
            q = order[q.long()].to(torch.uint8)
        torch.bitwise_or(q[::2] << 4, q[1::2], out=packed[start // 2:start // 2 + q.numel() // 2])
    packed = packed.unsqueeze(1)  # (n/2, 1), bnb's layout
    if spec.quant_storage != torch.uint8:
        packed = packed.squeeze().view(spec.quant_storage).unsqueeze(1)
    state = dict(shape=weight.shape, dtype=weight.dtype, blocksize=blocksize, code=code, quant_type=spec.quant_type)
    if not spec.double_quant:
        return packed, QuantState(absmax=absmax, **state)
    offset = absmax.mean()  # double quantization, as bnb does it
    qabsmax, state2 = quantize_blockwise(absmax - offset, blocksize=256)
    return packed, QuantState(absmax=qabsmax, offset=offset, state2=state2, **state)


def quant_state(layer: nn.Module) -> QuantState:
    """A 4-bit layer's quantization state: its weight's, or, where the weight is FSDP's all-gathered plain tensor
    (which carries no bnb attributes), the copy `quantize_linear` keeps on the layer."""
    return getattr(layer.weight, "quant_state", None) or layer.quant_state


def dequantized_weight(layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense (out, in) weight `layer` multiplies by, as a new tensor (never a view of the stored one)."""
    w = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        state = quant_state(layer)
        return _dense_4bit(w.data, state, dtype or state.dtype)
    if isinstance(layer, bnb.nn.Linear8bitLt):
        out = torch.empty(w.shape, dtype=dtype or torch.float32, device=w.device)
        return _int8_dense(w.data, _int8_scb(layer), out)
    dense = w.detach().clone()
    return dense.to(dtype) if dtype is not None else dense


def _dense_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """A 4-bit weight dense in `dtype`, a new tensor: bnb's kernel, or the same values in torch operators where a
    compiler traces it or bnb's kernel is wrong. Another dtype (float64, for references) is the state's dtype
    cast."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return _dense_4bit(packed, state, state.dtype).to(dtype)
    if torch.compiler.is_compiling() or not _bnb_4bit_exact(packed, state):
        return _dequantize_4bit_torch(packed, state, dtype)
    if dtype != state.dtype:
        # written in `dtype` directly, one pass fewer: into 16 bits the values of a cast; into fp32 from a
        # 16-bit state the exact products, not the 16-bit rounding of them
        state = copy.copy(state)
        state.dtype = dtype
    return dequantize_4bit(packed, state)


def _dequantize_4bit_torch(packed: torch.Tensor, state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """bnb's `dequantize_4bit` written in torch operators: each weight is its code's fp32 table value times its
    block's fp32 absmax (under double quantization that absmax is the 8-bit table value times its 256-block
    scale, plus the offset), rounded once to `dtype`, as bnb's kernels compute it; the first of two values
    packed in a byte is its high nibble. Two uses:
    - in a compiled graph the compiler fuses these operators into one kernel (unpack, both lookups, both
      scales), where bnb's path is two Python-implemented operators whose host time on a GPU exceeds their
      kernels';
    - on a CPU where bnb's kernel is wrong (`_bnb_4bit_exact`).
    In eager mode the codes materialise as an int64 tensor (8 bytes a weight): bnb's kernels serve elsewhere."""
    rows, cols = state.shape
    n = rows * cols
    q = packed.view(torch.uint8).reshape(-1, 1)  # (n/2, 1)
    shifts = torch.tensor([4, 0], dtype=torch.uint8, device=q.device)  # a broadcast, not a stack: one kernel
    codes = ((q >> shifts) & 15).reshape(-1)[:n].long()  # (n,)
    absmax = state.absmax
    if state.nested:
        s2 = state.state2
        absmax = _scaled_blocks(s2.code[absmax.long()], s2.absmax, s2.blocksize) + state.offset
    values = _scaled_blocks(state.code[codes], absmax.float(), state.blocksize)  # (n,) fp32
    return values.to(dtype).view(rows, cols)


def _bnb_4bit_exact(w: torch.Tensor, state: QuantState) -> bool:
    """Whether bnb's 4-bit dequantization kernel returns the right values for this weight. Its CPU kernel
    (bitsandbytes 0.50, AVX512, rows a multiple of 32 wide) takes a block's absmax by the wrong index when
    blocks do not tile the rows: with `blocksize: 128` SmolLM2's first q_proj comes back with a relative error
    of 0.62 instead of 0.11 (benchmarks/RESULTS.md; tested). bnb's CUDA kernel indexes blocks over the flat
    weight."""
    return w.device.type != "cpu" or state.shape[-1] % state.blocksize == 0


def _scaled_blocks(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values (n,) times scales[i // blocksize]: a last partial block padded for the product, then cut off."""
    n = values.numel()
    blocks = torch.nn.functional.pad(values, (0, -n % blocksize)).view(-1, blocksize)
    return (blocks * scales.view(-1, 1)).view(-1)[:n]


_HELD = threading.local()  # .weights: {(id(layer), dtype): dense weight} inside `dequantize_once`


@contextmanager
def dequantize_once() -> Iterator[None]:
    """Inside, each quantized layer is dequantized once per dtype, at its first matmul, and that dense weight is
    reused by the matmuls after it (the tiled MLP's chunks: one dequantization per MLP call, not per chunk).
    The weights are freed on leaving; the outermost context owns them."""
    outer = getattr(_HELD, "weights", None)
    if outer is None:
        _HELD.weights = {}
    try:
        yield
    finally:
        if outer is None:
            _HELD.weights = None


def matmul_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """`layer`'s dense (out, in) weight in `dtype`, for one matmul that follows at once: read it before the next
    call and never keep it. On CPU a quantized weight is written into a reused buffer (module docstring); a plain
    layer's weight is returned as is when it already has `dtype`. Inside `dequantize_once`, a held copy."""
    held = getattr(_HELD, "weights", None)
    if held is not None and is_quantized(layer):
        key = (id(layer), dtype)
        if key not in held:
            w = _matmul_weight(layer, dtype)
            held[key] = w.clone() if w.device.type == "cpu" else w  # on CPU `w` is the shared buffer
        return held[key]
    return _matmul_weight(layer, dtype)


def _matmul_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    w = layer.weight
    if not is_quantized(layer):
        return w.to(dtype)
    if torch.compiler.is_compiling():  # a compiled graph allocates its own buffers
        return dequantized_weight(layer, dtype)
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return _int8_matmul_weight(w.data, _int8_scb(layer), dtype)
    return _4bit_matmul_weight(w.data, quant_state(layer), dtype)


def _4bit_matmul_weight(packed: torch.Tensor, state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """`_matmul_weight` of a 4-bit weight: on CPU in the reused buffer where bnb's kernel applies."""
    out = _dequantize_4bit_cpu(packed, state, dtype) if packed.device.type == "cpu" else None
    return out if out is not None else _dense_4bit(packed, state, dtype)


def _int8_matmul_weight(weight: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`_matmul_weight` of an 8-bit weight: on CPU in the reused buffer."""
    out = (_scratch(tuple(weight.shape), dtype) if weight.device.type == "cpu"
           else torch.empty(weight.shape, dtype=dtype, device=weight.device))
    return _int8_dense(weight, scb, out)


def linear_product(x2: torch.Tensor, layer: nn.Module, bias: torch.Tensor | None,
                   dtype: torch.dtype) -> torch.Tensor:
    """x2 (N, in) · Wᵀ + bias in `dtype`, W from `matmul_weight` (or, see `_int8_row_scale`, its int8 values with
    the row scale on the output): a frozen base's forward in every fused path."""
    if _opaque_in_graph(layer, dtype):
        return _frozen_mm_of(x2, layer, bias, transposed=False)
    scale = _int8_row_scale(layer, x2.shape[0], dtype)
    if scale is not None:  # W = diag(scale)·Q: (x2·Qᵀ)·diag(scale)
        y = (x2 @ _int8_values(layer, dtype).T).mul_(scale)
        return y if bias is None else y.add_(bias.to(dtype))
    w = matmul_weight(layer, dtype).T  # (in, out)
    return x2 @ w if bias is None else torch.addmm(bias.to(dtype), x2, w)  # (N, out)


def linear_input_grad(gy2: torch.Tensor, layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """gy2 (N, out) · W in `dtype`, W as in `linear_product`: the same layer's input gradient (N, in)."""
    if _opaque_in_graph(layer, dtype):
        return _frozen_mm_of(gy2, layer, None, transposed=True)
    scale = _int8_row_scale(layer, gy2.shape[0], dtype)
    if scale is not None:  # gy2·diag(scale)·Q
        return (gy2 * scale) @ _int8_values(layer, dtype)
    return gy2 @ matmul_weight(layer, dtype)


def _int8_row_scale(layer: nn.Module, tokens: int, dtype: torch.dtype) -> torch.Tensor | None:
    """An 8-bit CPU weight is Q (int8) times a per-row scale, which a product over fewer `tokens` than the layer
    has inputs applies more cheaply to its (tokens × out) side than to the (out × in) weight: the weight is then
    written once (the int8 values in `dtype`, exact) instead of written and rescaled. That is every step of
    token-by-token generation and small micro-batches. The scale (out,), or None where the weight should be
    scaled instead. Same values to `dtype`'s rounding (one rounding on the other side of the product)."""
    if (not isinstance(layer, bnb.nn.Linear8bitLt) or layer.weight.device.type != "cpu"
            or tokens >= layer.in_features or torch.compiler.is_compiling()):
        return None
    return _int8_scb(layer).mul(1.0 / 127.0).to(dtype)  # the scale `_int8_dense` applies


def _int8_values(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """An 8-bit CPU layer's int8 weight Q (out, in) written in `dtype` into the reused buffer."""
    w = layer.weight.data
    return _scratch(tuple(w.shape), dtype).copy_(w)


def _int8_scb(layer: nn.Module) -> torch.Tensor:
    """An 8-bit layer's per-row absmax (out,)."""
    w = layer.weight
    return w.SCB if getattr(w, "SCB", None) is not None else layer.state.SCB


def _int8_dense(weight: torch.Tensor, scb: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out` (out, in) ← the int8 weight times row absmax / 127, in out's dtype: exactly how bnb's own training
    matmul (MatMul8bitFp) dequantizes."""
    return out.copy_(weight).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))


# A compiled block's backward recomputes its forward and then multiplies by the transposed weights: a weight
# dequantized inside the graph is one value with two users, computed at the recompute and kept to the input
# gradient's product, so the whole block's dense weights stay alive together (Llama-3-8B: 436 MiB in bf16,
# where eager code holds one weight at a time). For weights above IN_GRAPH_MAX_BYTES the graph calls
# `qtrain::frozen_mm` instead, an operator the compiler cannot look into that dequantizes, multiplies and frees
# inside: one dense weight at a time again. Smaller weights stay in the graph, where the compiler fuses their
# dequantization into one kernel; what they keep is at most the block's seven of them (≤ 56 MiB; SmolLM2-135M:
# 7 MiB in bf16), and on such models the host time of an opaque call would outweigh their GPU work.
IN_GRAPH_MAX_BYTES = _PLANNED_IN_GRAPH_MAX_BYTES  # one number, which the planner counts with (qtrain.memory)


def _opaque_in_graph(layer: nn.Module, dtype: torch.dtype) -> bool:
    return (torch.compiler.is_compiling() and is_quantized(layer)
            and layer.in_features * layer.out_features * dtype.itemsize > IN_GRAPH_MAX_BYTES)


def _frozen_mm_of(x2: torch.Tensor, layer: nn.Module, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """`qtrain::frozen_mm` over `layer`'s stored tensors: x2 · Wᵀ (+ bias), or x2 · W when `transposed`."""
    w = layer.weight
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return torch.ops.qtrain.frozen_mm(x2, w.data, _int8_scb(layer), None, None, None, None, bias, 0, 0,
                                          w.shape[0], w.shape[1], "int8", transposed)
    s = quant_state(layer)
    nested = (s.state2.absmax, s.state2.code, s.offset) if s.nested else (None, None, None)
    return torch.ops.qtrain.frozen_mm(x2, w.data, s.absmax, s.code, *nested, bias, s.blocksize,
                                      s.state2.blocksize if s.nested else 0, s.shape[0], s.shape[1], s.quant_type,
                                      transposed)


# Defined on a plain `torch.library.Library` rather than through `torch.library.custom_op`: that wrapper adds
# ~55 µs of Python per call (its autograd and alias checks; the op is never differentiated: `FrozenMatmul` calls
# it in its forward and its backward), and a big model's compiled step calls it 3 × 7 times per layer.
_LIB = torch.library.Library("qtrain", "DEF")
_LIB.define("frozen_mm(Tensor x, Tensor weight, Tensor absmax, Tensor? code, Tensor? absmax2, Tensor? code2, "
            "Tensor? offset, Tensor? bias, int blocksize, int blocksize2, int rows, int cols, str quant_type, "
            "bool transposed) -> Tensor")


def _frozen_mm(x, weight, absmax, code, absmax2, code2, offset, bias, blocksize, blocksize2, rows, cols, quant_type,
               transposed):
    """x · Wᵀ + bias (or x · W) with W (rows, cols) dequantized in x's dtype as eager code does it, then freed."""
    dtype = x.dtype
    if quant_type == "int8":
        dense = _int8_matmul_weight(weight, absmax, dtype)
    else:
        state2 = None if absmax2 is None else QuantState(absmax=absmax2, code=code2, blocksize=blocksize2,
                                                         dtype=torch.float32)
        dense = _4bit_matmul_weight(weight, QuantState(absmax=absmax, shape=torch.Size((rows, cols)), code=code,
                                                       blocksize=blocksize, quant_type=quant_type, dtype=dtype,
                                                       offset=offset, state2=state2), dtype)
    if transposed:
        return x @ dense
    return x @ dense.T if bias is None else torch.addmm(bias.to(dtype), x, dense.T)


_LIB.impl("frozen_mm", _frozen_mm, "CompositeExplicitAutograd")


@torch.library.register_fake("qtrain::frozen_mm", lib=_LIB)
def _(x, weight, absmax, code, absmax2, code2, offset, bias, blocksize, blocksize2, rows, cols, quant_type,
      transposed):
    return x.new_empty((x.shape[0], cols if transposed else rows))


_SCRATCH: dict[tuple[int, torch.dtype], torch.Tensor] = {}  # (thread, dtype) -> flat CPU buffer
_DEQUANTIZE_4BIT = {(q, dt): f"cdequantize_blockwise_cpu_{q}_{name}" for q in ("nf4", "fp4")
                    for dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16"))}


def _scratch(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    key, n = (threading.get_ident(), dtype), shape[0] * shape[1]
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < n:
        _SCRATCH[key] = buf = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


def scratch_tensors() -> list[torch.Tensor]:
    """The reused CPU weight buffers that exist now (memory accounting counts them as live)."""
    return list(_SCRATCH.values())


def _dequantize_4bit_cpu(w: torch.Tensor, state: QuantState, dtype: torch.dtype) -> torch.Tensor | None:
    """A 4-bit weight written into the reused buffer by bitsandbytes' own CPU kernel, the one `dequantize_4bit`
    calls (whose CPU backend has no `out=` form). None where that backend would not use this kernel either, or
    where the kernel is wrong (`_bnb_4bit_exact`)."""
    fn = _DEQUANTIZE_4BIT.get((state.quant_type, dtype))
    rows, cols = state.shape
    if (fn is None or isinstance(lib, ErrorHandlerMockBNBNativeLibrary) or not hasattr(lib, fn) or cols % 2
            or not _bnb_4bit_exact(w, state)
            or (state.blocksize >= 2048 and torch.backends.cpu.get_cpu_capability() == "AVX512")):
        return None
    absmax = state.absmax
    if state.nested:
        absmax = dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
    absmax = absmax.float().contiguous()  # named: the C call must not outlive the tensors it points into
    packed = w.data.view(torch.uint8).reshape(rows, cols // 2).contiguous()
    out = _scratch((rows, cols), dtype)
    getattr(lib, fn)(get_ptr(packed), get_ptr(absmax), get_ptr(out),
                     ctypes.c_longlong(state.blocksize), ctypes.c_longlong(rows), ctypes.c_longlong(cols))
    return out


def weight_nbytes(layer: nn.Module) -> int:
    """Bytes of the stored weight: packed values plus absmax/scale constants (and their own constants)."""
    w = layer.weight
    n = w.data.numel() * w.data.element_size()
    if isinstance(layer, bnb.nn.Linear4bit):
        qs = quant_state(layer)
        n += qs.absmax.numel() * qs.absmax.element_size()
        if qs.nested and qs.state2 is not None:
            n += qs.state2.absmax.numel() * qs.state2.absmax.element_size() + qs.state2.code.numel() * 4
    elif isinstance(layer, bnb.nn.Linear8bitLt):
        scb = _int8_scb(layer)
        n += scb.numel() * scb.element_size()
    return n
