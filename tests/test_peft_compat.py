"""qtrain's adapter folder loads in peft (a test-only dependency) on the same quantized base with the same logits,
and in qtrain itself."""

import json

import pytest
import torch

from qtrain.adapter_io import load_adapter, save_adapter
from qtrain.config import ModelSection, QuantizationSection
from qtrain.methods import build_methods
from qtrain.methods.blocks import LoRABlock
from qtrain.modeling import load_model

CPU = torch.device("cpu")


def trained_lora(model_dir, bits, block):
    loaded = load_model(ModelSection(path=str(model_dir)), QuantizationSection(bits=bits), CPU)
    torch.manual_seed(0)
    methods = build_methods([block])
    params = methods[0].attach(loaded.model)
    with torch.no_grad():
        for p in params.values():
            p.normal_(std=0.05)  # as if trained: both A and B non-zero
    return loaded.model.eval(), methods, params


@pytest.mark.parametrize("bits", [4, 8, "none"])
@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_our_adapter_with_the_same_logits(tiny_model_dir, tmp_path, bits, rslora):
    peft = pytest.importorskip("peft")
    block = LoRABlock(method="lora", r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"],
                      rslora=rslora)
    model, methods, params = trained_lora(tiny_model_dir, bits, block)
    save_adapter(tmp_path / "adapter", methods, params, base_model=str(tiny_model_dir))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_rslora"] is rslora
    assert str(tmp_path) not in json.dumps(config)  # no absolute path of the run leaks into the adapter

    def fresh_base():
        return load_model(ModelSection(path=str(tiny_model_dir)), QuantizationSection(bits=bits), CPU).model

    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        ours = model(ids).logits
        bare = fresh_base().eval()(ids).logits
        theirs = peft.PeftModel.from_pretrained(fresh_base(), str(tmp_path / "adapter")).eval()(ids).logits
        reloaded = fresh_base()
        load_adapter(reloaded, tmp_path / "adapter")
        again = reloaded.eval()(ids).logits
    assert (ours - bare).abs().max() > 1e-3  # the adapter really changes the output
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert torch.equal(again, ours)
