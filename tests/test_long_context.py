"""Long context on small cards: offloaded checkpoints, the tiled MLP and input embeddings on the host, each
against the plain path it replaces (same loss, same LoRA gradients), on a tiny float32 4-bit Llama on CPU.
On a CPU "host memory" is the device's own: the tests check the mechanism and the numbers; the GPU figures of
issue 19 wait for a GPU."""

import pytest
import torch
from accelerate import Accelerator

from qtrain.config import DataSection, ModelSection, QuantizationSection
from qtrain.data import collate, prepare
from qtrain.methods import build_methods
from qtrain.methods.blocks import LoRABlock
from qtrain.modeling import enable_checkpointing, load_model
from qtrain.offload import ActivationOffload
from qtrain.train import accumulate_gradients
from conftest import make_llama_folder

CPU = torch.device("cpu")
LAYERS = 3


@pytest.fixture(scope="module")
def three_layer_dir(tmp_path_factory):
    return make_llama_folder(tmp_path_factory.mktemp("llama3l"), tie=False, layers=LAYERS)


def _lora_model(model_dir, dropout=0.0):
    loaded = load_model(ModelSection(path=str(model_dir)), QuantizationSection(bits=4), CPU)
    torch.manual_seed(0)
    (method,) = build_methods([LoRABlock(method="lora", r=4, alpha=8, dropout=dropout)])
    params = method.attach(loaded.model)
    for p in params.values():  # non-zero B so every gradient depends on every factor
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    loaded.model.train()
    return loaded, params


def _batch(loaded, dates_file, n=4):
    ds, _ = prepare(str(dates_file), DataSection(train="x"), loaded.tokenizer, "data.train")
    return collate([ds[i] for i in range(n)], loaded.tokenizer.pad_token_id)


def _step(model, params, batch, seed=1):
    for p in params.values():
        p.grad = None
    torch.manual_seed(seed)
    loss, _ = accumulate_gradients(model, [batch], Accelerator(cpu=True), 1024)
    return loss, {n: p.grad.clone() for n, p in params.items()}


def test_offloaded_checkpoints_give_bit_identical_loss_and_gradients(three_layer_dir, dates_file):
    """Checkpointing with each block's input offloaded equals checkpointing without, bit for bit (the same
    bytes come back); every block's input went out once, came back once, all but the first one backward
    reaches prefetched one block ahead."""
    loaded, params = _lora_model(three_layer_dir)
    batch = _batch(loaded, dates_file)
    model = loaded.model
    enable_checkpointing(model)
    ref_loss, ref = _step(model, params, batch)
    offload = ActivationOffload()
    enable_checkpointing(model, offload=offload)
    for _ in range(2):  # twice: the second step starts from a clean chain (the first one's inputs are freed)
        loss, got = _step(model, params, batch)
        assert loss == ref_loss
        for n in ref:
            assert torch.equal(got[n], ref[n]), n
    tokens = batch["input_ids"].numel()
    assert offload.stats["offloaded"] == 2 * LAYERS
    assert offload.stats["prefetched"] == 2 * (LAYERS - 1) and offload.stats["late"] == 2
    # exactly the blocks' hidden-state inputs (float32 here), all of one step's held at once, nothing else
    assert offload.stats["host_bytes_peak"] == LAYERS * tokens * model.config.hidden_size * 4
    assert offload._host_bytes == 0  # freed with the graph


def test_offload_moves_the_block_input_and_gives_back_its_copy(three_layer_dir, dates_file):
    """The tensor the recompute gets is the host copy, not the forward's: corrupting the held copies changes
    the gradients (so the test above could not pass with offload doing nothing)."""
    loaded, params = _lora_model(three_layer_dir)
    batch = _batch(loaded, dates_file)
    enable_checkpointing(loaded.model)
    _, ref = _step(loaded.model, params, batch)
    offload = ActivationOffload()
    original = offload._offload
    offload._offload = lambda t: (lambda h: (h.host.mul_(1.5), h)[1])(original(t))
    enable_checkpointing(loaded.model, offload=offload)
    _, got = _step(loaded.model, params, batch)
    assert offload.stats["offloaded"] == LAYERS
    assert any(not torch.equal(got[n], ref[n]) for n in ref)


# ------------------------------------------------------------------------------------------------ tiled MLP


def _relative_gap(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("checkpointing", [True, False])
def test_tiled_mlp_gives_the_same_loss_and_gradients(three_layer_dir, dates_file, checkpointing, monkeypatch):
    """Chunks of 7 tokens (the last one shorter) against the whole sequence: the same loss, every LoRA
    gradient equal to float32 reassociation (the weight gradients are sums over chunks), every one non-zero.
    Each MLP weight is dequantized once per MLP call however many chunks: gate/up twice per step (forward and
    backward; the checkpoint's recompute skips the MLP) where the untiled run needs three with checkpointing."""
    import qtrain.quantization as quantization
    from qtrain.tiling import enable_tiled_mlp

    loaded, params = _lora_model(three_layer_dir)
    batch = _batch(loaded, dates_file)
    model = loaded.model
    if checkpointing:
        enable_checkpointing(model)
    ref_loss, ref = _step(model, params, batch)
    assert enable_tiled_mlp(model, 7) == LAYERS
    uses = {}
    dense = quantization._matmul_weight
    monkeypatch.setattr(quantization, "_matmul_weight",
                        lambda layer, dtype: uses.__setitem__(layer, uses.get(layer, 0) + 1) or dense(layer, dtype))
    loss, got = _step(model, params, batch)
    assert batch["input_ids"].numel() > 7 * 3
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for n in ref:
        assert got[n].abs().sum() > 0, n
        assert _relative_gap(got[n], ref[n]) < 2e-5, n
    for block in model.model.layers:
        assert uses[block.mlp.gate_proj.base_layer] == uses[block.mlp.up_proj.base_layer] == 2
        assert uses[block.mlp.down_proj.base_layer] == 2  # forward, and its input gradient in backward


def test_tiled_mlp_replays_the_forwards_dropout_masks(three_layer_dir):
    """With LoRA dropout in the MLP, the tiled backward differentiates the forward that ran: against plain
    autograd over the same chunks from the same RNG state, equal outputs and gradients (without restoring the
    RNG state in backward, other masks would be drawn and the gradients would differ)."""
    from qtrain.tiling import _TiledForward

    loaded, params = _lora_model(three_layer_dir, dropout=0.3)
    mlp = loaded.model.model.layers[1].mlp
    x = torch.randn(2, 11, loaded.model.config.hidden_size, requires_grad=True)
    gy = torch.randn(2, 11, loaded.model.config.hidden_size)
    mine = [p for p in mlp.parameters() if p.requires_grad]

    def run(fn):
        for p in mine + [x]:
            p.grad = None
        torch.manual_seed(5)
        out = fn(x)
        out.backward(gy)
        return out.detach(), [x.grad.clone()] + [p.grad.clone() for p in mine]

    plain = type(mlp).forward.__get__(mlp)
    ref_out, ref = run(lambda t: torch.cat([plain(c) for c in t.reshape(-1, t.shape[-1]).split(4)]).view_as(t))
    out, got = run(_TiledForward(mlp, 4, False))
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-7)
    for a, b in zip(got, ref):
        assert _relative_gap(a, b) < 1e-5
    _, untiled = run(plain)  # the masks differ from the chunked draws: the comparison above is not vacuous
    assert _relative_gap(untiled[0], ref[0]) > 1e-3
