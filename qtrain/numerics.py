"""Numerics that must exist exactly once: the loss, its normalisation, the LoRA scale and delta, DoRA's norm.

Training, evaluation, export and the benchmarks all call these, so a change here changes them all together.

Loss. `token_loss_sum` returns the *sum* of next-token cross-entropies over target positions. The training loop
divides by the number of target tokens in the whole optimizer step (all micro-batches, all processes), so a
step's gradient is the mean over its tokens no matter how they are split into micro-batches. Only target
positions reach the output head, a chunk of them at a time: the full (tokens × vocab) fp32 logits never exist,
which is most of a naive trainer's peak on small models. For a plain linear head (every causal LM's) the head
and the cross-entropy are one autograd function, `HeadCrossEntropy`, that computes each chunk's gradient in the
forward pass, while its logits exist anyway: softmax − one-hot, written over the logits in place, times the
head weight. Backward then only scales the stored (N, H) gradient by the incoming scalar, so the head runs once
per step (a checkpointed chunk would run it twice) and one chunk's logits are the whole working set. Any other
head (a wrapped or custom one) takes the generic path: each chunk through autograd under checkpointing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def lora_scaling(alpha: float, r: int, rslora: bool) -> float:
    """alpha/r (LoRA), or alpha/sqrt(r) (rsLoRA: keeps the update's scale stable as the rank grows)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def lora_delta_weight(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The dense (out, in) update a LoRA adds to its base weight: scaling · B @ A."""
    return scaling * (b @ a)


def dora_weight_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """DoRA's denominator: the row norms (out,) of the adapted weight W + ΔW, both (out, in)."""
    return torch.linalg.norm(weight + delta, dim=1)


def dora_merged_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's dense (out, in) weight: each row of W + ΔW rescaled to length m (out,). The bias is unchanged."""
    return (magnitude / dora_weight_norm(weight, delta))[:, None] * (weight + delta)


def target_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask over positions 0..T-2 whose next token is a target, those next tokens) for labels (B, T)."""
    nxt = labels[:, 1:]  # (B, T-1)
    mask = nxt != IGNORE_INDEX
    return mask, nxt[mask]


def count_targets(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def target_rows(hidden: torch.Tensor, labels: torch.Tensor, n_targets: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h (N, H), targets (N,)): the hidden states of the positions whose next token is a target, in order.

    A boolean mask picks them by reading the labels back from the device (a synchronisation, in forward and
    again in backward). When the caller knows N on the host (it counts the targets before the batch moves),
    `nonzero_static` finds the same positions with a size fixed in advance, and the rows are gathered with
    `index_select`, whose backward is a scatter-add: the same rows in the same order, nothing waits.
    """
    if n_targets is None:
        mask, targets = target_positions(labels)
        return hidden[:, :-1][mask], targets
    nxt = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T): position t's next token; none for the last
    flat = nxt.reshape(-1)
    index = torch.nonzero_static(flat != IGNORE_INDEX, size=n_targets).squeeze(1)  # (N,) row-major, as a mask
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, index), flat.index_select(0, index)


def _chunk_ce_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # (n, V)
    return F.cross_entropy(logits, targets, reduction="sum")


class HeadCrossEntropy(torch.autograd.Function):
    """Σ cross_entropy(h @ Wᵀ + b, targets) over N positions, chunk by chunk; the gradient is made in forward.

    h: (N, H) in the compute dtype, weight: (V, H), bias: (V,) or None, targets: (N,). The logits are float32
    (the matmul runs in `dtype`), as the generic path's `.float()` makes them.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_size: int, dtype: torch.dtype):
        with torch.autocast(h.device.type, enabled=False):  # dtypes are explicit here
            return HeadCrossEntropy._forward(ctx, h, weight, bias, targets, chunk_size, dtype)

    @staticmethod
    def _forward(ctx, h, weight, bias, targets, chunk_size, dtype):
        need_h, need_w = h.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        w = weight.to(dtype)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        # one logits buffer for all chunks: a fresh (n, V) block per chunk is fresh pages from the OS every time
        buffer = torch.empty(min(chunk_size, h.shape[0]), w.shape[0], dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_size):
            hc, tc = h[start:start + chunk_size].to(dtype), targets[start:start + chunk_size]
            logits = buffer[:len(tc)]  # (n, V)
            if dtype == torch.float32:
                torch.mm(hc, w.T, out=logits)
            else:
                logits.copy_(hc @ w.T)
            if bias is not None:
                logits += bias.float()
            picked = logits.gather(1, tc[:, None]).squeeze(1)  # (n,) the targets' logits
            top = logits.amax(dim=-1)  # (n,)
            probs = logits.sub_(top[:, None]).exp_()  # in place: logsumexp would allocate a second (n, V)
            norm = probs.sum(dim=-1)  # (n,)
            total += (top + norm.log() - picked).sum()  # Σ logsumexp − target logit
            if not (need_h or need_w or need_b):
                continue
            probs.div_(norm[:, None])  # softmax
            probs[torch.arange(len(tc), device=tc.device), tc] -= 1.0  # d loss / d logits, (n, V)
            if need_h:
                grad_h[start:start + chunk_size] = (probs.to(dtype) @ w).to(h.dtype)
            if need_w:
                grad_w.addmm_(probs.T, hc.float())
            if need_b:
                grad_b += probs.sum(0)
        as_param = lambda g: None if g is None else g.to(weight.dtype)  # noqa: E731
        ctx.save_for_backward(grad_h, as_param(grad_w), as_param(grad_b))
        return total

    @staticmethod
    def backward(ctx, grad_out):  # grad_out: the scalar the loss sum was multiplied by
        grads = tuple(None if g is None else g * grad_out.to(g.dtype) for g in ctx.saved_tensors)
        return (*grads, None, None, None)


def matmul_dtype(x: torch.Tensor, default: torch.dtype | None = None) -> torch.dtype:
    """The dtype a layer multiplies `x` in: autocast's when it is on (as `nn.Linear` would), else `default`
    (e.g. a 4-bit layer's compute dtype) or x's own. The fused training paths state their dtypes with it."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return default or x.dtype


def token_loss_sum(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_size: int = 1024,
                   fused: bool = True, n_targets: int | None = None) -> torch.Tensor:
    """Sum of cross-entropies of next-token predictions at target positions.

    hidden: (B, T, H) final hidden states; labels: (B, T) token ids with IGNORE_INDEX where no loss is taken;
    n_targets: their count, when known on the host (see `target_rows`).
    A plain `nn.Linear` head takes `HeadCrossEntropy` unless `fused=False`; other heads the generic path.
    """
    h, targets = target_rows(hidden, labels, n_targets)  # (N, H): only positions whose next token is a target
    if type(head) is nn.Linear and fused:
        return HeadCrossEntropy.apply(h, head.weight, head.bias, targets, chunk_size, matmul_dtype(h))
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_size):
        hc, tc = h[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_ce_sum, head, hc, tc, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(head, hc, tc)
    return total
