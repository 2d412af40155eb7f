"""The quantization seam: every storage computes exactly with the weight `dequantized_weight` reports."""

import weakref

import pytest
import torch
from torch import nn

from bitsandbytes.functional import get_4bit_type, quantize_4bit

from qtrain.quantization import (QuantSpec, _quantize_4bit, bits_of, dequantized_weight, is_quantized, matmul_weight,
                                 quantize_linear, scratch_tensors, weight_nbytes)

SPECS = [QuantSpec(bits=4, quant_type="nf4", double_quant=True),
         QuantSpec(bits=4, quant_type="fp4", double_quant=False), QuantSpec(bits=8), QuantSpec(bits=None)]


@pytest.mark.parametrize("spec", SPECS, ids=["nf4-dq", "fp4", "int8", "none"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("tokens", [5, 160])  # 8-bit: fewer tokens than inputs take the output-side row scale
def test_layer_multiplies_by_its_dequantized_weight(spec, mode, tokens):
    """In train and eval mode alike: bnb's own 8-bit layer quantizes its input to int8 in eval mode (~1e-2 off
    here), which would score a model with other numbers than it was trained with."""
    torch.manual_seed(0)
    dense = nn.Linear(128, 96, bias=True)
    layer = quantize_linear(dense, spec).train(mode == "train")
    x = torch.randn(tokens, 128)
    ref = x.double() @ dequantized_weight(layer, torch.float64).T + dense.bias.double()
    with torch.no_grad():
        out = layer(x)
    # float32 matmul against a float64 reference over 128 products: ~1e-6 relative.
    assert out.dtype == torch.float32 and (out.double() - ref).abs().max() < 2e-5
    assert bits_of(layer) == spec.bits and is_quantized(layer) == (spec.bits is not None)
    assert not any(p.requires_grad for p in layer.parameters())
    assert layer.bias.dtype == torch.float32  # bnb's forward casts its bias in place to the input dtype


@pytest.mark.parametrize("spec", SPECS[:3], ids=["nf4-dq", "fp4", "int8"])
@pytest.mark.parametrize("tokens", [5, 80])  # 2 × 5 < 128 inputs ≤ 2 × 80: both sides of the 8-bit row scale
def test_quantized_layer_keeps_nothing_from_forward(spec, tokens):
    """Input and (trainable) bias gradients of a quantized layer are the dense ones; backward dequantizes the
    weight again instead of keeping it, so the forward keeps nothing for backward at all: no saved tensor, and
    no input held outside autograd's view (bnb's 8-bit matmul keeps it as `ctx.A`, which gradient
    checkpointing cannot free)."""
    torch.manual_seed(0)
    layer = quantize_linear(nn.Linear(128, 96, bias=True), spec)
    layer.bias.requires_grad_(True)
    x = torch.randn(2, tokens, 128, requires_grad=True)
    h = x * 1.0  # a non-leaf input: only what the layer keeps can keep it alive
    saved, alive = [], weakref.ref(h)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(h)
    del h
    assert saved == [] and alive() is None
    gy = torch.randn_like(out)
    out.backward(gy)
    gx = gy.double() @ dequantized_weight(layer, torch.float64)  # (2, tokens, 128)
    assert (x.grad.double() - gx).abs().max() < 2e-5
    assert (layer.bias.grad.double() - gy.double().sum((0, 1))).abs().max() < 1e-5


@pytest.mark.parametrize("spec", SPECS[:2], ids=["nf4-dq", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_dequantization_equals_the_cast_float32_weight(spec, dtype):
    """A 4-bit weight dequantized straight into a 16-bit dtype (the training matmul's path) is the float32 one
    rounded: same numbers, one pass and half the bytes fewer. The stored state keeps its own dtype."""
    torch.manual_seed(0)
    layer = quantize_linear(nn.Linear(256, 192), spec)
    direct = dequantized_weight(layer, dtype)
    assert direct.dtype == dtype and torch.equal(direct, dequantized_weight(layer, torch.float32).to(dtype))
    assert layer.weight.quant_state.dtype == torch.float32


@pytest.mark.parametrize("spec", SPECS[:3], ids=["nf4-dq", "fp4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matmul_weight_is_the_dequantized_weight_in_one_reused_buffer(spec, dtype):
    """The training matmuls' weight equals `dequantized_weight` bit for bit, and on CPU every call writes the same
    buffer (no fresh pages per call), whatever the order of layer sizes."""
    torch.manual_seed(0)
    big, small = (quantize_linear(nn.Linear(256, 192), spec), quantize_linear(nn.Linear(64, 32), spec))
    seen = set()
    for layer in (small, big, small, big):
        w = matmul_weight(layer, dtype)
        assert w.dtype == dtype and torch.equal(w, dequantized_weight(layer, dtype))
        seen.add(w.untyped_storage().data_ptr())
    assert len(seen) <= 2  # the small layer's first call may come before the buffer grows
    assert matmul_weight(small, dtype).untyped_storage().data_ptr() == matmul_weight(big, dtype).data_ptr()
    assert any(t.data_ptr() == matmul_weight(big, dtype).data_ptr() for t in scratch_tensors())


def test_matmul_weight_falls_back_where_the_cpu_kernel_does_not_apply():
    """An odd number of input features is outside bnb's CPU 4-bit kernel: a new tensor, the same values."""
    torch.manual_seed(0)
    layer = quantize_linear(nn.Linear(65, 32), SPECS[0])
    w = matmul_weight(layer, torch.float32)
    assert torch.equal(w, dequantized_weight(layer, torch.float32))
    assert not any(t.data_ptr() == w.data_ptr() for t in scratch_tensors())
    plain = quantize_linear(nn.Linear(64, 32), SPECS[3])
    assert matmul_weight(plain, torch.float32) is plain.weight  # a plain weight in its own dtype: no copy


def _blockwise_reference(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A 4-bit layer's weight from its packed codes by the format's definition, element by element in float64:
    table[code] × absmax[i // blocksize], the absmax under double quantization being
    table2[q] × scale[j // 256] + offset. Each product of two float32 numbers is exact in float64, so rounding
    it to float32 (and then to `dtype`) is the kernels' arithmetic."""
    state = layer.weight.quant_state
    packed = layer.weight.data.view(torch.uint8).reshape(-1).long()
    codes = torch.stack((packed >> 4, packed & 15), dim=1).reshape(-1)[:state.shape.numel()]
    absmax = state.absmax.double()
    if state.nested:
        s2 = state.state2
        blocks = torch.arange(len(absmax)) // s2.blocksize
        absmax = (s2.code.double()[state.absmax.long()] * s2.absmax.double()[blocks]).float().double()
        absmax = (absmax + state.offset.double()).float().double()
    blocks = torch.arange(len(codes)) // state.blocksize
    values = state.code.double()[codes] * absmax[blocks]
    return values.float().to(dtype).view(state.shape)


@pytest.mark.parametrize("shape,blocksize", [((576, 576), 128), ((576, 576), 256), ((64, 48), 64), ((128, 64), 128),
                                             ((96, 1536), 256), ((32, 64), 64)])
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_4bit_weights_equal_the_formats_definition_for_every_blocksize(shape, blocksize, quant_type, double_quant,
                                                                       dtype):
    """Both dequantization paths (`dequantized_weight`, and `matmul_weight`'s reused CPU buffer) give the format's
    values exactly, where blocks tile the rows and where they do not. bitsandbytes 0.50's AVX512 CPU kernel
    reads the wrong block's absmax when they do not: with `blocksize: 128` SmolLM2's first q_proj came back
    with a relative error of 0.62 instead of 0.11 before qtrain stopped using it there."""
    torch.manual_seed(0)
    dense = nn.Linear(shape[1], shape[0], bias=False)
    layer = quantize_linear(dense, QuantSpec(bits=4, quant_type=quant_type, double_quant=double_quant,
                                             blocksize=blocksize))
    ref = _blockwise_reference(layer, dtype)
    assert torch.equal(dequantized_weight(layer, dtype), ref)
    assert torch.equal(matmul_weight(layer, dtype), ref)
    err = (ref.float() - dense.weight.detach()).abs().max() / dense.weight.detach().abs().max()
    assert err < (0.16 if quant_type == "nf4" else 0.17)  # half the widest gap between codes: 0.152, 0.167


@pytest.mark.parametrize("spec,tol", [(SPECS[0], 0.25), (SPECS[1], 0.35), (SPECS[2], 0.01), (SPECS[3], 0.0)],
                         ids=["nf4-dq", "fp4", "int8", "none"])
def test_dequantized_weight_is_close_to_the_original(spec, tol):
    torch.manual_seed(0)
    dense = nn.Linear(256, 64, bias=False)
    w = dense.weight.detach()
    err = (dequantized_weight(quantize_linear(dense, spec)) - w).abs().max() / w.abs().max()
    assert err <= tol
    if spec.bits is not None:
        assert err > 0  # it really was quantized


def test_storage_is_smaller_and_counted():
    dense = nn.Linear(1024, 1024, bias=False)
    fp32 = 1024 * 1024 * 4
    n4 = weight_nbytes(quantize_linear(dense, QuantSpec(bits=4, double_quant=True)))
    n4_plain = weight_nbytes(quantize_linear(dense, QuantSpec(bits=4, double_quant=False)))
    n8 = weight_nbytes(quantize_linear(dense, QuantSpec(bits=8)))
    assert n4 == 1024 * 1024 // 2 + (1024 * 1024 // 64) + (1024 * 1024 // 64 // 256) * 4 + 256 * 4
    assert n4_plain == 1024 * 1024 // 2 + (1024 * 1024 // 64) * 4  # fp32 absmax per 64-block
    assert n8 == 1024 * 1024 + 1024 * 4
    assert n4 < n4_plain < n8 < fp32


def test_eval_mode_keeps_the_4bit_layout():
    # bnb repacks 4-bit weights for AVX512-BF16 CPUs in eval mode; qtrain keeps one layout (and one numeric path).
    torch.manual_seed(0)
    layer = quantize_linear(nn.Linear(64, 64), SPECS[0])
    before = layer.weight.data.clone()
    x = torch.randn(3, 64)
    train_out = layer.train()(x)
    with torch.no_grad():
        eval_out = layer.eval()(x)
    assert torch.equal(layer.weight.data, before)
    assert torch.equal(train_out, eval_out)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_float_quant_storage_changes_nothing_but_the_dtype(storage):
    # FSDP-QLoRA stores packed 4-bit values in a float dtype; the bytes and the product must not change.
    torch.manual_seed(0)
    dense = nn.Linear(128, 64, bias=False)
    plain = quantize_linear(dense, QuantSpec(bits=4))
    fsdp = quantize_linear(dense, QuantSpec(bits=4, quant_storage=storage))
    assert fsdp.weight.dtype == storage
    assert weight_nbytes(fsdp) == weight_nbytes(plain)
    assert torch.equal(dequantized_weight(fsdp), dequantized_weight(plain))
    x = torch.randn(3, 128)
    assert torch.equal(fsdp(x), plain(x))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype,blocksize,storage", [(torch.float32, 64, torch.uint8),
                                                     (torch.bfloat16, 32, torch.uint8),
                                                     (torch.float16, 256, torch.uint8),
                                                     (torch.bfloat16, 64, torch.bfloat16)])
def test_chunked_4bit_quantization_is_bnbs_bit_for_bit(quant_type, double_quant, dtype, blocksize, storage):
    """The loader's CPU quantizer equals bnb's `quantize_4bit` in every packed byte and every state field, over
    several chunks with a partial last one, and at the edge cases of the code search: a zero block, values
    exactly at the midpoints between codes and at ±absmax."""
    torch.manual_seed(0)
    w = torch.randn(600, 1024).to(dtype)  # 614,400 weights: 2 full chunks of 2^18 and a partial one
    code = get_4bit_type(quant_type, device="cpu")
    mids = (code.sort().values[:-1] + code.sort().values[1:]) / 2
    w[0, :blocksize] = 0
    w[1, :15] = mids.to(dtype)  # in a block whose absmax is 1
    w[1, 15:blocksize] = torch.linspace(-1, 1, blocksize - 15).to(dtype)
    spec = QuantSpec(bits=4, quant_type=quant_type, double_quant=double_quant, blocksize=blocksize,
                     quant_storage=storage)
    packed, state = _quantize_4bit(w, spec)
    ref_packed, ref = quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type,
                                    quant_storage=storage)
    assert packed.dtype == ref_packed.dtype and packed.shape == ref_packed.shape
    assert torch.equal(packed.view(torch.uint8), ref_packed.view(torch.uint8))
    assert torch.equal(state.absmax, ref.absmax) and torch.equal(state.code, ref.code)
    assert (state.shape, state.dtype, state.blocksize, state.quant_type, state.nested) == \
        (ref.shape, ref.dtype, ref.blocksize, ref.quant_type, ref.nested)
    if double_quant:
        assert torch.equal(state.offset, ref.offset)
        assert torch.equal(state.state2.absmax, ref.state2.absmax) and torch.equal(state.state2.code, ref.state2.code)
        assert state.state2.blocksize == ref.state2.blocksize
