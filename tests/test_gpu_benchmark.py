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
    assert "NOT COMPILED" not in gpu.line(r)
    # a compiled run whose blocks never ran compiled, or ran in pieces, is flagged in its line
    base = {"step_times": [1.0, 0.5], "losses": [1.0], "peak_allocated_mib": 1.0, "compile": True}
    for calls, breaks, flagged in ((96, 0, False), (0, 0, True), (96, 3, True)):
        line = gpu.line(gpu.summarise({**base, "compiled_block_calls": calls, "graph_breaks": breaks}, 1, 1, 1.0))
        assert ("NOT COMPILED AS MEANT" in line) == flagged


def test_the_grid_runs_the_comparisons_first_and_the_experiments_last():
    gpu = load()
    point = {"runs": dict.fromkeys(("qtrain-cudagraphs", "qtrain-eager", "qtrain-profile", "peft", "qtrain"))}
    other = {"runs": dict.fromkeys(("qtrain-unfused", "peft+prepare"))}
    order = [system for _, system in gpu.run_order([point, other])]
    assert order == ["peft", "qtrain", "peft+prepare", "qtrain-profile", "qtrain-eager", "qtrain-unfused",
                     "qtrain-cudagraphs"]
    assert set(gpu.EXPERIMENTS) <= {s for g in gpu.GRID for s in g[5]}
    assert set(gpu.EXPERIMENTS) <= set(gpu.SMOKE_GRID[0][5])


def test_each_variant_is_compared_with_qtrain_in_speed_and_in_its_losses():
    gpu = load()
    def run(s_per_step, losses):
        return gpu.summarise({"step_times": [s_per_step] * 3, "losses": losses}, 1, 1, 1.0)
    point = {"runs": {"qtrain": run(0.5, [2.0, 1.5, 1.25]), "peft": run(1.0, [2.5, 2.0, 1.0]),
                      "qtrain-cudagraphs": run(0.25, [2.0, 1.5, 1.375]), "qtrain-eager": {"error": "exit 1"}}}
    gpu.compare_to_qtrain(point)
    assert point["speed_vs_peft"] == 2.0 and point["speed_vs_qtrain-cudagraphs"] == 0.5
    assert point["runs"]["qtrain-cudagraphs"]["loss_gap_vs_qtrain"] == 0.125
    assert "loss_gap_vs_qtrain" not in point["runs"]["peft"]  # another initialisation: not comparable
    assert point["runs"]["qtrain-eager"] == {"error": "exit 1"} and "speed_vs_qtrain-eager" not in point
    assert "(losses within 0.125 of qtrain's)" in gpu.table({"points": [{"point": "p", **point}]})


def test_matmul_parameters_of_llama_3_8b():
    gpu = load()
    # 32 layers x (q, k, v, o at 4096 wide with 8 of 32 heads for k, v; three 4096 x 14336 MLP matrices) + head
    assert gpu.matmul_params("l3-8b", 0) == 32 * (4096 * 128 * (2 * 32 + 2 * 8) + 3 * 4096 * 14336) + 128256 * 4096
    assert 6.9e9 < gpu.matmul_params("l3-8b", 0) < 7.6e9


def test_profile_summary_finds_the_devices_idle_time_and_what_the_host_was_doing():
    """Two steps of 10 ms: kernels busy 2 + 3.5 ms (overlapping ones counted once) in the first, and an idle
    stretch while the host waits on a synchronisation; the second all idle under a Python op."""
    gpu = load()

    def ev(name, kind, start_ms, end_ms):
        return {"name": name, "kind": kind, "start": start_ms * 1e3, "end": end_ms * 1e3}

    events = [ev("ProfilerStep#4", "step", 0, 10), ev("ProfilerStep#5", "step", 10, 20),
              ev("gemm", "device", 1, 3), ev("gemm", "device", 2, 3), ev("norm", "device", 6, 9.5),
              ev("cudaLaunchKernel", "runtime", 0.5, 0.6), ev("cudaLaunchKernel", "runtime", 1.0, 1.1),
              ev("aten::item", "op", 3, 6), ev("cudaStreamSynchronize", "runtime", 3.1, 5.9),
              ev("optimizer step", "op", 10, 20)]
    r = gpu.profile_summary(events)
    assert r["steps"] == 2 and r["step_ms"] == 10.0
    assert r["device_busy_ms"] == 2.75 and r["device_idle_ms"] == 7.25 and r["device_busy_fraction"] == 0.275
    assert r["device_kernels"] == 1.5 and r["launches"] == 1.0 and r["host_waits"] == 0.5
    assert r["host_wait_ms"] == 1.4
    assert r["kernels_by_time"][0] == {"name": "norm", "per_step": 0.5, "ms": 1.75}
    assert r["kernels_by_time"][1] == {"name": "gemm", "per_step": 1.0, "ms": 1.5}
    gaps = r["longest_idle_gaps"]
    assert gaps[0] == {"ms": 10.0, "at_ms": 0.0, "host": "optimizer step"}
    # the idle stretch from 3 to 6 ms began inside aten::item's wait
    assert {"ms": 3.0, "at_ms": 3.0, "host": "aten::item"} in gaps
    assert {"ms": 0.5, "at_ms": 9.5, "host": None} in gaps and {"ms": 1.0, "at_ms": 0.0, "host": None} in gaps
    assert len(gaps) == 4


def test_the_planned_allocation_leaves_out_what_torchs_allocator_never_sees(tmp_path, dates_file):
    """`max_memory_allocated` sees neither the CUDA context nor the optimizer states bnb pages (cudaMallocManaged
    buffers): Llama-3-8B's shapes with r=16 on every linear and paged 8-bit AdamW, as the benchmark runs it."""
    import json

    from qtrain.gpus import MiB

    gpu = load()
    model = tmp_path / "l3-8b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                   **gpu.SHAPES["l3-8b"]}))
    config = tmp_path / "c.yaml"
    config.write_text(gpu.CONFIG.format(model=model, dtype="bfloat16", rank=16, alpha=32, data=dates_file, seq=2048,
                                        batch=1, steps=3, ckpt="true", fused="auto", compile="auto", out=tmp_path / "o"))
    p = subprocess.run([sys.executable, "-m", "qtrain", "plan", str(config), "--device", "cuda", "--json"],
                       capture_output=True, text=True, timeout=120)
    plan = json.loads(p.stdout)
    paged = plan["details"]["pageable_optimizer_states"]
    assert paged > 40 * MiB  # 8-bit m and v of the 42M LoRA elements in tensors bnb pages
    expected = (plan["peak_bytes"] - plan["components"]["runtime_overhead"] - paged) / MiB
    assert gpu.planned_allocated_mib(config) == pytest.approx(expected)
