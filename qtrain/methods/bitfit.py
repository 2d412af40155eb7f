"""BitFit: train bias terms only (Ben Zaken et al., 2022), on any base storage.

`BiasLinear(base)` returns `base(x) + b` with `b` a float32 vector (out,) that starts at zero, so step 0 is the
base. It is a wrapper by composition rather than a bias put inside the base layer for two reasons: the base
stays untouched (bitsandbytes' Linear4bit.forward casts its own bias to the input dtype in place, which would
silently turn a trainable float32 bias into a 16-bit one), and bias-free architectures (the Llama family) gain
a bias without changing any base module. Where the base already has a bias (Qwen2's q/k/v), `b` is a trained
full-precision correction on top of the frozen one; mathematically that is training the bias itself.

Merging adds `b` to the base bias, or, where the checkpoint has none, adds a new `<layer>.bias` tensor.
peft has no BitFit, so the adapter carries the vectors as `<layer>.bitfit_bias` for qtrain to load.
"""

from __future__ import annotations

import torch
from torch import nn

from qtrain.methods.wrapping import LinearWrapper, WrappingMethod
from qtrain.surgery import innermost


class BiasLinear(LinearWrapper):
    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.bitfit_bias = nn.Parameter(torch.zeros(base_layer.out_features, device=self.base_device))  # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (..., out)
        return (out + self.bitfit_bias).to(out.dtype)

    def merged(self, kind: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor + self.bitfit_bias.detach().to(tensor.device) if kind == "bias" else tensor


class BitFit(WrappingMethod):
    name = "bitfit"
    wrapper = BiasLinear

    def attach(self, model: nn.Module) -> dict[str, nn.Parameter]:
        self.select(model)
        wrappers = self.wrap(model, lambda _, m: BiasLinear(m))
        return {f"{name}.bitfit_bias": w.bitfit_bias for name, w in wrappers.items()}

    def added_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{name}.bias": w.bitfit_bias.detach().clone() for name, w in self._wrappers.items()
                if innermost(w).bias is None}
