"""Bottleneck adapters: a small trainable MLP h + up(act(down(h))) inserted around each decoder layer's blocks.

Placements (Houlsby et al. 2019; Pfeiffer et al. 2021; He et al. 2022): `houlsby` puts a serial adapter after
the attention block and after the MLP, `pfeiffer` after the MLP only, `parallel` beside one block, reading
the block's input and adding `scaling` × its output to the block's. Insertion is by composition:
`SerialAdapter(mlp)` / `ParallelAdapter(mlp)` hold the layer's own `self_attn` / `mlp` module as `base_block`
and call it unchanged, so the frozen (quantized) base is never edited and `detach` puts the same objects back.

The adapter's weights are float32 master weights held as plain parameters, not `nn.Linear` modules, so
methods that target linear layers (LoRA `all-linear`, BitFit, ...) never mistake them for base layers. A
method listed after an adapter block sees the wrapped blocks' linears as `...mlp.base_block.up_proj`: name
targets (`up_proj`) still match, regexes over full names must allow for it. The up-projection starts at zero,
so the wrapped model equals the base at step 0. Adapters are nonlinear and cannot be merged into weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qtrain.methods import Method
from qtrain.methods.blocks import AdapterBlock
from qtrain.surgery import decoder_layers, replace_modules

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class Bottleneck(nn.Module):
    """up(act(down(h))): (..., features) → (..., width) → (..., out_features), in float32.

    Plain parameters rather than nn.Linear modules (see the module docstring). `zero_up` starts the
    up-projection at zero (an adapter that begins as the identity); otherwise both layers get nn.Linear's init.
    """

    def __init__(self, features: int, width: int, activation: str, device: torch.device,
                 out_features: int | None = None, zero_up: bool = True):
        super().__init__()
        out_features = out_features or features
        f32 = {"device": device, "dtype": torch.float32}
        self.down_weight = nn.Parameter(torch.empty(width, features, **f32))
        self.down_bias = nn.Parameter(torch.empty(width, **f32))
        self.up_weight = nn.Parameter(torch.zeros(out_features, width, **f32))
        self.up_bias = nn.Parameter(torch.zeros(out_features, **f32))
        layers = [(self.down_weight, self.down_bias)] + ([] if zero_up else [(self.up_weight, self.up_bias)])
        for weight, bias in layers:  # nn.Linear's default init
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            nn.init.uniform_(bias, -1 / math.sqrt(weight.shape[1]), 1 / math.sqrt(weight.shape[1]))
        self.activation = activation

    def forward(self, h: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """The output features `rows` (all by default: a slice costs only its share of the up-projection)."""
        z = ACTIVATIONS[self.activation](F.linear(h.to(torch.float32), self.down_weight, self.down_bias))  # (..., b)
        return F.linear(z, self.up_weight[rows], self.up_bias[rows])  # (..., len(rows))


def _output(out):
    # Attention blocks return (hidden, attention weights); MLPs return the hidden states alone.
    return out[0] if isinstance(out, tuple) else out


def _with_output(out, h: torch.Tensor):
    return (h, *out[1:]) if isinstance(out, tuple) else h


class SerialAdapter(nn.Module):
    """`base_block` followed by a residual adapter on its output: y + adapter(y)."""

    def __init__(self, base_block: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.base_block = base_block
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        out = self.base_block(*args, **kwargs)
        y = _output(out)  # (B, T, H)
        return _with_output(out, y + self.adapter(y).to(y.dtype))


class ParallelAdapter(nn.Module):
    """`base_block` with an adapter beside it on the same input: block(x) + scaling · adapter(x)."""

    def __init__(self, base_block: nn.Module, adapter: Bottleneck, scaling: float):
        super().__init__()
        self.base_block = base_block
        self.adapter = adapter
        self.scaling = scaling

    def forward(self, *args, **kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (B, T, H): the block's input
        out = self.base_block(*args, **kwargs)
        y = _output(out)
        return _with_output(out, y + (self.scaling * self.adapter(x)).to(y.dtype))


class Adapter(Method):
    name = "adapter"
    not_mergeable_reason = ("bottleneck adapters are nonlinear (down-projection, activation, up-projection) and "
                            "cannot be folded into the base weights; serve with the adapter attached")

    def __init__(self, block: AdapterBlock):
        super().__init__(block)
        self.sites: list[str] = []

    def attach(self, model: nn.Module) -> dict[str, nn.Parameter]:
        b: AdapterBlock = self.block
        hidden = model.config.get_text_config().hidden_size
        width = b.width(hidden)
        self.sites = [f"{layer}.{site}" for layer, _ in decoder_layers(model) for site in b.sites()]

        def wrap(_: str, block: nn.Module) -> nn.Module:
            device = next(block.parameters()).device
            adapter = Bottleneck(hidden, width, b.activation, device)
            if b.placement == "parallel":
                return ParallelAdapter(block, adapter, b.parallel_scaling())
            return SerialAdapter(block, adapter)

        replace_modules(model, self.sites, wrap)
        return {f"{site}.adapter.{name}": p for site in self.sites
                for name, p in model.get_submodule(site).adapter.named_parameters()}

    def detach(self, model: nn.Module) -> None:
        replace_modules(model, self.sites, lambda _, m: m.base_block)
        self.sites = []
