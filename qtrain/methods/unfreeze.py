"""Layer unfreezing: chosen decoder layers (or modules in them) are trained in full; the rest stays quantized.

The loader keeps the chosen layers' linears unquantized (`UnfreezeBlock.full_precision_linears`, passed by the
run as `skip_quantize`), so they start from the checkpoint's own values, not from a dequantized copy. `attach`
then makes float32 master copies of every parameter in them (weights, biases, norms) and trains those; the
loaded tensors are kept aside untouched so `detach` restores the base. (On a base loaded fully quantized, e.g.
when an adapter is loaded onto it, a chosen quantized linear is first replaced by a dense one from its
dequantized weight; the saved values then overwrite it.)

When the compute dtype is not float32 (bf16 on GPUs), each trained module gets a forward pre-hook that casts
its floating inputs to float32 and a hook that casts its outputs back, so the unfrozen layers compute in fp32
between quantized neighbours computing in bf16. On CPU (fp32 compute) no hook is needed and none is set.

Merging replaces the base tensors by the trained ones. Methods that add to the same weights (LoRA on an
unfrozen layer) must therefore come after `unfreeze` in `peft:`, so export adds their deltas on top;
`attach` refuses the other order.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from qtrain.errors import QTrainError
from qtrain.methods import Method
from qtrain.methods.blocks import UnfreezeBlock
from qtrain.quantization import dequantized_weight, is_quantized
from qtrain.surgery import decoder_layers


def _cast(value, dtype: torch.dtype):
    """`value` with every floating tensor in it (also inside tuples/lists) cast to `dtype`."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _dense_copy(layer: nn.Module) -> nn.Linear:
    """A plain float32 nn.Linear computing what the quantized `layer` computes."""
    weight = dequantized_weight(layer, torch.float32)
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device,
                      dtype=torch.float32)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if layer.bias is not None:
            dense.bias.copy_(layer.bias)
    dense.requires_grad_(False)
    return dense


class Unfreeze(Method):
    name = "unfreeze"
    mergeable = True

    def __init__(self, block: UnfreezeBlock):
        super().__init__(block)
        self._trained: dict[str, nn.Parameter] = {}
        self._restore: list[tuple[nn.Module, str, object]] = []  # (owner, attribute, original) to undo attach
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._upcast_from: set[torch.dtype] = set()

    def _chosen_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        b: UnfreezeBlock = self.block
        layers = decoder_layers(model)
        n = len(layers)
        if b.pattern is None:
            if b.last_n is not None:
                if b.last_n > n:
                    raise QTrainError(f"peft.unfreeze.last_n: {b.last_n} exceeds the model's {n} layers")
                indices = range(n - b.last_n, n)
            else:
                bad = [i for i in b.layers if not -n <= i < n]
                if bad:
                    raise QTrainError(f"peft.unfreeze.layers: {bad} out of range for a model with {n} layers")
                indices = sorted({i % n for i in b.layers})
            return [layers[i] for i in indices]
        chosen: list[tuple[str, nn.Module]] = []
        for layer_name, layer in layers:
            for sub, module in layer.named_modules(prefix=layer_name):
                # outermost matches only: a module inside a chosen one is trained with it
                if re.fullmatch(b.pattern, sub) and not any(sub.startswith(c + ".") for c, _ in chosen):
                    chosen.append((sub, module))
        if not chosen:
            raise QTrainError(f"peft.unfreeze.pattern: {b.pattern!r} matches no module inside the decoder layers "
                              f"(named like {layers[0][0]}.mlp.up_proj); fix the regex")
        return chosen

    def attach(self, model: nn.Module) -> dict[str, nn.Parameter]:
        for top_name, top in self._chosen_modules(model):
            wrapped = [n for n, _ in top.named_modules(prefix=top_name) if {"base_layer", "base_block"} &
                       set(n.split("."))]
            if wrapped:
                raise QTrainError(f"peft: unfreeze comes after a method that already wraps {wrapped[0]}; list the "
                                  "unfreeze block first in peft: so merged weights stay correct")
            for name, module in list(top.named_modules(prefix=top_name)):
                if is_quantized(module):
                    parent_name, _, attr = name.rpartition(".")
                    parent = model.get_submodule(parent_name)
                    self._restore.append((parent, attr, module))
                    parent._modules[attr] = _dense_copy(module)
            before: set[torch.dtype] = set()
            for name, module in top.named_modules(prefix=top_name):
                for pname, p in list(module.named_parameters(recurse=False)):
                    if p.requires_grad:  # another method's parameter
                        continue
                    before.add(p.dtype)
                    master = nn.Parameter(p.detach().to(torch.float32, copy=True))  # (never aliases the base)
                    self._restore.append((module, pname, p))
                    module._parameters[pname] = master
                    self._trained[f"{name}.{pname}"] = master
            low = before - {torch.float32}
            if low:
                self._upcast_from |= low
                target = low.pop()
                self._hooks.append(top.register_forward_pre_hook(
                    lambda _, args, kwargs: (_cast(args, torch.float32), _cast(kwargs, torch.float32)),
                    with_kwargs=True))
                self._hooks.append(top.register_forward_hook(lambda _, __, out, dt=target: _cast(out, dt)))
        return dict(self._trained)

    def describe(self) -> str:
        n = sum(p.numel() for p in self._trained.values())
        cast = (f"upcast from {', '.join(str(d).replace('torch.', '') for d in self._upcast_from)} to float32 "
                "master weights (these modules compute in float32)") if self._upcast_from else "float32 weights"
        return f"unfreeze: training {n:,} parameters in full ({len(self._trained)} tensors, {cast})"

    def merged_tensor(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        trained = self._trained.get(key)
        return tensor if trained is None else trained.detach().to(tensor.device, tensor.dtype)

    def detach(self, model: nn.Module) -> None:
        for hook in self._hooks:
            hook.remove()
        for owner, attr, original in reversed(self._restore):
            if isinstance(original, nn.Module):
                owner._modules[attr] = original
            else:
                owner._parameters[attr] = original
        self._trained, self._restore, self._hooks = {}, [], []
