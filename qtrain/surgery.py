"""Explicit module surgery: one tree walker that swaps modules matching a predicate, and target matching.

No monkeypatching: a PEFT method replaces a module with a wrapper that holds the original by composition, and
unwrapping puts the very same object back. Target selection follows peft's rules so adapter_config.json
`target_modules` means the same thing to both: a list matches the module's name or its last components
(`q_proj` matches `model.layers.0.self_attn.q_proj`), a string is a regex that must match the full name, and
`all-linear` is every linear layer except the output head.
"""

from __future__ import annotations

import re
from typing import Callable

from torch import nn

from qtrain.errors import QTrainError
from qtrain.quantization import is_linear
from qtrain.arch import matches


def replace_modules(model: nn.Module, names: list[str], build: Callable[[str, nn.Module], nn.Module]) -> None:
    """Replace each named submodule with `build(name, module)`."""
    for name in names:
        model.set_submodule(name, build(name, model.get_submodule(name)))


def innermost(module: nn.Module) -> nn.Module:
    """The layer at the bottom of a stack of PEFT wrappers (each holds the layer it wraps as `base_layer`)."""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


def refuse_restacking(model: nn.Module, names: list[str], wrapper: type[nn.Module], key: str) -> None:
    """An error naming `key` if a named layer already holds a `wrapper` (two blocks of one method on it)."""
    for name in names:
        module = model.get_submodule(name)
        while module is not None:
            if isinstance(module, wrapper):
                raise QTrainError(f"{key}: {name} is targeted by two blocks of the same method; give each layer to "
                                  "one block (narrow target_modules)")
            module = getattr(module, "base_layer", None)


def linear_names(model: nn.Module, include_head: bool = False) -> list[str]:
    """Names of the linear layers (plain, 4-bit or 8-bit, or a PEFT wrapper around one, so methods can stack on
    one layer), excluding wrappers' inner layers and the head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, m in model.named_modules()
            if is_linear(innermost(m)) and (include_head or m is not head) and not _inside_wrapper(name)]


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(full name, module) of each decoder layer of a causal LM, e.g. (`model.layers.0`, LlamaDecoderLayer)."""
    prefix = model.base_model_prefix
    layers = getattr(getattr(model, prefix), "layers", None)
    assert isinstance(layers, nn.ModuleList), f"{type(model).__name__} has no {prefix}.layers"
    return [(f"{prefix}.layers.{i}", layer) for i, layer in enumerate(layers)]


def _inside_wrapper(name: str) -> bool:
    # Layers owned by a PEFT wrapper (its base layer, its own A/B projections) are not targets themselves.
    return any(part in ("base_layer", "lora_A", "lora_B") for part in name.split("."))


def portable_targets(model: nn.Module, chosen: list[str], given: list[str] | str) -> list[str] | str:
    """What adapter_config.json should list for the layers `chosen` (selected by the user's `given`): their
    last name components when those select exactly the same layers (portable across models), else `given`."""
    short = sorted({n.rsplit(".", 1)[-1] for n in chosen})
    same = {n for n in linear_names(model) if n.rsplit(".", 1)[-1] in short} == set(chosen)
    return short if same else given


def select_linears(model: nn.Module, targets: list[str] | str, key: str) -> list[str]:
    """The linear layers `targets` names; an error naming `key` when it matches none."""
    candidates = linear_names(model)
    if targets == "all-linear":
        chosen = candidates
    else:
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as e:
                raise QTrainError(f"{key}: {targets!r} is not a valid regex ({e}); fix it or list module names")
        chosen = [n for n in candidates if matches(n, targets)]
    if not chosen:
        short = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise QTrainError(f"{key}: {targets!r} matches no linear layer of this model; its linear layers are "
                          f"named {short} (or use 'all-linear')")
    return chosen
