"""IA3: learned scaling vectors on keys, values and the MLP's intermediate activation (Liu et al., 2022).

`IA3Linear(base)` holds any linear (plain, 4-bit, 8-bit, or another method's wrapper) and scales either its
output (keys, values: one factor per output feature) or, for a "feedforward" layer such as `down_proj`, its
input (the MLP's intermediate activation: one factor per input feature). The vectors start at one, so step 0 is
the base. The layout is peft's: a float32 `ia3_l` of shape (out, 1) or (1, in) under the layer's path, and an
IA3 adapter_config.json with `feedforward_modules`, so peft loads the files.

Merging scales the weight's rows (output) or columns (input); an output scaling scales the bias as well.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qtrain.errors import QTrainError
from qtrain.methods.blocks import IA3Block
from qtrain.methods.wrapping import LinearWrapper, WrappingMethod
from qtrain.surgery import portable_targets, select_linears


class IA3Linear(LinearWrapper):
    def __init__(self, base_layer: nn.Module, feedforward: bool):
        super().__init__(base_layer)
        self.is_feedforward = feedforward
        shape = (1, base_layer.in_features) if feedforward else (base_layer.out_features, 1)  # peft's shapes
        self.ia3_l = nn.Parameter(torch.ones(shape, device=self.base_device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.ia3_l.flatten()  # (in,) or (out,)
        if self.is_feedforward:
            return self.base_layer((x * scale).to(x.dtype))  # (..., in) scaled before the layer
        out = self.base_layer(x)  # (..., out)
        return (out * scale).to(out.dtype)

    def merged(self, kind: str, tensor: torch.Tensor) -> torch.Tensor:
        scale = self.ia3_l.detach().to(tensor.device)
        if kind == "weight":
            return tensor * scale  # (1, in) scales columns, (out, 1) scales rows
        return tensor if self.is_feedforward else tensor * scale.flatten()


class IA3(WrappingMethod):
    name = "ia3"
    peft_type = "IA3"
    wrapper = IA3Linear

    def __init__(self, block: IA3Block):
        super().__init__(block)
        self._peft_targets: list[str] | str = block.target_modules
        self._peft_feedforward: list[str] | str = block.feedforward_modules or []

    def attach(self, model: nn.Module) -> dict[str, nn.Parameter]:
        b: IA3Block = self.block
        self.select(model)
        if b.feedforward_modules is None:  # the default: wherever it is targeted
            feedforward = [n for n in self.targets if b.is_feedforward(n)]
        else:  # what the user named, which must be targeted; [] for none
            feedforward = b.feedforward_modules and select_linears(model, b.feedforward_modules,
                                                                   "peft.ia3.feedforward_modules")
        outside = sorted(set(feedforward) - set(self.targets))
        if outside:  # peft refuses such a config too
            raise QTrainError(f"peft.ia3.feedforward_modules: {outside[0]} is not among target_modules; feedforward "
                              "modules must be a subset of the targets (e.g. target_modules: [k_proj, v_proj, "
                              "down_proj], feedforward_modules: [down_proj])")
        self._peft_targets = portable_targets(model, self.targets, b.target_modules)
        self._peft_feedforward = portable_targets(model, feedforward, b.feedforward_modules or feedforward) \
            if feedforward else []
        ff = set(feedforward)
        wrappers = self.wrap(model, lambda name, m: IA3Linear(m, name in ff))
        return {f"{name}.ia3_l": w.ia3_l for name, w in wrappers.items()}

    def adapter_config(self, base_model: str) -> dict[str, Any]:
        return {
            "peft_type": "IA3", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "target_modules": self._peft_targets, "feedforward_modules": self._peft_feedforward,
            "fan_in_fan_out": False, "init_ia3_weights": True, "modules_to_save": None, "inference_mode": True,
            "revision": None,
        }
