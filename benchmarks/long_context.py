"""Long context on small cards (issue 19): what the planner predicts, and what a CUDA GPU measures.

    python benchmarks/long_context.py plan        # any machine, no weights: the README's table of predictions
    python benchmarks/long_context.py measure     # a CUDA GPU: the issue's points, each under its allocator cap

`plan` asks `qtrain.planner` for Llama-3-8B's shapes (NF4 + double quantization, bf16, LoRA r=32 on every
linear, micro-batch 1, paged 8-bit AdamW, checkpointing): the longest sequence under 23.5 and 7.6 GiB without
and with the memory savers (input embeddings on the host, tiled MLP, offloaded checkpoints), and the predicted
peak at each point `measure` runs.

`measure` writes a random-weight checkpoint of those shapes (with SmolLM2's tokenizer: only the ids matter),
then runs each point as its own `python -m qtrain run` process with the CUDA allocator capped to the card it
simulates (`torch.cuda.set_per_process_memory_fraction`), and prints one JSON line per point:
- peak `torch.cuda.max_memory_allocated` and median tokens/s after the first step;
- the run's peak resident host memory (`host_rss_gib`: Python, torch and CUDA's libraries, the loaded
  checkpoint's pages, and the pinned buffers the savers add; the offload's own peak is `offload.host_bytes_peak`);
- the savers `auto` chose;
- the planner's prediction: tensor bytes without the CUDA context term, which `max_memory_allocated` does not
  see; `predicted_allocated_gib` also without the optimizer states bnb pages, which live in CUDA managed memory
  outside torch's allocator and its cap; and `planner_error` against the measured peak.
`--tokenizer KIT/tok` takes the tokenizer from an offline kit (`benchmarks/gpu.py prepare`); `--deadline SECONDS`
skips or stops a point that would run past it.
`--shape tiny --device-check off --max-seq 256` runs the same code on a CPU with a tiny model (the mechanics
only, no caps), which is how it was tested here; no GPU was available to this work, so its figures are still
to be measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qtrain.config import validate_config  # noqa: E402
from qtrain.memory import CUDA_CONTEXT, estimate, setup_from_config  # noqa: E402
from qtrain.planner import longest_sequence  # noqa: E402
from qtrain.savers import auto_memory_savers, autos, with_savers, without_savers  # noqa: E402

GiB = 2**30
SHAPES = {
    "l3-8b": {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128},
    "tiny": {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},
}
# (name, sequence, micro-batch, rank, target modules, cap in GiB or None, overrides)
POINTS = [
    ("24GB-128k", 131072, 1, 32, "all-linear", 23.5, {}),
    ("24GB-32k-offload", 32768, 1, 32, "all-linear", 23.5, {"training.activation_offload": True}),
    ("24GB-32k-no-offload", 32768, 1, 32, "all-linear", 23.5, {"training.activation_offload": False}),
    ("8GB-16k", 16384, 1, 32, "all-linear", 7.6, {}),
    ("torchtune-2x2048", 2048, 2, 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
     6.0, {}),
]


def model_config(shape: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 2, "rope_theta": 500000.0, **SHAPES[shape]}


def run_config(model: str, data: str, out: str, seq: int, micro: int, rank: int, targets, cap: float | None,
               overrides: dict, steps: int = 4) -> dict:
    raw = {"model": {"path": model}, "quantization": {"bits": 4, "type": "nf4", "double_quant": True,
                                                       "compute_dtype": "bfloat16"},
           "peft": [{"method": "lora", "r": rank, "alpha": 2 * rank, "dropout": 0.0, "target_modules": targets}],
           "data": {"train": data, "format": "text", "max_seq_len": seq},
           "eval": {"before_training": False, "exact_match": False},
           "training": {"micro_batch_size": micro, "max_steps": steps, "optimizer": "paged_adamw_8bit",
                        "gradient_checkpointing": True, "lr_scheduler": "constant", "save_every": None,
                        "memory_budget": f"{cap}GiB" if cap else None},
           "logging": {"progress": False}, "output": {"dir": out}}
    for key, value in overrides.items():
        section, name = key.split(".")
        raw[section][name] = value
    return raw


def plan() -> None:
    shape = model_config("l3-8b")
    base = run_config("unused", "unused", "unused", 2048, 1, 32, "all-linear", None, {})
    s = setup_from_config(validate_config(base), shape, "cuda")
    print("| budget | longest sequence without the savers | with all of them (fused ops, host embeddings, "
          "offload, tiled MLP in 1024-token chunks) |")
    print("|---|---|---|")
    for cap in (23.5, 7.6):
        budget = int(cap * GiB)
        print(f"| {cap} GiB | {longest_sequence(without_savers(s), budget):,} | "
              f"{longest_sequence(with_savers(s), budget):,} |")
    print()
    for name, seq, micro, rank, targets, cap, overrides in POINTS:
        print(json.dumps({"point": name, **predicted(shape, seq, micro, rank, targets, cap, overrides)}))


def predicted(shape: dict, seq, micro, rank, targets, cap, overrides) -> dict:
    cfg = validate_config(run_config("unused", "unused", "unused", seq, micro, rank, targets, cap, overrides))
    s = setup_from_config(cfg, shape, "cuda")
    if cap:
        s = auto_memory_savers(s, int(cap * GiB), autos(cfg))
    est = estimate(s)
    return {"predicted_tensor_gib": round((est.peak - CUDA_CONTEXT) / GiB, 2),
            "predicted_allocated_gib": round(est.details["allocator_bytes"] / GiB, 2),
            "paged_states_gib": round(est.details["pageable_optimizer_states"] / GiB, 3),
            "predicted_host_gib": round(est.details["host_bytes"] / GiB, 2),
            "savers": {"embeddings_on_host": s.host_embeddings, "mlp_chunk_tokens": s.mlp_chunk,
                       "activation_offload": s.offload}}


def write_checkpoint(out: Path, shape: str, tokenizer: str | None = None) -> None:
    """Random weights of `shape` in bf16 safetensors shards, with SmolLM2's tokenizer (ids only matter): the
    folder `tokenizer` (an offline kit's tok/, `benchmarks/gpu.py prepare`), or the shipped model's."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from qtrain.config import ModelSection
    from qtrain.modeling import load_tokenizer, resolve_model_path

    cfg = model_config(shape)
    (out / "config.json").write_text(json.dumps(cfg))
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(LlamaConfig(**cfg))
    gen = torch.Generator().manual_seed(0)
    shard, size, n = {}, 0, 0
    for name, p in skeleton.state_dict().items():
        shard[name] = torch.ones(p.shape, dtype=torch.bfloat16) if name.endswith("norm.weight") else \
            (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16)
        size += shard[name].nbytes
        if size > 2 * GiB:
            n += 1
            save_file(shard, str(out / f"model-{n:05d}.safetensors"), metadata={"format": "pt"})
            shard, size = {}, 0
    if shard:
        save_file(shard, str(out / f"model-{n + 1:05d}.safetensors"), metadata={"format": "pt"})
    source = Path(tokenizer) if tokenizer else resolve_model_path(ModelSection())
    load_tokenizer(source, ModelSection()).save_pretrained(out)


CAPPED_RUN = """import json, os, resource, sys
from qtrain.gpus import prefer_expandable_segments
prefer_expandable_segments()  # as `qtrain run` does; here the cap below is the first CUDA call
import torch
cap = float(os.environ.get("CAP_GIB") or 0)
if cap:
    torch.cuda.set_per_process_memory_fraction(cap * 2**30 / torch.cuda.get_device_properties(0).total_memory)
from qtrain.cli import main
rc = main(sys.argv[1:])
with open(os.environ["RSS_FILE"], "w") as f:  # the run's peak resident host memory, pinned buffers included
    json.dump({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}, f)
sys.exit(rc)
"""


def measure(shape: str, steps: int, points: list[str], caps: bool, max_seq: int, tokenizer: str | None = None,
            deadline: float = float("inf")) -> None:
    import time

    import yaml

    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="qtrain-longctx-"))
    model = work / "model"
    model.mkdir()
    write_checkpoint(model, shape, tokenizer)
    data = work / "long.jsonl"
    words = " ".join(f"w{i % 997} n{i % 101}" for i in range(200_000))  # ~1 token per piece, > 128k tokens
    data.write_text("".join(json.dumps({"text": words}) + "\n" for _ in range(4)))
    (work / "capped.py").write_text(CAPPED_RUN)
    for name, seq, micro, rank, targets, cap, overrides in POINTS:
        if points and name not in points:
            continue
        out, seq = work / name, min(seq, max_seq)
        raw = run_config(str(model), str(data), str(out), seq, micro, rank, targets, cap, overrides, steps)
        (work / f"{name}.yaml").write_text(yaml.safe_dump(raw))
        env = {**os.environ, "CAP_GIB": str(cap if caps and cap else ""), "RSS_FILE": str(work / f"{name}.rss.json"),
               "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        result = {"point": name, **predicted(model_config(shape), seq, micro, rank, targets, cap, overrides)}
        left = deadline - (time.perf_counter() - start)
        if left < 30:
            print(json.dumps({**result, "error": "skipped: --deadline reached"}), flush=True)
            continue
        try:
            proc = subprocess.run([sys.executable, str(work / "capped.py"), "run", str(work / f"{name}.yaml")],
                                  env=env, capture_output=True, text=True,
                                  timeout=left if left != float("inf") else None)  # no --deadline: none
        except subprocess.TimeoutExpired:
            print(json.dumps({**result, "error": f"timed out after {left:.0f} s (--deadline)"}), flush=True)
            continue
        result["rc"] = proc.returncode
        if proc.returncode == 0:
            summary = json.loads((out / "summary.json").read_text())
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            rows = [r for r in rows if "tokens_per_s" in r]
            peak = summary["peak_mem_mb"] / 1024  # on a CPU the process's RSS: no planner error then
            if caps:
                result["planner_error"] = round(result["predicted_allocated_gib"] / peak - 1, 3)
            rss = json.loads((work / f"{name}.rss.json").read_text())["peak_rss_bytes"]
            result.update({"peak_gib": round(peak, 2), "host_rss_gib": round(rss / GiB, 2),
                           "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rows[1:] or rows)),
                           "savers_run": {k: summary.get(k) for k in ("embeddings_on_host", "mlp_chunk_tokens",
                                                                       "activation_offload")},
                           "offload": summary.get("offload"), "peak_reserved_gib": round(
                               summary["peak_reserved_mb"] / 1024, 2) if "peak_reserved_mb" in summary else None,
                           "allocator": summary.get("cuda_allocator_conf")})
        else:
            result["error"] = (proc.stderr or proc.stdout)[-400:]
        print(json.dumps(result), flush=True)
    print(f"runs in {work}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["plan", "measure"])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="l3-8b")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--points", nargs="*", default=[], help=f"of {[p[0] for p in POINTS]} (default: all)")
    ap.add_argument("--max-seq", type=int, default=1 << 20, help="shorten every point to this (script tests)")
    ap.add_argument("--tokenizer", help="a tokenizer folder (an offline kit's tok/; default: the shipped model's)")
    ap.add_argument("--deadline", type=float, default=float("inf"), help="seconds for all points: a point that "
                    "would start later is skipped, one that runs over is stopped (each reported)")
    ap.add_argument("--device-check", choices=["on", "off"], default="on",
                    help="off: allow a CPU run, without allocator caps (tests the script, measures nothing)")
    args = ap.parse_args()
    if args.what == "plan":
        return plan()
    import torch

    if args.device_check == "on" and not torch.cuda.is_available():
        sys.exit("measure needs a CUDA GPU (or --shape tiny --device-check off to test the script on a CPU)")
    measure(args.shape, args.steps, args.points, caps=torch.cuda.is_available(), max_seq=args.max_seq,
            tokenizer=args.tokenizer, deadline=args.deadline)


if __name__ == "__main__":
    main()
