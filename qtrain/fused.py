"""Fused RMSNorm and SwiGLU (`training.fused_ops`): the same forward, less kept for backward, fewer kernels.

What autograd keeps of transformers' modules, per token of a Llama-family decoder layer in 16-bit compute:

- RMSNorm (`w * (x.float() * rsqrt(mean(x.float()²) + eps)).to(dtype)`) keeps the fp32 upcast of its input,
  twice the 16-bit input, and its backward makes several fp32 (tokens × hidden) gradients at once. Two norms
  per layer on Llama-3-8B: 32 KiB per token saved, ~64 KiB more while a layer runs backward.
- The MLP's `act_fn(gate) * up` keeps gate, silu(gate) and up: three (tokens × intermediate) tensors, when two
  of them determine the third.

qtrain's replacements keep only their 16-bit inputs (the norm's input is often kept anyway: a checkpointed
block's input, a residual sum) and rebuild the rest in backward:

- the plain path, on any device. The norm (`recomputed`): its forward runs the module's own code over chunks
  of rows without autograd and saves only the input; backward re-runs that code chunk by chunk under autograd
  and differentiates it at once, so the fp32 temporaries exist for one chunk at a time. silu·up (`SwiGLU`):
  saves gate and up, and backward replays the three operations autograd runs for it, rebuilding silu(gate).
  The gradients are the ones transformers' modules give, bit for bit in 16-bit compute (the same operations
  on the same rows, tested); the price is one more forward of the norm and of silu per backward (elementwise,
  memory-bound).
- On a CUDA GPU with Triton installed, `qtrain.triton_kernels` does each direction in one kernel (instead of
  ~8 forward and ~12 backward launches for a norm, 2 and 4 for silu·up), saving the same inputs (and the norm's
  fp32 per-row rstd). The same values up to the transcendental functions' last bits (tested against the plain
  path through Triton's interpreter on the CPU).

Modules are switched the way `qtrain.tiling` switches the MLP: the module instance gets its own `forward`,
which keeps its class, parameter names, state dict, hooks and wrappers; deleting the attribute restores the
plain forward. Only the stock Llama/Mistral/Qwen2/Qwen3 classes are switched (their forwards are the formulas
above); a norm whose weight trains (`unfreeze`) keeps transformers' forward, and so does evaluation: the fused
forward runs where autograd records, in training.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qtrain.memory import FUSED_CHUNK_ELEMENTS
from qtrain.tiling import autocast_state

_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
CHUNK_ELEMENTS = FUSED_CHUNK_ELEMENTS  # elements per chunk of the norm's plain path (the planner counts them)


class Recompute(torch.autograd.Function):
    """out = fn(x) for a row-wise `fn` of x (rows, width), computed `rows` at a time; saves x only, and
    differentiates `fn` again chunk by chunk in backward (module docstring)."""

    @staticmethod
    def forward(ctx, fn: Callable[[torch.Tensor], torch.Tensor], rows: int, x: torch.Tensor) -> torch.Tensor:
        ctx.fn, ctx.rows = fn, rows
        ctx.autocast = autocast_state(x.device.type)
        ctx.save_for_backward(x)
        if x.shape[0] <= rows:
            return fn(x)
        first = fn(x[:rows])
        out = first.new_empty((x.shape[0], *first.shape[1:]))
        out[:rows] = first
        for i in range(rows, x.shape[0], rows):
            out[i:i + rows] = fn(x[i:i + rows])
        return out

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved_tensors
        gx = None if x.shape[0] <= ctx.rows else torch.empty_like(x)  # one chunk: autograd's own result
        with torch.enable_grad(), torch.autocast(x.device.type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
            for i in range(0, x.shape[0], ctx.rows):
                xc = x[i:i + ctx.rows].detach().requires_grad_()  # (chunk, width)
                (g,) = torch.autograd.grad(ctx.fn(xc), xc, gy[i:i + ctx.rows])
                if gx is None:
                    gx = g
                else:
                    gx[i:i + ctx.rows] = g
        return None, None, gx


def recomputed(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`fn(x)` through `Recompute`, x of any leading shape taken as rows of its last dimension, chunks of at
    most CHUNK_ELEMENTS elements."""
    rows = max(1, CHUNK_ELEMENTS // x.shape[-1])
    out = Recompute.apply(fn, rows, x.reshape(-1, x.shape[-1]))  # (rows, width)
    return out.view(*x.shape[:-1], out.shape[-1])


class SwiGLU(torch.autograd.Function):
    """silu(gate)·up, saving gate and up. Backward runs the three operations autograd runs for
    `F.silu(gate) * up` (g_up = gy·silu(gate), g_s = gy·up, g_gate = silu_backward(g_s, gate)), so the gradients
    are its own bit for bit, with silu(gate) rebuilt instead of kept and each gradient written over a temporary
    (g_up over the rebuilt silu, g_gate over g_s): two (tokens × intermediate) tensors fewer than autograd's
    backward holds at its peak."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, gy):
        gate, up = ctx.saved_tensors
        need_gate, need_up = ctx.needs_input_grad
        g_up = F.silu(gate).mul_(gy) if need_up else None
        g_gate = None
        if need_gate:
            g_s = gy * up
            g_gate = torch.ops.aten.silu_backward.grad_input(g_s, gate, grad_input=g_s)
        return g_gate, g_up


# ------------------------------------------------------------------------------------------------ Triton


@functools.cache
def _triton():
    """`qtrain.triton_kernels` when Triton can be imported, else None."""
    from qtrain import triton_kernels

    return triton_kernels if triton_kernels.available() else None


def _interpreting() -> bool:
    """Triton's interpreter (TRITON_INTERPRET=1, set before Triton is imported) runs kernels on CPU tensors:
    how the tests run the Triton path without a GPU."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_for(t: torch.Tensor):
    """The Triton kernels for a tensor on a CUDA GPU (or under Triton's interpreter), or None: the plain path."""
    return _triton() if t.is_cuda or _interpreting() else None


def backend_name(device: torch.device) -> str:
    """What the fused ops run on for `device`: "triton" kernels, or "torch" (the plain path)."""
    return "triton" if (device.type == "cuda" or _interpreting()) and _triton() is not None else "torch"


class TritonRMSNorm(torch.autograd.Function):
    """transformers' RMSNorm in one kernel each way; saves x (its dtype) and rstd (fp32 per row)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, kernels):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (rows, hidden)
        y, rstd = kernels.rms_norm_forward(x2, weight, eps)
        ctx.save_for_backward(x2, rstd, weight)
        ctx.kernels, ctx.shape = kernels, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x2, rstd, weight = ctx.saved_tensors
        gx = ctx.kernels.rms_norm_backward(gy.reshape(x2.shape).contiguous(), x2, rstd, weight)
        return gx.view(ctx.shape), None, None, None


class TritonSwiGLU(torch.autograd.Function):
    """silu(gate)·up in one kernel each way; saves gate and up."""

    @staticmethod
    def forward(ctx, gate, up, kernels):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        ctx.kernels = kernels
        return kernels.swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, gy):
        gate, up = ctx.saved_tensors
        g_gate, g_up = ctx.kernels.swiglu_backward(gy.contiguous(), gate, up)
        return g_gate, g_up, None


# ------------------------------------------------------------------------------------------------ switching


def _recording(module: nn.Module) -> bool:
    return module.training and torch.is_grad_enabled()


class FusedRMSNormForward:
    """The instance `forward` of one RMSNorm: fused where autograd records, the module's own elsewhere."""

    def __init__(self, norm: nn.Module):
        self.norm = norm
        self.plain = type(norm).forward.__get__(norm)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        if not _recording(norm) or norm.weight.requires_grad:
            return self.plain(x)
        kernels = triton_for(x)
        if kernels is not None:
            return TritonRMSNorm.apply(x, norm.weight, norm.variance_epsilon, kernels)
        return recomputed(self.plain, x)


class FusedSwiGLUForward:
    """The instance `forward` of one SwiGLU MLP: down(swiglu(gate(x), up(x))) with silu·up fused."""

    def __init__(self, mlp: nn.Module):
        self.mlp = mlp
        self.plain = type(mlp).forward.__get__(mlp)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp
        if not _recording(mlp):
            return self.plain(x)
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)  # (..., intermediate)
        kernels = triton_for(gate)
        h = TritonSwiGLU.apply(gate, up, kernels) if kernels is not None else SwiGLU.apply(gate, up)
        return mlp.down_proj(h)


def _is_silu(mlp: nn.Module) -> bool:
    act = getattr(mlp, "act_fn", None)
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def enable_fused_ops(model: nn.Module) -> dict[str, int]:
    """Switch the stock RMSNorm and SwiGLU MLP modules of `model` to the fused forwards (module docstring);
    returns how many of each. Must run before `qtrain.tiling.enable_tiled_mlp`, whose chunks then run this
    MLP forward."""
    count = {"rms_norm": 0, "swiglu": 0}
    for module in model.modules():
        name = type(module).__name__
        norm = name in _NORMS and not module.weight.requires_grad
        if not (norm or name in _MLPS and _is_silu(module)):
            continue
        assert "forward" not in vars(module), f"{name} already has its own forward"
        module.forward = FusedRMSNormForward(module) if norm else FusedSwiGLUForward(module)
        count["rms_norm" if norm else "swiglu"] += 1
    return count


def disable_fused_ops(model: nn.Module) -> None:
    """Give every switched module its class's forward back."""
    for module in model.modules():
        if isinstance(vars(module).get("forward"), (FusedRMSNormForward, FusedSwiGLUForward)):
            del module.forward
