"""qtrain vs the setup a user would otherwise pick (transformers + bitsandbytes + peft), side by side.

    python benchmarks/compare.py                 # the grid (4/8-bit × seq 256/1024 × micro-batch 1/4), then curves
    python benchmarks/compare.py --only 4-256-4  # one grid point (bits-seq-microbatch)
    python benchmarks/compare.py --curves-only   # only the learning curves
    python benchmarks/compare.py --model /tmp/qtrain-bench-tinyllama-1.1b-random --only 4-256-1 --no-curves
                                                 # another local checkpoint (e.g. load_memory.py's random 1.1B)

Both systems train the same thing: SmolLM2-135M-Instruct (the shipped model), base frozen in 4-bit NF4 with
double quantization or 8-bit, LoRA r=16 alpha=32 dropout 0 on every linear layer of the blocks, AdamW, gradient
checkpointing on, train mode, the same compute dtype (float32 unless --dtype says otherwise: on this CPU bf16
matmuls are slower and the documented bf16 recipe does not learn, see the curves), the same batches.

The baseline is configured as peft's and transformers' docs say: `from_pretrained(quantization_config=
BitsAndBytesConfig(...))`, `prepare_model_for_kbit_training(model)` (which upcasts the non-quantized weights
to float32 and turns on gradient checkpointing), `get_peft_model(model, LoraConfig(...))`, `model.train()`,
`model(**batch, labels=...).loss.backward()`, `torch.optim.AdamW`.

qtrain runs through its own pieces exactly as `qtrain run` wires them: `load_model`, the LoRA method,
`enable_checkpointing`, `accumulate_gradients`, the configured optimizer.

Every measurement is a fresh process, and the systems alternate A, B, A, B at each grid point so drift on a
shared machine hits both. Each process loads, runs `--warmup` steps, resets the kernel's RSS high-water mark
(/proc/self/clear_refs), times `--steps` steps, then runs one more step under a tracker of live tensor bytes
(a TorchDispatchMode; it slows the step, so it is not timed). Reported: tokens/s (median of the timed steps),
peak live tensor bytes, peak RSS during the timed steps, and qtrain/baseline ratios. The batches are windows
of general English text (qtrain's reference text), every position a target.

The physical floor of a config is what no trainer of this recipe can avoid holding at once: quantized
weights and the other frozen weights in the compute dtype, LoRA weights with gradients and AdamW's two fp32
states, each block's checkpointed input, one block's recompute working set (its saved activations, taken
from qtrain's planner), and one chunk (`training.loss_chunk_size` targets) of fp32 logits.

Results and their reading: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
LORA = dict(r=16, alpha=32, dropout=0.0)
LR = 2e-4


def text_stream(tokenizer) -> list[int]:
    """General English (the reference text) followed by the date task's training rows, as one token stream."""
    from qtrain.evaluate import reference_text

    rows = (ROOT / "configs/data/dates-train.jsonl").read_text(encoding="utf-8")
    return tokenizer(reference_text() + "\n" + rows)["input_ids"]


def batches(tokenizer, mb: int, seq: int, n: int) -> list[dict]:
    """n micro-batches of `mb` windows of `seq` tokens each, every position a target."""
    import torch

    stream = torch.tensor(text_stream(tokenizer))
    out, start = [], 0
    for _ in range(n):
        rows = []
        for _ in range(mb):
            if start + seq > len(stream):
                start = 0
            rows.append(stream[start:start + seq])
            start += seq // 2 + 7
        ids = torch.stack(rows)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def rss_reset() -> None:
    """Drop freed heap back to the kernel, then restart the RSS high-water mark from the current RSS."""
    import ctypes

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def rss_peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


_MODEL: Path | None = None  # --model; None: the shipped SmolLM2


def smollm2() -> Path:
    from qtrain.config import ModelSection
    from qtrain.modeling import resolve_model_path

    return resolve_model_path(ModelSection(path="smollm2-135m-instruct"))


def model_dir() -> Path:
    """The checkpoint both systems train: `--model`, or the shipped SmolLM2."""
    return _MODEL or smollm2()


# ------------------------------------------------------------------------------------------- the two systems


def build_baseline(bits: int, dtype, upcast: bool = True):
    """transformers + bitsandbytes + peft as their docs set up QLoRA; returns (model, trainable params, step)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 4:
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=dtype)
    else:
        qc = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir(), quantization_config=qc, dtype=dtype, device_map="cpu")
    if upcast:
        model = prepare_model_for_kbit_training(model)  # use_gradient_checkpointing=True by default
    else:  # the same recipe minus the fp32 upcast of the frozen non-quantized weights
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)

    def step(batch: dict) -> float:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return model, optimizer, step


def qtrain_config(bits: int, dtype_name: str, mb: int, seq: int):
    from qtrain.config import validate_config

    return validate_config({
        "model": {"path": str(model_dir())},
        "quantization": {"bits": bits, "compute_dtype": dtype_name},
        "peft": [{"method": "lora", **LORA, "target_modules": "all-linear"}],
        "data": {"train": str(ROOT / "configs/data/dates-train.jsonl"), "max_seq_len": seq},
        "training": {"micro_batch_size": mb, "learning_rate": LR, "optimizer": "adamw",
                     "gradient_checkpointing": True, "max_steps": 1},
        "output": {"dir": "/tmp/qtrain-compare-unused"},
    })


def build_qtrain(bits: int, dtype_name: str, mb: int, seq: int, checkpointing: bool = True):
    """qtrain's own pieces, wired as `qtrain run` wires them."""
    from accelerate import Accelerator

    from qtrain.memory import loss_chunk_tokens
    from qtrain.methods import build_methods
    from qtrain.modeling import enable_checkpointing, load_model
    from qtrain.train import accumulate_gradients, make_optimizer

    cfg = qtrain_config(bits, dtype_name, mb, seq)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16" if dtype_name == "bfloat16" else "no")
    model = load_model(cfg.model, cfg.quantization, accelerator.device).model
    model.config.use_cache = False
    params: dict = {}
    for method in build_methods(cfg.peft):
        params.update(method.attach(model))
    if checkpointing:
        enable_checkpointing(model)
    model.train()
    optimizer = make_optimizer([{"params": list(params.values()), "lr": LR}], cfg.training)

    chunk = loss_chunk_tokens(cfg.training.loss_chunk_size, "cpu", 0)

    def step(batch: dict) -> float:
        loss, _ = accumulate_gradients(model, [batch], accelerator, chunk)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return model, optimizer, step


def worker(system: str, bits: int, seq: int, mb: int, dtype_name: str, warmup: int, steps: int) -> dict:
    """Measure one system at one grid point in this (fresh) process."""
    import warnings

    import torch
    from transformers import AutoTokenizer

    from planner_accuracy import LiveTensorBytes, existing_tensors

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    t0 = time.perf_counter()
    if system == "qtrain":
        model, optimizer, step = build_qtrain(bits, dtype_name, mb, seq)
    else:
        model, optimizer, step = build_baseline(bits, dtype, upcast=system == "baseline")
    load_s = time.perf_counter() - t0
    data = batches(AutoTokenizer.from_pretrained(model_dir()), mb, seq, warmup + steps + 1)
    losses = [step(b) for b in data[:warmup]]
    rss_reset()
    times = []
    for b in data[warmup:warmup + steps]:
        t = time.perf_counter()
        losses.append(step(b))
        times.append(time.perf_counter() - t)
    rss = rss_peak()
    tracker = LiveTensorBytes()
    with tracker.mode:
        for t in existing_tensors(model, optimizer):
            tracker.add(t)
        losses.append(step(data[-1]))
    sec = statistics.median(times)
    return {"system": system, "bits": bits, "seq": seq, "mb": mb, "dtype": dtype_name,
            "tokens_per_s": mb * seq / sec, "step_s": sec, "times": times, "peak_tensor_bytes": tracker.peak,
            "peak_rss_bytes": rss, "load_s": load_s, "losses": losses}


def floor_bytes(bits: int, seq: int, mb: int, dtype_name: str) -> int:
    """The physical floor of a grid point (module docstring), from the model's config alone."""
    from qtrain.memory import estimate, loss_chunk_tokens, setup_from_config

    cfg = qtrain_config(bits, dtype_name, mb, seq)
    model_cfg = json.loads((model_dir() / "config.json").read_text())
    est = estimate(setup_from_config(cfg, model_cfg, device="cpu"))
    c, d = est.components, est.details
    chunk = min(loss_chunk_tokens(cfg.training.loss_chunk_size, "cpu", 0), mb * (seq - 1))
    return (c["quantized_weights"] + c["other_weights"] + 4 * d["trainable_parameter_count"] * 4
            + model_cfg["num_hidden_layers"] * d["activations_per_layer_checkpointed"] + d["activations_per_layer"]
            + chunk * model_cfg["vocab_size"] * 4)


# ------------------------------------------------------------------------------------------------- curves


CURVE_SYSTEMS = {  # name: (system, compute dtype)
    "baseline as documented, bf16": ("baseline", "bfloat16"),
    "baseline without the fp32 upcast, bf16": ("baseline-no-upcast", "bfloat16"),
    "baseline as documented, fp32": ("baseline", "float32"),
    "qtrain, fp32": ("qtrain", "float32"),
}


def curve_worker(system: str, dtype_name: str, steps: int) -> dict:
    """Train the date task for `steps` steps of 4 examples (the same batches for every system); returns the
    training losses and the held-out loss on 48 examples of configs/data/dates-eval.jsonl."""
    import warnings

    import torch
    from transformers import AutoTokenizer

    from qtrain.config import DataSection
    from qtrain.data import Batches, collate, prepare

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    if system == "qtrain":
        model, _, step = build_qtrain(4, dtype_name, 4, 128)
    else:
        model, _, step = build_baseline(4, dtype, upcast=system == "baseline")
    tok = AutoTokenizer.from_pretrained(model_dir())
    section = DataSection(train=str(ROOT / "configs/data/dates-train.jsonl"), max_seq_len=128)
    train_set, _ = prepare(section.train, section, tok, "data.train")
    eval_set, _ = prepare(str(ROOT / "configs/data/dates-eval.jsonl"), section, tok, "data.eval")
    batches = Batches(train_set, 4, 42, tok.pad_token_id)
    losses = [step(next(batches)) for _ in range(steps)]
    model.eval()
    held_out = [eval_set[i] for i in range(48)]
    total = count = 0.0
    with torch.no_grad():  # the same measurement for both: the HF forward's own mean token loss per batch
        for start in range(0, len(held_out), 8):
            batch = collate(held_out[start:start + 8], tok.pad_token_id)
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += model(**batch).loss.float().item() * n
            count += n
    return {"system": system, "dtype": dtype_name, "losses": losses, "eval_loss": total / count}


def run_worker(*args: str, curve: bool = False, warmup: int = 1) -> dict:
    """One measurement in a fresh process (its RSS and allocator state are its own)."""
    flag = ["--curve-worker"] if curve else ["--warmup", str(warmup), "--worker"]
    if _MODEL is not None:
        flag = ["--model", str(_MODEL), *flag]
    out = subprocess.run([sys.executable, __file__, *flag, *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


GRID = [(bits, seq, mb) for bits in (4, 8) for seq in (256, 1024) for mb in (1, 4)]
GiB = 2**30


def measure_point(bits: int, seq: int, mb: int, args) -> dict:
    """A, B, A, B: two fresh processes per system; the better tokens/s and the lower peaks of each system."""
    runs: dict[str, list[dict]] = {"baseline": [], "qtrain": []}
    for _ in range(args.rounds):
        for system in runs:
            runs[system].append(run_worker(system, str(bits), str(seq), str(mb), args.dtype, str(args.steps),
                                           warmup=args.warmup))
    best = {}
    for system, rs in runs.items():
        best[system] = {"tokens_per_s": max(r["tokens_per_s"] for r in rs),
                        "peak_tensor_bytes": min(r["peak_tensor_bytes"] for r in rs),
                        "peak_rss_bytes": min(r["peak_rss_bytes"] for r in rs),
                        "all_tokens_per_s": [round(r["tokens_per_s"], 1) for r in rs],
                        "losses": rs[0]["losses"]}
    b, q = best["baseline"], best["qtrain"]
    floor = floor_bytes(bits, seq, mb, args.dtype)
    return {"bits": bits, "seq": seq, "mb": mb, "baseline": b, "qtrain": q, "floor_bytes": floor,
            "speed_ratio": q["tokens_per_s"] / b["tokens_per_s"],
            "tensor_ratio": q["peak_tensor_bytes"] / b["peak_tensor_bytes"],
            "rss_ratio": q["peak_rss_bytes"] / b["peak_rss_bytes"],
            "floor_multiple": q["peak_tensor_bytes"] / floor}


def grid_table(rows: list[dict]) -> str:
    mib = lambda n: f"{n / 2**20:,.0f}"  # noqa: E731
    out = ["| bits | seq | mb | tokens/s baseline → qtrain | speed × | peak tensors MiB baseline → qtrain | "
           "tensors × | peak RSS MiB baseline → qtrain | RSS × | floor MiB | qtrain / floor |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, q = r["baseline"], r["qtrain"]
        out.append(f"| {r['bits']} | {r['seq']} | {r['mb']} | {b['tokens_per_s']:.0f} → {q['tokens_per_s']:.0f} | "
                   f"**{r['speed_ratio']:.2f}** | {mib(b['peak_tensor_bytes'])} → {mib(q['peak_tensor_bytes'])} | "
                   f"**{r['tensor_ratio']:.2f}** | {mib(b['peak_rss_bytes'])} → {mib(q['peak_rss_bytes'])} | "
                   f"**{r['rss_ratio']:.2f}** | {mib(r['floor_bytes'])} | **{r['floor_multiple']:.2f}** |")
    return "\n".join(out)


def curves_table(curves: dict[str, dict], every: int = 5) -> str:
    steps = len(next(iter(curves.values()))["losses"])
    marks = [0] + list(range(every - 1, steps, every))
    out = ["| system | " + " | ".join(f"step {i + 1}" for i in marks) + " | held-out loss |",
           "|---|" + "---|" * (len(marks) + 1)]
    for name, c in curves.items():
        out.append(f"| {name} | " + " | ".join(f"{c['losses'][i]:.3f}" for i in marks) +
                   f" | **{c['eval_loss']:.3f}** |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", nargs=6, metavar=("SYSTEM", "BITS", "SEQ", "MB", "DTYPE", "STEPS"))
    ap.add_argument("--curve-worker", nargs=3, metavar=("SYSTEM", "DTYPE", "STEPS"))
    ap.add_argument("--only", nargs="*", help="grid points as bits-seq-mb, e.g. 4-256-4")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="A/B rounds per grid point")
    ap.add_argument("--curve-steps", type=int, default=40)
    ap.add_argument("--curves-only", action="store_true")
    ap.add_argument("--no-curves", action="store_true")
    ap.add_argument("--json", help="also write every measurement here")
    ap.add_argument("--model", type=Path, help="a local checkpoint folder to train instead of the shipped SmolLM2")
    args = ap.parse_args()
    global _MODEL
    _MODEL = args.model
    if args.worker:
        system, bits, seq, mb, dtype_name, steps = args.worker
        print(json.dumps(worker(system, int(bits), int(seq), int(mb), dtype_name, args.warmup, int(steps))))
        return
    if args.curve_worker:
        system, dtype_name, steps = args.curve_worker
        print(json.dumps(curve_worker(system, dtype_name, int(steps))))
        return
    report: dict = {"grid": [], "curves": {}}
    if not args.curves_only:
        points = [g for g in GRID if not args.only or f"{g[0]}-{g[1]}-{g[2]}" in args.only]
        for bits, seq, mb in points:
            row = measure_point(bits, seq, mb, args)
            report["grid"].append(row)
            print(f"{bits}-bit seq {seq} mb {mb}: tokens/s ×{row['speed_ratio']:.2f}, "
                  f"tensors ×{row['tensor_ratio']:.2f}, RSS ×{row['rss_ratio']:.2f}, "
                  f"qtrain/floor {row['floor_multiple']:.2f}", flush=True)
        print("\n" + grid_table(report["grid"]) + "\n", flush=True)
    if not args.no_curves and not args.only:
        for name, (system, dtype_name) in CURVE_SYSTEMS.items():
            report["curves"][name] = run_worker(system, dtype_name, str(args.curve_steps), curve=True)
            print(f"{name}: loss {report['curves'][name]['losses'][0]:.3f} → "
                  f"{report['curves'][name]['losses'][-1]:.3f}, held-out {report['curves'][name]['eval_loss']:.3f}",
                  flush=True)
        print("\n" + curves_table(report["curves"]) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
