"""The training loop: one function, top to bottom, with everything it needs passed in.

Each optimizer step takes `gradient_accumulation_steps` micro-batches, counts their target tokens (summed over
processes), and back-propagates each micro-batch's loss *sum* divided by that count, so the step's gradient is
the mean over all its target tokens however they were split (see `qtrain.numerics`). Then: clip, step the
optimizer and the schedule, log. Accelerate supplies the device, autocast and data-parallel gradient sync; the
loop never wraps itself in a Trainer.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from qtrain.config import TrainingSection
from qtrain.numerics import count_targets, token_loss_sum
from qtrain.quantization import make_optimizer_class


def batch_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    """Forward the decoder, then the summed next-token loss over the batch's target tokens."""
    decoder = getattr(model, model.base_model_prefix)
    out = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return token_loss_sum(out[0], model.get_output_embeddings(), batch["labels"], chunk_size)


def accumulate_gradients(model: nn.Module, micro: list[dict[str, torch.Tensor]], accelerator,
                         chunk_size: int) -> tuple[float, int]:
    """Back-propagate one optimizer step's micro-batches; returns (mean token loss, target tokens).

    Each micro-batch's loss sum is divided by the step's total target tokens (over all processes), so the
    accumulated gradient is the per-token mean of the whole step, however the tokens were split.
    """
    device = accelerator.device
    local = sum(count_targets(b["labels"]) for b in micro)
    n_targets = int(accelerator.reduce(torch.tensor(local, device=device), "sum").item())
    scale = accelerator.num_processes / n_targets  # DDP averages over processes; this undoes it
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(micro):
        with nullcontext() if i == len(micro) - 1 else accelerator.no_sync(model):
            with accelerator.autocast():
                part = batch_loss_sum(model, batch, chunk_size)
            accelerator.backward(part * scale)
        loss_sum += part.detach().float()
    return accelerator.reduce(loss_sum, "sum").item() / n_targets, n_targets


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based): linear warmup, then decay."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(groups: list[dict[str, Any]], cfg: TrainingSection) -> torch.optim.Optimizer:
    cls = make_optimizer_class(cfg.optimizer)
    return cls(groups, lr=cfg.learning_rate, betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@dataclass
class TrainResult:
    steps: int
    losses: list[float]
    seconds: float
    tokens: int


def train(model: nn.Module, groups: list[dict[str, Any]], batches: Iterator[dict[str, torch.Tensor]],
          cfg: TrainingSection, total_steps: int, accelerator, log: Callable[[dict[str, Any]], None],
          progress: bool = False) -> TrainResult:
    """Run `total_steps` optimizer steps on the parameters in `groups`; call `log` with each step's record."""
    from tqdm.auto import tqdm

    optimizer = accelerator.prepare_optimizer(make_optimizer(groups, cfg))
    peak_lrs = [g["lr"] for g in optimizer.param_groups]
    params = [p for g in groups for p in g["params"]]
    accum = cfg.gradient_accumulation_steps
    device = accelerator.device
    model.train()
    bar = tqdm(total=total_steps, desc="train", unit="step", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    losses: list[float] = []
    start = last = time.perf_counter()
    tokens_total = tokens_since = 0
    for step in range(total_steps):
        factor = lr_factor(step, cfg.warmup_steps, total_steps, cfg.lr_scheduler)
        for group, peak in zip(optimizer.param_groups, peak_lrs):
            group["lr"] = peak * factor

        micro = [{k: v.to(device) for k, v in next(batches).items()} for _ in range(accum)]
        loss, n_targets = accumulate_gradients(model, micro, accelerator, cfg.loss_chunk_size)
        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        step_tokens = int(sum(b["attention_mask"].sum() for b in micro)) * accelerator.num_processes
        tokens_total += step_tokens
        tokens_since += step_tokens
        losses.append(loss)
        bar.update(1)
        if (step + 1) % cfg.log_every == 0 or step + 1 == total_steps:
            now = time.perf_counter()
            record = {
                "step": step + 1, "loss": round(loss, 6), "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": None if grad_norm is None else round(float(grad_norm), 6),
                "target_tokens": int(n_targets), "tokens_per_s": round(tokens_since / (now - last), 1),
                "elapsed_s": round(now - start, 2), "peak_mem_mb": round(peak_memory_bytes(device) / 2**20, 1),
            }
            last, tokens_since = now, 0
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=record["tokens_per_s"], mem=f"{record['peak_mem_mb']:.0f}M")
            log(record)
    bar.close()
    return TrainResult(steps=total_steps, losses=losses, seconds=time.perf_counter() - start, tokens=tokens_total)
