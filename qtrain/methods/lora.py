"""LoRA and its variants: a trainable low-rank update B·A beside a frozen linear of any storage (plain, 4/8-bit).

`LoRALinear(base)` holds the base layer and returns `base(x) + scaling · B(A(dropout(x)))`. B starts at zero,
so the wrapped model equals the base at step 0. A and B are float32 master weights whatever the base stores;
under autocast their matmuls run in the compute dtype. The parameter names (`lora_A.weight`, `lora_B.weight`,
DoRA's `lora_magnitude_vector` under the wrapped module's path) are peft's, so saved files load in peft.

Variants (options in `LoRABlock`): rsLoRA changes the scale; rank/alpha patterns give each module its own r and
alpha by peft's matching rule; LoRA+ gives B its own learning rate through `param_groups`; DoRA adds a
magnitude m (out,) and computes, like peft,

    out = base(x) + (m/n − 1) · (W·x) + (m/n) · scaling · B·A·x,   n = ‖W + scaling·B·A‖_row (no gradient)

which equals m · (W + ΔW)/n applied to x, plus the base bias. W is the base's dequantized weight, so DoRA works
on 4-bit and 8-bit bases; the price is one dequantization per forward. At init m = n, so step 0 is the base.

Training takes a fused path when the base is a frozen linear (plain, 4-bit or 8-bit) and DoRA is off:
`LoRAFunction` computes y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ with the update accumulated into the base's output by the
GEMM itself (`addmm_(..., alpha=s)`), and writes its own backward (gx = gy·W + s·(gy·B)·A, gB = s·gyᵀ·(x·Aᵀ),
gA = s·(gy·B)ᵀ·x). That drops the scaling and addition passes over every (tokens × out) output in forward and
backward, saves only x and the (tokens × r) x·Aᵀ, and dequantizes W once in forward and once in backward, as
bitsandbytes' own matmul does (on CPU into one reused buffer: `quantization.matmul_weight`). In a checkpointed
block's recompute, a layer whose output the recompute never reads (`recompute_tail`, which `enable_checkpointing`
sets on the MLP's down projection) computes only the x·Aᵀ that backward saves and skips its base matmul.
Evaluation and generation use the composed modules above; the paths agree to float tolerance
(tests/test_fast_paths.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from qtrain.arch import pattern_key
from qtrain.errors import QTrainError
from qtrain.methods.blocks import LoRABlock
from qtrain.methods.wrapping import LinearWrapper, WrappingMethod
from qtrain.numerics import dora_merged_weight, dora_weight_norm, lora_delta_weight, lora_scaling, matmul_dtype
from qtrain.modeling import recomputing
from qtrain.quantization import FrozenMatmul, dequantized_weight, is_linear, linear_input_grad, linear_product
from qtrain.surgery import portable_targets


def _scaled_mm(m1: torch.Tensor, m2: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · m1 @ m2 as one GEMM (beta=0: the empty output's contents are never read)."""
    out = m1.new_empty((m1.shape[0], m2.shape[1]))
    return torch.addmm(out, m1, m2, beta=0, alpha=scale)


class LoRAFunction(torch.autograd.Function):
    """y = x·Wᵀ + bias + s·(h·Aᵀ)·Bᵀ over a frozen base `layer`; h is x after dropout, or None for x itself
    (one tensor is never passed twice: torch.compile cannot trace a Function given the same tensor twice)."""

    @staticmethod
    def forward(ctx, x, h, a, b, layer: nn.Module, scaling: float, dtype: torch.dtype, output_unused: bool = False):
        with torch.autocast(x.device.type, enabled=False):  # dtypes are explicit here
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (N, in)
            h2 = x2 if h is None else h.reshape(-1, h.shape[-1]).to(dtype)
            ha = h2 @ a.to(dtype).T  # (N, r)
            if output_unused:  # a recompute that only needs what backward saves: no base matmul
                y = ha.new_zeros(()).expand(x2.shape[0], layer.out_features)
            else:
                y = linear_product(x2, layer, layer.bias, dtype)  # (N, out)
                y.addmm_(ha, b.to(dtype).T, alpha=scaling)
        ctx.save_for_backward(h2, ha, a, b)
        ctx.layer, ctx.scaling, ctx.dtype, ctx.same_input = layer, scaling, dtype, h is None
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        h2, ha, a, b = ctx.saved_tensors
        dtype, s = ctx.dtype, ctx.scaling
        need_x, need_h, need_a, need_b = ctx.needs_input_grad[:4]
        with torch.autocast(gy.device.type, enabled=False):
            gy2 = gy.reshape(-1, gy.shape[-1]).to(dtype)  # (N, out)
            gyb = gy2 @ b.to(dtype)  # (N, r)
            gx = gh = None
            if need_x:
                gx = linear_input_grad(gy2, ctx.layer, dtype)  # (N, in)
                if ctx.same_input:
                    gx.addmm_(gyb, a.to(dtype), alpha=s)
                gx = gx.reshape(ctx.x_shape).to(ctx.x_dtype)
            if need_h and not ctx.same_input:
                gh = _scaled_mm(gyb, a.to(dtype), s).reshape(ctx.x_shape).to(ctx.x_dtype)
            # the scale goes into the GEMM (its alpha: one kernel and one rounding, not a product then a scale
            # pass), never onto a (tokens × features) operand
            ga = _scaled_mm(gyb.T, h2, s).to(a.dtype) if need_a else None  # (r, in)
            gb = _scaled_mm(gy2.T, ha, s).to(b.dtype) if need_b else None  # (out, r)
        return gx, gh, ga, gb, None, None, None, None


class LoRALinear(LinearWrapper):
    fuse_training = True  # False: train through the composed modules (the reference the fused path is tested on)
    recompute_tail = False  # set by enable_checkpointing where the recompute never reads this layer's output

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dora: bool = False):
        super().__init__(base_layer)
        device = self.base_device
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's default init for A
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = lora_scaling(alpha, r, rslora)
        self.lora_magnitude_vector: nn.Parameter | None = None
        if dora:
            assert is_linear(base_layer), "DoRA needs the weight of the layer it wraps"
            with torch.no_grad():  # m starts at the row norms the forward divides by, so m/n = 1 exactly
                norm = dora_weight_norm(dequantized_weight(base_layer, torch.float32), self.delta_weight())
            self.lora_magnitude_vector = nn.Parameter(norm)  # (out,)

    @property
    def _fused(self) -> bool:
        """Training over a frozen linear without DoRA takes `LoRAFunction` (module docstring)."""
        base = self.base_layer
        return (self.fuse_training and self.training and torch.is_grad_enabled() and self.lora_magnitude_vector is None
                and is_linear(base) and not base.weight.requires_grad
                and (base.bias is None or not base.bias.requires_grad))

    def delta_weight(self) -> torch.Tensor:
        """scaling · B @ A, (out, in) float32."""
        return lora_delta_weight(self.lora_A.weight, self.lora_B.weight, self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused:
            h = self.lora_dropout(x)
            return LoRAFunction.apply(x, None if h is x else h, self.lora_A.weight, self.lora_B.weight,
                                      self.base_layer, self.scaling,
                                      matmul_dtype(x, getattr(self.base_layer, "compute_dtype", None)),
                                      self.recompute_tail and recomputing())
        out = self.base_layer(x)  # (..., out)
        h = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(h)) * self.scaling  # A: (..., r), B: (..., out)
        if self.lora_magnitude_vector is not None:
            update = self._dora_update(x, h, out, update)
        return out + update.to(out.dtype)

    def _dora_update(self, x: torch.Tensor, h: torch.Tensor, out: torch.Tensor,
                     update: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the norm is a constant in backward (DoRA, section 4.3)
            weight = dequantized_weight(self.base_layer, torch.float32)  # (out, in)
            norm = dora_weight_norm(weight, self.delta_weight())  # (out,)
        scale = self.lora_magnitude_vector / norm  # (out,); m receives the gradient
        if h is x or not self.training or isinstance(self.lora_dropout, nn.Identity):
            bias = self.base_layer.bias
            base = out.float() if bias is None else out.float() - bias.float()  # W·x, reused from the base
        else:
            # with dropout, peft rescales the dropped-out input's base path; through FrozenMatmul, which
            # dequantizes again in backward, not F.linear, which would keep this float32 weight until then
            base = FrozenMatmul.apply(h, None, self.base_layer, torch.float32)
        return (scale - 1) * base + scale * update

    def merged(self, kind: str, tensor: torch.Tensor) -> torch.Tensor:
        if kind != "weight":
            return tensor  # DoRA rescales W·x only; the bias passes through unchanged
        delta = self.delta_weight().detach().to(tensor.device)
        if self.lora_magnitude_vector is None:
            return tensor + delta
        return dora_merged_weight(tensor, delta, self.lora_magnitude_vector.detach().to(tensor.device))


class LoRA(WrappingMethod):
    name = "lora"
    peft_type = "LORA"
    wrapper = LoRALinear

    def __init__(self, block: LoRABlock):
        super().__init__(block)
        self._peft_targets: list[str] | str = block.target_modules

    def attach(self, model: nn.Module) -> dict[str, nn.Parameter]:
        b: LoRABlock = self.block
        self.select(model)
        self._check_targets(model)
        self._peft_targets = portable_targets(model, self.targets, b.target_modules)
        wrappers = self.wrap(model, lambda name, m: LoRALinear(
            m, b.rank_for(name), b.alpha_for(name), b.dropout, b.rslora, b.dora))
        params: dict[str, nn.Parameter] = {}
        for name, wrapper in wrappers.items():
            params[f"{name}.lora_A.weight"] = wrapper.lora_A.weight
            params[f"{name}.lora_B.weight"] = wrapper.lora_B.weight
            if wrapper.lora_magnitude_vector is not None:
                params[f"{name}.lora_magnitude_vector"] = wrapper.lora_magnitude_vector
        return params

    def _check_targets(self, model: nn.Module) -> None:
        b: LoRABlock = self.block
        for key, pattern in (("rank_pattern", b.rank_pattern), ("alpha_pattern", b.alpha_pattern)):
            for k in pattern:
                if not any(pattern_key({k: None}, n) for n in self.targets):
                    raise QTrainError(f"peft.lora.{key}: {k!r} matches none of the targeted modules "
                                      f"(e.g. {self.targets[0]}); use a module name suffix or a regex over them")
        for name in self.targets:
            if b.dora and not is_linear(model.get_submodule(name)):
                raise QTrainError(f"peft.lora.dora: {name} is already wrapped by an earlier method; DoRA needs the "
                                  "layer's own weight, so list the lora block first in `peft`")

    def param_groups(self, params: dict[str, nn.Parameter], lr: float) -> list[dict[str, Any]]:
        ratio = self.block.lr_ratio_b
        if ratio is None:
            return super().param_groups(params, lr)
        # LoRA+: B (and, as in peft's LoRA+ optimizer, the 1-D DoRA magnitudes) learn `ratio` times faster.
        slow = {id(w.lora_A.weight) for w in self._wrappers.values()}
        return [{"params": [p for p in params.values() if id(p) in slow], "lr": lr},
                {"params": [p for p in params.values() if id(p) not in slow], "lr": lr * ratio}]

    def adapter_config(self, base_model: str) -> dict[str, Any]:
        b: LoRABlock = self.block
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": b.r, "lora_alpha": b.alpha, "lora_dropout": b.dropout,
            "target_modules": self._peft_targets,
            "use_rslora": b.rslora, "use_dora": b.dora, "bias": "none", "fan_in_fan_out": False,
            "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
            "rank_pattern": dict(b.rank_pattern), "alpha_pattern": dict(b.alpha_pattern),
            "layers_to_transform": None, "layers_pattern": None, "revision": None,
        }
