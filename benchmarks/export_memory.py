"""Peak RAM of a streaming `qtrain export` on a 1B+ parameter Llama checkpoint with random weights.

The checkpoint (Llama-3.2-1B shapes: 1.24B parameters, bfloat16, 2.5 GB) is generated here shard by shard, so
generating it never holds more than one shard either; a LoRA (r=16, every linear layer) is written as a run
folder next to it; then `qtrain export --no-check` runs in a child process whose memory is sampled from
/proc every 20 ms. Reported: peak RSS (VmHWM), and the peaks of its anonymous part (what the process really
allocated) and its file-backed part (pages of the memory-mapped input shard, which the kernel can drop). The
equivalence check is skipped: it loads the quantized model and the exported dense model by design.

    python benchmarks/export_memory.py [--workdir /tmp/qtrain-export-bench] [--shard-gb 2] [--keep]

Everything it writes is deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                tie_word_embeddings=True, rms_norm_eps=1e-5)


def tensor_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, hd = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    shapes = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                   (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                   (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                   (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                   (p + "post_attention_layernorm.weight", (h,))]
    return shapes + [("model.norm.weight", (h,))]


def write_checkpoint(folder: Path, shard_bytes: int) -> int:
    """Random bf16 weights written shard by shard (never more than one shard in memory); returns the count."""
    from transformers import LlamaConfig

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tokenizer

    folder.mkdir(parents=True)
    LlamaConfig(**LLAMA_1B, dtype="bfloat16").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    size = n_shards = total = 0
    shapes = tensor_shapes(LLAMA_1B)
    for k, (name, shape) in enumerate(shapes):
        t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.02
        shard[name] = t.to(torch.bfloat16)
        size += shard[name].numel() * 2
        total += shard[name].numel()
        if size >= shard_bytes or k == len(shapes) - 1:
            n_shards += 1
            save_file(shard, str(folder / f"model-{n_shards:05d}.safetensors"), metadata={"format": "pt"})
            shard, size = {}, 0
    return total


def write_run(run: Path, model_dir: Path, r: int = 16) -> int:
    """A run folder: resolved config + a LoRA on every linear layer with random A and B (as if trained)."""
    from torch import nn

    from qtrain.adapter_io import save_adapter
    from qtrain.config import validate_config
    from qtrain.methods import build_methods
    from qtrain.modeling import build_skeleton

    data = run.parent / "rows.jsonl"
    data.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    cfg = validate_config({"model": {"path": str(model_dir)}, "quantization": {"bits": 4},
                           "peft": [{"method": "lora", "r": r, "alpha": 2 * r, "target_modules": "all-linear"}],
                           "data": {"train": str(data)}, "output": {"dir": str(run)}})
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    skeleton = build_skeleton(cfg.model, model_dir, torch.float32)  # meta device: no memory
    methods = build_methods(cfg.peft)
    params = methods[0].attach(skeleton)
    g = torch.Generator().manual_seed(1)
    real = {n: nn.Parameter(torch.randn(p.shape, generator=g) * 0.01) for n, p in params.items()}
    save_adapter(run / "adapter", methods, real, base_model=cfg.model.path)
    return sum(p.numel() for p in real.values())


def measure(cmd: list[str]) -> dict[str, float]:
    """Run `cmd`, sampling its /proc status every 20 ms; peaks in MiB and the wall time."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    peaks = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                key, _, value = line.partition(":")
                if key in peaks:
                    peaks[key] = max(peaks[key], int(value.split()[0]))
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
        time.sleep(0.02)
    assert proc.returncode == 0, f"{cmd} failed with {proc.returncode}"
    return {**{k: round(v / 1024, 1) for k, v in peaks.items()}, "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/qtrain-export-bench")
    ap.add_argument("--input-shard-gb", type=float, default=1.0, help="shard size of the generated checkpoint")
    ap.add_argument("--shard-gb", type=float, nargs="+", default=[2.0, 0.5], help="export shard sizes to measure")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        n = write_checkpoint(work / "model", int(args.input_shard_gb * 2**30))
        lora = write_run(work / "run", work / "model")
        print(f"checkpoint: {n / 1e9:.2f}B parameters (bf16, {args.input_shard_gb} GiB input shards), LoRA r=16 "
              f"all-linear {lora / 1e6:.1f}M parameters; written in {time.perf_counter() - t0:.0f}s", flush=True)
        results = []
        for gb in args.shard_gb:
            out = work / f"export-{gb}"
            r = measure([sys.executable, "-m", "qtrain", "export", str(work / "run"), "--out", str(out),
                         "--dtype", "bfloat16", "--no-check", "--max-shard-size", str(gb)])
            r["output_shard_gib"] = gb
            r["output_gib"] = round(sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**30, 2)
            results.append(r)
            print(json.dumps(r), flush=True)
            shutil.rmtree(out)
        print(json.dumps({"parameters": n, "lora_parameters": lora, "results": results}, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
