"""The memory planner: its formulas against real tensors of tiny models, its monotonicity, the what-fits solver,
the `qtrain plan` command, and `micro_batch_size: auto` in `qtrain run`."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from qtrain.arch import Arch
from qtrain.cli import main
from qtrain.config import TrainingSection, load_config
from qtrain.errors import QTrainError
from qtrain.gpus import GPUS, fmt_bytes, gpu_profile, parse_bytes
from qtrain.memory import _layer_gradients, estimate, loss_chunk_tokens, quantized_linear_bytes, setup_from_config
from qtrain.planner import (auto_checkpointing, auto_micro_batch, check_before_loading, largest_micro_batch,
                            longest_sequence, make_plan, render, suggestions)
from tests.conftest import write_config


def _cfg(tmp_path, model_dir, dates_file, **sections):
    return load_config(write_config(tmp_path, model_dir, dates_file, **sections))


def _model_cfg(model_dir):
    return json.loads((model_dir / "config.json").read_text())


@pytest.mark.parametrize("bits,double_quant,blocksize", [(4, True, 64), (4, False, 64), (4, True, 128), (8, True, 64)])
@pytest.mark.parametrize("shape", [(64, 128), (576, 1536), (33, 17), (520, 1100)])
def test_one_linear_matches_weight_nbytes(bits, double_quant, blocksize, shape):
    from qtrain.quantization import QuantSpec, quantize_linear, weight_nbytes

    n_in, n_out = shape
    layer = quantize_linear(nn.Linear(n_in, n_out, bias=False), QuantSpec(bits, "nf4", double_quant, blocksize))
    assert quantized_linear_bytes(n_in, n_out, bits, 4, double_quant, blocksize) == weight_nbytes(layer)


@pytest.mark.parametrize("bits", [4, 8, "none"])
@pytest.mark.parametrize("tied", [True, False])
def test_weights_equal_the_loaded_models_footprint(tmp_path, tiny_model_dir, tiny_untied_dir, dates_file, bits, tied):
    from qtrain.modeling import footprint, load_model

    model_dir = tiny_model_dir if tied else tiny_untied_dir
    cfg = _cfg(tmp_path, model_dir, dates_file, quantization={"bits": bits})
    model = load_model(cfg.model, cfg.quantization, torch.device("cpu"), path=model_dir).model
    fp = footprint(model)
    comp = estimate(setup_from_config(cfg, _model_cfg(model_dir), device="cpu")).components
    assert comp["quantized_weights"] == fp["quantized_linear_bytes"]
    assert comp["other_weights"] == fp["other_param_bytes"]


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"], ".*mlp.*"])
def test_trainable_count_equals_attached_lora(tmp_path, tiny_model_dir, dates_file, targets):
    from qtrain.methods import build_methods
    from qtrain.modeling import load_model

    peft = [{"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": targets}]
    cfg = _cfg(tmp_path, tiny_model_dir, dates_file, peft=peft)
    model = load_model(cfg.model, cfg.quantization, torch.device("cpu"), path=tiny_model_dir).model
    params = build_methods(cfg.peft)[0].attach(model)
    est = estimate(setup_from_config(cfg, _model_cfg(tiny_model_dir), device="cpu"))
    n = sum(p.numel() for p in params.values())
    assert est.details["trainable_parameter_count"] == n
    assert est.components["trainable_params"] == est.details["gradient_bytes"] == 4 * n
    # each layer's share, which its backward makes (the planner's gradients appear layer by layer)
    per_layer = [0] * len(model.model.layers)
    for name, p in params.items():
        per_layer[int(name.split("layers.")[1].split(".")[0])] += 4 * p.numel()
    assert _layer_gradients(setup_from_config(cfg, _model_cfg(tiny_model_dir), device="cpu")) == per_layer



@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_appear_layer_by_layer_as_the_planner_counts(tmp_path, tiny_model_dir, dates_file, checkpointing):
    """In a step of one micro-batch no gradient exists in the loss phase, and when layer k's backward starts
    exactly those of the layers above it do: the gradients the planner counts at each moment of the backward.
    Before a second step they are gone again (the loop sets them to None)."""
    from accelerate import Accelerator

    from qtrain.methods import build_methods
    from qtrain.modeling import load_model
    from qtrain.train import accumulate_gradients, train

    peft = [{"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "down_proj"]}]
    cfg = _cfg(tmp_path, tiny_model_dir, dates_file, peft=peft,
               training={"gradient_checkpointing": checkpointing, "max_steps": 2, "optimizer": "adamw"})
    model = load_model(cfg.model, cfg.quantization, torch.device("cpu"), path=tiny_model_dir).model
    params = build_methods(cfg.peft)[0].attach(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = model.model.layers
    alive: list[tuple[str, int]] = []
    grad_bytes = lambda: sum(4 * p.numel() for p in params.values() if p.grad is not None)  # noqa: E731
    model.model.norm.register_full_backward_pre_hook(lambda *_: alive.append(("norm", grad_bytes())))
    for k, layer in enumerate(layers):
        layer.register_full_backward_pre_hook(lambda *_, k=k: alive.append((k, grad_bytes())))
    ids = torch.randint(0, 100, (2, 24))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    accumulate_gradients(model, [batch], Accelerator(cpu=True), 128)

    per_layer = _layer_gradients(setup_from_config(cfg, _model_cfg(tiny_model_dir), device="cpu"))
    assert sum(per_layer) == 4 * sum(p.numel() for p in params.values()) == grad_bytes()
    expected = [("norm", 0)] + [(k, sum(per_layer[k + 1:])) for k in reversed(range(len(layers)))]
    assert alive == expected

    alive.clear()  # through the training loop: each step starts with no gradients
    for p in params.values():
        p.grad = None
    groups = [{"params": list(params.values()), "lr": 1e-3}]
    train(model, groups, iter([batch] * 2), cfg.training, 2, Accelerator(cpu=True), log=lambda record: None)
    assert [a for a in alive if a[0] == "norm"] == [("norm", 0), ("norm", 0)]

def _saved_and_predicted(tmp_path, model_dir, dates_file, micro_batch=3, **sections):
    """(bytes autograd saves in a real training forward, parameters excluded and each storage once; the
    planner's predicted activations) for the tiny model at 96 tokens without checkpointing."""
    from qtrain.methods import build_methods
    from qtrain.modeling import load_model

    cfg = _cfg(tmp_path, model_dir, dates_file, data={"max_seq_len": 96},
               training={"micro_batch_size": micro_batch, "gradient_checkpointing": False}, **sections)
    model = load_model(cfg.model, cfg.quantization, torch.device("cpu"), path=model_dir).model
    for method in build_methods(cfg.peft):
        method.attach(model)
    predicted = estimate(setup_from_config(cfg, _model_cfg(model_dir), device="cpu")).components["activations"]
    return saved_bytes(model, loss_chunk_tokens(cfg.training.loss_chunk_size, "cpu", 0), micro_batch), predicted


def saved_bytes(model: nn.Module, chunk_size: int, micro_batch: int = 3) -> int:
    """Bytes autograd saves in one training forward of `model` over a (micro_batch, 96) batch whose last row
    has padding when there are several (parameters and buffers excluded, each storage once)."""
    from qtrain.train import batch_loss_sum, without_right_padding_mask

    model.train()
    existing = {id(t.untyped_storage()) for t in list(model.parameters()) + list(model.buffers())}
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if id(s) not in existing:
            saved[id(s)] = s.nbytes()
        return t

    ids = torch.randint(0, model.config.vocab_size, (micro_batch, 96), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[-1, -8:] = 0 if micro_batch > 1 else 1
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        batch_loss_sum(model, without_right_padding_mask(batch), chunk_size)  # as training gives it
    return sum(saved.values())


PREFIX = {"method": "prefix_tuning", "num_virtual_tokens": 40}


DROPOUT = {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.1, "target_modules": "all-linear"}


DORA = {**DROPOUT, "dora": True}


@pytest.mark.parametrize("peft,micro_batch", [(None, 3), ([PREFIX], 1), ([PREFIX], 3), ([DROPOUT], 3), ([DORA], 3),
                                              ([{**DORA, "dropout": 0.0}], 3)])
def test_saved_activations_match_autograd(tmp_path, tiny_model_dir, dates_file, peft, micro_batch):
    """The bytes autograd saves in a real forward vs the prediction (LoRA; prefix tuning, whose 40 keys/values
    per layer also make transformers build a mask, repeat the GQA keys/values and sdpa keep a float mask; LoRA
    with dropout, whose mask a CPU keeps in the input's dtype, CUDA's fused kernel as bool; DoRA, whose rescaling
    keeps W·x and the update in fp32, and which with dropout kept every targeted layer's fp32 weight)."""
    saved, predicted = _saved_and_predicted(tmp_path, tiny_model_dir, dates_file, micro_batch,
                                            **({"peft": peft} if peft else {}))
    assert abs(predicted - saved) / saved < 0.10


def test_prefix_tuning_memory_is_counted(tmp_path, tiny_model_dir, dates_file):
    """What a longer prefix adds to the saved activations is predicted (to 10 %: measured +5 %) from the
    config alone; its parameters, gradients and optimizer states are counted; and `gradient_checkpointing: auto`
    decides for prefix tuning as for any method, since it now trains under checkpointing."""
    from qtrain.arch import Arch

    short, long = (_saved_and_predicted(tmp_path, tiny_model_dir, dates_file, 1,
                                        peft=[{**PREFIX, "num_virtual_tokens": n}]) for n in (1, 40))
    grown, predicted = long[0] - short[0], long[1] - short[1]
    assert grown > 0 and abs(predicted - grown) / grown < 0.10, (grown, predicted)

    model_cfg, arch = _model_cfg(tiny_model_dir), Arch.from_path(tiny_model_dir)
    cfg = _cfg(tmp_path, tiny_model_dir, dates_file, peft=[PREFIX])
    s = setup_from_config(cfg, model_cfg, device="cpu")
    assert (s.tokens, s.keys) == (s.seq_len, s.seq_len + 40)  # longer attention, not a longer sequence
    est = estimate(s)
    n = 40 * arch.layers * 2 * arch.kv_heads * arch.head_dim  # one tensor, fp32, AdamW: two states
    assert est.details["trainable_parameter_count"] == n == cfg.peft[0].trainable_parameters(arch)
    assert (est.components["trainable_params"], est.components["gradients"]) == (4 * n, 4 * n)  # not a layer's
    assert est.components["optimizer_states"] == 8 * n
    on, off = (estimate(replace(s, checkpointing=c)).peak for c in (True, False))
    assert on < off
    assert auto_checkpointing(s, math.ceil(off / 0.9) - 1) is True  # too tight without it: on
    assert auto_checkpointing(s, math.ceil(off / 0.9)) is False


def test_monotone_and_the_right_knobs_lower_memory(tmp_path, tiny_model_dir, dates_file):
    s = setup_from_config(_cfg(tmp_path, tiny_model_dir, dates_file), _model_cfg(tiny_model_dir))
    peaks = [estimate(replace(s, micro_batch=m)).peak for m in (1, 2, 4, 8)]
    assert peaks == sorted(peaks) and len(set(peaks)) == 4
    lengths = [estimate(replace(s, seq_len=t)).peak for t in (32, 64, 128, 256)]
    assert lengths == sorted(lengths) and len(set(lengths)) == 4
    big = replace(s, micro_batch=8, seq_len=256)
    off, on = estimate(replace(big, checkpointing=False)), estimate(replace(big, checkpointing=True))
    assert on.components["activations"] < off.components["activations"]
    assert on.details["activations_checkpointing"] < on.details["activations_no_checkpointing"]
    eager = estimate(replace(big, attention="eager")).details["activations_per_layer"]
    assert eager > off.details["activations_per_layer"]  # the tokens² softmax


def test_bnb_keeps_small_tensors_in_32bit(tmp_path, tiny_model_dir, dates_file):
    """hidden 64, r=4: every LoRA tensor has < 4096 elements, so bnb's 8-bit AdamW keeps 32-bit states."""
    cfg = _cfg(tmp_path, tiny_model_dir, dates_file, training={"optimizer": "adamw_8bit"})
    est = estimate(setup_from_config(cfg, _model_cfg(tiny_model_dir)))
    n = est.details["trainable_parameter_count"]
    assert est.components["optimizer_states"] == 8 * n + 2 * 256 * 4
    big = setup_from_config(cfg, {**_model_cfg(tiny_model_dir), "hidden_size": 2048, "intermediate_size": 4096})
    b = estimate(big)
    assert b.components["optimizer_states"] < 3 * b.details["trainable_parameter_count"]


def test_solver_is_consistent(tmp_path, tiny_model_dir, dates_file):
    s = setup_from_config(_cfg(tmp_path, tiny_model_dir, dates_file), _model_cfg(tiny_model_dir), device="cpu")
    budget = estimate(replace(s, micro_batch=37)).peak + 1000
    m = largest_micro_batch(s, budget)
    assert estimate(replace(s, micro_batch=m)).peak <= budget < estimate(replace(s, micro_batch=m + 1)).peak
    t = longest_sequence(s, budget)
    assert estimate(replace(s, seq_len=t)).peak <= budget < estimate(replace(s, seq_len=t + 1)).peak
    assert largest_micro_batch(s, estimate(replace(s, micro_batch=1)).peak - 1) == 0
    over = replace(s, micro_batch=64, accumulation=2)
    sugs = suggestions(over, budget)
    fitting = [x for x in sugs if x.fits]
    assert fitting and all(x.peak <= budget for x in fitting) and all(not x.fits for x in sugs[len(fitting):])
    micro = next(x for x in sugs if x.change.startswith("micro-batch"))
    m_new = int(micro.overrides[0].split("=")[1])
    acc = int(micro.overrides[1].split("=")[1])
    assert m_new * acc == 128
    assert estimate(replace(s, micro_batch=m_new, accumulation=acc)).peak == micro.peak <= budget


@pytest.mark.parametrize("targets", [["q_proj"], ["v_proj", "q_proj"], "all-linear"])
def test_suggestions_only_name_changes_that_lower_the_peak(tmp_path, tiny_model_dir, dates_file, targets):
    """'LoRA on q_proj and v_proj only' used to be offered to a LoRA on q_proj alone (+1.6 MB predicted here)
    or on exactly those two (no change); 8-bit AdamW to this tiny model, whose tensors bnb keeps in 32-bit."""
    cfg = _cfg(tmp_path, tiny_model_dir, dates_file, peft=[{"method": "lora", "r": 4, "target_modules": targets}])
    s = replace(setup_from_config(cfg, _model_cfg(tiny_model_dir), device="cuda"), micro_batch=64)
    sugs = suggestions(s, estimate(s).peak // 2)
    assert sugs and all(x.peak < estimate(s).peak for x in sugs)
    changes = [x.change for x in sugs]
    assert ("LoRA on q_proj and v_proj only" in changes) == (targets == "all-linear")
    assert any(c.startswith("enable gradient checkpointing") for c in changes) and "LoRA rank 2" in changes


def test_cli_json_schema(tmp_path, tiny_model_dir, dates_file, capsys):
    path = write_config(tmp_path, tiny_model_dir, dates_file)
    assert main(["plan", str(path), "--budget", "2GB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out["peak_bytes"], int) and out["peak_bytes"] == sum(out["components"].values())
    assert all(isinstance(k, str) and isinstance(v, int) for k, v in out["components"].items())
    assert out["budget_bytes"] == 2 * 10**9 and out["headroom_bytes"] == out["budget_bytes"] - out["peak_bytes"]
    assert out["verdict"] == "fits" and out["max_micro_batch"] >= 2


def test_cli_bad_gpu_lists_known_names(tmp_path, tiny_model_dir, dates_file, capsys):
    path = write_config(tmp_path, tiny_model_dir, dates_file)
    assert main(["plan", str(path), "--gpu", "rtx9999"]) == 2
    err = capsys.readouterr().err
    assert "rtx9999" in err and all(name in err for name in GPUS)


def test_cli_table_and_model_config_file(tmp_path, tiny_model_dir, dates_file, capsys):
    path = write_config(tmp_path, tiny_model_dir, dates_file, model={"path": "owner/not-downloaded"})
    assert main(["plan", str(path), "--gpu", "t4"]) == 2
    assert "--model-config" in capsys.readouterr().err
    assert main(["plan", str(path), "--gpu", "t4", "--model-config", str(tiny_model_dir / "config.json")]) == 0
    out = capsys.readouterr().out
    assert "total peak" in out and "verdict: fits" in out and "budget (--gpu t4) 15.00 GiB" in out


def test_an_unreadable_config_json_names_where_it_came_from(tmp_path, tiny_model_dir, dates_file, capsys):
    """The error named --model-config even when the file came from model.path and no --model-config was given."""
    import shutil

    model = shutil.copytree(tiny_model_dir, tmp_path / "broken-model")
    (model / "config.json").write_text("{not json")
    path = write_config(tmp_path, model, dates_file)
    assert main(["plan", str(path), "--gpu", "t4"]) == 2
    err = capsys.readouterr().err
    assert "model.path: cannot read" in err and "give a readable one with --model-config FILE" in err
    assert main(["plan", str(path), "--gpu", "t4", "--model-config", str(model / "config.json")]) == 2
    assert "--model-config: cannot read" in capsys.readouterr().err
    assert main(["plan", str(path), "--gpu", "t4", "--model-config", str(tiny_model_dir / "config.json")]) == 0


def test_plan_does_not_import_torch(tmp_path, tiny_model_dir, dates_file):
    path = write_config(tmp_path, tiny_model_dir, dates_file)
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "qtrain", "plan", str(path), "--budget", "8GB"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "qtrain.planner" in imported and not {"torch", "bitsandbytes", "transformers"} & imported


def test_parse_bytes():
    assert parse_bytes("24GB") == 24 * 10**9 and parse_bytes("11.5GiB") == int(11.5 * 2**30)
    assert parse_bytes(1234) == 1234 and parse_bytes("800 mib") == 800 * 2**20


def test_qtrain_run_asks_for_expandable_segments_unless_the_allocator_is_configured(monkeypatch, tmp_path,
                                                                                    tiny_model_dir, dates_file):
    """`qtrain run` sets torch's allocator variable (its torch ≥ 2.9 name) when the user set none, leaves a
    user's setting alone (either name), and does nothing off Linux; torch reads the variable even when set after
    `import torch`, before the first allocation (checked where torch can report its allocator settings)."""
    from qtrain.gpus import EXPANDABLE_SEGMENTS, prefer_expandable_segments

    env: dict[str, str] = {}
    assert prefer_expandable_segments(env) == "PYTORCH_ALLOC_CONF"
    assert env == {"PYTORCH_ALLOC_CONF": EXPANDABLE_SEGMENTS}
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        env = {name: "max_split_size_mb:512"}
        assert prefer_expandable_segments(env) is None and env == {name: "max_split_size_mb:512"}
    monkeypatch.setattr(sys, "platform", "win32")
    assert prefer_expandable_segments(env := {}) is None and env == {}
    monkeypatch.undo()

    if hasattr(torch._C, "_accelerator_getAllocatorSettings"):
        probe = ("import torch; from qtrain.gpus import prefer_expandable_segments; prefer_expandable_segments(); "
                 "print(torch._C._accelerator_getAllocatorSettings())")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTORCH_")}
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
        assert out.stdout.strip() == EXPANDABLE_SEGMENTS
    import qtrain.run

    order = []
    monkeypatch.setattr(qtrain.run, "prefer_expandable_segments", lambda: order.append("allocator") or 1 / 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: order.append("cuda") or False)
    with pytest.raises(ZeroDivisionError):
        qtrain.run.run(_cfg(tmp_path, tiny_model_dir, dates_file))
    assert order == ["allocator"]  # before anything asks CUDA


def test_auto_micro_batch_keeps_the_effective_batch(tmp_path, tiny_model_dir, dates_file, capsys):
    model_cfg = _model_cfg(tiny_model_dir)
    base = _cfg(tmp_path, tiny_model_dir, dates_file)
    s = setup_from_config(base, model_cfg, device="cpu")
    budget = estimate(replace(s, micro_batch=5)).peak  # 5 fits, 6 does not: the largest divisor of 12 is 4
    cfg = _cfg(tmp_path, tiny_model_dir, dates_file, training={
        "micro_batch_size": "auto", "effective_batch_size": 12, "memory_budget": budget, "max_steps": 1,
        "optimizer": "adamw", "learning_rate": 1e-3})
    assert auto_micro_batch(cfg, s, budget) == (4, 3)
    resolved = check_before_loading(cfg, model_cfg, "cpu", say=print)
    assert (resolved.training.micro_batch_size, resolved.training.gradient_accumulation_steps) == (4, 3)
    assert cfg.training.micro_batch_size == "auto"  # the caller's config is not mutated
    capsys.readouterr()
    tight = _cfg(tmp_path, tiny_model_dir, dates_file, training={"memory_budget": "1MB"})
    check_before_loading(tight, model_cfg, "cpu", say=print)
    warning = capsys.readouterr().err
    assert "over training.memory_budget" in warning
    # The command it names plans the same run: on CPU it must say so (plan's default device is cuda, whose
    # overheads and compute dtype differ), and it then predicts the peak the warning states.
    command = re.search(r"`qtrain plan CONFIG (.*)`", warning).group(1).split()
    assert command == ["--budget", "1MB", "--device", "cpu"]
    assert main(["plan", str(tmp_path / "config.yaml"), *command, "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)["peak_bytes"]
    assert f"a peak of {fmt_bytes(planned)}," in warning
    assert main(["plan", str(tmp_path / "config.yaml"), "--budget", "1MB", "--json"]) == 0  # without --device
    assert json.loads(capsys.readouterr().out)["peak_bytes"] != planned


def test_auto_checkpointing_is_off_exactly_when_the_run_fits_without_it_with_headroom(tmp_path, tiny_model_dir, dates_file, capsys):
    model_cfg = _model_cfg(tiny_model_dir)
    s = setup_from_config(_cfg(tmp_path, tiny_model_dir, dates_file), model_cfg, device="cpu")
    on, off = (estimate(replace(s, checkpointing=c)).peak for c in (True, False))
    assert on < off
    fits = math.ceil(off / 0.9)  # without checkpointing, with the 10 % headroom auto keeps
    for budget, expected in ((fits, False), (fits - 1, True), (on - 1, True)):
        cfg = _cfg(tmp_path, tiny_model_dir, dates_file, training={  # fused ops, a saver too, stay out of it
            "gradient_checkpointing": "auto", "memory_budget": budget, "max_steps": 1, "fused_ops": False})
        assert cfg.training.gradient_checkpointing == "auto"
        assert auto_checkpointing(s, budget) is expected
        resolved = check_before_loading(cfg, model_cfg, "cpu", say=print)
        assert resolved.training.gradient_checkpointing is expected
        assert cfg.training.gradient_checkpointing == "auto"  # the caller's config is not mutated
        out = capsys.readouterr()
        assert f"gradient_checkpointing auto → {'on' if expected else 'off'}" in out.out
        assert ("over training.memory_budget" in out.err) is (budget < on)  # on, and still over: the warning
        plan = make_plan(cfg, model_cfg, budget, "training.memory_budget", device="cpu")
        assert plan.setup.checkpointing is expected
    on_cfg = _cfg(tmp_path, tiny_model_dir, dates_file, training={"gradient_checkpointing": True})
    offer = make_plan(on_cfg, model_cfg, fits, "--budget", device="cpu").faster  # qtrain plan: "faster, and fits"
    assert offer.overrides == ["training.gradient_checkpointing=false"] and offer.peak == off and offer.fits
    assert make_plan(on_cfg, model_cfg, fits - 1, "--budget", device="cpu").faster is None
    assert "faster, and still fits" in render(make_plan(on_cfg, model_cfg, fits, "--budget", device="cpu"))
    assert TrainingSection().gradient_checkpointing is True  # auto is asked for, never the default
    with pytest.raises(Exception, match="gradient_checkpointing"):
        _cfg(tmp_path, tiny_model_dir, dates_file, training={"gradient_checkpointing": "sometimes"})


def test_cpu_memory_is_shared_by_the_processes_on_the_host(monkeypatch):
    from qtrain.planner import device_memory

    monkeypatch.setattr("os.sysconf", lambda name: {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}[name])
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert device_memory("cpu") == 4_096_000
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # as accelerate's launcher sets it for --nproc 4
    assert device_memory("cpu") == 1_024_000


def test_run_with_auto_micro_batch(tmp_path, tiny_model_dir, dates_file, capsys):
    from qtrain.run import run

    cfg = _cfg(tmp_path, tiny_model_dir, dates_file, training={
        "micro_batch_size": "auto", "effective_batch_size": 4, "memory_budget": "64GB", "max_steps": 1,
        "optimizer": "adamw", "learning_rate": 1e-3, "gradient_checkpointing": "auto", "save_every": None})
    run(cfg)
    out = capsys.readouterr().out
    assert "micro_batch_size auto → 4 (gradient accumulation 1" in out
    assert "gradient_checkpointing auto → off" in out  # 64GB: the tiny model fits without it
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["micro_batch_size"], summary["gradient_accumulation_steps"]) == (4, 1)
    assert summary["gradient_checkpointing"] is False
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["step"] == 1


def test_every_method_block_is_accounted_through_its_hooks(tmp_path, tiny_model_dir, dates_file):
    from qtrain.arch import Arch
    from qtrain.methods.blocks import METHOD_BLOCKS

    model_cfg, arch = _model_cfg(tiny_model_dir), Arch.from_path(tiny_model_dir)
    base = estimate(setup_from_config(_cfg(tmp_path, tiny_model_dir, dates_file), model_cfg))
    options = {"unfreeze": {"last_n": 1}, "prompt_tuning": {"num_virtual_tokens": 16}}
    for name in METHOD_BLOCKS:
        cfg = _cfg(tmp_path, tiny_model_dir, dates_file, peft=[{"method": name, **options.get(name, {})}])
        block = cfg.peft[0]
        est = estimate(setup_from_config(cfg, model_cfg))
        assert est.details["trainable_parameter_count"] == block.trainable_parameters(arch), name
        dense = block.full_precision_linears(arch)
        expected = base.components["quantized_weights"] - sum(
            quantized_linear_bytes(*arch.linears()[n], 4, 2) for n in dense)
        assert est.components["quantized_weights"] == expected, name
        s = setup_from_config(cfg, model_cfg)
        assert s.tokens == s.seq_len + (16 if name == "prompt_tuning" else block.extra_tokens()), name


LLAMA_70B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
             "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
             "tie_word_embeddings": False}


def test_sharding_divides_parameters_gradients_and_optimizer_states_per_device(tmp_path, tiny_model_dir, dates_file):
    cfg = _cfg(tmp_path, tiny_model_dir, dates_file, training={"gradient_checkpointing": True})
    # FSDP counts every gradient from the start; so does one device from a second micro-batch on
    one, two, four = (estimate(replace(setup_from_config(cfg, LLAMA_70B, shards=n), accumulation=1 if n > 1 else 2))
                      for n in (1, 2, 4))
    for n, est in ((2, two), (4, four)):
        for key in ("other_weights", "trainable_params", "gradients", "optimizer_states"):
            assert est.components[key] == math.ceil(one.components[key] / n), key
        assert est.components["activations"] == one.components["activations"]  # each device runs its own batch
        # the packed 4-bit values shard; absmax and the double-quant constants stay whole on every device
        constants = sum(quantized_linear_bytes(i, o, 4, 2) - (i * o + 1) // 2 for i, o in Arch.from_config(
            LLAMA_70B).linears().values())
        packed = one.components["quantized_weights"] - constants
        assert est.components["quantized_weights"] == constants + math.ceil(packed / n)
        assert est.details["gathered_weights"] > 0 and est.components["gathered_weights"] > 0
    assert one.components["gathered_weights"] == 0
    assert four.peak < two.peak < one.peak
    # a 70B's 4-bit linears: 32.9 GiB on one device, 16.9 GiB each over two (the constants, 1 GiB, on both); its
    # untied embeddings and head (2 x 2 GiB in bf16) are halved at rest and gathered whole to run
    assert one.components["quantized_weights"] / 2**30 == pytest.approx(32.89, abs=0.01)
    assert two.components["quantized_weights"] / 2**30 == pytest.approx(16.95, abs=0.01)
    assert two.components["gathered_weights"] > 2 * 2**30 > two.components["other_weights"]


def test_cli_plans_per_device_with_fsdp_or_the_accelerate_config(tmp_path, tiny_model_dir, dates_file, capsys):
    path = write_config(tmp_path, tiny_model_dir, dates_file)
    config_file = str(Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp-qlora.yaml")

    def plan(*args):
        assert main(["plan", str(path), "--budget", "2GB", "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)

    single, data_parallel = plan(), plan("--nproc", "2")
    sharded, from_file, four = plan("--nproc", "2", "--fsdp"), plan("--accelerate-config", config_file), \
        plan("--accelerate-config", config_file, "--nproc", "4")
    assert single["setup"]["shards"] == data_parallel["setup"]["shards"] == 1  # data-parallel: each holds all
    assert (single["setup"]["data_parallel"], data_parallel["setup"]["data_parallel"]) == (False, True)
    # the same but for the gradients: DDP's buckets hold every one all along; one process makes them in backward
    gradients = single["details"]["gradient_bytes"]
    assert data_parallel["components"]["gradients"] == gradients > single["components"]["gradients"]
    assert data_parallel["peak_bytes"] - single["peak_bytes"] == gradients - single["components"]["gradients"]
    assert sharded["setup"]["shards"] == from_file["setup"]["shards"] == 2 and four["setup"]["shards"] == 4
    assert from_file["components"] == sharded["components"]
    assert sharded["components"]["optimizer_states"] == single["components"]["optimizer_states"] // 2
    assert main(["plan", str(path), "--nproc", "2", "--fsdp"]) == 0
    assert "sharded over 2 devices (FSDP2): per device" in capsys.readouterr().out
    assert main(["plan", str(path), "--fsdp"]) == 2
    assert "--nproc" in capsys.readouterr().err
    for text in ("model: {path: x}\n", "distributed_type: FSDP\nnum_processes: two\n"):  # not accelerate's
        (tmp_path / "acc.yaml").write_text(text)
        assert main(["plan", str(path), "--accelerate-config", str(tmp_path / "acc.yaml")]) == 2
        assert "is not an accelerate config" in capsys.readouterr().err


LLAMA_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "tie_word_embeddings": False}
CONFIG_8B = Path(__file__).resolve().parents[1] / "configs" / "llama3-8b-24gb.yaml"


def test_each_suggestion_is_what_re_planning_the_config_with_it_predicts():
    """Without checkpointing at 8192 tokens on a T4, `auto` tiles the MLP (and more); at the suggested 1637
    tokens it would not (1637 tokens are under the tiling threshold), so the suggestion, priced with the savers
    kept, read 14.99 GiB "fits" where re-planning predicts 26.17 GiB; checkpointing read 11.30 for 13.46 GiB."""
    over = ["training.gradient_checkpointing=false", "data.max_seq_len=8192"]
    budget = gpu_profile("T4").usable
    plan = make_plan(load_config(CONFIG_8B, over), LLAMA_8B, budget, "--gpu T4")
    assert plan.verdict == "does not fit" and plan.setup.mlp_chunk is not None
    changes = [x.overrides[0].split("=")[0] for x in plan.suggestions]
    assert {"data.max_seq_len", "training.gradient_checkpointing"} <= set(changes)
    for sug in plan.suggestions:
        again = make_plan(load_config(CONFIG_8B, over + sug.overrides), LLAMA_8B, budget, "--gpu T4")
        assert (sug.peak, sug.fits) == (again.estimate.peak, again.verdict == "fits"), sug.change
    longest = make_plan(load_config(CONFIG_8B, over[:1] + [f"data.max_seq_len={plan.max_seq_len}"]), LLAMA_8B,
                        budget)
    assert longest.verdict == "fits"  # "sequences up to N tokens": N fits when planned


def test_a_plan_for_several_processes_keeps_the_embeddings_on_the_device(tmp_path, monkeypatch, capsys):
    """Multi-process runs keep the table on the device; `plan --nproc 2` read this process's WORLD_SIZE (unset)
    and planned host embeddings (1 GiB low), even suggesting them."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    budget = gpu_profile("rtx4090").usable
    cfg = load_config(CONFIG_8B)
    one = make_plan(cfg, LLAMA_8B, budget)
    assert one.setup.host_embeddings  # one process: a 1 GiB table goes to the host
    for shards, replicas in ((1, 2), (2, 1)):
        plan = make_plan(cfg, LLAMA_8B, budget, shards=shards, replicas=replicas)
        assert not plan.setup.host_embeddings and plan.estimate.details["host_embeddings"] == 0
        assert not any("embeddings" in x.change for x in plan.suggestions)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    assert main(["plan", str(CONFIG_8B), "--model-config", str(tmp_path / "config.json"), "--nproc", "2",
                 "--gpu", "rtx4090", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["memory_savers"]["embeddings_on_host"] is False and out["setup"]["data_parallel"] is True
    assert out["peak_bytes"] == make_plan(cfg, LLAMA_8B, budget, replicas=2).estimate.peak > one.estimate.peak


def test_auto_micro_batch_shares_the_effective_batch_among_the_processes(tmp_path, tiny_model_dir, dates_file):
    """effective_batch_size is micro-batch × accumulation × processes: 8 over two processes is 4 each (it was
    8 × 1 on each, 16 examples a step)."""
    model_cfg = _model_cfg(tiny_model_dir)
    cfg = _cfg(tmp_path, tiny_model_dir, dates_file, training={
        "micro_batch_size": "auto", "effective_batch_size": 8, "memory_budget": "10GB", "max_steps": 1})
    s = setup_from_config(cfg, model_cfg, device="cpu", data_parallel=True)
    budget = parse_bytes("10GB")
    assert auto_micro_batch(cfg, s, budget) == (8, 1)
    assert auto_micro_batch(cfg, s, budget, processes=2) == (4, 1)
    tight = estimate(replace(s, micro_batch=3)).peak  # 3 fits, 4 does not: 2 × 2 on each process
    assert auto_micro_batch(cfg, s, tight, processes=2) == (2, 2)
    with pytest.raises(QTrainError, match=r"effective_batch_size: 8 .* 3 processes.* multiple of 3, e\.g\. 9"):
        auto_micro_batch(cfg, s, budget, processes=3)
    resolved = check_before_loading(cfg, model_cfg, "cpu", say=print, replicas=2).training
    assert (resolved.micro_batch_size, resolved.gradient_accumulation_steps) == (4, 1)
    for shards, replicas in ((1, 2), (2, 1)):  # qtrain plan --nproc 2 [--fsdp]
        plan = make_plan(cfg, model_cfg, budget, device="cpu", shards=shards, replicas=replicas)
        assert (plan.setup.micro_batch, plan.setup.accumulation) == (4, 1)
    # a fixed micro-batch: the same product, checked where the processes are known (the config cannot know them)
    fixed = _cfg(tmp_path, tiny_model_dir, dates_file, training={
        "micro_batch_size": 2, "gradient_accumulation_steps": 2, "effective_batch_size": 8, "max_steps": 1})
    kept = check_before_loading(fixed, model_cfg, "cpu", say=print, replicas=2).training
    assert (kept.micro_batch_size, kept.gradient_accumulation_steps, kept.effective_batch_size) == (2, 2, 8)
    with pytest.raises(QTrainError, match=r"effective_batch_size \(8\) must equal micro_batch_size \(2\) × "
                                          r"gradient_accumulation_steps \(2\) × processes \(1\) = 4"):
        check_before_loading(fixed, model_cfg, "cpu", say=print)


def test_auto_micro_batch_is_no_larger_than_the_data(tmp_path, tiny_model_dir, dates_file, capsys):
    """With room for thousands, `auto` took 4096 for a file of 40 examples (every step used all 40, and the
    summary said 4096): it takes at most a process's share of the training rows."""
    from qtrain.run import run

    model_cfg = _model_cfg(tiny_model_dir)
    cfg = _cfg(tmp_path, tiny_model_dir, dates_file, training={
        "micro_batch_size": "auto", "max_steps": 2, "save_every": None})
    s = setup_from_config(cfg, model_cfg, device="cpu")
    assert auto_micro_batch(cfg, s, 1 << 40) == (4096, 1)  # no data known: what the memory allows
    assert auto_micro_batch(cfg, s, 1 << 40, rows=40) == (40, 1)
    assert auto_micro_batch(cfg, s, 1 << 40, processes=3, rows=40) == (14, 1)
    every = cfg.model_copy(update={"training": cfg.training.model_copy(update={"effective_batch_size": 12})})
    assert auto_micro_batch(every, s, 1 << 40, rows=5) == (4, 3)  # the largest divisor of 12 the rows fill
    run(cfg)
    rows = sum(1 for line in dates_file.read_text().splitlines() if line.strip())
    assert f"micro_batch_size auto → {rows} (" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["micro_batch_size"] == rows


def test_two_unfreeze_blocks_of_one_layer_are_refused_before_planning(tiny_model_dir, dates_file, tmp_path):
    """The second would train nothing there and the plan counted its parameters twice."""
    from qtrain.config import load_config
    from qtrain.errors import QTrainError
    from qtrain.memory import setup_from_config

    blocks = [{"method": "unfreeze", "layers": [1]}, {"method": "unfreeze", "last_n": 1}]
    cfg = load_config(write_config(tmp_path, tiny_model_dir, dates_file, peft=blocks))
    with pytest.raises(QTrainError, match=r"peft\.1: unfreeze chooses model\.layers\.1\..*which the unfreeze block "
                                          r"peft\.0 chooses too"):
        setup_from_config(cfg, _model_cfg(tiny_model_dir), device="cpu")
    apart = load_config(write_config(tmp_path, tiny_model_dir, dates_file, peft=[
        {"method": "unfreeze", "layers": [0]}, {"method": "unfreeze", "last_n": 1}]))
    setup_from_config(apart, _model_cfg(tiny_model_dir), device="cpu")  # layers 0 and 1: fine
