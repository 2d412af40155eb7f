"""QLoRA on a Llama-2-7B-architecture model on a CPU box: peak RAM, load time and seconds per step of `qtrain run`.

    python benchmarks/scale_7b.py                 # 3 steps, 128-token packed rows (about 20 minutes on 2 cores)
    python benchmarks/scale_7b.py --steps 5 --seq 256

The checkpoint has the Llama-2-7B shapes (hidden 4096, 32 layers, 32 heads without GQA, intermediate 11008,
vocab 32000, untied head) and random bf16 weights, written once under $TMPDIR (or /tmp) in save_pretrained's
layout with max_shard_size "2GB" (13.5 GB), one tensor at a time (`load_memory.write_random_checkpoint`). The
tokenizer is the tests' small BPE one (its ids all fall inside the 32000-row embedding).

The run is the real CLI, `python -m qtrain run CONFIG`, under `/usr/bin/time -v`: 4-bit NF4 with double
quantization, compute dtype `auto` (float32 on CPU), LoRA r=16 on every linear, gradient checkpointing,
micro-batch 1 of packed rows from configs/data/dates-train.jsonl, logging every step. This is a benchmark, not
a test: it needs ~14 GB of disk and ~10 GB of RAM, and it prints the numbers that benchmarks/RESULTS.md quotes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from load_memory import MB, checkpoint_dir, write_random_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False,
                 max_position_embeddings=4096, rms_norm_eps=1e-5)
SHARD_BYTES = 2 * 10**9  # save_pretrained(max_shard_size="2GB")


def run_config(model: Path, out: Path, steps: int, seq: int) -> dict:
    return {
        "model": {"path": str(model)},
        "quantization": {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "auto"},
        "peft": [{"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}],
        "data": {"train": str(ROOT / "configs/data/dates-train.jsonl"), "format": "instruction",
                 "max_seq_len": seq, "packing": True},
        "eval": {"before_training": False, "exact_match": False},
        "training": {"micro_batch_size": 1, "gradient_accumulation_steps": 1, "max_steps": steps,
                     "learning_rate": 1e-4, "lr_scheduler": "constant", "gradient_checkpointing": True,
                     "optimizer": "adamw", "log_every": 1, "save_every": None},
        "logging": {"progress": False},
        "output": {"dir": str(out)},
    }


def run_timed(config: Path, log: Path) -> dict[str, float]:
    """Run the CLI, echoing its lines with the seconds since start; returns when each milestone line appeared."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "qtrain", "run", str(config), "--overwrite"]
    seen: dict[str, float] = {}
    t0 = time.perf_counter()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT) as proc, \
            open(log, "w") as out:
        for line in proc.stdout:
            t = time.perf_counter() - t0
            out.write(f"{t:8.1f}s {line}")
            if "kernels" not in line:
                print(f"{t:8.1f}s {line}", end="", flush=True)
            for key, marker in [("data", "qtrain: data.train"), ("loaded", "qtrain: base "),
                                ("training", "qtrain: training "), ("adapter", "adapter written"),
                                ("done", "qtrain: loss ")]:
                if marker in line and key not in seen:
                    seen[key] = t
            if "Maximum resident set size" in line:
                seen["time_maxrss"] = int(line.split(":")[-1]) * 1024
    if proc.returncode != 0:
        raise SystemExit(f"qtrain run failed (exit {proc.returncode}); see {log}")
    seen["wall"] = time.perf_counter() - t0
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    model = checkpoint_dir("llama2-7b-random")
    print(f"checkpoint: {model} (Llama-2-7B architecture, random bf16, max_shard_size 2GB)", flush=True)
    write_random_checkpoint(model, LLAMA2_7B, SHARD_BYTES)
    shards = [f.stat().st_size for f in sorted(model.glob("*.safetensors"))]
    print(f"{len(shards)} shards, {sum(shards) / MB:.0f} MB, largest {max(shards) / MB:.0f} MB", flush=True)

    work = checkpoint_dir("scale-7b-run")
    work.mkdir(parents=True, exist_ok=True)
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(run_config(model, work / "run", args.steps, args.seq), sort_keys=False))
    marks = run_timed(config, work / "run.log")

    steps = [json.loads(line) for line in (work / "run/metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    summary = json.loads((work / "run/summary.json").read_text())
    elapsed = [0.0] + [s["elapsed_s"] for s in steps]
    per_step = [b - a for a, b in zip(elapsed, elapsed[1:])]
    base = summary["base_footprint_bytes"]
    print("\n| measure | value |\n|---|---|")
    print(f"| load (config read → quantized base ready) | {marks['loaded'] - marks['data']:.0f} s |")
    print(f"| 4-bit base footprint (linears + fp32 embeddings/head/norms) | "
          f"{base['quantized_linear_bytes'] / MB:.0f} + {base['other_param_bytes'] / MB:.0f} MB |")
    print(f"| trainable LoRA parameters | {summary['trainable_parameters'] / 1e6:.1f} M |")
    print(f"| seconds per step ({args.seq}-token rows, micro-batch 1) | "
          f"{', '.join(f'{s:.0f}' for s in per_step)} (steps 1..{len(per_step)}) |")
    losses = ", ".join(f"{s['loss']:.3f}" for s in steps)
    print(f"| loss per step | {losses} |")
    print(f"| peak RSS, qtrain's report (ru_maxrss) | {summary['peak_mem_mb'] * 2**20 / MB:.0f} MB |")
    print(f"| peak RSS, /usr/bin/time -v | {marks.get('time_maxrss', 0) / MB:.0f} MB |")
    print(f"| wall time of `qtrain run` | {marks['wall']:.0f} s |")
    print(f"\nconfig: {config}\nlog: {work / 'run.log'}")


if __name__ == "__main__":
    main()
