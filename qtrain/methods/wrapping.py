"""What the weight-side methods share: a wrapper around one linear layer, and a method that wraps its targets.

LoRA, IA3, BitFit and sparse fine-tuning each replace a targeted linear (plain, 4/8-bit, or another method's
wrapper, so that methods stack on one layer) with a module that holds it as `base_layer`, by composition. The
wrapper reports the wrapped layer's shape and folds itself into a dense tensor of that layer (`merged`); the
method selects targets by peft's rules, refuses a second block of itself on one layer, puts the very same base
modules back on detach, and routes export's tensor-by-tensor merge to the wrapper of each tensor's layer.
Because every wrapper treats the layer it wraps as a black box (out = f(inner(x))), merging tensor by tensor in
attach order composes stacked methods correctly.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import nn

from qtrain.methods import Method
from qtrain.surgery import innermost, refuse_restacking, replace_modules, select_linears


class LinearWrapper(nn.Module):
    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def base_device(self) -> torch.device:
        """Where the wrapped layer's weight lives (the new parameters go there too)."""
        return innermost(self.base_layer).weight.device

    def merged(self, kind: str, tensor: torch.Tensor) -> torch.Tensor:
        """The wrapped layer's dense float32 `weight` (out, in) or `bias` (out,), with this wrapper folded in."""
        raise AssertionError(f"{type(self).__name__} must implement merged")


class WrappingMethod(Method):
    """A method made of one `wrapper` per targeted linear layer."""

    mergeable = True
    wrapper: ClassVar[type[LinearWrapper]]

    def __init__(self, block):
        super().__init__(block)
        self.targets: list[str] = []
        self._wrappers: dict[str, LinearWrapper] = {}

    def select(self, model: nn.Module) -> list[str]:
        """The targeted layers (errors name `peft.<method>.target_modules`)."""
        key = f"peft.{self.name}.target_modules"
        self.targets = select_linears(model, self.block.target_modules, key)
        refuse_restacking(model, self.targets, self.wrapper, key)
        return self.targets

    def wrap(self, model: nn.Module, build: Callable[[str, nn.Module], LinearWrapper]) -> dict[str, LinearWrapper]:
        """Replace each selected layer by `build(name, layer)`; the wrappers by layer name."""
        replace_modules(model, self.targets, build)
        self._wrappers = {name: model.get_submodule(name) for name in self.targets}
        return self._wrappers

    def detach(self, model: nn.Module) -> None:
        replace_modules(model, self.targets, lambda _, m: m.base_layer)
        self._wrappers = {}

    def merged_tensor(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        module, _, kind = key.rpartition(".")
        wrapper = self._wrappers.get(module)
        if wrapper is None or kind not in ("weight", "bias"):
            return tensor
        return wrapper.merged(kind, tensor.to(torch.float32)).to(tensor.dtype)
