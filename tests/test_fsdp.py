"""FSDP-QLoRA on CPU: two processes over gloo, launched by accelerate with the shipped FSDP2 config
(configs/accelerate/fsdp-qlora.yaml), shard the frozen base and the trained parameters and train exactly like one
process with two micro-batches of accumulation; the adapter and checkpoints they write are the whole tensors.

Tolerance: the two runs add the same fp32 per-token gradients in a different order (a reduce-scatter over two
processes against two local micro-batches), so they may differ by fp32 rounding, ~1e-7 relative; Adam's update is
normalised, so after 3 steps the weights differ by no more than a few ulps of lr·steps. rel/abs 1e-5 holds that
with room and would still catch a wrong loss normalisation (a factor 2) or a lost gradient shard."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DATES, write_config
from test_distributed import run_cli

ROOT = Path(__file__).resolve().parents[1]
FSDP_CONFIG = ROOT / "configs" / "accelerate" / "fsdp-qlora.yaml"


def free_port() -> int:
    with socket.socket() as s:  # other test runs on this machine may hold torchrun's default 29500
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sharded(config, out, *extra):
    """`qtrain run` under `accelerate launch` with the FSDP2 config, two CPU processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
           "--num_processes", "2", "--main_process_port", str(free_port()),
           "-m", "qtrain", "run", str(config), "--output-dir", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode and "cannot be sharded by the FSDP of torch" in proc.stderr:  # (the launcher exits 1)
        pytest.skip(f"this torch ({torch.__version__}) cannot shard 8-bit weights, and qtrain said so")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "FSDP2: base and adapters sharded over 2 processes" in proc.stdout  # not a silent data-parallel run
    return proc


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert (a[k] - b[k]).abs().max() <= atol, k


CASES = {  # base quantization, method, what the sharded run changes (the step still takes the same 4 examples)
    "4bit-lora": ({"bits": 4, "quant_storage": "float32"},
                  {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}, []),
    "8bit-unfreeze": ({"bits": 8}, {"method": "unfreeze", "last_n": 1}, []),
    # accumulation under sharding: each process 2 micro-batches of 1 (gradients reduce-scattered after each)
    "none-ia3": ({"bits": "none"}, {"method": "ia3"},
                 ["--set", "training.micro_batch_size=1", "--set", "training.gradient_accumulation_steps=2"]),
}


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """case → its folder, after one single-process run (`one`, accumulation 2) and one sharded run (`two`); each
    case is trained once per module, so the tests reading a case share its two launches."""
    done: dict[str, tuple[Path, subprocess.CompletedProcess]] = {}

    def get(case: str) -> tuple[Path, subprocess.CompletedProcess]:
        if case not in done:
            quantization, method, sharded = CASES[case]
            folder = tmp_path_factory.mktemp(case)
            dates = folder / "dates.jsonl"
            dates.write_text("".join(json.dumps({"instruction": "Rewrite the date in ISO 8601 format.", "input": t,
                                                 "output": iso}) + "\n" for t, iso in DATES))
            config = write_config(folder, tiny_model_dir, dates, quantization=quantization, peft=[method],
                                  training={"max_steps": 3, "micro_batch_size": 2, "save_every": 2})
            run_cli(config, "--output-dir", str(folder / "one"), "--set", "training.gradient_accumulation_steps=2")
            done[case] = folder, run_sharded(config, folder / "two", *sharded)
        return done[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_two_sharded_processes_equal_one_with_double_accumulation(case, trained):
    folder, proc = trained(case)
    one, two = folder / "one", folder / "two"
    assert len(losses(two)) == 3
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    assert_same_tensors(adapter(two), adapter(one), atol=1e-5)
    assert proc.stdout.count("adapter written") == 1  # gathered, then written once, by the main process
    # what the main process holds is what `qtrain plan --fsdp` predicts per device: its shard of every parameter
    # (frozen and trained), and the quantization constants whole. Exactly, where every tensor has at least as many
    # rows as processes; FSDP2 shards by rows, so IA3's (1, in) vectors sit whole on the first process (+512
    # bytes here); and unfreeze keeps the loaded tensors of its layers aside, outside the parameters, unsharded
    from qtrain.config import load_config
    from qtrain.memory import estimate, setup_from_config

    cfg = load_config(two / "config.yaml")
    comp = estimate(setup_from_config(cfg, json.loads((Path(cfg.model.path) / "config.json").read_text()), "cpu",
                                      shards=2)).components
    held = json.loads((two / "summary.json").read_text())["parameter_bytes_per_process"]
    predicted = comp["quantized_weights"] + comp["other_weights"] + comp["trainable_params"]
    if cfg.peft[0].method == "lora":
        assert held == predicted
    else:
        assert abs(held - predicted) <= 0.005 * predicted
    # the checkpoints hold whole tensors too: the sharded run's equal the single process's
    for step in (2, 3):
        for name in ("trainable.safetensors", "optimizer.safetensors"):
            assert_same_tensors(load_file(two / "checkpoints" / f"step-{step}" / name),
                                load_file(one / "checkpoints" / f"step-{step}" / name), atol=1e-5)


def test_a_sharded_run_resumed_from_its_checkpoint_equals_the_uninterrupted_one(trained):
    folder, _ = trained("4bit-lora")
    # through `qtrain run --nproc 2 --fsdp` (accelerate's launcher underneath, its FSDP flags instead of a file)
    proc = run_cli(folder / "config.yaml", "--nproc", "2", "--fsdp", "--output-dir", str(folder / "resumed"),
                   "--resume", str(folder / "two/checkpoints/step-2"))
    assert "FSDP2: base and adapters sharded over 2 processes" in proc.stdout
    assert "resuming from" in proc.stdout and "(step 2 of 3)" in proc.stdout
    assert losses(folder / "resumed") == losses(folder / "two")[2:]  # only step 3 ran, and gave the same loss
    assert_same_tensors(adapter(folder / "resumed"), adapter(folder / "two"), atol=0)  # bit for bit on CPU


def test_the_sharded_adapter_loads_in_peft_and_in_one_qtrain_process(trained, tiny_model_dir):
    peft = pytest.importorskip("peft")
    from qtrain.adapter_io import load_adapter
    from qtrain.config import ModelSection, QuantizationSection
    from qtrain.modeling import load_model

    folder, _ = trained("4bit-lora")
    config = json.loads((folder / "two" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert all(k.startswith("base_model.model.") for k in adapter(folder / "two"))  # peft's names, no FSDP prefix

    def base():
        return load_model(ModelSection(path=str(tiny_model_dir)),
                          QuantizationSection(bits=4, quant_storage="float32"), torch.device("cpu")).model.eval()

    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        bare = base()(ids).logits
        theirs = peft.PeftModel.from_pretrained(base(), str(folder / "two" / "adapter")).eval()(ids).logits
        ours = base()
        load_adapter(ours, folder / "two" / "adapter")
        ours = ours(ids).logits
    assert (ours - bare).abs().max() > 1e-3  # the trained adapter changes the output
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_what_cannot_shard_is_refused_before_anything_loads(monkeypatch, tiny_model_dir, dates_file, tmp_path,
                                                            capsys):
    from qtrain import sharding
    from qtrain.cli import main
    from qtrain.errors import QTrainError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(QTrainError, match="fsdp_version: 1.*fsdp_version: 2"):
        sharding.requested()
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    assert sharding.requested() == sharding.FSDPSettings(reshard_after_forward=False, offload_params=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert sharding.requested() is None
    # bitsandbytes' optimizers fail on DTensor parameters (checked on this CPU: their step raises
    # NotImplementedError "Operator bitsandbytes.optimizer_update_32bit.default does not have a sharding strategy")
    with pytest.raises(QTrainError, match="training.optimizer: adamw_8bit.*adamw"):
        sharding.check_supported("adamw_8bit")
    sharding.check_supported("adamw")
    config = write_config(tmp_path, tiny_model_dir, dates_file)
    assert main(["run", str(config), "--fsdp"]) == 2
    assert "--nproc N" in capsys.readouterr().err


def test_an_fsdp_that_cannot_shard_8bit_weights_is_told_apart(monkeypatch):
    """torch 2.11's FSDP2 fails on an integer parameter (it makes each shard require grad before copying the
    flag): that failure becomes qtrain's error naming the field and the fix; any other failure passes through."""
    import torch.distributed.fsdp as fsdp
    from transformers import LlamaConfig, LlamaForCausalLM

    from qtrain import sharding
    from qtrain.errors import QTrainError

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=32))
    for message, expected in (("only Tensors of floating point dtype can require gradients", QTrainError),
                              ("something else", RuntimeError)):
        def failing(module, **kwargs):
            raise RuntimeError(message)

        monkeypatch.setattr(fsdp, "fully_shard", failing)
        with pytest.raises(expected) as info:
            sharding.shard_model(model, sharding.FSDPSettings())
        assert type(info.value) is expected
        if expected is QTrainError:
            assert "quantization.bits: 8" in str(info.value) and "quant_storage" in str(info.value)
