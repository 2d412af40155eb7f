"""LoRA numerics: identity at init, float64 reference on every base storage, gradients only on A and B."""

import math

import pytest
import torch
from torch import nn

from qtrain.methods.blocks import LoRABlock
from qtrain.methods.lora import LoRA, LoRALinear
from qtrain.numerics import lora_delta_weight, lora_scaling
from qtrain.quantization import QuantSpec, dequantized_weight, quantize_linear

STORAGES = {"nf4": QuantSpec(bits=4, quant_type="nf4"), "fp4": QuantSpec(bits=4, quant_type="fp4"),
            "int8": QuantSpec(bits=8), "none": QuantSpec(bits=None)}


@pytest.mark.parametrize("storage", STORAGES)
def test_lora_equals_float64_reference(storage):
    torch.manual_seed(0)
    base = quantize_linear(nn.Linear(96, 80, bias=False), STORAGES[storage])
    lora = LoRALinear(base, r=8, alpha=16).train()
    nn.init.normal_(lora.lora_B.weight)  # a non-zero update, so the low-rank path is checked too
    x = torch.randn(4, 7, 96)
    ref = x.double() @ (dequantized_weight(base, torch.float64)
                        + lora_delta_weight(lora.lora_A.weight.double(), lora.lora_B.weight.double(), 2.0)).T
    # Stated tolerance: float32 accumulation over 96 (base) and 8 (rank) products, |values| ~ 10.
    assert (lora(x).double() - ref).abs().max() < 1e-4


@pytest.mark.parametrize("storage", STORAGES)
def test_identity_at_init_and_gradients_reach_only_a_and_b(storage):
    torch.manual_seed(0)
    base = quantize_linear(nn.Linear(32, 48, bias=True), STORAGES[storage])
    lora = LoRALinear(base, r=4, alpha=8).train()
    x = torch.randn(6, 32, requires_grad=True)
    assert torch.equal(lora(x), base(x))  # B = 0
    lora(x).pow(2).sum().backward()
    nn.init.normal_(lora.lora_B.weight)
    lora.lora_A.weight.grad = None
    lora(x).pow(2).sum().backward()
    assert lora.lora_A.weight.grad is not None and lora.lora_A.weight.grad.abs().sum() > 0
    assert lora.lora_B.weight.grad is not None and lora.lora_B.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in base.parameters())


def test_scaling_and_rslora():
    assert lora_scaling(32, 16, rslora=False) == 2.0
    assert lora_scaling(32, 16, rslora=True) == 8.0
    assert LoRALinear(nn.Linear(8, 8), r=4, alpha=8, rslora=True).scaling == 8 / math.sqrt(4)


def test_attach_and_detach_on_a_model(tiny_model_dir):
    from qtrain.config import ModelSection, QuantizationSection
    from qtrain.modeling import load_model

    model = load_model(ModelSection(path=str(tiny_model_dir)), QuantizationSection(bits=4), torch.device("cpu")).model
    original = {n: m for n, m in model.named_modules()}
    method = LoRA(LoRABlock(method="lora", r=2, target_modules=["q_proj", "v_proj"]))
    params = method.attach(model)
    assert sorted({n.split(".")[-3] for n in params}) == ["q_proj", "v_proj"]
    assert len(params) == 2 * 2 * 2  # 2 layers × 2 targets × (A, B)
    assert all(p.requires_grad for p in params.values())
    assert method.adapter_config("x")["target_modules"] == ["q_proj", "v_proj"]
    method.detach(model)
    assert all(original[n] is m for n, m in model.named_modules())  # the very same base modules are back


def test_regex_and_bad_targets(tiny_model_dir):
    from qtrain.config import ModelSection, QuantizationSection
    from qtrain.errors import QTrainError
    from qtrain.modeling import load_model

    model = load_model(ModelSection(path=str(tiny_model_dir)), QuantizationSection(bits=4), torch.device("cpu")).model
    method = LoRA(LoRABlock(method="lora", r=2, target_modules=r"model\.layers\.1\.mlp\..*"))
    params = method.attach(model)
    assert {n.split(".")[2] for n in params} == {"1"}
    assert method.adapter_config("x")["target_modules"] == r"model\.layers\.1\.mlp\..*"  # names would select more
    with pytest.raises(QTrainError, match="matches no linear layer.*q_proj"):
        LoRA(LoRABlock(method="lora", target_modules=["qproj"])).attach(model)


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"], r"model\.layers\.1\.mlp\..*"])
def test_closed_form_count_equals_the_real_model(tiny_model_dir, targets):
    from qtrain.arch import Arch
    from qtrain.config import ModelSection, QuantizationSection
    from qtrain.modeling import load_model

    block = LoRABlock(method="lora", r=3, target_modules=targets)
    model = load_model(ModelSection(path=str(tiny_model_dir)), QuantizationSection(bits=4), torch.device("cpu")).model
    real = sum(p.numel() for p in LoRA(block).attach(model).values())
    assert block.trainable_parameters(Arch.from_path(tiny_model_dir)) == real


@pytest.mark.parametrize("bits", [4, 8, "none"])
def test_merged_tensor_reproduces_the_wrapped_layer(tiny_model_dir, bits):
    from qtrain.config import ModelSection, QuantizationSection
    from qtrain.modeling import load_model

    model = load_model(ModelSection(path=str(tiny_model_dir)), QuantizationSection(bits=bits),
                       torch.device("cpu")).model
    method = LoRA(LoRABlock(method="lora", r=3, alpha=6, dropout=0.0, target_modules=["o_proj"]))
    for name, p in method.attach(model).items():
        nn.init.normal_(p, std=0.1)
    wrapper = model.get_submodule("model.layers.0.self_attn.o_proj")
    merged = method.merged_tensor("model.layers.0.self_attn.o_proj.weight", dequantized_weight(wrapper.base_layer))
    x = torch.randn(5, 64)
    torch.testing.assert_close(x @ merged.T, wrapper.train()(x), rtol=0, atol=1e-5)
    untouched = torch.randn(64, 64)
    assert method.merged_tensor("model.layers.0.self_attn.q_proj.weight", untouched) is untouched
