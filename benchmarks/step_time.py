"""Where one qtrain training step's time goes on this machine: the setup of `compare.py` (SmolLM2, frozen base in
4-bit or 8-bit, LoRA r=16 on every linear, float32, gradient checkpointing, AdamW), split into

- frozen GEMMs: the base weights' matmuls in forward, recompute and input gradients (their GFLOP and rate),
- dequantization: writing each frozen weight in float32 before its matmul (three times per linear per step),
- loss head: the chunked cross-entropy with its gradient (`HeadCrossEntropy`, the tied 49k-vocabulary head),
- attention: scaled-dot-product attention at the step's shapes, timed on its own (forward twice, backward once,
  as checkpointing runs it),
- the rest: the norms, RoPE, SiLU and residual passes, LoRA's low-rank products, autograd, the optimizer and
  Python; the step time of a 16-token micro-batch (no compute to speak of) shows its fixed part.

and the peak of live tensor bytes over one more (untimed) step, counted as `compare.py` counts it.

    python benchmarks/step_time.py                      # 4-bit, 1x256, 4x256, 1x1024, 4x1024: ~5 minutes
    python benchmarks/step_time.py --bits 8 --points 4x256
    python benchmarks/step_time.py --no-checkpointing   # what the recompute costs, and what dropping it costs

One process per call; timers wrap the functions named above (`qtrain.methods.lora.linear_product`,
`linear_input_grad`, `qtrain.quantization.matmul_weight` and `_int8_values`, `HeadCrossEntropy._forward`).
Medians of `--steps` steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

import compare
import qtrain.methods.lora as lora
import qtrain.quantization as quantization
from planner_accuracy import LiveTensorBytes, existing_tensors
from qtrain.numerics import HeadCrossEntropy

CLOCK: dict[str, float] = collections.defaultdict(float)  # seconds per component in the current step


def timed(name: str, fn, flops=None):
    """`fn` with its wall time (and, given `flops(*args)`, its FLOP count) added to CLOCK."""
    def wrapper(*args):
        start = time.perf_counter()
        out = fn(*args)
        CLOCK[name] += time.perf_counter() - start
        if flops is not None:
            CLOCK[name + " flop"] += flops(*args)
        return out
    return wrapper


def install_timers() -> None:
    """Wrap the frozen products (which call `matmul_weight` inside: its time is taken out of theirs below)."""
    lora.linear_product = timed("products", lora.linear_product,
                                lambda x2, layer, *_: 2 * x2.shape[0] * x2.shape[1] * layer.out_features)
    lora.linear_input_grad = timed("products", lora.linear_input_grad,
                                   lambda gy2, layer, *_: 2 * gy2.shape[0] * gy2.shape[1] * layer.in_features)
    quantization.matmul_weight = timed("dequantize", quantization.matmul_weight)
    quantization._int8_values = timed("dequantize", quantization._int8_values)  # 8-bit below `in` tokens
    HeadCrossEntropy._forward = staticmethod(timed("loss head", HeadCrossEntropy._forward))


def attention_seconds(config, mb: int, seq: int, checkpointing: bool, repeats: int = 3) -> float:
    """SDPA at one block's shapes, forward twice (once without checkpointing) and backward once, times the
    number of blocks."""
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    dim = config.hidden_size // heads
    q = torch.randn(mb, heads, seq, dim, requires_grad=True)
    k, v = (torch.randn(mb, kv, seq, dim, requires_grad=True) for _ in range(2))

    def once() -> float:
        start = time.perf_counter()
        if checkpointing:
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
        return time.perf_counter() - start

    once()
    return statistics.median(once() for _ in range(repeats)) * config.num_hidden_layers


def measure(bits: int, mb: int, seq: int, steps: int, checkpointing: bool) -> dict[str, float]:
    model, optimizer, step = compare.build_qtrain(bits, "float32", mb, seq, checkpointing)
    tokenizer = AutoTokenizer.from_pretrained(compare.smollm2())
    data = compare.batches(tokenizer, mb, seq, steps + 2)
    tiny = compare.batches(tokenizer, 1, 16, steps + 1)
    step(data[0])
    runs = []
    for batch in data[1:-1]:
        CLOCK.clear()
        start = time.perf_counter()
        step(batch)
        runs.append({"step": time.perf_counter() - start, **CLOCK})
    row = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    step(tiny[0])
    row["16-token step"] = statistics.median(_seconds(step, b) for b in tiny[1:])
    tracker = LiveTensorBytes()
    with tracker.mode:
        for t in existing_tensors(model, optimizer):
            tracker.add(t)
        step(data[-1])  # last, as in compare.py: the tracked step is not timed
    row["peak MiB"] = tracker.peak / 2**20
    row["attention"] = attention_seconds(model.config, mb, seq, checkpointing)
    row["frozen GEMMs"] = row.pop("products") - row["dequantize"]
    row["rest"] = row["step"] - sum(row[k] for k in ("frozen GEMMs", "dequantize", "loss head", "attention"))
    return row


def _seconds(step, batch) -> float:
    start = time.perf_counter()
    step(batch)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8])
    parser.add_argument("--points", nargs="+", default=["1x256", "4x256", "1x1024", "4x1024"],
                        help="micro-batch x sequence length")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    args = parser.parse_args()
    install_timers()
    torch.manual_seed(0)
    print(f"{args.bits}-bit, float32, checkpointing {'on' if args.checkpointing else 'off'}: seconds per step "
          "(share of the step); frozen GEMMs with their rate; peak live tensors")
    print("| mb x seq | step | frozen GEMMs | dequantize | loss head | attention | rest | 16-token step | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for point in args.points:
        mb, seq = (int(v) for v in point.split("x"))
        r = measure(args.bits, mb, seq, args.steps, args.checkpointing)
        share = lambda k: f"{r[k]:.2f} ({100 * r[k] / r['step']:.0f} %)"  # noqa: E731
        rate = r["products flop"] / r["frozen GEMMs"] / 1e9
        print(f"| {mb} x {seq} | {r['step']:.2f} | {share('frozen GEMMs')}, {rate:.0f} GFLOP/s | "
              f"{share('dequantize')} | {share('loss head')} | {share('attention')} | {share('rest')} | "
              f"{r['16-token step']:.2f} | {r['peak MiB']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
