"""A LoRA layer's training step on CPU with its frozen weight dequantized into a fresh tensor per matmul (as
bitsandbytes and qtrain before it did) vs into qtrain's reused buffer (`quantization.matmul_weight`).

    python benchmarks/weight_buffers.py                  # 4-bit and 8-bit, three Llama MLP shapes, ~2 minutes
    python benchmarks/weight_buffers.py --tokens 512

One process; per shape the two ways alternate (A, B, A, B) over the same layer and input, each timing the
forward + backward of `LoRALinear` (r=16, fp32 compute) over `--tokens` tokens. Printed per way: milliseconds per
step (median), minor page faults per step and system CPU seconds per step (`getrusage`), then the ratio. The
shapes are the MLP up projections of SmolLM2-135M (576 → 1536), TinyLlama-1.1B (2048 → 5632) and Llama-2-7B
(4096 → 11008): their fp32 weights are 3.5, 46 and 180 MB, against glibc's 32 MB ceiling for reusing freed
blocks instead of mapping new ones.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
from torch import nn

import qtrain.methods.lora as lora_module
from qtrain.methods.lora import LoRALinear
from qtrain.quantization import QuantSpec, dequantized_weight, matmul_weight, quantize_linear

SHAPES = {"SmolLM2-135M": (576, 1536), "TinyLlama-1.1B": (2048, 5632), "Llama-2-7B": (4096, 11008)}


def fresh_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The previous behaviour: a new dense tensor per call."""
    return dequantized_weight(layer, dtype)


def measure(layer: nn.Module, x: torch.Tensor, steps: int) -> tuple[float, float, float]:
    times, r0 = [], resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        t = time.perf_counter()
        layer(x).sum().backward()
        times.append(time.perf_counter() - t)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return (statistics.median(times) * 1e3, (r1.ru_minflt - r0.ru_minflt) / steps,
            (r1.ru_stime - r0.ru_stime) / steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"LoRA r=16 forward + backward over {args.tokens} tokens, fp32, {torch.get_num_threads()} threads\n")
    print("| bits | model (in → out) | fresh ms | reused ms | speed × | faults/step fresh → reused "
          "| system s/step fresh → reused |")
    print("|---|---|---:|---:|---:|---|---|")
    for bits in (4, 8):
        for name, (n_in, n_out) in SHAPES.items():
            layer = LoRALinear(quantize_linear(nn.Linear(n_in, n_out, bias=False), QuantSpec(bits)), 16, 32).train()
            x = torch.randn(args.tokens, n_in, requires_grad=True)
            best = {}
            for _ in range(args.rounds):
                for way, fn in (("fresh", fresh_weight), ("reused", matmul_weight)):
                    lora_module.matmul_weight = fn
                    layer(x).sum().backward()  # warm-up: the reused buffer exists before timing
                    m = measure(layer, x, args.steps)
                    best[way] = min(best.get(way, m), m)  # the better round of each way
            lora_module.matmul_weight = matmul_weight
            (fm, ff, fs), (rm, rf, rs) = best["fresh"], best["reused"]
            print(f"| {bits} | {name} ({n_in} → {n_out}) | {fm:.1f} | {rm:.1f} | **{fm / rm:.2f}** "
                  f"| {ff:,.0f} → {rf:,.0f} | {fs:.3f} → {rs:.3f} |", flush=True)
            del layer, x


if __name__ == "__main__":
    main()
