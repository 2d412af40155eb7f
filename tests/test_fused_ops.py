"""Fused RMSNorm and SwiGLU (`training.fused_ops`, `qtrain.fused`) against the transformers modules they replace:
the same loss and gradients on a tiny 4-bit Llama (bit for bit in 16-bit compute), less kept for backward
(counted byte for byte), and the switch itself (what it touches, what it leaves alone, how `qtrain run` and the
planner decide it). The Triton path is tested through Triton's interpreter in tests/test_triton_kernels.py."""

import json

import pytest
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState

import qtrain.fused as fused
from qtrain.cli import main
from qtrain.config import ModelSection, QuantizationSection, validate_config
from qtrain.fused import disable_fused_ops, enable_fused_ops
from qtrain.memory import estimate, setup_from_config
from qtrain.methods import build_methods
from qtrain.methods.blocks import LoRABlock
from qtrain.modeling import enable_checkpointing, load_model
from qtrain.savers import auto_memory_savers
from qtrain.tiling import enable_tiled_mlp
from qtrain.train import accumulate_gradients
from conftest import make_llama_folder, write_config

CPU = torch.device("cpu")
LAYERS = 3


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_llama_folder(tmp_path_factory.mktemp("llama-fused"), tie=False, layers=LAYERS)


def _lora_model(model_dir, dtype: str):
    loaded = load_model(ModelSection(path=str(model_dir)), QuantizationSection(bits=4, compute_dtype=dtype), CPU)
    torch.manual_seed(0)
    (method,) = build_methods([LoRABlock(method="lora", r=4, alpha=8, dropout=0.0)])
    params = method.attach(loaded.model)
    for p in params.values():  # non-zero B, so every gradient depends on every factor
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    return loaded.model.train(), params


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 300, (2, 40), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    batch["attention_mask"][1, -5:] = 0  # a padded row
    batch["labels"][1, -5:] = -100
    return batch


def _step(model, params, precision: str):
    """One forward/backward under the autocast `qtrain run` uses for the compute dtype."""
    AcceleratorState._reset_state()  # each test picks its own mixed precision
    for p in params.values():
        p.grad = None
    loss, _ = accumulate_gradients(model, [_batch()], Accelerator(cpu=True, mixed_precision=precision), 1024)
    return loss, {n: p.grad.clone() for n, p in params.items()}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("tiled", [False, True])
def test_fused_ops_give_bit_identical_loss_and_gradients_in_bf16(llama_dir, checkpointing, tiled, monkeypatch):
    """bf16 compute (autocast, as on a GPU): the same loss and LoRA gradients bit for bit, with the norm's
    backward in chunks of 7 rows (and in one chunk), with and without checkpointing and the tiled MLP; every
    gradient is non-zero. The forward is the modules' own, the backward replays their operations."""
    model, params = _lora_model(llama_dir, "bfloat16")
    if checkpointing:
        enable_checkpointing(model)
    if tiled:
        enable_tiled_mlp(model, 16)  # 80 tokens: five chunks
    ref_loss, ref = _step(model, params, "bf16")
    assert all(g.abs().sum() > 0 for g in ref.values())
    if tiled:  # the tiled MLP runs whatever forward the MLP has: switch first, as `qtrain run` does
        for layer in model.model.layers:
            del layer.mlp.forward
    count = enable_fused_ops(model)
    assert count == {"rms_norm": 2 * LAYERS + 1, "swiglu": LAYERS}
    if tiled:
        enable_tiled_mlp(model, 16)
    for chunk in (fused.CHUNK_ELEMENTS, 7 * model.config.hidden_size):
        monkeypatch.setattr(fused, "CHUNK_ELEMENTS", chunk)
        loss, got = _step(model, params, "bf16")
        assert loss == ref_loss
        for n in ref:
            assert torch.equal(got[n], ref[n]), n


def test_fused_ops_in_fp32_swiglu_exact_norm_to_rounding(llama_dir):
    """fp32 compute: silu·up's gradients are bit-identical; the norm's agree to float32 rounding, not bit for bit:
    there `x.to(float32)` is x itself, so autograd sums the norm's two gradient paths and the residual's at one
    tensor in an order that a separate function cannot reproduce (in 16-bit compute the upcast is its own
    tensor and the sums match). That is why `fused_ops: auto` stays off on a CPU, whose compute is fp32."""
    model, params = _lora_model(llama_dir, "float32")
    ref_loss, ref = _step(model, params, "no")
    enable_fused_ops(model)
    for module in model.modules():  # SwiGLU alone: exact
        if isinstance(vars(module).get("forward"), fused.FusedRMSNormForward):
            del module.forward
    loss, got = _step(model, params, "no")
    assert loss == ref_loss and all(torch.equal(got[n], ref[n]) for n in ref)
    disable_fused_ops(model)
    enable_fused_ops(model)
    loss, got = _step(model, params, "no")
    assert abs(loss - ref_loss) < 1e-6 * abs(ref_loss)
    for n in ref:
        gap = (got[n] - ref[n]).abs().max() / ref[n].abs().max()
        assert gap < 1e-5, (n, gap)


def _saved_bytes(model, batch) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=batch["input_ids"], use_cache=False)
    del out
    return sum(seen.values())


def test_fused_ops_keep_exactly_the_16bit_inputs(llama_dir):
    """What autograd keeps, counted storage by storage over one bf16 forward without checkpointing: the fused
    ops keep, per token, each norm's 16-bit input instead of its fp32 upcast and fp32 rstd (hidden × 2 + 4 bytes
    less per norm) and no silu(gate) (intermediate × 2 bytes less per MLP). The first layer's input norm keeps
    nothing either way: its input, the frozen embeddings' output, needs no gradient."""
    model, _ = _lora_model(llama_dir, "bfloat16")
    batch = _batch()
    plain = _saved_bytes(model, batch)
    enable_fused_ops(model)
    lean = _saved_bytes(model, batch)
    tokens, cfg = batch["input_ids"].numel(), model.config
    norms = 2 * LAYERS  # every layer's two and the final one, less layer 0's input norm
    per_norm = tokens * (cfg.hidden_size * 4 + 4 - cfg.hidden_size * 2)  # fp32 upcast and rstd → the bf16 input
    per_mlp = tokens * cfg.intermediate_size * 2  # silu(gate) in bf16
    assert plain - lean == norms * per_norm + LAYERS * per_mlp


def test_the_switch_keeps_modules_names_and_eval(llama_dir):
    """Switching keeps each module's class, parameters and state dict; evaluation (no autograd) runs the
    modules' own forward; a norm whose weight trains keeps transformers' forward; switching back restores it."""
    model, _ = _lora_model(llama_dir, "float32")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    norm = model.model.layers[0].post_attention_layernorm
    norm.weight.requires_grad_(True)  # as `unfreeze` trains it
    count = enable_fused_ops(model)
    assert count["rms_norm"] == 2 * LAYERS  # every norm but the trained one
    assert "forward" not in vars(norm)
    assert [type(m) for m in model.modules()] == types
    assert model.state_dict().keys() == state.keys()
    ids = _batch()["input_ids"]
    with torch.no_grad():
        switched = model(input_ids=ids, use_cache=False).logits
    calls = []
    original = fused.Recompute.apply
    fused.Recompute.apply = lambda *a: calls.append(1) or original(*a)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        assert not calls  # evaluation takes the plain forward
    finally:
        fused.Recompute.apply = original
    disable_fused_ops(model)
    assert not any("forward" in vars(m) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, switched)


def _cfg(**training):
    return validate_config({"model": {"path": "unused"}, "peft": [{"method": "lora", "r": 16}],
                            "data": {"train": "unused.jsonl", "max_seq_len": 4096}, "training": training})


LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "tie_word_embeddings": False}


def test_planner_counts_what_the_fused_ops_keep():
    """Llama-3-8B shapes in bf16: without checkpointing, each layer keeps 2 × 4096 × 2 bytes less per token for
    its norms and 14,336 × 2 less for silu(gate); with checkpointing the recomputed layer and its backward
    shrink (no fp32 norm gradients), so the peak drops at long sequences."""
    off = setup_from_config(_cfg(fused_ops=False, gradient_checkpointing=False, micro_batch_size=1), LLAMA_8B, "cuda")
    on = setup_from_config(_cfg(fused_ops=True, gradient_checkpointing=False, micro_batch_size=1), LLAMA_8B, "cuda")
    per_token = 2 * 4096 * (4 - 2) + 14336 * 2
    tokens = 4096
    diff = estimate(off).details["activations_no_checkpointing"] - estimate(on).details["activations_no_checkpointing"]
    assert diff == 32 * per_token * tokens
    ckpt_off = setup_from_config(_cfg(fused_ops=False), LLAMA_8B, "cuda")
    ckpt_on = setup_from_config(_cfg(fused_ops=True), LLAMA_8B, "cuda")
    assert estimate(ckpt_on).peak < estimate(ckpt_off).peak


@pytest.mark.parametrize("device,budget_gib,expected", [("cuda", 80, True), ("cpu", 80, False), ("cpu", 1, True)])
def test_auto_is_on_for_a_gpu_and_a_memory_saver_on_a_cpu(device, budget_gib, expected):
    """`fused_ops: auto`: always on for a GPU (fewer kernels, and exact); on a CPU only when the run would not fit
    without it (it costs a recompute there)."""
    cfg = _cfg(micro_batch_size=1)
    s = setup_from_config(cfg, LLAMA_8B, device)
    s = auto_memory_savers(s, budget_gib * 2**30, {"fused_ops"})
    assert s.fused is expected


def test_a_run_with_fused_ops_trains_records_and_resumes_its_decision(tmp_path, llama_dir, dates_file, capsys):
    """`qtrain run` with fused_ops true on the CPU: the plain path ("torch") is used, said and recorded in
    summary.json; the adapter equals a run's without fused ops to float rounding (fp32 here); with `auto` a
    resumed run keeps what the interrupted run decided."""
    common = dict(data={"train": str(dates_file), "max_seq_len": 64},
                  peft=[{"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0}])
    runs = {}
    for name, value in (("plain", False), ("fused", True)):
        (tmp_path / name).mkdir()
        cfg = write_config(tmp_path / name, llama_dir, dates_file, **common,
                           training={"max_steps": 3, "micro_batch_size": 2, "fused_ops": value, "save_every": 2,
                                     "learning_rate": 1e-3})
        assert main(["run", str(cfg)]) == 0
        runs[name] = json.loads((tmp_path / name / "run" / "summary.json").read_text())
    out = capsys.readouterr().out
    assert "fused_ops on: 7 RMSNorms and 3 SwiGLU MLPs (torch)" in out
    assert runs["fused"]["fused_ops"] is True and runs["fused"]["fused_ops_backend"] == "torch"
    assert runs["plain"]["fused_ops"] is False and runs["plain"]["fused_ops_backend"] is None
    assert abs(runs["fused"]["final_loss"] - runs["plain"]["final_loss"]) < 1e-5
    from safetensors.torch import load_file

    a = load_file(tmp_path / "plain" / "run" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "fused" / "run" / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)

    # a run interrupted with fused_ops decided on (a smaller machine), resumed under `auto` on this one
    run = tmp_path / "fused" / "run"
    ckpt = run / "checkpoints" / "step-2" / "state.json"
    assert ckpt.is_file()
    cfg = yaml.safe_load((tmp_path / "fused" / "config.yaml").read_text())
    cfg["training"]["fused_ops"] = "auto"
    (tmp_path / "fused" / "config.yaml").write_text(yaml.safe_dump(cfg))
    # a changed fused_ops would be refused as a change of the maths: this resume succeeds only if `auto` kept it
    assert main(["run", str(tmp_path / "fused" / "config.yaml"), f"--resume={run / 'checkpoints' / 'step-2'}"]) == 0
    assert "fused_ops on" in capsys.readouterr().out
