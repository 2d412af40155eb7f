"""Data-parallel through accelerate: 2 processes × micro-batch b train exactly like 1 process with 2 × gradient
accumulation (same micro-batches, loss normalised by the step's global target tokens), and only rank 0 writes."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import write_config


def run_cli(config, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "qtrain", "run", str(config), *extra], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_processes_equal_one_with_double_accumulation(tiny_model_dir, dates_file, tmp_path):
    config = write_config(tmp_path, tiny_model_dir, dates_file, training={"max_steps": 3, "micro_batch_size": 2})
    run_cli(config, "--output-dir", str(tmp_path / "one"), "--set", "training.gradient_accumulation_steps=2")
    # checkpointing changes no number; `auto` here checks the processes train as the main one decided
    proc = run_cli(config, "--output-dir", str(tmp_path / "two"), "--nproc", "2",
                   "--set", "training.gradient_checkpointing=auto")

    def losses(name):
        return [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(x)]

    assert len(losses("two")) == 3
    assert losses("two") == pytest.approx(losses("one"), rel=1e-5)  # 3 steps cross an epoch boundary (4 per epoch)
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for k in one:
        assert (one[k] - two[k]).abs().max() < 1e-5, k
    assert proc.stdout.count("adapter written") == 1  # only the main process writes and reports
    assert proc.stdout.count("gradient_checkpointing auto → off") == 1
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["gradient_checkpointing"] is False
