"""A LoRA layer's training step on CPU with its frozen weight dequantized into a fresh tensor per matmul (as
bitsandbytes and qtrain before it did) vs into qtrain's reused buffer (`quantization.matmul_weight`); then a
quantized layer's no-grad forward (evaluation, scoring, generation) through bitsandbytes' own layer vs qtrain's
(`quantization.FrozenMatmul`, the same buffer).

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

import qtrain.quantization as quantization
from qtrain.methods.lora import LoRALinear
from qtrain.quantization import QuantSpec, dequantized_weight, matmul_weight, quantize_linear

SHAPES = {"SmolLM2-135M": (576, 1536), "TinyLlama-1.1B": (2048, 5632), "Llama-2-7B": (4096, 11008)}


def fresh_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The previous behaviour: a new dense tensor per call."""
    return dequantized_weight(layer, dtype)


def measure(layer: nn.Module, x: torch.Tensor, steps: int, backward: bool = True) -> tuple[float, float, float]:
    times, r0 = [], resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        t = time.perf_counter()
        if backward:
            layer(x).sum().backward()
        else:
            with torch.no_grad():
                layer(x)
        times.append(time.perf_counter() - t)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return (statistics.median(times) * 1e3, (r1.ru_minflt - r0.ru_minflt) / steps,
            (r1.ru_stime - r0.ru_stime) / steps)


def alternate(layer: nn.Module, x: torch.Tensor, ways: dict, args, backward: bool = True) -> tuple[dict, dict]:
    """Per round each way in turn: `ways[way]()` selects it, one warm-up call (the reused buffer exists before
    timing), then `measure`. Returns the better round of each way and each way's output."""
    best, outs = {}, {}
    for _ in range(args.rounds):
        for way, select in ways.items():
            select()
            with torch.set_grad_enabled(backward):
                out = layer(x)
                if backward:
                    out.sum().backward()
            outs[way] = out.detach()
            m = measure(layer, x, args.steps, backward)
            best[way] = min(best.get(way, m), m)
    return best, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    train_rows, eval_rows = [], []
    for bits in (4, 8):
        for name, (n_in, n_out) in SHAPES.items():
            label = f"| {bits} | {name} ({n_in} → {n_out}) |"
            layer = LoRALinear(quantize_linear(nn.Linear(n_in, n_out, bias=False), QuantSpec(bits)), 16, 32).train()
            x = torch.randn(args.tokens, n_in, requires_grad=True)
            best, _ = alternate(layer, x, {"fresh": lambda: setattr(quantization, "matmul_weight", fresh_weight),
                                           "reused": lambda: setattr(quantization, "matmul_weight", matmul_weight)},
                                args)
            quantization.matmul_weight = matmul_weight
            (fm, ff, fs), (rm, rf, rs) = best["fresh"], best["reused"]
            train_rows.append(f"{label} {fm:.1f} | {rm:.1f} | **{fm / rm:.2f}** | {ff:,.0f} → {rf:,.0f} "
                              f"| {fs:.3f} → {rs:.3f} |")
            base = layer.base_layer.eval()  # the quantized layer alone, no grad: evaluation and generation
            ours, theirs = type(base), type(base).__mro__[1]  # qtrain's class and the bnb class it extends
            best, outs = alternate(base, x.detach(), {"bnb": lambda: setattr(base, "__class__", theirs),
                                                      "qtrain": lambda: setattr(base, "__class__", ours)},
                                   args, backward=False)
            (bm, bf, _), (qm, qf, _) = best["bnb"], best["qtrain"]
            diff = (outs["bnb"] - outs["qtrain"]).abs().max().item()
            eval_rows.append(f"{label} {bm:.1f} | {qm:.1f} | **{bm / qm:.2f}** | {bf:,.0f} → {qf:,.0f} "
                             f"| {diff:.1e} |")
            print(train_rows[-1], eval_rows[-1], flush=True)  # progress
            del layer, base, x
    print(f"\nLoRA r=16 forward + backward over {args.tokens} tokens, fp32, {torch.get_num_threads()} threads\n")
    print("| bits | model (in → out) | fresh ms | reused ms | speed × | faults/step fresh → reused "
          "| system s/step fresh → reused |")
    print("|---|---|---:|---:|---:|---|---|")
    print("\n".join(train_rows))
    print(f"\nNo-grad forward of the quantized layer alone over {args.tokens} tokens, fp32, eval mode\n")
    print("| bits | model (in → out) | bnb's layer ms | qtrain's ms | speed × | faults/call bnb → qtrain "
          "| max |difference| |")
    print("|---|---|---:|---:|---:|---|---:|")
    print("\n".join(eval_rows))

if __name__ == "__main__":
    main()
