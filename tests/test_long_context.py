"""Long context on small cards: offloaded checkpoints, the tiled MLP and input embeddings on the host, each
against the plain path it replaces (same loss, same LoRA gradients), on a tiny float32 4-bit Llama on CPU.
On a CPU "host memory" is the device's own: the tests check the mechanism and the numbers; the GPU figures of
issue 19 wait for a GPU."""

import json
from dataclasses import replace

import pytest
import torch
import yaml
from accelerate import Accelerator

from qtrain.config import DataSection, ModelSection, QuantizationSection
from qtrain.data import collate, prepare
from qtrain.methods import build_methods
from qtrain.methods.blocks import LoRABlock
from qtrain.modeling import enable_checkpointing, load_model
from qtrain.memory import pinned_pieces
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


@pytest.mark.parametrize("piece", [None, 64])
def test_offloaded_checkpoints_give_bit_identical_loss_and_gradients(three_layer_dir, dates_file, piece):
    """Checkpointing with each block's input offloaded equals checkpointing without, bit for bit (the same
    bytes come back, in one piece or, with 64-byte pieces, in many); every block's input went out once, came
    back once, all but the first one backward reaches prefetched one block ahead."""
    loaded, params = _lora_model(three_layer_dir)
    batch = _batch(loaded, dates_file)
    model = loaded.model
    enable_checkpointing(model)
    ref_loss, ref = _step(model, params, batch)
    offload = ActivationOffload() if piece is None else ActivationOffload(piece=piece)
    original, pieces = offload._offload, []
    offload._offload = lambda t: (lambda h: (pieces.append(len(h.pieces)), h)[1])(original(t))
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
    assert set(pieces) == ({1} if piece is None else {len(pinned_pieces(tokens * model.config.hidden_size * 4, 64))})
    assert piece is None or min(pieces) > 1  # several pieces, reassembled


def test_offload_moves_the_block_input_and_gives_back_its_copy(three_layer_dir, dates_file):
    """The tensor the recompute gets is the host copy, not the forward's: corrupting the held copies changes
    the gradients (so the test above could not pass with offload doing nothing)."""
    loaded, params = _lora_model(three_layer_dir)
    batch = _batch(loaded, dates_file)
    enable_checkpointing(loaded.model)
    _, ref = _step(loaded.model, params, batch)
    offload = ActivationOffload()
    original = offload._offload
    offload._offload = lambda t: (lambda h: (h.pieces[0].view(torch.float32).mul_(1.5), h)[1])(original(t))
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


# ------------------------------------------------------------------------------------------------ host embeddings


def test_embeddings_on_the_host_give_the_same_numbers(three_layer_dir, dates_file):
    """The table moved into a `HostEmbedding`: same loss and LoRA gradients bit for bit (a gather is exact),
    the same parameter name, and a device move of the model leaves it where it is."""
    from qtrain.offload import HostEmbedding, put_embeddings_on_host

    loaded, params = _lora_model(three_layer_dir)
    model, batch = loaded.model, _batch(loaded, dates_file)
    ref_loss, ref = _step(model, params, batch)
    table = model.get_input_embeddings().weight
    host = put_embeddings_on_host(model, CPU)
    assert model.get_input_embeddings() is host and torch.equal(host.weight, table)
    assert "model.embed_tokens.weight" in dict(model.named_parameters())
    loss, got = _step(model, params, batch)
    assert loss == ref_loss and all(torch.equal(got[n], ref[n]) for n in ref)
    ptr = host.weight.data_ptr()
    model.to(torch.float64)  # what would move or cast every other weight
    assert isinstance(model.get_input_embeddings(), HostEmbedding) and host.weight.data_ptr() == ptr
    assert host.weight.dtype == table.dtype


def test_the_ids_a_host_table_reads_stay_on_the_host(three_layer_dir, dates_file, monkeypatch):
    """With the table on the host the batch's input ids are not sent to the device: on a GPU the gather would
    have to copy them back first, a wait for everything queued before it, at every forward. Every other key
    moves; without a host table the ids move too."""
    from qtrain import evaluate, train
    from qtrain.offload import put_embeddings_on_host

    loaded, params = _lora_model(three_layer_dir)
    batch = _batch(loaded, dates_file)
    kept = []
    real = train.to_device
    monkeypatch.setattr(train, "to_device",
                        lambda b, d, on_host=frozenset(): kept.append(on_host) or real(b, d, on_host))
    monkeypatch.setattr(evaluate, "to_device", train.to_device)
    _step(loaded.model, params, batch)
    assert kept == [frozenset()]
    put_embeddings_on_host(loaded.model, CPU)
    _step(loaded.model, params, batch)
    ds, _ = prepare(str(dates_file), DataSection(train="x"), loaded.tokenizer, "data.train")
    evaluate.eval_loss(loaded.model, [ds[0]], 1, loaded.tokenizer.pad_token_id, 64, CPU)
    assert kept[1:] == [frozenset({"input_ids"})] * 2
    moved = real(batch, torch.device("meta"), kept[-1])
    assert moved["input_ids"] is batch["input_ids"]
    assert all(moved[k].device.type == "meta" for k in batch if k != "input_ids")


def test_embeddings_on_the_host_refuse_a_tied_table(tiny_model_dir):
    from qtrain.errors import QTrainError
    from qtrain.offload import put_embeddings_on_host

    model = load_model(ModelSection(path=str(tiny_model_dir)), QuantizationSection(bits=4), CPU).model
    with pytest.raises(QTrainError, match="ties its input embeddings to the output head"):
        put_embeddings_on_host(model, CPU)


# ------------------------------------------------------------------------------------------------ the planner

L3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
         "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
         "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False}
GiB = 2**30


def _plan_cfg(tmp_path, dates_file, seq, **training):
    from qtrain.config import load_config
    from conftest import write_config

    return load_config(write_config(
        tmp_path, tmp_path, dates_file, quantization={"bits": 4, "compute_dtype": "bfloat16"},
        peft=[{"method": "lora", "r": 32, "alpha": 64, "dropout": 0.0, "target_modules": "all-linear"}],
        data={"train": str(dates_file), "max_seq_len": seq},
        training={"micro_batch_size": 1, "optimizer": "paged_adamw_8bit", "gradient_checkpointing": True,
                  **training}))


def _setup(tmp_path, dates_file, seq, **fields):
    from qtrain.memory import setup_from_config

    return replace(setup_from_config(_plan_cfg(tmp_path, dates_file, seq), L3_8B, "cuda"), **fields)


def test_planner_offload_moves_the_checkpointed_inputs_to_the_host(tmp_path, dates_file):
    """Llama-3-8B shapes at 32k tokens: offload takes L × tokens × hidden × 2 bytes of layer inputs off the
    device but the two that are on it in backward (the one recomputed, the next one prefetched), and puts all
    L of them in host memory; nothing else changes."""
    from qtrain.memory import estimate

    tokens, hidden, layers = 32768, 4096, 32
    plain, off = (estimate(_setup(tmp_path, dates_file, tokens, offload=o)) for o in (False, True))
    inputs = tokens * hidden * 2
    assert plain.components["activations"] - off.components["activations"] == (layers - 2) * inputs
    # with every layer input kept the backward peaks in the top layer, beside its own gradients; offloaded, in
    # the bottom one, beside every layer's (the loop sets them to None after a step: they appear layer by layer)
    grads = plain.details["gradient_bytes"] // layers
    assert (plain.components["gradients"], off.components["gradients"]) == (grads, layers * grads)
    assert plain.peak - off.peak == (layers - 2) * inputs - (layers - 1) * grads
    assert off.details["host_offloaded_activations"] == off.details["host_bytes"] == layers * inputs
    assert plain.details["host_bytes"] == 0
    no_ckpt = _setup(tmp_path, dates_file, tokens, offload=True, checkpointing=False)
    assert estimate(no_ckpt).details["host_bytes"] == 0  # nothing to offload without checkpointing


def test_planner_counts_pinned_host_memory_as_torch_allocates_it(tmp_path, dates_file):
    """torch's pinned allocator rounds each block up to a power of two, so offload holds each input in
    power-of-two pieces that waste less than a MiB (768 MiB: 512 + 256), and the planner counts those; the
    embedding rows' buffer is one block (100,000 tokens of rows, 781.25 MiB, take 1 GiB); the table itself is
    plain memory, and a CPU run pins nothing (the host is the device)."""
    from qtrain.memory import PINNED_PIECE, estimate, pinned_bytes, pinned_pieces

    assert [pinned_bytes(n) for n in (0, 1, 4096, 4097, 2**30)] == [0, 1, 4096, 8192, 2**30]
    assert pinned_pieces(768 * 2**20) == [512 * 2**20, 256 * 2**20] and pinned_pieces(5000, 4096) == [4096, 1024]
    for n in (1, 3000, 819_200_000, 2**30 + 5):
        assert n <= sum(pinned_pieces(n)) < n + PINNED_PIECE
        assert all(p & (p - 1) == 0 for p in pinned_pieces(n))
    tokens, layers, inputs = 100_000, 32, 100_000 * 4096 * 2
    est = estimate(_setup(tmp_path, dates_file, tokens, offload=True, host_embeddings=True))
    assert est.details["host_offloaded_activations"] == layers * sum(pinned_pieces(inputs)) == layers * inputs
    assert est.details["host_embeddings"] == 128256 * 4096 * 2 + GiB
    cpu = estimate(_setup(tmp_path, dates_file, tokens, offload=True, host_embeddings=True, device="cpu"))
    assert cpu.details["host_offloaded_activations"] == layers * inputs
    assert cpu.details["host_embeddings"] == 128256 * 4096 * 2


def test_planner_tiled_mlp_shrinks_the_layer_working_set(tmp_path, dates_file):
    """The recomputed layer keeps its MLP input instead of the MLP's insides, and those exist for one chunk:
    by hand, per token the MLP saves gate and up (fused ops, on for a GPU: silu(gate) is rebuilt), the down
    projection's input (LoRA) and the MLP input, and the LoRA rank-32 intermediates of gate, up and down. The
    layer's backward peaks in its MLP: untiled, two intermediate-sized gradients beside the incoming residual
    one; tiled, the chunk's insides and two intermediate-sized gradients, beside the incoming gradient and the
    chunked input gradient. The three dense MLP weights are held through the call instead of one (tiling turns
    compiled blocks off)."""
    from qtrain.memory import estimate

    tokens, chunk, h, i, r = 32768, 4096, 4096, 14336, 32
    plain, tiled = (estimate(_setup(tmp_path, dates_file, tokens, mlp_chunk=c)) for c in (None, chunk))
    assert plain.components["layer_backward"] and tiled.components["layer_backward"]  # where the peaks are
    mlp = (3 * i + h + 3 * r) * 2  # bytes per token
    untiled_moment, tiled_moment = (2 * i + h) * 2 * tokens, (mlp + 2 * i * 2) * chunk + 2 * h * 2 * tokens
    expected = (mlp - h * 2) * tokens + untiled_moment - tiled_moment
    assert plain.details["layer_backward"] - tiled.details["layer_backward"] == expected
    # untiled, the blocks compile (auto, on a GPU): the backward keeps k and v, dequantized in the graph (8 MiB
    # each, not above quantization.IN_GRAPH_MAX_BYTES), beside one MLP weight through qtrain::frozen_mm
    kv = 2 * h * 1024 * 2
    assert tiled.details["dequant_scratch"] == 3 * h * i * 2 and plain.details["dequant_scratch"] == h * i * 2 + kv
    assert plain.peak - tiled.peak > 2.5 * GiB  # of 23.4 GiB
    short = _setup(tmp_path, dates_file, chunk)  # no longer than a chunk: the plain path, the same numbers
    assert estimate(replace(short, mlp_chunk=chunk)).peak == estimate(short).peak


def test_planner_host_embeddings_move_the_table(tmp_path, dates_file):
    from qtrain.memory import estimate

    plain, host = (estimate(_setup(tmp_path, dates_file, 2048, host_embeddings=o)) for o in (False, True))
    table, rows = 128256 * 4096 * 2, 2048 * 4096 * 2  # the table in plain memory, the rows' pinned buffer
    assert plain.components["other_weights"] - host.components["other_weights"] == table
    assert host.details["host_embeddings"] == host.details["host_bytes"] == table + rows
    tied = _setup(tmp_path, dates_file, 2048, host_embeddings=True)
    tied = replace(tied, arch=replace(tied.arch, tie_embeddings=True))
    assert estimate(tied).details["host_bytes"] == 0  # a tied table is the head: it stays on the device


def test_saved_activations_with_a_tiled_mlp_match_autograd(tmp_path, dates_file, three_layer_dir):
    """Without checkpointing, a tiled MLP keeps its input only: the bytes autograd really saves against the
    prediction (within 10 %, as the plain path is tested in test_planner.py), and far below the untiled run."""
    from qtrain.config import load_config
    from qtrain.memory import estimate, setup_from_config
    from qtrain.tiling import enable_tiled_mlp
    from conftest import write_config
    from tests.test_planner import saved_bytes

    model_cfg = json.loads((three_layer_dir / "config.json").read_text())
    saved_by = {}
    for chunk in (None, 32):
        cfg = load_config(write_config(tmp_path, three_layer_dir, dates_file, data={"max_seq_len": 96},
                                       training={"micro_batch_size": 3, "mlp_chunk_tokens": chunk}))
        model = load_model(cfg.model, cfg.quantization, CPU, path=three_layer_dir).model
        build_methods(cfg.peft)[0].attach(model)
        if chunk:
            enable_tiled_mlp(model, chunk)
        predicted = estimate(setup_from_config(cfg, model_cfg, device="cpu")).components["activations"]
        saved_by[chunk] = saved_bytes(model, 128)
        assert abs(predicted - saved_by[chunk]) / saved_by[chunk] < 0.10, (chunk, predicted, saved_by[chunk])
    assert saved_by[32] < 0.75 * saved_by[None]


@pytest.mark.parametrize("seq,expected", [
    (2048, {"embeddings_on_host": True, "mlp_chunk_tokens": None, "activation_offload": False}),
    (45056, {"embeddings_on_host": True, "mlp_chunk_tokens": 4096, "activation_offload": False}),
    (65536, {"embeddings_on_host": True, "mlp_chunk_tokens": None, "activation_offload": True}),  # tiling undone
    (98304, {"embeddings_on_host": True, "mlp_chunk_tokens": 4096, "activation_offload": True}),
])
def test_auto_turns_the_savers_on_only_when_the_run_would_not_fit(tmp_path, dates_file, seq, expected):
    """Llama-3-8B shapes under a 23.5 GiB budget on a GPU: fused ops are always on there, the 1 GiB embedding
    table goes to the host always (one gather per step), the tiled MLP and then offload only as the sequence
    stops fitting without them; the run said to fit does fit; a tiled MLP that offload made unnecessary is
    turned off again. On a CPU neither host option applies."""
    from qtrain.memory import estimate, setup_from_config
    from qtrain.savers import auto_memory_savers, autos

    cfg = _plan_cfg(tmp_path, dates_file, seq)
    assert autos(cfg) == {"fused_ops", "embeddings_on_host", "mlp_chunk_tokens", "activation_offload",
                          "loss_chunk_size"}  # defaults
    budget = int(23.5 * GiB)
    s = auto_memory_savers(setup_from_config(cfg, L3_8B, "cuda"), budget, autos(cfg))
    assert s.fused and {"embeddings_on_host": s.host_embeddings, "mlp_chunk_tokens": s.mlp_chunk,
                        "activation_offload": s.offload} == expected
    assert estimate(s).peak <= budget
    if s.mlp_chunk:  # each one on was needed
        assert estimate(replace(s, mlp_chunk=None)).peak > budget
    if s.offload:
        assert estimate(replace(s, offload=False)).peak > budget
    cpu = auto_memory_savers(setup_from_config(cfg, L3_8B, "cpu"), budget, autos(cfg))
    assert not cpu.host_embeddings and not cpu.offload


def test_auto_takes_smaller_mlp_chunks_where_offload_is_not_enough(tmp_path, dates_file):
    """Llama-3-8B shapes at 16,384 tokens under an 8 GB card's 7.6 GiB: every saver is on and 4096-token MLP
    chunks still leave the run over; auto takes 2048-token chunks, which fit; on a 24 GB card the same
    sequence needs no tiling at all."""
    from qtrain.memory import estimate, setup_from_config
    from qtrain.savers import auto_memory_savers, autos

    cfg = _plan_cfg(tmp_path, dates_file, 16384)
    small = int(7.6 * GiB)
    s = auto_memory_savers(setup_from_config(cfg, L3_8B, "cuda"), small, autos(cfg))
    assert (s.fused, s.host_embeddings, s.offload, s.mlp_chunk) == (True, True, True, 2048)
    assert estimate(s).peak <= small < estimate(replace(s, mlp_chunk=4096)).peak
    big = auto_memory_savers(setup_from_config(cfg, L3_8B, "cuda"), int(23.5 * GiB), autos(cfg))
    assert big.mlp_chunk is None and not big.offload


def test_qtrain_plan_reports_host_memory_and_the_longest_sequences(tmp_path, dates_file, capsys):
    from qtrain.cli import main
    from qtrain.memory import pinned_bytes

    (tmp_path / "config.json").write_text(json.dumps(L3_8B))
    cfg = _plan_cfg(tmp_path, dates_file, 98304)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["plan", str(path), "--budget", "23.5GiB", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["memory_savers"] == {"embeddings_on_host": True, "mlp_chunk_tokens": 4096, "activation_offload": True,
                                  "fused_ops": True}
    inputs = 98304 * 4096 * 2  # 768 MiB each, in pieces; the rows' buffer, one pinned block, takes 1 GiB
    assert d["host_bytes"] == 128256 * 4096 * 2 + pinned_bytes(inputs) + 32 * inputs and d["fits"]
    assert d["max_seq_len_with_savers"] > 2 * d["max_seq_len_without_savers"]
    assert d["max_seq_len_without_savers"] < 98304 <= d["max_seq_len"] == d["max_seq_len_with_savers"]
    assert main(["plan", str(path), "--budget", "23.5GiB"]) == 0
    out = capsys.readouterr().out
    assert "host memory the run adds: 25.98 GiB" in out and "checkpointed layer inputs offloaded (24.00 GiB)" in out
    assert f"{d['max_seq_len_without_savers']} tokens without the memory savers" in out


# ------------------------------------------------------------------------------------------------ qtrain run


def test_a_run_with_every_memory_saver_trains_as_one_without(tmp_path, three_layer_dir, dates_file, capsys):
    """`qtrain run` with the three switched on explicitly (on CPU: copies and chunks) against the same run
    with them off: the same losses (the tiled MLP reassociates sums, so to float tolerance), and the summary
    says what ran: every block's input offloaded and fetched back each step."""
    from qtrain.config import load_config
    from qtrain.run import run
    from conftest import write_config

    losses = {}
    for on in (False, True):
        (tmp_path / str(on)).mkdir()
        cfg = load_config(write_config(
            tmp_path / str(on), three_layer_dir, dates_file, model={"path": str(three_layer_dir),
                                                                   "embeddings_on_host": on},
            eval={"exact_match": False, "before_training": False},
            training={"micro_batch_size": 4, "max_steps": 2, "learning_rate": 1e-2, "gradient_checkpointing": True,
                      "activation_offload": on, "mlp_chunk_tokens": 16 if on else None, "save_every": None}))
        run(cfg)
        out = capsys.readouterr().out
        summary = json.loads((tmp_path / str(on) / "run" / "summary.json").read_text())
        losses[on] = [json.loads(line)["loss"] for line in
                      (tmp_path / str(on) / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        assert (summary["activation_offload"], summary["mlp_chunk_tokens"], summary["embeddings_on_host"]) == \
            ((True, 16, True) if on else (False, None, False))
    assert "memory savers: activation_offload on, mlp_chunk_tokens 16, embeddings_on_host on" in out
    assert summary["offload"]["offloaded"] == 2 * LAYERS and summary["offload"]["late"] == 2
    assert len(losses[True]) == 2 and losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_config_checks_of_the_memory_savers():
    from qtrain.config import TrainingSection

    with pytest.raises(ValueError, match="activation_offload: true offloads the inputs gradient checkpointing"):
        TrainingSection(activation_offload=True, gradient_checkpointing=False)
    with pytest.raises(ValueError):
        TrainingSection(mlp_chunk_tokens=0)
    t = TrainingSection()
    assert (t.activation_offload, t.mlp_chunk_tokens, ModelSection().embeddings_on_host) == ("auto",) * 3


@pytest.mark.parametrize("value,device,vocab,expected", [
    ("auto", "cpu", 128256, 128), ("auto", "cuda", 128256, 512), ("auto", "cuda", 49152, 1024),
    ("auto", "cuda", 32000, 2048), ("auto", "cuda", 300, 2048), (64, "cuda", 128256, 64),
])
def test_loss_chunk_auto_is_the_devices(value, device, vocab, expected):
    """`loss_chunk_size: auto`: the CPU's measured 128; on a GPU the largest power of two up to 2048 whose fp32
    logits fit 256 MiB; a number is itself."""
    from qtrain.memory import loss_chunk_tokens

    assert loss_chunk_tokens(value, device, vocab) == expected


def test_a_gpu_loss_chunk_goes_back_to_128_only_when_the_run_would_not_fit(tmp_path, dates_file):
    """Llama-3-8B shapes at 512 tokens on a GPU with gradient accumulation (every gradient alive from the second
    micro-batch on), where the loss's logits are the peak: the 512-token chunk is kept when the run fits, and is
    the first thing `auto` gives back (before any other saver) when it does not; `qtrain run`'s resolve says so.
    The planner counts the chunk's logits (a bigger chunk, a bigger peak)."""
    from qtrain.memory import estimate, setup_from_config
    from qtrain.savers import auto_memory_savers, autos, resolve

    cfg = _plan_cfg(tmp_path, dates_file, 512, gradient_accumulation_steps=4)
    s = setup_from_config(cfg, L3_8B, "cuda")
    small = replace(s, loss_chunk=128)
    assert s.loss_chunk == 512 and estimate(s).peak > estimate(small).peak
    assert auto_memory_savers(s, estimate(s).peak, autos(cfg)).loss_chunk == 512
    tight = auto_memory_savers(s, estimate(small).peak, autos(cfg))
    assert tight.loss_chunk == 128 and not tight.offload and tight.mlp_chunk is None
    said = []
    resolved = resolve(cfg, s, estimate(small).peak, autos(cfg), "budget", said.append)
    assert resolved.training.loss_chunk_size == 128 and "loss_chunk_size 128" in said[0]
    said.clear()
    assert resolve(cfg, s, estimate(s).peak, autos(cfg), "budget", said.append).training.loss_chunk_size == 512
    assert "loss_chunk_size" not in said[0]  # the device's own chunk is no news (host embeddings are said)


def test_planner_counts_the_dense_weights_a_compiled_backward_keeps(tmp_path, dates_file):
    """Compiled blocks (on by default on a GPU) dequantize weights up to quantization.IN_GRAPH_MAX_BYTES in the
    graph, and the backward keeps them from the recompute to the input gradients: Llama-3-8B's k and v (8 MiB
    each in bf16) beside the one big weight `qtrain::frozen_mm` holds at a time (the MLP's, 112 MiB);
    SmolLM2-135M's seven, all small. `compile: false` holds one dense weight at a time."""
    from qtrain.memory import IN_GRAPH_MAX_BYTES, estimate, setup_from_config

    h, i = 4096, 14336
    assert h * 1024 * 2 <= IN_GRAPH_MAX_BYTES < h * h * 2
    compiled, eager = (estimate(_setup(tmp_path, dates_file, 2048, compiled=c)) for c in (True, False))
    assert eager.details["dequant_scratch"] == h * i * 2
    assert compiled.details["dequant_scratch"] == h * i * 2 + 2 * h * 1024 * 2
    smol = {**L3_8B, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
            "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152}
    s = setup_from_config(_plan_cfg(tmp_path, dates_file, 512), smol, "cuda")
    assert s.compiled
    block = (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) * 2
    assert estimate(s).details["dequant_scratch"] == block
    assert estimate(replace(s, compiled=False)).details["dequant_scratch"] == 576 * 1536 * 2
