"""benchmarks/gpu.py where no GPU is: it says what is missing and exits 2; its arithmetic is checked here.
(`python benchmarks/gpu.py run --smoke --out DIR` runs its whole grid on the CPU with tiny shapes, in minutes.)"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

GPU_PY = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def load():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", GPU_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the benchmark would run")
def test_without_a_gpu_it_says_so_and_exits_2(tmp_path):
    p = subprocess.run([sys.executable, str(GPU_PY), "run", "--out", str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2
    assert "no CUDA device" in p.stdout and "--smoke" in p.stdout and "prepare KIT" in p.stdout
    assert "Traceback" not in p.stderr and not (tmp_path / "out").exists()


def test_summary_takes_the_median_after_warm_up_and_the_usual_utilisation():
    gpu = load()
    # children report steps 2..N; the first of those is a warm-up step too
    r = gpu.summarise({"step_times": [9.0, 0.5, 0.7, 0.6, 0.4], "losses": [1.0], "peak_allocated_mib": 1000.0,
                       "planned_allocated_mib": 1100.0}, tokens=2048, n_matmul=10**9, tflops=100.0)
    assert r["s_per_step"] == 0.55 and r["tokens_per_s"] == round(2048 / 0.55)
    assert r["mfu"] == round(6 * 10**9 * 2048 / 0.55 / 100e12, 3)
    assert r["planner_error"] == 0.1
    assert gpu.summarise({"error": "exit 1"}, 1, 1, 1.0) == {"error": "exit 1"}


def test_matmul_parameters_of_llama_3_8b():
    gpu = load()
    # 32 layers x (q, k, v, o at 4096 wide with 8 of 32 heads for k, v; three 4096 x 14336 MLP matrices) + head
    assert gpu.matmul_params("l3-8b", 0) == 32 * (4096 * 128 * (2 * 32 + 2 * 8) + 3 * 4096 * 14336) + 128256 * 4096
    assert 6.9e9 < gpu.matmul_params("l3-8b", 0) < 7.6e9
