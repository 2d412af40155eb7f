"""The training loop: one function, top to bottom, with everything it needs passed in.

Each optimizer step takes `gradient_accumulation_steps` micro-batches, counts their target tokens (summed over
processes), and back-propagates each micro-batch's loss *sum* divided by that count, so the step's gradient is
the mean over all its target tokens however they were split (see `qtrain.numerics`). Then: clip, step the
optimizer and the schedule, log, checkpoint (see `qtrain.checkpoint`: a resumed run equals the uninterrupted
one bit for bit on CPU). A step whose loss or gradient is not finite is skipped, not applied. Accelerate
supplies the device, autocast and data-parallel gradient sync; the loop never wraps itself in a Trainer.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from qtrain.checkpoint import Checkpointer, Progress
from qtrain.config import TrainingSection
from qtrain.errors import QTrainError
from qtrain.memory import loss_chunk_tokens
from qtrain.methods import prepare_inputs
from qtrain.numerics import count_targets, token_loss_sum
from qtrain.offload import HostEmbedding
from qtrain.optimizers import make_optimizer_class
from qtrain.sharding import no_sync


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model is given of a batch. Packed rows (see `qtrain.data.pack`) go in with their position_ids
    and without the 2D attention mask: transformers builds the block-diagonal causal mask from the position
    restarts only when no 2D mask and no key/value cache is given (the forward passes use_cache=False); with
    either, the examples of a row would attend to each other."""
    keys = ("input_ids", "position_ids", "labels") if "position_ids" in batch else \
        ("input_ids", "attention_mask", "labels")
    return {k: batch[k] for k in keys if k in batch}


def without_right_padding_mask(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A host batch without its attention mask where each row's padding is all on the right (as `collate`
    pads), or there is none: causal attention alone then gives every real position the same result (padding
    comes after a row's real tokens, so no real query sees it, and padding has no targets: it adds nothing to
    the loss or the gradients). Given the mask, transformers attends through a masked kernel wherever a row is
    padded (on a GPU sdpa's memory-efficient one, with a (B, 1, T, T) mask and GQA keys/values repeated to every
    head) instead of the causal one. Decided on the host, where reading the mask costs nothing; transformers
    still reads one value per forward either way (given no mask, whether the positions restart: packed rows)."""
    mask = batch.get("attention_mask")
    if mask is None or not bool((mask[:, 1:] <= mask[:, :-1]).all()):  # (B, T) of 1s then 0s per row
        return batch
    return {k: v for k, v in batch.items() if k != "attention_mask"}


def to_device(batch: dict[str, torch.Tensor], device: torch.device,
              on_host: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """A host batch on `device`, but for the keys `on_host` (`host_inputs`), which stay where they are. On a
    GPU the copy goes from pinned memory and the host does not wait for it (a copy from pageable memory would
    make it wait for the GPU to drain its queue first)."""
    if device.type != "cuda":
        return {k: v if k in on_host else v.to(device) for k, v in batch.items()}
    return {k: v if k in on_host else v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def host_inputs(model: nn.Module) -> frozenset[str]:
    """The batch keys `model` reads on the host: a `HostEmbedding` (`model.embeddings_on_host`) gathers its rows
    there, so the input ids stay on the host. Sent to the GPU, they would have to come back before the gather:
    a copy to the host, which waits for everything the GPU was given before it, at every forward."""
    return frozenset({"input_ids"}) if isinstance(unwrap(model).get_input_embeddings(), HostEmbedding) \
        else frozenset()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a data-parallel wrapper: what accelerate's `extract_model_from_parallel` returns for the
    models qtrain trains (FSDP2's `fully_shard` wraps nothing), without its walk over every module in search of
    compiled ones, which a step would pay each time."""
    while isinstance(model, (DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def batch_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int,
                   n_targets: int | None = None) -> torch.Tensor:
    """Forward the model, then the summed next-token loss over the batch's target tokens.

    The model's own forward runs (so a data-parallel wrapper prepares its gradient sync) with no logits kept
    (one kept position costs a (B, H)·(H, V) matmul, ~0.6 s per step in bf16 on CPU) and the final hidden
    states returned; the loss then runs the head on target positions only, in chunks. `n_targets`, the batch's
    target count when the caller knows it on the host, lets the loss pick those positions without reading the
    labels back from the device.
    The final hidden states are taken from the decoder's output as it is made (a forward hook), not with
    `output_hidden_states`, which would keep every layer's input on the device to the end of the forward:
    checkpointing keeps those anyway, but offloaded checkpoints (`qtrain.offload`) exist not to.
    """
    inner = unwrap(model)
    inputs = prepare_inputs(inner, model_inputs(batch))
    labels = inputs.pop("labels")  # (B, T'): with IGNORE_INDEX on any positions the methods added
    no_logits = torch.empty(0, dtype=torch.long, device=labels.device)  # positions to run the model's head on
    final: list[torch.Tensor] = []
    hook = inner.get_decoder().register_forward_hook(lambda m, args, out: final.append(out[0]))
    try:
        model(**inputs, use_cache=False, logits_to_keep=no_logits)
    finally:
        hook.remove()
    return token_loss_sum(final[-1], inner.get_output_embeddings(), labels, chunk_size, n_targets=n_targets)


def mean_batch_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int, accelerator) -> torch.Tensor:
    """One batch's mean token loss, on the accelerator's device and under its autocast (method calibration)."""
    n_targets = count_targets(batch["labels"])
    batch = to_device(without_right_padding_mask(batch), accelerator.device, host_inputs(model))
    with accelerator.autocast():
        return batch_loss_sum(model, batch, chunk_size, n_targets=n_targets) / max(1, n_targets)


def step_gradients(model: nn.Module, micro: list[dict[str, torch.Tensor]], accelerator,
                   chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Back-propagate one optimizer step's micro-batches (host tensors, as `Batches` yields them); returns the
    step's loss sum and target count over all processes, as tensors on the device, read by nobody here.

    Each micro-batch's loss sum is divided by the step's total target tokens (over all processes), so the
    accumulated gradient is the per-token mean of the whole step, however the tokens were split. The targets
    are counted on the host before the batches move, so nothing in here waits for the device.
    """
    device = accelerator.device
    counts = [count_targets(b["labels"]) for b in micro]  # host tensors: no synchronisation
    n_targets = torch.tensor(float(sum(counts)), dtype=torch.float64, device=device)
    if accelerator.num_processes > 1:
        n_targets = accelerator.reduce(n_targets, "sum")
    scale = accelerator.num_processes / n_targets  # DDP averages over processes; this undoes it
    loss_sum = torch.zeros((), device=device)
    on_host = host_inputs(model)
    for i, (batch, count) in enumerate(zip(micro, counts)):
        batch = to_device(without_right_padding_mask(batch), device, on_host)
        with nullcontext() if i == len(micro) - 1 else no_sync(model, accelerator):
            with accelerator.autocast():
                part = batch_loss_sum(model, batch, chunk_size, n_targets=count)
            accelerator.backward(part * scale.to(part.dtype))
        loss_sum += part.detach().float()
    if accelerator.num_processes > 1:
        loss_sum = accelerator.reduce(loss_sum, "sum")
    return loss_sum, n_targets


def real_tokens(micro: list[dict[str, torch.Tensor]]) -> int:
    """The non-padding tokens of a step's host batches (counted on the host: no wait for the device)."""
    return int(sum(b["attention_mask"].sum() for b in micro))


def accumulate_gradients(model: nn.Module, micro: list[dict[str, torch.Tensor]], accelerator,
                         chunk_size: int) -> tuple[float, int]:
    """`step_gradients`, read on the host: (mean token loss, target tokens) of the step."""
    loss_sum, n_targets = step_gradients(model, micro, accelerator, chunk_size)
    total, n = read_on_host(loss_sum, n_targets)
    return total / n, int(n)


def read_on_host(*values: torch.Tensor) -> list[float]:
    """Scalars of a step, read back in one transfer: the training loop's one wait for the device per step.
    A sharded run's gradient norm is a DTensor: its full value takes part."""
    values = [v.full_tensor() if hasattr(v, "full_tensor") else v for v in values]
    return torch.stack([v.detach().to(torch.float64) for v in values]).tolist()


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
    extra = {}
    if cls is torch.optim.AdamW:  # one fused kernel over all tensors, not ~12 small ops per parameter
        extra["fused"] = all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                             for g in groups for p in g["params"])
    return cls(groups, lr=cfg.learning_rate, betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
               **extra)


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
    skipped: int = 0  # steps skipped for a non-finite loss or gradient
    stopped: bool = False  # a stop was requested before the last step; a checkpoint holds the run so far
    checkpoint: Path | None = None  # the newest checkpoint of the run


class TrainingDiverged(QTrainError):
    """`training.max_bad_steps` optimizer steps in a row had a non-finite loss or gradient."""


def grad_norm_of(params: list[nn.Parameter], max_norm: float | None, accelerator) -> torch.Tensor:
    """The gradients' global L2 norm (a device tensor), after clipping them to `max_norm` when it is set."""
    if max_norm:
        return accelerator.clip_grad_norm_(params, max_norm)
    accelerator.unscale_gradients()  # a no-op unless fp16 loss scaling is on
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def train(model: nn.Module, groups: list[dict[str, Any]], batches: Iterator[dict[str, torch.Tensor]],
          cfg: TrainingSection, total_steps: int, accelerator, log: Callable[[dict[str, Any]], None],
          progress: bool = False, checkpoints: Checkpointer | None = None,
          stop: Callable[[], bool] = lambda: False, last_accum: int | None = None) -> TrainResult:
    """Run optimizer steps up to `total_steps` on the parameters in `groups`; call `log` with each step's record.
    Each step accumulates `gradient_accumulation_steps` micro-batches, the last one `last_accum` (an `epochs`
    run's last step, where the epochs end; `qtrain.run.schedule`).

    With `checkpoints`, the loop first restores its resume point (weights, optimizer, data position, RNG), then
    saves every `save_every` steps, after the last step, and when `stop()` turns true after a step (it then
    returns early with `stopped`). A step whose loss or gradient is not finite is skipped (no update) and
    counted; `max_bad_steps` of them in a row raise TrainingDiverged, leaving the last good checkpoint.
    """
    from tqdm.auto import tqdm

    optimizer = accelerator.prepare_optimizer(make_optimizer(groups, cfg))
    peak_lrs = [g["lr"] for g in optimizer.param_groups]
    # a restored optimizer takes its groups' settings from the checkpoint; the config's are the run's (they
    # differ only where --allow-config-change let weight_decay, adam_betas or adam_eps change)
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    params = [p for g in groups for p in g["params"]]
    accum = cfg.gradient_accumulation_steps
    device = accelerator.device
    # `qtrain run` has decided an `auto` chunk already (the savers may have made it smaller); else the device's
    chunk = loss_chunk_tokens(cfg.loss_chunk_size, device.type,
                              unwrap(model).get_output_embeddings().weight.shape[0])
    scaler = getattr(accelerator, "scaler", None)
    done = checkpoints.restore(optimizer, batches, scaler) if checkpoints else Progress()
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)
    model.train()
    bar = tqdm(total=total_steps, initial=done.step, desc="train", unit="step", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    seconds_before, start = done.seconds, time.perf_counter()
    # tokens_per_s: the tokens since the last record over the training time since, without what `log` (an
    # evaluation during training) and checkpoint saves took in between
    last, tokens_since, paused, bad_in_a_row, stopped = start, 0, 0.0, 0, False
    for step in range(done.step, total_steps):
        factor = lr_factor(step, cfg.warmup_steps, total_steps, cfg.lr_scheduler)
        for group, peak in zip(optimizer.param_groups, peak_lrs):
            group["lr"] = peak * factor

        n_micro = last_accum if last_accum and step + 1 == total_steps else accum
        micro = [next(batches) for _ in range(n_micro)]  # on the host; step_gradients moves them
        loss_sum, n_targets = step_gradients(model, micro, accelerator, chunk)
        # the step's one read of the device: whether to apply it depends on these
        loss_sum, n_targets, grad_norm = read_on_host(loss_sum, n_targets,
                                                      grad_norm_of(params, cfg.max_grad_norm, accelerator))
        loss = loss_sum / n_targets
        # A non-finite step is skipped: no update, the optimizer state untouched. Under fp16 loss scaling an
        # overflowing gradient is the scaler's to handle: its step skips the update and lowers the scale.
        finite = math.isfinite(loss) and (math.isfinite(grad_norm) or scaler is not None)
        if finite or scaler is not None:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bad_in_a_row = 0 if finite else bad_in_a_row + 1

        step_tokens = real_tokens(micro) * accelerator.num_processes
        done.step, done.tokens, done.skipped = step + 1, done.tokens + step_tokens, done.skipped + (not finite)
        done.losses.append(loss)
        tokens_since += step_tokens
        bar.update(1)
        if (step + 1) % cfg.log_every == 0 or step + 1 == total_steps or not finite:
            now = time.perf_counter()
            record = {
                "step": step + 1, "loss": round(loss, 6) if finite else None, "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": round(grad_norm, 6) if math.isfinite(grad_norm) else None,
                "target_tokens": int(n_targets),
                "tokens_per_s": round(tokens_since / max(now - last - paused, 1e-9), 1),
                "elapsed_s": round(seconds_before + now - start, 2),
                "peak_mem_mb": round(peak_memory_bytes(device) / 2**20, 1),
            }
            if not finite:
                record["skipped"] = f"non-finite {'loss' if not math.isfinite(loss) else 'gradient'}"
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.1e}", tok_s=record["tokens_per_s"],
                            mem=f"{record['peak_mem_mb']:.0f}M")
            log(record)
            last, tokens_since, paused = time.perf_counter(), 0, 0.0
        if bad_in_a_row >= cfg.max_bad_steps:
            bar.close()
            kept = checkpoints.last_saved if checkpoints else None
            raise TrainingDiverged(
                f"training.max_bad_steps: {bad_in_a_row} optimizer steps in a row (up to step {step + 1}) had a "
                "non-finite loss or gradient and were skipped; stopping. "
                + (f"The last good checkpoint is {kept}: lower training.learning_rate or check the data, then "
                   "continue from it with --resume (and --allow-config-change for a new learning rate), or start "
                   "again with --overwrite" if kept else
                   "No checkpoint was written: lower training.learning_rate or check the data, then start again "
                   "with --overwrite (or --resume)"))

        stopped = stop() and step + 1 < total_steps
        # the last step's checkpoint even where it was skipped (the weights are the last good ones), so a
        # finished run resumes to nothing; a periodic one not amid bad steps, which could prune good ones
        if checkpoints and ((checkpoints.due(step + 1) and not bad_in_a_row) or step + 1 == total_steps or stopped):
            saving = time.perf_counter()
            done.seconds = seconds_before + saving - start
            checkpoints.save(done, optimizer, batches, total_steps, scaler)
            paused += time.perf_counter() - saving
        if stopped:
            break
    bar.close()
    return TrainResult(steps=done.step, losses=done.losses, seconds=seconds_before + time.perf_counter() - start,
                       tokens=done.tokens, skipped=done.skipped, stopped=stopped,
                       checkpoint=checkpoints.last_saved if checkpoints else None)
