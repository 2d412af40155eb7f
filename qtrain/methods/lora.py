"""LoRA: a trainable low-rank update B·A beside a frozen linear layer of any storage (plain, 4-bit, 8-bit).

`LoRALinear(base)` holds the base layer and returns `base(x) + scaling · B(A(dropout(x)))`. B starts at zero,
so the wrapped model equals the base at step 0. A and B are float32 master weights whatever the base stores;
under autocast their matmuls run in the compute dtype. The parameter names (`lora_A.weight`, `lora_B.weight`
under the wrapped module's path) are peft's, so saved files load in peft unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from qtrain.methods import Method
from qtrain.methods.blocks import LoRABlock
from qtrain.numerics import lora_delta_weight, lora_scaling
from qtrain.surgery import linear_names, replace_modules, select_linears


class LoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        self.base_layer = base_layer
        device = base_layer.weight.device
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's default init for A
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = lora_scaling(alpha, r, rslora)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (..., out)
        h = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        return out + (self.lora_B(self.lora_A(h)) * self.scaling).to(out.dtype)  # A: (..., r), B: (..., out)


class LoRA(Method):
    name = "lora"
    peft_type = "LORA"
    mergeable = True

    def __init__(self, block: LoRABlock):
        super().__init__(block)
        self.targets: list[str] = []
        self._short_names: list[str] = []
        self._wrappers: dict[str, LoRALinear] = {}

    def attach(self, model: nn.Module) -> dict[str, nn.Parameter]:
        b: LoRABlock = self.block
        self.targets = select_linears(model, b.target_modules, "peft.lora.target_modules")
        all_linear = linear_names(model)
        short = sorted({n.rsplit(".", 1)[-1] for n in self.targets})
        # Portable configs list module names; keep the user's regex only when names would select more.
        same = {n for n in all_linear if n.rsplit(".", 1)[-1] in short} == set(self.targets)
        self._short_names = short if same else []
        replace_modules(model, self.targets,
                        lambda _, m: LoRALinear(m, b.r, b.alpha, b.dropout, b.rslora))
        params: dict[str, nn.Parameter] = {}
        for name in self.targets:
            wrapper = self._wrappers[name] = model.get_submodule(name)
            params[f"{name}.lora_A.weight"] = wrapper.lora_A.weight
            params[f"{name}.lora_B.weight"] = wrapper.lora_B.weight
        return params

    def detach(self, model: nn.Module) -> None:
        replace_modules(model, self.targets, lambda _, m: m.base_layer)
        self._wrappers = {}

    def merged_tensor(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        module, _, kind = key.rpartition(".")
        wrapper = self._wrappers.get(module)
        if wrapper is None or kind != "weight":
            return tensor
        delta = lora_delta_weight(wrapper.lora_A.weight.detach().to(tensor.device, torch.float32),
                                  wrapper.lora_B.weight.detach().to(tensor.device, torch.float32), wrapper.scaling)
        return (tensor.to(torch.float32) + delta).to(tensor.dtype)

    def adapter_config(self, base_model: str) -> dict[str, Any]:
        b: LoRABlock = self.block
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": b.r, "lora_alpha": b.alpha, "lora_dropout": b.dropout,
            "target_modules": self._short_names or b.target_modules,
            "use_rslora": b.rslora, "use_dora": False, "bias": "none", "fan_in_fan_out": False,
            "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
            "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
            "revision": None,
        }
