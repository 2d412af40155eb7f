"""The quantization seam: the only module that imports bitsandbytes.

Everything else (PEFT methods, export, the planner) sees a linear layer through four calls:

    quantize_linear(linear, spec)   -> a frozen bnb Linear4bit / Linear8bitLt holding the same weight
    dequantized_weight(layer)       -> the dense (out, in) weight the layer actually multiplies by
    matmul_weight(layer, dtype)     -> the same, for one matmul right away (the fused training paths)
    is_linear(module)               -> plain, 4-bit or 8-bit linear?
    weight_nbytes(layer)            -> bytes the stored weight takes (packed data + quantization constants)

so M PEFT methods × N storage formats cost M + N code. Quantization is an explicit call on a real tensor,
never a side effect of `.to()`.

One deliberate deviation from bnb's defaults: on CPUs with AVX512-BF16, bnb's `Linear4bit` repacks its weight
into a different layout the first time it runs in eval mode without gradients. That makes eval numerics differ
from training numerics and mutates the frozen base, so `quantize_linear` switches it off.
"""

from __future__ import annotations

import copy
import ctypes
import threading
from dataclasses import dataclass

import torch
from torch import nn

import bitsandbytes as bnb
from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib
from bitsandbytes.functional import dequantize_4bit, dequantize_blockwise, get_ptr, int8_vectorwise_quant, quantize_4bit


@dataclass(frozen=True)
class QuantSpec:
    """How to store frozen linear weights. `bits=None` keeps them in `compute_dtype`."""

    bits: int | None  # 4, 8 or None
    quant_type: str = "nf4"  # nf4 | fp4 (4-bit only)
    double_quant: bool = True  # quantize the per-block absmax constants too (4-bit only)
    blocksize: int = 64
    compute_dtype: torch.dtype = torch.float32
    quant_storage: torch.dtype = torch.uint8  # a float dtype here lets FSDP shard 4-bit weights (FSDP-QLoRA)


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
        layer = bnb.nn.Linear4bit(
            in_features, out_features, bias=has_bias, compute_dtype=spec.compute_dtype,
            compress_statistics=spec.double_quant, quant_type=spec.quant_type, device="meta",
        )
        packed, state = quantize_4bit(
            weight.contiguous(), blocksize=spec.blocksize, compress_statistics=spec.double_quant,
            quant_type=spec.quant_type, quant_storage=spec.quant_storage,
        )
        layer.weight = bnb.nn.Params4bit(
            packed, requires_grad=False, quant_state=state, blocksize=spec.blocksize,
            compress_statistics=spec.double_quant, quant_type=spec.quant_type, quant_storage=spec.quant_storage,
            module=layer, bnb_quantized=True,
        )
        layer.quant_state = state
        layer.support_avx512bf16_for_cpu = False  # keep one numeric path for train and eval (module docstring)
    elif spec.bits == 8:
        layer = bnb.nn.Linear8bitLt(
            in_features, out_features, bias=has_bias, has_fp16_weights=False, threshold=0.0, device="meta",
        )
        cb, scb, _ = int8_vectorwise_quant(weight.contiguous().to(torch.float16))
        param = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False)
        param.CB, param.SCB = cb, scb
        layer.weight = param
    else:
        raise AssertionError(f"unsupported bits {spec.bits}")
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().to(spec.compute_dtype), requires_grad=False)
    return layer


def dequantized_weight(layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense (out, in) weight `layer` multiplies by, as a new tensor (never a view of the stored one)."""
    w = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        state = w.quant_state
        if dtype in (torch.float32, torch.bfloat16, torch.float16) and dtype != state.dtype:
            # written in `dtype` directly, one pass fewer: into 16 bits the values of a cast; into fp32 from a
            # 16-bit state the exact products, not the 16-bit rounding of them
            state = copy.copy(state)
            state.dtype = dtype
        dense = dequantize_4bit(w.data, state)
    elif isinstance(layer, bnb.nn.Linear8bitLt):
        return _int8_dequantized(layer, torch.empty(w.shape, dtype=dtype or torch.float32, device=w.device))
    else:
        dense = w.detach().clone()
    return dense.to(dtype) if dtype is not None else dense


def matmul_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """`layer`'s dense (out, in) weight in `dtype`, for one matmul that follows at once: read it before the next
    call and never keep it. On CPU a quantized weight is written into a reused buffer (module docstring); a plain
    layer's weight is returned as is when it already has `dtype`."""
    w = layer.weight
    if not is_quantized(layer):
        return w.to(dtype)
    if w.device.type != "cpu":
        return dequantized_weight(layer, dtype)
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return _int8_dequantized(layer, _scratch(tuple(w.shape), dtype))
    out = _dequantize_4bit_cpu(w, dtype)
    return out if out is not None else dequantized_weight(layer, dtype)


def _int8_scb(layer: nn.Module) -> torch.Tensor:
    """An 8-bit layer's per-row absmax (out,)."""
    w = layer.weight
    return w.SCB if getattr(w, "SCB", None) is not None else layer.state.SCB


def _int8_dequantized(layer: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """`out` (out, in) ← the int8 weight times row absmax / 127, in out's dtype: exactly how bnb's own training
    matmul (MatMul8bitFp) dequantizes."""
    return out.copy_(layer.weight.data).mul_(_int8_scb(layer).unsqueeze(1).mul(1.0 / 127.0))


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


def _dequantize_4bit_cpu(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """A 4-bit weight written into the reused buffer by bitsandbytes' own CPU kernel, the one `dequantize_4bit`
    calls (whose CPU backend has no `out=` form). None where that backend would not use this kernel either."""
    state = w.quant_state
    fn = _DEQUANTIZE_4BIT.get((state.quant_type, dtype))
    rows, cols = state.shape
    if (fn is None or isinstance(lib, ErrorHandlerMockBNBNativeLibrary) or not hasattr(lib, fn) or cols % 2
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
        qs = w.quant_state
        n += qs.absmax.numel() * qs.absmax.element_size()
        if qs.nested and qs.state2 is not None:
            n += qs.state2.absmax.numel() * qs.state2.absmax.element_size() + qs.state2.code.numel() * 4
    elif isinstance(layer, bnb.nn.Linear8bitLt):
        scb = _int8_scb(layer)
        n += scb.numel() * scb.element_size()
    return n


def make_optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class for `training.optimizer`; bitsandbytes' for the 8-bit and paged ones."""
    return {
        "adamw": torch.optim.AdamW,
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }[name]
