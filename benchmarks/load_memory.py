"""Peak RAM and time of a 4-bit load: qtrain's streaming loader vs transformers' `from_pretrained` + bitsandbytes.

    python benchmarks/load_memory.py                  # float32 and bfloat16 compute dtype, both loaders
    python benchmarks/load_memory.py --dtype float32  # one dtype
    python benchmarks/load_memory.py --model llama2-7b --loader qtrain --dtype float32  # the 7B checkpoint

The checkpoint is a TinyLlama-1.1B-architecture model (hidden 2048, 22 layers, GQA 32:4, vocab 32000, untied)
with random bf16 weights, written once under $TMPDIR (or /tmp) the way `save_pretrained` shards it
(max_shard_size "1GB", an index json, HF's greedy split), tensor by tensor: the generator never holds more than
one tensor (see `write_random_checkpoint`, which the 7B benchmark reuses).

Each load runs in a fresh process that imports the same libraries for both loaders, records its RSS after the
imports, loads, and reports `ru_maxrss` (the kernel's peak resident set). A sampling thread reads
/proc/self/status every 5 ms so the table can say how much of the peak was anonymous memory (tensors, malloc)
and how much was file pages of the mmapped shards, which RSS counts while they are mapped and touched (the
kernel can drop them under pressure; they are not a copy). The target of issue 6 is

    peak RSS - RSS after imports <= quantized footprint + largest shard + 300 MB

where the footprint is `qtrain.modeling.footprint` (4-bit linears with their constants, the rest in the compute
dtype). The absolute peak is printed too; the import overhead (torch, transformers, bitsandbytes) is the same
for both loaders and is what `qtrain plan` calls the CPU runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False,
                 max_position_embeddings=2048, rms_norm_eps=1e-5)
SHARD_BYTES = 10**9  # save_pretrained(max_shard_size="1GB"): decimal gigabytes, as transformers parses it
MB = 10**6
SAFETENSORS_DTYPES = {"torch.bfloat16": "BF16", "torch.float16": "F16", "torch.float32": "F32"}


# ------------------------------------------------------------------------------------------------ checkpoint


def checkpoint_dir(name: str) -> Path:
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"qtrain-bench-{name}"


def plan_shards(shapes: dict[str, tuple[int, ...]], itemsize: int, max_bytes: int) -> list[list[str]]:
    """HF's greedy split (huggingface_hub.split_torch_state_dict_into_shards): tensors in state-dict order, a
    new shard whenever the next tensor would push the current one past `max_bytes`."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        n = itemsize * _numel(shape)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def random_tensor(key: str, shape: tuple[int, ...], dtype, seed: int):
    """Norm weights are ones (as initialised); everything else N(0, 0.02), seeded per tensor so any shard can
    be regenerated alone."""
    import torch

    if key.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    g = torch.Generator().manual_seed(seed + sum(map(ord, key)) * 7919 + len(key))
    return (torch.randn(shape, generator=g, dtype=torch.float32) * 0.02).to(dtype)


def write_shard(file: Path, keys: list[str], shapes: dict[str, tuple[int, ...]], dtype, seed: int) -> int:
    """A safetensors file whose header is written first (the shapes are known), then each tensor's bytes as it
    is generated: memory holds one tensor."""
    import torch

    itemsize = torch.empty((), dtype=dtype).element_size()
    entries, offset = {}, 0
    for key in keys:
        n = itemsize * _numel(shapes[key])
        entries[key] = {"dtype": SAFETENSORS_DTYPES[str(dtype)], "shape": list(shapes[key]),
                        "data_offsets": [offset, offset + n]}
        offset += n
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(file, "wb") as out:
        out.write(struct.pack("<Q", len(header)) + header)
        for key in keys:
            t = random_tensor(key, shapes[key], dtype, seed).contiguous()
            out.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            del t
    return offset


def write_random_checkpoint(path: Path, fields: dict, max_shard_bytes: int, seed: int = 0) -> Path:
    """A Llama folder with random bf16 weights in HF's sharded layout (+ index json, config, tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "model.safetensors.index.json").is_file():
        return path
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tokenizer

    tok = make_tokenizer()
    config = LlamaConfig(**fields, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    shards = plan_shards(shapes, 2, max_shard_bytes)
    tmp = path.with_name(path.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        t0 = time.perf_counter()
        total += write_shard(tmp / name, keys, shapes, torch.bfloat16, seed)
        print(f"  wrote {name} ({(tmp / name).stat().st_size / MB:.0f} MB, {time.perf_counter() - t0:.0f}s)",
              flush=True)
        weight_map.update({k: name for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(path)
    return path


# ------------------------------------------------------------------------------------------------ measuring


class RssSampler:
    """The largest VmRSS seen, with its anonymous and file-backed parts at that moment (/proc/self/status)."""

    def __init__(self, every: float = 0.005) -> None:
        self.every, self.peak, self._stop = every, {"rss": 0, "anon": 0, "file": 0}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> dict[str, int]:
        fields = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024
        return {"rss": fields["VmRSS"], "anon": fields["RssAnon"], "file": fields["RssFile"]}

    def _run(self) -> None:
        while not self._stop.is_set():
            s = self.now()
            if s["rss"] > self.peak["rss"]:
                self.peak = s
            time.sleep(self.every)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def child(loader: str, path: Path, dtype_name: str) -> dict:
    """One load in this (fresh) process; returns the measurements."""
    import resource

    import accelerate  # noqa: F401  the same imports for both loaders, so "after imports" is comparable
    import bitsandbytes  # noqa: F401
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM  # noqa: F401

    from qtrain.config import ModelSection, QuantizationSection
    from qtrain.modeling import footprint, load_model

    after_imports = RssSampler.now()["rss"]
    dtype = getattr(torch, dtype_name)
    with RssSampler() as sampler:
        t0 = time.perf_counter()
        if loader == "qtrain":
            quant = QuantizationSection(bits=4, type="nf4", double_quant=True, compute_dtype=dtype_name)
            model = load_model(ModelSection(path=str(path)), quant, torch.device("cpu"), path=path).model
        else:
            bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                     bnb_4bit_compute_dtype=dtype)
            model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=dtype,
                                                         device_map="cpu")
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fp = footprint(model)
    return {"loader": loader, "dtype": dtype_name, "load_s": seconds, "after_imports": after_imports,
            "peak": peak, "peak_anon": sampler.peak["anon"], "peak_file": sampler.peak["file"],
            "end_rss": RssSampler.now()["rss"], "footprint": fp["quantized_linear_bytes"] + fp["other_param_bytes"],
            "quantized_linear_bytes": fp["quantized_linear_bytes"]}


def measure(loader: str, path: Path, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--child", loader, "--path", str(path), "--dtype", dtype]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{loader} load failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict], largest_shard: int) -> str:
    lines = ["| loader | compute dtype | load s | RSS after imports | peak RSS | peak − imports | of which "
             "anon / file pages | 4-bit footprint | bound (footprint + shard + 300 MB) | target |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        growth = r["peak"] - r["after_imports"]
        bound = r["footprint"] + largest_shard + 300 * MB
        lines.append(
            f"| {r['loader']} | {r['dtype']} | {r['load_s']:.1f} | {r['after_imports'] / MB:.0f} MB | "
            f"{r['peak'] / MB:.0f} MB | {growth / MB:.0f} MB | {r['peak_anon'] / MB:.0f} / {r['peak_file'] / MB:.0f} MB"
            f" | {r['footprint'] / MB:.0f} MB | {bound / MB:.0f} MB | {'pass' if growth <= bound else 'FAIL'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--loader", choices=["qtrain", "transformers"], nargs="+", default=["qtrain", "transformers"])
    ap.add_argument("--model", choices=["tinyllama-1.1b", "llama2-7b"], default="tinyllama-1.1b")
    ap.add_argument("--child", choices=["qtrain", "transformers"], help=argparse.SUPPRESS)
    ap.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.path, args.dtype[0])))
        return
    if args.model == "llama2-7b":  # the checkpoint benchmarks/scale_7b.py writes (max_shard_size 2GB)
        from scale_7b import LLAMA2_7B, SHARD_BYTES as SHARD_7B

        path = write_random_checkpoint(checkpoint_dir("llama2-7b-random"), LLAMA2_7B, SHARD_7B)
    else:
        path = write_random_checkpoint(checkpoint_dir("tinyllama-1.1b-random"), TINYLLAMA, SHARD_BYTES)
    print(f"checkpoint: {path} ({args.model} architecture, random bf16)", flush=True)
    shard_sizes = [f.stat().st_size for f in sorted(path.glob("*.safetensors"))]
    print(f"shards: {', '.join(f'{s / MB:.0f} MB' for s in shard_sizes)}; largest {max(shard_sizes) / MB:.0f} MB",
          flush=True)
    rows = []
    for dtype in args.dtype:
        for loader in args.loader:
            rows.append(measure(loader, path, dtype))
            print(f"  {loader} {dtype}: {rows[-1]['load_s']:.1f}s, peak {rows[-1]['peak'] / MB:.0f} MB", flush=True)
    print(table(rows, max(shard_sizes)))


if __name__ == "__main__":
    main()
