"""Numerics that must exist exactly once: the loss, its normalisation, the LoRA scale and delta, DoRA's norm.

Training, evaluation, export and the benchmarks all call these, so a change here changes them all together.

Loss. `token_loss_sum` returns the *sum* of next-token cross-entropies over target positions. The training loop
divides by the number of target tokens in the whole optimizer step (all micro-batches, all processes), so a
step's gradient is the mean over its tokens no matter how they are split into micro-batches. Only target
positions reach the output head, and the head runs on chunks of them under activation checkpointing: the full
(tokens × vocab) fp32 logits never exist, which is most of a naive trainer's peak on small models.
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


def _chunk_ce_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # (n, V)
    return F.cross_entropy(logits, targets, reduction="sum")


def token_loss_sum(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_size: int = 1024,
                   checkpoint_chunks: bool = True) -> torch.Tensor:
    """Sum of cross-entropies of next-token predictions at target positions.

    hidden: (B, T, H) final hidden states; labels: (B, T) token ids with IGNORE_INDEX where no loss is taken.
    """
    mask, targets = target_positions(labels)
    h = hidden[:, :-1][mask]  # (N, H): only positions whose next token is a target
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_size):
        hc, tc = h[start:start + chunk_size], targets[start:start + chunk_size]
        if checkpoint_chunks and torch.is_grad_enabled():
            total = total + checkpoint(_chunk_ce_sum, head, hc, tc, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(head, hc, tc)
    return total
