"""qtrain on a CUDA GPU beside transformers + bitsandbytes + peft, in one command, offline.

    python benchmarks/gpu.py prepare KIT            # here (network for pip): wheels, source, tokenizer -> KIT/
    python KIT/proj/benchmarks/gpu.py run --out DIR # on the CUDA machine (torch, transformers, peft, accelerate)
    python benchmarks/gpu.py run --smoke --out DIR  # the same plumbing on the CPU with tiny shapes (minutes)

`run` writes random-weight checkpoints of Llama-3-8B's and SmolLM2-135M's shapes (bf16, sharded safetensors,
the shipped model's tokenizer), measures the GPU's bf16 matmul rate, then runs each grid point as a separate
process, one at a time: qtrain (`qtrain run` on a generated config) and the baseline a user would otherwise pick,
both as peft documents it (`prepare_model_for_kbit_training`) and without that call. Same model, NF4 + double
quantization, bf16 compute, LoRA r=16 (alpha 32, no dropout) on every linear, paged 8-bit AdamW, gradient
checkpointing, the same texts cut to the same length. Per point it prints and writes to DIR/gpu.json: s/step
(median after two warm-up steps), tokens/s, `max_memory_allocated` and `max_memory_reserved`, the planner's
prediction of the allocated peak (`qtrain plan --device cuda`, its CUDA-context term taken out: the allocator
does not see it) and its error, the model FLOP utilisation (6 · matmul parameters · tokens per second over the
measured bf16 rate: the usual convention; a frozen base does 4·N, the recompute 2·N more) and qtrain's speed
ratio to each baseline. Anything that fails or is missing is reported, not hidden.

`qtrain-profile` (after the comparisons, at 135M 4 × 512 and 8B 1 × 2048) runs qtrain again under torch.profiler
for steps 4 and 5 and says where a step's time went: host time, kernels and the device's busy time, launches,
host waits, the kernels and host operators by time, and the longest stretches the device sat idle with the host
call running at each one's start (DIR/gpu.json; the traces in DIR/profiles/, for chrome://tracing or Perfetto).

`qtrain-cudagraphs` (last, while time is left) is an experiment, not a setting qtrain has: the compiled blocks
with inductor's CUDA graphs, to measure whether they pay at the host-bound points, how many graphs inductor
would not record (`cudagraph_skips`; why: the run's log), and whether it trains the same (`loss_gap_vs_qtrain`,
which every qtrain variant gets: the largest difference of its losses from qtrain's, same seed and data).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NEEDED = ("torch", "transformers", "bitsandbytes", "peft", "accelerate", "datasets", "safetensors", "pydantic",
          "yaml", "qtrain")
WHEELS = ("bitsandbytes", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "datasets", "dill",
          "multiprocess", "pytest", "pluggy", "iniconfig", "pygments")  # pytest & co.: the GPU test suite
SHAPES = {  # name: LlamaConfig arguments (vocab comes from the tokenizer for "tiny")
    "l3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "smol": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
}
# (label, shape, micro-batch, sequence, checkpointing, systems)
# "qtrain" is the default: on a GPU `training.compile: auto` compiles the decoder blocks. "qtrain-eager": compile
# off, fused ops on (Triton kernels), the default before compiled blocks; "qtrain-unfused": neither (transformers'
# RMSNorm and silu·up). They show what each buys where the fixed cost per step shows.
# "qtrain-cudagraphs": an experiment, not a product setting: the compiled blocks with inductor's CUDA graphs
# (TORCHINDUCTOR_CUDAGRAPHS=1 in the child's environment), to learn whether replaying recorded graphs removes
# the host time a short step waits on, and whether it trains the same (its losses against qtrain's).
GRID = [
    ("135M 4x512", "smol", 4, 512, True, ("qtrain", "peft+prepare", "peft", "qtrain-eager", "qtrain-unfused",
                                          "qtrain-profile", "qtrain-cudagraphs")),
    ("135M 4x512 no-ckpt", "smol", 4, 512, False, ("qtrain",)),
    ("8B 1x2048", "l3-8b", 1, 2048, True, ("qtrain", "peft+prepare", "peft", "qtrain-eager", "qtrain-profile",
                                           "qtrain-cudagraphs")),
    ("8B 1x2048 no-ckpt", "l3-8b", 1, 2048, False, ("qtrain",)),
    ("8B 4x2048", "l3-8b", 4, 2048, True, ("qtrain", "peft+prepare", "peft")),
]
PRIMARY = ("qtrain", "peft+prepare", "peft")  # run first at every point; the rest after, while time is left
EXPERIMENTS = {"qtrain-cudagraphs": {"TORCHINDUCTOR_CUDAGRAPHS": "1"}}  # run last; their children's environment
SMOKE_GRID = [("tiny 2x64", "tiny", 2, 64, True, ("qtrain", "peft+prepare", "peft", "qtrain-eager", "qtrain-unfused",
                                                  "qtrain-profile", "qtrain-cudagraphs")),
              ("tiny 2x64 no-ckpt", "tiny", 2, 64, False, ("qtrain",))]
RANK = 16


def missing_modules() -> list[str]:
    out = []
    for name in NEEDED:
        try:
            importlib.import_module(name)
        except Exception as e:  # an import that fails for any reason is as missing as an absent one
            out.append(f"{name} ({type(e).__name__}: {e})")
    return out


# ---------------------------------------------------------------------------------------------------- prepare


def prepare(kit: Path) -> None:
    """Wheels a CUDA machine with torch/transformers/peft/accelerate lacks (Python 3.12, manylinux), the committed
    source, the shipped model's tokenizer."""
    from qtrain.config import ModelSection
    from qtrain.modeling import resolve_model_path

    from importlib.metadata import PackageNotFoundError, version

    kit.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(kit / "whl", ignore_errors=True)
    # bitsandbytes 0.50's wheels are manylinux_2_24: without that tag pip settles for 0.42's platform-free wheel
    plat = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                        "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any") for a in ("--platform", p)]
    for name in WHEELS:
        try:  # the versions this project is tested with here
            wanted = f"{name}=={version(name)}"
        except PackageNotFoundError:
            wanted = name
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp", *plat, "-d", str(kit / "whl"), wanted],
                       check=True)
    proj = kit / "proj"
    shutil.rmtree(proj, ignore_errors=True)
    proj.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD", "qtrain", "pyproject.toml", "benchmarks",
                              "tests"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "x", "-C", str(proj)], input=archive, check=True)
    source = resolve_model_path(ModelSection(path="smollm2-135m-instruct"))  # converts the shipped GGUF once
    tok = kit / "tok"
    tok.mkdir(exist_ok=True)
    for name in ("tokenizer.json", "special_tokens_map.json", "chat_template.jinja"):
        if (source / name).is_file():
            shutil.copy(source / name, tok / name)
    # the class every transformers 5.x knows, without this version's loader-only keys (as the kit that first ran
    # on the CUDA machine, with an older transformers, wrote it)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", model_max_length=10**6)
    for key in ("backend", "is_local", "local_files_only"):
        config.pop(key, None)
    (tok / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    print(f"kit ready in {kit}. On the CUDA machine:\n  pip install --no-index --no-deps --target /tmp/site "
          f"{kit}/whl/*.whl && PYTHONPATH=/tmp/site:{kit}/proj python3 {kit}/proj/benchmarks/gpu.py run "
          f"--tokenizer {kit}/tok --out OUT")


# ---------------------------------------------------------------------------------------------------- setup


def write_checkpoint(out: Path, shape: str, tokenizer: Path, device: str) -> float:
    """A random-weight Llama of `shape` (bf16, sharded safetensors, with the tokenizer); returns seconds."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    if (out / "config.json").is_file():
        return 0.0
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(tokenizer)
    args = dict(SHAPES[shape])
    args.setdefault("vocab_size", len(tok))
    cfg = LlamaConfig(**args, max_position_embeddings=8192, rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, architectures=["LlamaForCausalLM"])
    h, i, n_heads, n_kv, hd = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                               cfg.num_key_value_heads, cfg.head_dim)
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes.update({p + "self_attn.q_proj.weight": (n_heads * hd, h), p + "self_attn.k_proj.weight": (n_kv * hd, h),
                       p + "self_attn.v_proj.weight": (n_kv * hd, h), p + "self_attn.o_proj.weight": (h, n_heads * hd),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=device).manual_seed(0)
    shard, size, index = {}, 0, {}

    def flush() -> None:
        name = f"model-{len(set(index.values())) + 1:05d}.safetensors"
        save_file({k: v.cpu() for k, v in shard.items()}, str(out / name), metadata={"format": "pt"})
        index.update({k: name for k in shard})
        shard.clear()

    for key, s in shapes.items():
        if key.endswith("norm.weight"):
            shard[key] = torch.ones(s, dtype=torch.bfloat16, device=device)
        else:
            shard[key] = (torch.randn(s, generator=g, device=device) * 0.02).to(torch.bfloat16)
        size += shard[key].numel() * 2
        if size > 4 * 2**30:
            flush()
            size = 0
    if shard:
        flush()
    total = sum((out / f).stat().st_size for f in set(index.values()))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": index}))
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(out)
    tok.save_pretrained(out)
    return time.perf_counter() - t0


def write_texts(path: Path, rows: int = 32, words: int = 2400) -> None:
    """Texts long enough to fill every sequence of the grid (the reference text, rotated)."""
    import random

    text = (ROOT / "qtrain" / "resources" / "reference.txt").read_text().split()
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(rows):
            s = rng.randrange(len(text))
            f.write(json.dumps({"text": " ".join(((text[s:] + text[:s]) * 8)[:words])}) + "\n")


def matmul_rate(device: str) -> float:
    """Measured dense matmul rate in TFLOP/s (bf16 8192³ on a GPU; fp32 1024³ on the CPU for --smoke)."""
    import torch

    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    reps = 20 if device == "cuda" else 3
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def matmul_params(shape: str, vocab: int) -> int:
    a = SHAPES[shape]
    h, i, hd = a["hidden_size"], a["intermediate_size"], a["head_dim"]
    layer = h * hd * (2 * a["num_attention_heads"] + 2 * a["num_key_value_heads"]) + 3 * h * i
    return a["num_hidden_layers"] * layer + a.get("vocab_size", vocab) * h


# ---------------------------------------------------------------------------------------------------- children


def child_qtrain(config: str, profile_dir: str | None = None) -> None:
    """`qtrain run CONFIG` in this process, then one JSON line: step times from metrics.jsonl and peak memory.
    With `profile_dir`: torch.profiler over steps 4 and 5 (`profiled`), its summary in the line."""
    import torch
    import yaml

    from qtrain.cli import main

    found: dict = {}
    if profile_dir:
        with profiled(Path(profile_dir), found):
            rc = main(["run", config])
    else:
        rc = main(["run", config])
    run_dir = Path(yaml.safe_load(open(config))["output"]["dir"])
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r and "elapsed_s" in r]
    elapsed = [r["elapsed_s"] for r in steps]
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    print(json.dumps({"rc": rc, "step_times": [round(b - a, 4) for a, b in zip(elapsed, elapsed[1:])],
                      "losses": [r["loss"] for r in steps], "fused_ops": summary.get("fused_ops_backend"),
                      "compile": summary.get("compile"), "first_step_s": elapsed[0] if elapsed else None,
                      "compiled_block_calls": summary.get("compiled_block_calls"),
                      "graph_breaks": summary.get("graph_breaks"), "allocator": summary.get("cuda_allocator_conf"),
                      **peaks(torch), **({"profile": found["summary"]} if "summary" in found else {}),
                      **({"cudagraph_skips": skips} if (skips := cudagraph_skips()) is not None else {})}))


def cudagraph_skips() -> int | None:
    """Compiled graphs inductor ran without CUDA graphs though asked to (why: the child's log, "skipping
    cudagraphs due to ..."); None where they were not asked for."""
    import torch._inductor.config
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"] if torch._inductor.config.triton.cudagraphs else None


# ---------------------------------------------------------------------------------------------------- profile

# host calls that wait for the GPU (a memcpy to pageable host memory waits too) and that launch a kernel
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpyAsync")
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
PROFILE_STEPS = dict(wait=2, warmup=1, active=2)  # steps 1-2 compile and settle, 3 warms the profiler up


class profiled:
    """torch.profiler around a whole `qtrain run`, stepped by every optimizer step (a global post-step hook:
    nothing in qtrain knows), recording steps 4 and 5. On the trace: `found["summary"]`
    (`profile_summary` of its events, plus the host operators by self time) and `DIR/trace.json.gz`."""

    def __init__(self, folder: Path, found: dict):
        self.folder, self.found = folder, found

    def __enter__(self):
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.prof = profile(activities=activities, schedule=schedule(**PROFILE_STEPS, repeat=1),
                            on_trace_ready=self.ready)
        self.hook = register_optimizer_step_post_hook(lambda *_: self.prof.step())
        self.prof.start()
        return self

    def __exit__(self, *exc):
        self.hook.remove()
        self.prof.stop()

    def ready(self, prof) -> None:
        import gzip

        from torch.autograd import DeviceType

        events = []
        for e in prof.events():
            if e.device_type == DeviceType.CUDA:
                kind = "device"
            elif e.name.startswith("ProfilerStep"):
                kind = "step"
            else:
                kind = "runtime" if e.name.startswith("cu") else "op"
            events.append({"name": e.name, "kind": kind, "start": e.time_range.start, "end": e.time_range.end})
        summary = profile_summary(events)
        n = max(summary["steps"], 1)
        ops = sorted(prof.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)[:12]
        summary["host_ops_by_self_time"] = [{"name": a.key[:80], "calls": round(a.count / n, 1),
                                             "ms": round(a.self_cpu_time_total / 1e3 / n, 2)} for a in ops]
        self.found["summary"] = summary
        self.folder.mkdir(parents=True, exist_ok=True)
        trace = self.folder / "trace.json"
        prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as f, gzip.open(self.folder / "trace.json.gz", "wb") as g:
            shutil.copyfileobj(f, g)
        trace.unlink()
        (self.folder / "summary.json").write_text(json.dumps(summary, indent=1))


def profile_summary(events: list[dict]) -> dict:
    """Per profiled step (mean over the steps): host time, device kernels and their busy time (the union of
    their intervals), the time the device sat idle, launches and host waits; the kernels by total time; and the
    longest idle gaps with the host call running when each began (the innermost one: often a wait, or the
    Python between two launches). `events`: name, kind ("step", "device", "runtime", "op"), start, end in µs."""
    steps = sorted((e for e in events if e["kind"] == "step"), key=lambda e: e["start"])
    host = [e for e in events if e["kind"] in ("runtime", "op")]
    kernels: dict[str, list[float]] = {}
    rows, gaps = [], []
    for s in steps:
        inside = [e for e in events if s["start"] <= e["start"] < s["end"]]
        device = sorted((e for e in inside if e["kind"] == "device"), key=lambda e: e["start"])
        busy, merged = 0.0, []
        for e in device:
            kernels.setdefault(e["name"], []).append(e["end"] - e["start"])
            if merged and e["start"] <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e["end"])
            else:
                merged.append([e["start"], e["end"]])
        busy = sum(b - a for a, b in merged)
        edges = [s["start"]] + [x for m in merged for x in m] + [s["end"]]
        # idle: before the first kernel, between kernels, after the last
        gaps += [(b - a, a, s["start"]) for a, b in zip(edges[::2], edges[1::2]) if b > a]
        rows.append({"step_ms": (s["end"] - s["start"]) / 1e3, "device_kernels": len(device),
                     "device_busy_ms": busy / 1e3, "device_idle_ms": (s["end"] - s["start"] - busy) / 1e3,
                     "launches": sum(e["name"] in LAUNCHES for e in inside),
                     "host_waits": sum(e["name"] in WAITS for e in inside),
                     "host_wait_ms": sum(e["end"] - e["start"] for e in inside if e["name"] in WAITS) / 1e3})
    n = len(rows)
    out = {"steps": n, **{k: round(sum(r[k] for r in rows) / n, 3) if n else None for k in (
        "step_ms", "device_kernels", "device_busy_ms", "device_idle_ms", "launches", "host_waits", "host_wait_ms")}}
    out["device_busy_fraction"] = round(out["device_busy_ms"] / out["step_ms"], 3) if n and out["step_ms"] else None
    out["kernels_by_time"] = [{"name": k[:80], "per_step": round(len(v) / n, 1), "ms": round(sum(v) / 1e3 / n, 3)}
                              for k, v in sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:12]]
    longest = []
    for length, at, step_start in sorted(gaps, key=lambda g: -g[0])[:8]:  # the host call running at each start
        running = [h for h in host if h["start"] <= at < h["end"]]
        longest.append({"ms": round(length / 1e3, 3), "at_ms": round((at - step_start) / 1e3, 3),
                        "host": min(running, key=lambda h: h["end"] - h["start"])["name"][:80] if running else None})
    out["longest_idle_gaps"] = longest
    return out


def child_peft(model: str, data: str, steps: int, batch: int, seq: int, prep: bool, ckpt: bool) -> None:
    """The documented QLoRA recipe (transformers + bitsandbytes + peft), timed step by step; one JSON line."""
    import torch
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model)
    dtype = torch.bfloat16 if cuda else torch.float32
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=dtype)
    m = AutoModelForCausalLM.from_pretrained(model, quantization_config=qc, dtype=dtype,
                                             device_map={"": 0 if cuda else "cpu"})
    if prep:
        m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=ckpt)
    elif ckpt:
        m.gradient_checkpointing_enable()
        m.enable_input_require_grads()
    m = get_peft_model(m, LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules="all-linear",
                                     task_type="CAUSAL_LM"))
    m.train()
    rows = [tok(json.loads(x)["text"], truncation=True, max_length=seq)["input_ids"] for x in open(data)]
    assert all(len(r) == seq for r in rows), "the texts must fill the sequence"
    opt = bnb.optim.PagedAdamW8bit([p for p in m.parameters() if p.requires_grad], lr=2e-4)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times, losses = [], []
    for step in range(steps):
        ids = torch.tensor([rows[(step * batch + i) % len(rows)] for i in range(batch)], device=m.device)
        sync()
        t0 = time.perf_counter()
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        sync()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"rc": 0, "step_times": [round(t, 4) for t in times[1:]], "losses": losses, **peaks(torch)}))


def peaks(torch) -> dict:
    if torch.cuda.is_available():
        return {"peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
                "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20}
    import resource

    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ---------------------------------------------------------------------------------------------------- run

CONFIG = """model: {{path: {model}}}
quantization: {{bits: 4, type: nf4, double_quant: true, compute_dtype: {dtype}}}
peft: [{{method: lora, r: {rank}, alpha: {alpha}, dropout: 0.0, target_modules: all-linear}}]
data: {{train: {data}, format: text, max_seq_len: {seq}}}
eval: {{before_training: false, exact_match: false}}
training: {{micro_batch_size: {batch}, gradient_accumulation_steps: 1, max_steps: {steps}, learning_rate: 0.0002,
           lr_scheduler: constant, optimizer: paged_adamw_8bit, gradient_checkpointing: {ckpt}, seed: 0,
           log_every: 1, save_every: 1000, fused_ops: {fused}, compile: {compile}}}
logging: {{progress: false}}
output: {{dir: {out}}}
"""


def child(args: list[str], timeout: float, log: Path, env: dict | None = None) -> dict:
    """Run this file as a child process (with `env` added to its environment); its last JSON line, or what went
    wrong."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                                "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})})
    except subprocess.TimeoutExpired as e:
        log.write_text(str(e.stdout or "") + str(e.stderr or ""))
        return {"error": f"timed out after {timeout:.0f} s", "log": str(log)}
    log.write_text(p.stdout + p.stderr)
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {p.returncode}: " + " | ".join(tail), "log": str(log)}
    return {**json.loads(lines[-1]), "wall_s": round(time.perf_counter() - t0, 1)}


def planned_allocated_mib(config: Path) -> float | None:
    """The planner's `allocator_bytes` for `config` on CUDA: its peak less what lives outside torch's allocator
    (the CUDA context; the optimizer states bnb pages, cudaMallocManaged, which `max_memory_allocated` never sees)."""
    p = subprocess.run([sys.executable, "-m", "qtrain", "plan", str(config), "--device", "cuda", "--json"],
                       capture_output=True, text=True)
    if p.returncode:
        return None
    return json.loads(p.stdout)["details"]["allocator_bytes"] / 2**20


def run(args) -> int:
    import torch

    missing = missing_modules()
    cuda = torch.cuda.is_available()
    if missing or not (cuda or args.smoke):
        print("benchmarks/gpu.py cannot run here:\n" + "".join(f"  - missing: {m}\n" for m in missing)
              + ("" if cuda or args.smoke else "  - no CUDA device (torch.cuda.is_available() is False); "
                 "--smoke runs the same plumbing on the CPU with tiny shapes\n")
              + "Prepare an offline kit with `python benchmarks/gpu.py prepare KIT` on a machine with network.")
        return 2
    device = "cuda" if cuda else "cpu"
    out = Path(args.out)
    work = Path(args.work or out / "work")
    for d in (out / "logs", work):  # logs beside the results; checkpoints (16 GB for 8B) in --work
        d.mkdir(parents=True, exist_ok=True)
    tokenizer = Path(args.tokenizer) if args.tokenizer else default_tokenizer()
    start = time.perf_counter()
    import bitsandbytes
    import peft
    import transformers

    from qtrain import triton_kernels

    triton = importlib.import_module("triton").__version__ if triton_kernels.available() else None
    result = {"machine": {"device": torch.cuda.get_device_name() if cuda else "cpu (smoke)",
                          "torch": torch.__version__, "cuda": torch.version.cuda,
                          "transformers": transformers.__version__,
                          "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__, "triton": triton},
              "points": []}
    result["matmul_tflops"] = round(matmul_rate(device), 3)
    print(f"{result['machine']}\nmeasured {'bf16' if cuda else 'fp32'} matmul rate: {result['matmul_tflops']} TFLOP/s",
          flush=True)
    data = work / "texts.jsonl"
    write_texts(data)
    grid = SMOKE_GRID if args.smoke else [g for g in GRID if not args.points or g[0] in args.points]
    vocab = len(__import__("transformers").AutoTokenizer.from_pretrained(tokenizer))
    for shape in dict.fromkeys(g[1] for g in grid):
        s = write_checkpoint(work / shape, shape, tokenizer, device)
        print(f"checkpoint {shape}: {s:.0f} s", flush=True)
    points = [{"point": label, "shape": shape, "micro_batch": batch, "seq": seq, "checkpointing": ckpt,
               "runs": {system: None for system in systems}} for label, shape, batch, seq, ckpt, systems in grid]
    for point, system in run_order(points):
        label, shape, batch, seq, ckpt = (point[k] for k in ("point", "shape", "micro_batch", "seq", "checkpointing"))
        steps = 6 if shape == "l3-8b" else 8
        left = args.deadline - (time.perf_counter() - start)
        if left < 30:
            point["runs"][system] = {"error": "skipped: the run's deadline (--deadline) was reached"}
            continue
        name = f"{shape}-{batch}x{seq}-{'ckpt' if ckpt else 'nockpt'}-{system}".replace("+", "-")
        log = out / "logs" / f"{name}.log"
        if system.startswith("qtrain"):
            cfg = work / f"{name}.yaml"
            cfg.write_text(CONFIG.format(model=work / shape, dtype="bfloat16" if cuda else "float32",
                                         rank=RANK, alpha=2 * RANK, data=data, seq=seq, batch=batch,
                                         steps=steps, ckpt=str(ckpt).lower(), out=work / "runs" / name,
                                         fused="false" if system == "qtrain-unfused" else "auto",
                                         compile="auto" if system in ("qtrain", "qtrain-profile", *EXPERIMENTS)
                                         else "false"))
            shutil.rmtree(work / "runs" / name, ignore_errors=True)
            profile = [str(out / "profiles" / name)] if system == "qtrain-profile" else []
            r = child(["child-qtrain", str(cfg), *profile], min(left, args.timeout), log, EXPERIMENTS.get(system))
            r["planned_allocated_mib"] = planned_allocated_mib(cfg)
        else:
            r = child(["child-peft", str(work / shape), str(data), str(steps), str(batch), str(seq),
                       str(int(system == "peft+prepare")), str(int(ckpt))], min(left, args.timeout), log)
        point["runs"][system] = summarise(r, batch * seq, matmul_params(shape, vocab), result["matmul_tflops"])
        print(f"  {label:20s} {system:13s} {line(point['runs'][system])}", flush=True)
    for point in points:
        compare_to_qtrain(point)
        result["points"].append(point)
    result["seconds"] = round(time.perf_counter() - start)
    (out / "gpu.json").write_text(json.dumps(result, indent=1))
    print(table(result))
    print(profile_table(result))
    print(f"{result['seconds']} s; written to {out / 'gpu.json'}")
    return 0


def run_order(points: list[dict]) -> list[tuple[dict, str]]:
    """(point, system) in the order they run: the comparisons the issue asks for first, every point's; then the
    profiles; then qtrain's variants; then the experiments. A short --deadline (a lent GPU's few minutes) drops
    what matters least."""
    def rank(system: str) -> int:
        return 0 if system in PRIMARY else 1 if system == "qtrain-profile" else 3 if system in EXPERIMENTS else 2
    return sorted(((p, system) for p in points for system in p["runs"]), key=lambda ps: rank(ps[1]))


def compare_to_qtrain(point: dict) -> None:
    """Beside each run of `point`: qtrain's speed-up over it (`speed_vs_SYSTEM` on the point) and, for qtrain's
    variants, the largest difference of their losses from qtrain's (`loss_gap_vs_qtrain`: same seed, data and
    steps, so a variant that trains differently shows)."""
    q = point["runs"].get("qtrain") or {}
    for system, b in point["runs"].items():
        if not b:
            continue
        if system not in ("qtrain", "qtrain-profile") and "s_per_step" in q and "s_per_step" in b:
            point[f"speed_vs_{system}"] = round(b["s_per_step"] / q["s_per_step"], 2)
        if system.startswith("qtrain-") and q.get("losses") and b.get("losses"):
            b["loss_gap_vs_qtrain"] = round(max(abs(x - y) for x, y in zip(q["losses"], b["losses"])), 4)


def summarise(r: dict, tokens: int, n_matmul: int, tflops: float) -> dict:
    if "error" in r:
        return r
    times = r["step_times"][1:] or r["step_times"]  # after two warm-up steps (the children drop the first)
    s = statistics.median(times)
    out = {"s_per_step": round(s, 4), "tokens_per_s": round(tokens / s), "losses": r["losses"],
           "mfu": round(6 * n_matmul * tokens / s / (tflops * 1e12), 3)}
    if "fused_ops" in r:
        out["fused_ops"] = r["fused_ops"]  # the backend the fused ops ran on ("triton", "torch"), or None: off
    # compiled blocks (and whether they ran compiled, whole); the first step (compiling them); a trace
    for k in ("compile", "compiled_block_calls", "graph_breaks", "first_step_s", "allocator", "profile",
              "cudagraph_skips"):
        if k in r:
            out[k] = r[k]
    for k in ("peak_allocated_mib", "peak_reserved_mib", "peak_rss_mib", "planned_allocated_mib"):
        if r.get(k) is not None:
            out[k] = round(r[k], 1)
    if "planned_allocated_mib" in out and "peak_allocated_mib" in out:
        out["planner_error"] = round(out["planned_allocated_mib"] / out["peak_allocated_mib"] - 1, 3)
    return out


def line(r: dict) -> str:
    if "error" in r:
        return "FAILED " + r["error"]
    mem = r.get("peak_allocated_mib", r.get("peak_rss_mib"))
    plan = f"  plan {r['planner_error']:+.1%}" if "planner_error" in r else ""
    first = f"  first step {r['first_step_s']:.1f} s" if r.get("first_step_s") is not None else ""
    uncompiled = (r.get("compile") and (r.get("compiled_block_calls") == 0 or r.get("graph_breaks"))
                  and f"  NOT COMPILED AS MEANT ({r['compiled_block_calls']} compiled calls, "
                      f"{r['graph_breaks']} graph breaks)")
    skips = f"  {r['cudagraph_skips']} graphs without CUDA graphs" if r.get("cudagraph_skips") else ""
    return (f"{r['s_per_step']:.3f} s/step {r['tokens_per_s']:>8} tok/s  peak {mem:,.0f} MiB  MFU {r['mfu']:.1%}"
            f"{plan}{first}{uncompiled or ''}{skips}")


def table(result: dict) -> str:
    rows = ["| point | system | s/step | tokens/s | allocated MiB | reserved MiB | planned (error) | MFU "
            "| qtrain speed-up |",
            "|---|---|---|---|---|---|---|---|---|"]
    for p in result["points"]:
        for system, r in p["runs"].items():
            if "error" in r:
                rows.append(f"| {p['point']} | {system} | {r['error']} | | | | | | |")
                continue
            plan = f"{r['planned_allocated_mib']:,.0f} ({r['planner_error']:+.1%})" if "planner_error" in r else ""
            ratio = p.get(f"speed_vs_{system}", "")
            gap = f" (losses within {r['loss_gap_vs_qtrain']} of qtrain's)" if "loss_gap_vs_qtrain" in r else ""
            rows.append(f"| {p['point']} | {system}{gap} | {r['s_per_step']:.3f} | {r['tokens_per_s']:,} | "
                        f"{r.get('peak_allocated_mib', r.get('peak_rss_mib', 0)):,.0f} | "
                        f"{r.get('peak_reserved_mib', 0):,.0f} | {plan} | {r['mfu']:.1%} | "
                        f"{f'{ratio}x' if ratio else ''} |")
    return "\n".join(rows)


def profile_table(result: dict) -> str:
    """Where a profiled step's time went (`profile_summary`), per profiled point."""
    rows = []
    for p in result["points"]:
        r = (p["runs"].get("qtrain-profile") or {}).get("profile")
        if not r or not r["steps"]:
            continue
        busy = f"{r['device_busy_fraction']:.0%}" if r["device_busy_fraction"] is not None else "-"
        rows += [f"profile {p['point']}: step {r['step_ms']:.1f} ms, device busy {r['device_busy_ms']:.1f} ms "
                 f"({busy}), {r['device_kernels']:.0f} kernels, {r['launches']:.0f} launches, "
                 f"{r['host_waits']:.0f} host waits ({r['host_wait_ms']:.1f} ms)"]
        rows += [f"  kernel {k['ms']:8.2f} ms  x{k['per_step']:<6} {k['name']}" for k in r["kernels_by_time"][:6]]
        rows += [f"  host   {k['ms']:8.2f} ms  x{k['calls']:<6} {k['name']}" for k in r["host_ops_by_self_time"][:6]]
        rows += [f"  idle   {g['ms']:8.2f} ms  at {g['at_ms']:.1f} ms, host in {g['host']}"
                 for g in r["longest_idle_gaps"][:5]]
    return "\n".join(rows)


def default_tokenizer() -> Path:
    from qtrain.locate import cache_dir

    path = cache_dir() / "models" / "smollm2-135m-instruct"
    if not (path / "tokenizer.json").is_file():
        sys.exit(f"no tokenizer at {path}: pass --tokenizer DIR (the kit's tok/), or run the quickstart once here")
    return path


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "child-qtrain":
        child_qtrain(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "child-peft":
        m, d, steps, b, t, prep, ckpt = sys.argv[2:9]
        child_peft(m, d, int(steps), int(b), int(t), prep == "1", ckpt == "1")
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("prepare", help="build an offline kit (needs network for pip)")
    pr.add_argument("kit")
    ru = sub.add_parser("run", help="measure (on a CUDA machine, or --smoke on the CPU)")
    ru.add_argument("--out", required=True)
    ru.add_argument("--work", help="checkpoints, configs, runs (default OUT/work; 16 GB for the 8B checkpoint: "
                    "keep it out of a folder that is copied back)")
    ru.add_argument("--tokenizer", help="a tokenizer folder (default: qtrain's converted SmolLM2)")
    ru.add_argument("--points", nargs="*", help="grid points by label (default: all)")
    ru.add_argument("--deadline", type=float, default=450, help="seconds for the whole grid (default 450)")
    ru.add_argument("--timeout", type=float, default=240, help="seconds for one run (default 240: an 8B run "
                    "loads 16 GB and compiles its blocks)")
    ru.add_argument("--smoke", action="store_true", help="tiny shapes; runs on the CPU")
    a = ap.parse_args()
    if a.command == "prepare":
        prepare(Path(a.kit))
        return 0
    return run(a)


if __name__ == "__main__":
    sys.exit(main())
