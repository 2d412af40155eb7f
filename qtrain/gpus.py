"""GPU memory profiles by name, memory sizes as users write them ("24GB", "12 GiB", 25769803776), and how torch's
CUDA allocator is asked to hand out that memory (`prefer_expandable_segments`).

A profile's `usable` bytes are what `cudaMemGetInfo` reports as total on that card (the marketing size minus
what the driver reserves, e.g. ECC on data-centre cards), so the planner compares its prediction with memory a
process can actually get. Figures are the commonly reported `nvidia-smi` totals per model, rounded down.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import MutableMapping

from qtrain.errors import QTrainError

MiB = 2**20
GiB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    usable: int  # bytes a process can allocate at most (before the CUDA context)
    bf16: bool  # Ampere or newer: compute_dtype auto → bfloat16, else float16 (same size for planning)


def _gpu(name: str, mib: int, bf16: bool = True) -> GPU:
    return GPU(name, mib * MiB, bf16)


GPUS: dict[str, GPU] = {g.name: g for g in [
    _gpu("rtx3060-8gb", 8192), _gpu("rtx3060", 12288), _gpu("rtx3070", 8192), _gpu("rtx3080", 10240),
    _gpu("rtx3080-12gb", 12288), _gpu("rtx3090", 24576), _gpu("rtx4060", 8188), _gpu("rtx4060ti-16gb", 16380),
    _gpu("rtx4070", 12282), _gpu("rtx4070ti-super", 16376), _gpu("rtx4080", 16376), _gpu("rtx4090", 24564),
    _gpu("rtx5070", 12227), _gpu("rtx5080", 16303), _gpu("rtx5090", 32607),
    _gpu("rtx-a4000", 16376), _gpu("rtx-a5000", 24564), _gpu("rtx4000-ada", 20475), _gpu("rtx-a6000", 49140),
    _gpu("t4", 15360, bf16=False), _gpu("v100-16gb", 16160, bf16=False), _gpu("l4", 23034), _gpu("a10", 23028),
    _gpu("a10g", 23028), _gpu("a100-40gb", 40960), _gpu("a100-80gb", 81920), _gpu("h100", 81559),
    _gpu("h100-80gb", 81559), _gpu("h200", 143771), _gpu("l40s", 46068),
]}


def gpu_profile(name: str) -> GPU:
    key = name.strip().lower().replace(" ", "").replace("_", "-")
    if key in GPUS:
        return GPUS[key]
    raise QTrainError(f"--gpu: unknown GPU {name!r}; known names: {', '.join(GPUS)} "
                      "(or give the memory directly with --budget, e.g. --budget 24GB)")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: str | int | float, key: str = "memory budget") -> int:
    """'24GB' → 24e9 bytes, '24GiB' → 24·2^30; a bare number is bytes. Raises QTrainError naming `key`."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value > 0:
            return int(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b|b)?\s*", value.lower())
        if m and float(m.group(1)) > 0:
            return int(float(m.group(1)) * _UNITS[m.group(2) or ""])
    raise QTrainError(f"{key}: {value!r} is not a memory size; write e.g. 24GB, 11.5GiB, 8000MB or a number of "
                      "bytes")


def fmt_bytes(n: float) -> str:
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 2**10)):
        if n >= size:
            return f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{int(n)} B"


ALLOCATOR_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")
EXPANDABLE_SEGMENTS = "expandable_segments:True"


def prefer_expandable_segments(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Ask torch's CUDA caching allocator for expandable segments (`qtrain.run.run` does, first thing); returns the
    variable set, or None where the user configured the allocator already or the platform has no such segments
    (they need Linux).

    Why: the default allocator carves tensors out of fixed `cudaMalloc` segments and cannot give a free gap of
    one segment to a request that needs more, so memory reserved runs ahead of memory used. That slack is worst
    where tensor sizes vary widely, as at long sequences (a layer's recompute next to a loss chunk next to
    offloaded inputs coming back); on a card capped at its size it is the difference between a run that fits
    and one that stops out of memory with gigabytes reserved and unused. Expandable segments map physical pages
    into one growing range, so a large free gap serves any request. torch reads the variable at the process's
    first CUDA call: this must run before it (importing torch is fine). torch 2.9 renamed the variable
    (PYTORCH_ALLOC_CONF; the old name still works and warns).
    """
    if not sys.platform.startswith("linux") or any(environ.get(k) for k in ALLOCATOR_VARIABLES):
        return None
    try:
        major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", metadata.version("torch")).groups())
    except (metadata.PackageNotFoundError, AttributeError, ValueError):
        major, minor = 2, 9
    name = ALLOCATOR_VARIABLES[0] if (major, minor) >= (2, 9) else ALLOCATOR_VARIABLES[1]
    environ[name] = EXPANDABLE_SEGMENTS
    return name


def allocator_settings() -> str | None:
    """The allocator settings torch runs with, where torch reports them (2.13 does, 2.11 does not), else the
    variable in the environment."""
    import torch

    get = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    if get is not None:
        return get() or None
    return next((os.environ[k] for k in ALLOCATOR_VARIABLES if os.environ.get(k)), None)
