"""FSDP2 for qtrain's frozen-base + adapter models: shard, gather, restore.

accelerate's launcher says a run is sharded (`accelerate launch --config_file configs/accelerate/fsdp-qlora.yaml`
sets ACCELERATE_USE_FSDP and FSDP_VERSION); qtrain then applies torch's FSDP2 (`fully_shard`) itself, one group
per decoder layer and one for the rest, rather than through `accelerator.prepare_model`, because accelerate 1.16
shards only on accelerators: on a CPU it silently falls back to data-parallel (its `AcceleratorState` makes a
CPU run MULTI_CPU, outside its FSDP branch). So the same sharding code runs on a CPU over gloo (tested) and on
GPUs over NCCL.

FSDP2 shards every parameter on its first dimension across processes (a DTensor) and all-gathers a layer's
parameters just before its forward and backward; the frozen base shards with the adapters. A 4-bit weight is
stored packed in `quantization.quant_storage`, so it shards like any other tensor; its quantization constants
(absmax, a few % of its size) are plain attributes and stay whole on every process. The all-gathered weight is a
plain tensor without bnb's `quant_state`: `qtrain.quantization` reads the layer's copy of it.

What the rest of qtrain sees: parameters are DTensors after `shard_model`, with unchanged names, so the
trainable-parameter dict is rebuilt by name (`reshard_params`); `full_tensors` gathers them (and optimizer
states) for the main process to write the adapter and checkpoints in the unsharded layout, and
`distribute_like` puts a full tensor back into a sharded parameter's layout on resume.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from qtrain.errors import QTrainError


@dataclass(frozen=True)
class FSDPSettings:
    """What accelerate's launcher asked for (its FSDP_* environment)."""

    reshard_after_forward: bool = True  # free each layer's gathered weights after its forward (ZeRO-3)
    offload_params: bool = False  # keep the shards in CPU memory between uses (GPU runs)


def requested() -> FSDPSettings | None:
    """The FSDP settings accelerate's launcher passed to this process, or None for an unsharded run."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise QTrainError(f"fsdp_config.fsdp_version: {version}; qtrain shards with FSDP2 only (per-parameter "
                          "sharding, which keeps frozen 4-bit weights and trainable adapters apart). Set "
                          "`fsdp_version: 2` in the accelerate config (configs/accelerate/fsdp-qlora.yaml does)")
    flag = lambda name, default: os.environ.get(name, default).lower() in ("true", "1", "full_shard")  # noqa: E731
    return FSDPSettings(reshard_after_forward=flag("FSDP_RESHARD_AFTER_FORWARD", "true"),
                        offload_params=flag("FSDP_OFFLOAD_PARAMS", "false"))


def check_supported(optimizer: str) -> None:
    """Refuse, before anything loads, what cannot train sharded: bitsandbytes' optimizers have no DTensor rule
    (their step fails with `NotImplementedError: Operator bitsandbytes.optimizer_update_32bit.default does not
    have a sharding strategy registered` on CPU; it is DTensor's dispatch, not a CPU kernel, that has no rule)."""
    if optimizer != "adamw":
        raise QTrainError(f"training.optimizer: {optimizer} cannot step FSDP-sharded parameters (bitsandbytes' "
                          "optimizers have no DTensor support); use training.optimizer=adamw, whose 32-bit states "
                          "are sharded with the parameters (1/N of them per device)")


def shard_model(model: nn.Module, settings: FSDPSettings) -> nn.Module:
    """Shard `model` in place with FSDP2: each decoder layer one group, then the root (embeddings, norm, head)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    extra: dict[str, Any] = {"offload_policy": CPUOffloadPolicy()} if settings.offload_params else {}
    try:
        for layer in model.get_decoder().layers:
            fully_shard(layer, reshard_after_forward=settings.reshard_after_forward, **extra)
        fully_shard(model, **extra)
    except RuntimeError as e:
        # torch 2.11's FSDP2 makes every shard a parameter that requires grad before copying the flag over,
        # which an integer tensor cannot be (2.13 passes the flag in)
        if "floating point dtype can require gradients" not in str(e):
            raise
        raise QTrainError(f"quantization.bits: 8 cannot be sharded by the FSDP of torch {torch.__version__}: it "
                          "fails on integer weights, and 8-bit weights are int8. Use quantization.bits: 4 with "
                          "quantization.quant_storage: bfloat16 (or float32), which stores them in a float dtype "
                          "that shards, or a torch that shards integer parameters (2.13 does)") from None
    return model


@contextmanager
def no_sync(model: nn.Module, accelerator) -> Iterator[None]:
    """Inside: no gradient reduction in backward (all but an optimizer step's last micro-batch), as
    `accelerator.no_sync` does for data-parallel. Not for a model sharded here: FSDP2 would then keep every
    trainable gradient whole on every device until the step's last micro-batch (what sharding is there to avoid,
    and what `qtrain plan` does not count), so a sharded run reduce-scatters after each micro-batch instead."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        yield
        return
    with accelerator.no_sync(model):
        yield


def reshard_params(model: nn.Module, params: dict[str, nn.Parameter],
                   groups: list[dict[str, Any]]) -> tuple[dict[str, nn.Parameter], list[dict[str, Any]]]:
    """The trainable parameters and optimizer groups pointing at the sharded parameters that replaced them
    (FSDP2 swaps each parameter for a DTensor one under the same name)."""
    now = dict(model.named_parameters(remove_duplicate=False))
    new = {name: now[name] for name in params}
    by_id = {id(old): new[name] for name, old in params.items()}
    return new, [{**g, "params": [by_id[id(p)] for p in g["params"]]} for g in groups]


def held_parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameters this process holds: its shard of each parameter, plus the quantization constants
    (absmax, row scales) that stay whole on every process. `qtrain plan --fsdp` predicts this number."""
    from torch.distributed.tensor import DTensor

    from qtrain.quantization import is_quantized, weight_nbytes

    total = 0
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        total += local.numel() * local.element_size()
    for m in model.modules():
        if is_quantized(m):  # what weight_nbytes counts beyond the weight itself
            total += weight_nbytes(m) - m.weight.numel() * m.weight.element_size()
    return total


def full_tensor(t: Any) -> Any:
    """A DTensor gathered whole (a collective: every process must call it); anything else as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: full_tensor(t.detach()) for name, t in tensors.items()}


def full_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """`optimizer.state_dict()` with every sharded state tensor gathered whole (every process must call it)."""
    return {**state, "state": {i: {k: full_tensor(v) for k, v in s.items()} for i, s in state["state"].items()}}


def distribute_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` in `param`'s layout: this process's shard of it where `param` is sharded, else `full` itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor) or full.shape != param.shape:
        return full
    return distribute_tensor(full.to(param.device), param.device_mesh, param.placements)


def sharded_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A gathered optimizer state dict (`full_optimizer_state`) put back into the layout of `optimizer`'s
    sharded parameters, for `optimizer.load_state_dict`."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return {**state, "state": {i: {k: distribute_like(v, params[int(i)]) if torch.is_tensor(v) else v
                                   for k, v in s.items()} for i, s in state["state"].items()}}
