"""The tiled MLP (`training.mlp_chunk_tokens`): each decoder block's MLP runs over the sequence in chunks.

At long sequences the biggest tensors of a block's backward are the MLP's (tokens × intermediate) ones: gate,
silu(gate), up and the down projection's input, 14,336 wide on Llama-3-8B against 4,096 for the residual
stream. The MLP is position-wise, so it can run chunk by chunk without changing any token's result.
`TiledMLP` is one autograd function around the block's own MLP module:

- forward: the MLP runs chunk by chunk and only its output is kept; the function saves its (tokens × hidden)
  input and nothing of the MLP's insides. Under gradient checkpointing the block's recompute does not even do
  that much: its MLP output feeds only the block's output, which the recompute throws away (the same reasoning
  as LoRA's `recompute_tail`, and only for the same stock block classes), so it just saves the input again.
- backward: chunk by chunk, the MLP is re-run with autograd and differentiated at once, so the working set is
  one chunk's (chunk × intermediate) tensors; the input gradient is written per chunk and the parameter
  gradients (LoRA's, any trainable MLP weight's) are summed over the chunks and returned as the function's
  own, so gradient accumulation, DDP hooks and the optimizer see ordinary gradients. The down projection's
  frozen matmul is skipped there too (its output is only the root of the chunk's backward).

Chunks run the MLP's own modules (the fused LoRA path, 4-bit layers, IA3, bottleneck adapters after the MLP),
with the RNG state and autocast of the forward restored, so dropout masks and dtypes match chunk for chunk. The
quantized weights are dequantized once per MLP call and shared by the chunks (`quantization.dequantize_once`):
three dense MLP weights held during the call instead of one at a time, instead of one dequantization per chunk.
(bnb's own 4-bit forward on a GPU, used by an MLP linear that no method wraps, still dequantizes per call.)
Per-token outputs equal the untiled MLP's; the parameter gradients are sums over chunks, equal up to float
reassociation. Sequences no longer than a chunk take the plain path, so short runs keep full speed.

The MLP is switched by giving the module instance its own `forward` (`enable_tiled_mlp`), which keeps the
module, its class, its parameter names and state dict, hooks and wrappers exactly as they were; deleting the
attribute restores the plain forward.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from qtrain.modeling import mark_recompute_tail, recompute_context, recomputing, tail_is_discarded
from qtrain.quantization import dequantize_once
from qtrain.surgery import decoder_layers


def autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    """(enabled, dtype) of autocast now: what a re-run in backward must restore to compute as forward did."""
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class TiledMLP(torch.autograd.Function):
    """out = mlp(x), computed and differentiated `chunk` tokens at a time (module docstring)."""

    @staticmethod
    def forward(ctx, x, run: Callable, chunk: int, discard_in_recompute: bool, stochastic: bool, *params):
        ctx.run, ctx.chunk, ctx.skip = run, chunk, discard_in_recompute
        ctx.autocast = autocast_state(x.device.type)
        ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda else None) \
            if stochastic else None
        ctx.save_for_backward(x)
        ctx.params = params
        if discard_in_recompute and recomputing():  # nothing reads it: see the module docstring
            return x.new_zeros(()).expand(x.shape)
        flat = x.reshape(-1, x.shape[-1])  # (N, hidden)
        out = None
        # gradients on (the fused training paths, as untiled), each chunk's graph dropped at once; the identity
        # hooks keep a checkpoint's saved-tensor hooks from recording the chunks as the block's own
        with torch.enable_grad(), _own_saved_tensors(), dequantize_once(), \
                torch.autocast(x.device.type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
            for i in range(0, flat.shape[0], chunk):
                y = run(flat[i:i + chunk]).detach()  # (c, hidden)
                if out is None:
                    out = y.new_empty((flat.shape[0], y.shape[-1]))
                out[i:i + chunk] = y
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved_tensors
        flat, g = x.detach().reshape(-1, x.shape[-1]), gy.reshape(-1, gy.shape[-1])  # (N, hidden), (N, out)
        need_x = ctx.needs_input_grad[0]
        wanted = [p for p, need in zip(ctx.params, ctx.needs_input_grad[5:]) if need]
        gx = torch.empty_like(flat) if need_x else None
        sums: list[torch.Tensor | None] = [None] * len(wanted)
        rng = torch.random.fork_rng(devices=[x.device] if x.is_cuda else [], enabled=ctx.rng is not None)
        with rng, torch.enable_grad(), dequantize_once(), recompute_context(ctx.skip), \
                torch.autocast(x.device.type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
            if ctx.rng is not None:  # the forward's dropout masks, chunk for chunk
                torch.set_rng_state(ctx.rng[0])
                if ctx.rng[1] is not None:
                    torch.cuda.set_rng_state(ctx.rng[1], x.device)
            for i in range(0, flat.shape[0], ctx.chunk):
                xc = flat[i:i + ctx.chunk].detach().requires_grad_(need_x)  # (c, hidden)
                inputs = ([xc] if need_x else []) + wanted
                grads = torch.autograd.grad(ctx.run(xc), inputs, g[i:i + ctx.chunk], allow_unused=True)
                if need_x:
                    gx[i:i + ctx.chunk] = grads[0]
                    grads = grads[1:]
                for k, gp in enumerate(grads):
                    if gp is not None:
                        sums[k] = gp if sums[k] is None else sums[k].add_(gp)
        it = iter(sums)
        param_grads = [next(it) if need else None for need in ctx.needs_input_grad[5:]]
        return (gx.view_as(x) if need_x else None, None, None, None, None, *param_grads)


@contextlib.contextmanager
def _own_saved_tensors():
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        yield


class _TiledForward:
    """The instance `forward` of one tiled MLP module: chunks only in training and past one chunk's tokens."""

    def __init__(self, mlp: nn.Module, chunk: int, discard_in_recompute: bool):
        self.mlp, self.chunk, self.discard = mlp, chunk, discard_in_recompute
        self.plain = vars(mlp).get("forward") or type(mlp).forward.__get__(mlp)  # a fused MLP's, or the class's

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        mlp = self.mlp
        if args or kwargs or not (mlp.training and torch.is_grad_enabled()) or x.shape[:-1].numel() <= self.chunk:
            return self.plain(x, *args, **kwargs)
        params = [p for p in mlp.parameters() if p.requires_grad]
        stochastic = any(isinstance(m, nn.Dropout) and m.p > 0 and m.training for m in mlp.modules())
        return TiledMLP.apply(x, self.plain, self.chunk, self.discard, stochastic, *params)


def enable_tiled_mlp(model: nn.Module, chunk_tokens: int) -> int:
    """Run every decoder block's MLP in chunks of `chunk_tokens` tokens in training; returns how many."""
    count = 0
    for _, layer in decoder_layers(model):
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            continue
        mlp.forward = _TiledForward(mlp, chunk_tokens, tail_is_discarded(layer))
        mark_recompute_tail(layer)  # the chunks' re-run in backward needs no down-projection output either
        count += 1
    return count
