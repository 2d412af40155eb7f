"""The fused training paths compute what the plain composition computes: same loss, same gradients.

`HeadCrossEntropy` (head + cross-entropy with the gradient made in forward) against chunks of `nn.Linear` +
`F.cross_entropy` through autograd; `LoRAFunction` (the fused LoRA training step) against
`base(x) + s·B(A(dropout(x)))` through autograd; and a whole model's accumulated gradients both ways.
"""

import collections
import functools

import pytest
import torch
from torch import nn

from qtrain.methods.lora import LoRALinear
from qtrain.numerics import token_loss_sum
from qtrain.quantization import QuantSpec, quantize_linear

STORAGES = {"nf4": QuantSpec(bits=4, quant_type="nf4"), "int8": QuantSpec(bits=8), "none": QuantSpec(bits=None)}


def _loss_and_grads(hidden, head, labels, fused: bool, scale: float = 0.37):
    params = [hidden] + [p for p in head.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    loss = token_loss_sum(hidden, head, labels, chunk_size=5, fused=fused)
    (loss * scale).backward()
    return loss.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("train_head", [False, True])
def test_head_cross_entropy_equals_autograd_chunks(bias, train_head):
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=bias).requires_grad_(train_head)
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 9))
    labels[0, :4] = -100  # a prompt: no loss there
    fused_loss, fused_grads = _loss_and_grads(hidden, head, labels, fused=True)
    plain_loss, plain_grads = _loss_and_grads(hidden, head, labels, fused=False)
    assert fused_loss.item() == pytest.approx(plain_loss.item(), rel=1e-6)
    assert len(fused_grads) == 1 + train_head * (1 + bias)
    for f, p in zip(fused_grads, plain_grads):
        assert (f - p).abs().max() < 1e-6 * max(1.0, p.abs().max().item())
    assert fused_grads[0][0, :3].abs().sum() == 0  # positions whose next token is not a target get nothing


def test_head_cross_entropy_under_bf16_autocast():
    torch.manual_seed(0)
    head = nn.Linear(32, 64, bias=False).requires_grad_(False)
    hidden = torch.randn(2, 12, 32, requires_grad=True)
    labels = torch.randint(0, 64, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused_loss, (fused_grad,) = _loss_and_grads(hidden, head, labels, fused=True)
        plain_loss, (plain_grad,) = _loss_and_grads(hidden, head, labels, fused=False)
    assert fused_loss.item() == pytest.approx(plain_loss.item(), rel=1e-5)  # same bf16 logits, fp32 softmax
    assert (fused_grad - plain_grad).abs().max() < 1e-2 * plain_grad.abs().max()  # bf16 rounding of the matmul


def _lora_run(layer: LoRALinear, x: torch.Tensor, fused: bool, seed: int = 3):
    layer.fuse_training = fused
    for p in (x, layer.lora_A.weight, layer.lora_B.weight):
        p.grad = None
    torch.manual_seed(seed)  # the same dropout mask both ways
    out = layer(x)
    out.pow(2).sum().backward()
    return out.detach(), x.grad.clone(), layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_fused_lora_equals_composition(storage, dropout):
    torch.manual_seed(0)
    base = quantize_linear(nn.Linear(40, 24, bias=True), STORAGES[storage])
    layer = LoRALinear(base, r=4, alpha=8, dropout=dropout).train()
    nn.init.normal_(layer.lora_B.weight)  # a live update, so every gradient term is exercised
    x = torch.randn(2, 5, 40, requires_grad=True)
    fused = _lora_run(layer, x, fused=True)
    plain = _lora_run(layer, x, fused=False)
    for f, p in zip(fused, plain):
        assert (f - p).abs().max() < 1e-5 * max(1.0, p.abs().max().item())
    assert all(p.grad is None for p in base.parameters())


def test_fused_lora_is_only_for_training_over_a_frozen_linear():
    base = nn.Linear(8, 8).requires_grad_(False)
    layer = LoRALinear(base, r=2, alpha=4).train()
    x = torch.randn(3, 8)
    assert layer(x).grad_fn.name() == "LoRAFunctionBackward"
    with torch.no_grad():
        assert layer(x).grad_fn is None
    assert layer.eval()(x).grad_fn.name() != "LoRAFunctionBackward"
    base.weight.requires_grad_(True)  # a base that trains too (e.g. an unfrozen layer) composes
    assert layer.train()(x).grad_fn.name() != "LoRAFunctionBackward"


@pytest.mark.parametrize("bits", [4, None])
def test_model_gradients_equal_with_and_without_fused_paths(tiny_model_dir, dates_file, bits, monkeypatch):
    """A whole step, with checkpointing: every LoRA gradient equal both ways.

    The fused way also skips each block's down projection in the recompute: its base weight is used twice per
    step (forward, backward) where every other projection's is used three times (forward, recompute, backward),
    except the first block's attention inputs, whose input gradient nothing needs (frozen embeddings).
    """
    import qtrain.quantization as quantization
    from accelerate import Accelerator

    import qtrain.train as train
    from qtrain.config import DataSection, ModelSection, QuantizationSection
    from qtrain.data import Batches, prepare
    from qtrain.methods import build_methods
    from qtrain.methods.blocks import LoRABlock
    from qtrain.modeling import enable_checkpointing, load_model

    model = load_model(ModelSection(path=str(tiny_model_dir)), QuantizationSection(bits=bits),
                       torch.device("cpu"))
    tok = model.tokenizer
    model = model.model
    torch.manual_seed(0)
    (lora,) = build_methods([LoRABlock(method="lora", r=4, target_modules="all-linear")])
    params = lora.attach(model)
    for p in params.values():
        if p.abs().sum() == 0:
            nn.init.normal_(p, std=0.02)  # B ≠ 0: the update takes part in every gradient
    assert enable_checkpointing(model) == model.config.num_hidden_layers  # every block's down_proj marked
    model.train()
    data, _ = prepare(str(dates_file), DataSection(train=str(dates_file), max_seq_len=64), tok, "data.train")
    uses = collections.Counter()
    dense_weight = quantization.matmul_weight  # every fused path's frozen weight comes from here
    monkeypatch.setattr(quantization, "matmul_weight", lambda layer, dtype: uses.update([layer]) or
                        dense_weight(layer, dtype))
    batch = next(iter(Batches(data, 4, 0, tok.pad_token_id)))
    results = []
    for fused in (True, False):
        LoRALinear.fuse_training = fused
        monkeypatch.setattr(train, "token_loss_sum", functools.partial(token_loss_sum, fused=fused))
        for p in params.values():
            p.grad = None
        torch.manual_seed(1)  # the same LoRA dropout masks both ways
        loss, _ = train.accumulate_gradients(model, [batch], Accelerator(cpu=True), 7)
        results.append((loss, {n: p.grad.clone() for n, p in params.items()}))
        if fused:
            for i, block in enumerate(model.model.layers):
                assert uses[block.mlp.down_proj.base_layer] == 2
                assert uses[block.mlp.gate_proj.base_layer] == uses[block.self_attn.o_proj.base_layer] == 3
                # nothing before the first block trains: its attention inputs need no gradient, so no backward use
                assert uses[block.self_attn.q_proj.base_layer] == (2 if i == 0 else 3)
    LoRALinear.fuse_training = True
    (fl, fg), (pl, pg) = results
    assert fl == pytest.approx(pl, rel=1e-5)
    for name in fg:
        assert (fg[name] - pg[name]).abs().max() < 1e-4 * max(1e-3, pg[name].abs().max().item()), name


def test_model_forward_runs_no_head_positions(tiny_model_dir, dates_file):
    """The loss runs the head itself on target positions; the model's own head sees zero positions (one kept
    position is a (B, H)·(H, V) matmul per step, ~0.6 s in bf16 on CPU), and the loss is unchanged."""
    import qtrain.train as train
    from qtrain.config import DataSection, ModelSection, QuantizationSection
    from qtrain.data import Batches, prepare
    from qtrain.modeling import load_model

    loaded = load_model(ModelSection(path=str(tiny_model_dir)), QuantizationSection(bits=4), torch.device("cpu"))
    model, tok = loaded.model, loaded.tokenizer
    data, _ = prepare(str(dates_file), DataSection(train=str(dates_file), max_seq_len=64), tok, "data.train")
    batch = next(iter(Batches(data, 3, 0, tok.pad_token_id)))
    seen = []
    model.lm_head.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        loss = train.batch_loss_sum(model, batch, 16)
        logits = model(**train.model_inputs(batch)).logits  # the plain forward, every position
    assert seen == [0, batch["input_ids"].shape[1]]
    mask, targets = (batch["labels"][:, 1:] != -100), batch["labels"][:, 1:]
    ref = torch.nn.functional.cross_entropy(logits[:, :-1][mask].float(), targets[mask], reduction="sum")
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
