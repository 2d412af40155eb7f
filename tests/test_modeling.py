"""Loading: every base parameter frozen, linears quantized (head and embeddings kept), tied head still tied,
outputs close to the full-precision model, and clear errors for unusable folders."""

import gc
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from qtrain.config import ModelSection, QuantizationSection
from qtrain.errors import QTrainError
from qtrain.modeling import footprint, load_model
from qtrain.quantization import bits_of

CPU = torch.device("cpu")


def full_precision(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("bits,tol", [(4, 0.35), (8, 0.02), ("none", 1e-5)])
def test_quantized_load(tiny_model_dir, bits, tol):
    loaded = load_model(ModelSection(path=str(tiny_model_dir)), QuantizationSection(bits=bits), CPU)
    model = loaded.model
    assert not any(p.requires_grad for p in model.parameters())
    linears = {n: m for n, m in model.named_modules() if n.endswith(("_proj",))}
    assert len(linears) == 2 * 7
    assert all(bits_of(m) == (None if bits == "none" else bits) for m in linears.values())
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        ref = full_precision(tiny_model_dir)(ids).logits
        out = model.train()(ids).logits  # train mode: bnb's dequantise-and-matmul path
    rel = (out - ref).abs().max() / ref.abs().max()
    assert rel < tol
    if bits != "none":
        assert rel > 0


def test_footprint_reports_quantized_storage(tiny_model_dir):
    four = footprint(load_model(ModelSection(path=str(tiny_model_dir)), QuantizationSection(bits=4), CPU).model)
    full = footprint(load_model(ModelSection(path=str(tiny_model_dir)), QuantizationSection(bits="none"), CPU).model)
    assert full["quantized_linear_bytes"] == 0
    linear_fp32 = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128) * 4
    # 4 bits per weight plus absmax constants (and, at this tiny size, a 1 KiB nested code table per layer)
    assert linear_fp32 / 8 < four["quantized_linear_bytes"] < linear_fp32 / 5
    assert four["other_param_bytes"] + linear_fp32 == full["other_param_bytes"]  # embeddings and norms as they were


def test_untied_head_loads(tiny_untied_dir):
    model = load_model(ModelSection(path=str(tiny_untied_dir)), QuantizationSection(bits=4), CPU).model
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    ref = full_precision(tiny_untied_dir).lm_head.weight
    assert torch.equal(model.lm_head.weight, ref)


def test_unusable_folders_get_clear_errors(tiny_model_dir, tmp_path):
    with pytest.raises(QTrainError, match="has no config.json"):
        load_model(ModelSection(path=str(tmp_path)), QuantizationSection(), CPU)
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(QTrainError, match="safetensors only"):
        load_model(ModelSection(path=str(no_weights)), QuantizationSection(), CPU)
    unknown = tmp_path / "unknown-arch"
    shutil.copytree(tiny_model_dir, unknown)
    cfg = json.loads((unknown / "config.json").read_text())
    cfg["model_type"] = "no-such-architecture"
    (unknown / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QTrainError, match="(?s)model.path.*transformers version that knows this one") as err:
        load_model(ModelSection(path=str(unknown)), QuantizationSection(), CPU)
    assert "trust_remote_code" not in str(err.value)  # the model ships no code: trusting it cannot help
    with pytest.raises(QTrainError, match="neither a local folder"):
        load_model(ModelSection(path="no such thing"), QuantizationSection(), CPU)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc")
@pytest.mark.parametrize("bits", [4, "none"])
def test_loaded_model_keeps_no_shard_mapped(tiny_model_dir, tmp_path, bits):
    """The fp32 checkpoint loaded in fp32: read through safetensors' mmap, every kept tensor would be a view of
    the shard, keeping the file mapped (and its pages in RSS) for the model's lifetime."""
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    model = load_model(ModelSection(path=str(folder)), QuantizationSection(bits=bits, compute_dtype="float32"),
                       CPU).model
    gc.collect()
    maps = Path("/proc/self/maps").read_text()
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert not any(str(shard.resolve()) in maps for shard in folder.glob("*.safetensors"))


def test_shard_reader_matches_safe_open(tiny_untied_dir, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qtrain.shards import ShardReader

    mixed = tmp_path / "mixed.safetensors"  # every dtype a checkpoint uses, odd sizes, a scalar
    save_file({"bf16": torch.randn(3, 5).to(torch.bfloat16), "f16": torch.randn(7).half(), "i64": torch.arange(3),
               "u8": torch.arange(5, dtype=torch.uint8), "scalar": torch.tensor(2.5)}, str(mixed))
    for shard in [*tiny_untied_dir.glob("*.safetensors"), mixed]:
        with safe_open(str(shard), framework="pt") as ref, ShardReader(shard) as mine:
            assert sorted(mine.keys()) == sorted(ref.keys())
            for key in ref.keys():
                a, b = ref.get_tensor(key), mine.get_tensor(key)
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), key


def test_shard_reader_reports_truncated_files(tiny_model_dir, tmp_path):
    from qtrain.shards import ShardReader

    shard = next(tiny_model_dir.glob("*.safetensors"))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(shard.read_bytes()[:-100])
    with ShardReader(cut) as f, pytest.raises(QTrainError, match="truncated"):
        for key in f.keys():
            f.get_tensor(key)
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(QTrainError, match="not a readable safetensors file"):
        ShardReader(tmp_path / "junk.safetensors")
