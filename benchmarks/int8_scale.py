"""Where an 8-bit weight's row scale goes on CPU: on the weight (W = Q·diag-scale written out before every matmul)
or on the product's (tokens × out) side, which `quantization.linear_product` / `linear_input_grad` choose when a
product has fewer tokens than the layer has inputs (token-by-token generation, scoring and training on short
micro-batches). The second way writes the weight once (the int8 values in float32) instead of writing it and
rescaling it in place.

    python benchmarks/int8_scale.py                 # one layer at three Llama MLP shapes + SmolLM2 decoding, ~2 min
    python benchmarks/int8_scale.py --model /tmp/qtrain-bench-tinyllama-1.1b-random   # also decode a 1.1B model

One process. Per shape and token count the two ways alternate (A, B, A, B) on the same qtrain 8-bit layer and
input: no-grad forward, median of `--steps` calls, the better round; bitsandbytes' own 8-bit layer (int8
activations, other numbers) is timed alongside for reference. Then greedy decoding through `qtrain.serve.Server`
in 8-bit, `--new-tokens` tokens per prompt, the ways alternating, tokens/s of each run and whether the two ways
generated the same tokens. The weight-side way is what the code did before (selected by patching
`quantization._int8_row_scale` to decline).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import bitsandbytes as bnb
import qtrain.quantization as quantization
from qtrain.quantization import QuantSpec, quantize_linear

SHAPES = {"SmolLM2-135M": (576, 1536), "TinyLlama-1.1B": (2048, 5632), "Llama-2-7B": (4096, 11008)}
ROW_SCALE = quantization._int8_row_scale
WAYS = {"weight": lambda *_: None, "rows": ROW_SCALE}  # what `_int8_row_scale` is, per way


def select(way: str) -> None:
    quantization._int8_row_scale = WAYS[way]


def forward_ms(layer: nn.Module, x: torch.Tensor, steps: int) -> float:
    times = []
    with torch.no_grad():
        layer(x)
        for _ in range(steps):
            t = time.perf_counter()
            layer(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def layer_table(args) -> str:
    rows = ["| model (in → out) | tokens | weight-scaled ms | row-scaled ms | speed × | max rel. difference "
            "| bnb's int8 layer ms |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, (n_in, n_out) in SHAPES.items():
        dense = nn.Linear(n_in, n_out, bias=False)
        layer = quantize_linear(dense, QuantSpec(bits=8)).eval()
        theirs = bnb.nn.Linear8bitLt(n_in, n_out, bias=False, has_fp16_weights=False)
        theirs.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        theirs = theirs.to("cpu").eval()  # .to() quantizes (bnb's Int8Params)
        for tokens in args.tokens:
            x = torch.randn(tokens, n_in)
            steps = max(3, min(args.steps, int(4e9 / (n_in * n_out * max(tokens, 8)))))
            best, outs = {}, {}
            for _ in range(args.rounds):
                for way in WAYS:
                    select(way)
                    best[way] = min(best.get(way, float("inf")), forward_ms(layer, x, steps))
                    with torch.no_grad():
                        outs[way] = layer(x)
            select("rows")
            theirs_ms = forward_ms(theirs, x, steps)
            diff = ((outs["rows"] - outs["weight"]).abs().max() / outs["weight"].abs().max()).item()
            rows.append(f"| {name} ({n_in} → {n_out}) | {tokens} | {best['weight']:.2f} | {best['rows']:.2f} | "
                        f"**{best['weight'] / best['rows']:.2f}** | {diff:.1e} | {theirs_ms:.2f} |")
            print(rows[-1], flush=True)
    return "\n".join(rows)


PROMPTS = ["Write one sentence about the sea.", "List three colours.", "What is 12 times 7?"]


def decode_table(models: list[str], args) -> str:
    from qtrain.serve import Server

    rows = ["| model | tokens/s weight-scaled | tokens/s row-scaled | speed × | same tokens |",
            "|---|---|---|---:|---|"]
    for source in models:
        server = Server.from_model(source, bits=8, device="cpu")
        rates: dict[str, list[float]] = {way: [] for way in WAYS}
        texts: dict[str, list[str]] = {way: [] for way in WAYS}
        server.generate(PROMPTS[0], max_new_tokens=2)  # warm-up
        for _ in range(args.rounds):
            for way in WAYS:
                select(way)
                t, outs = time.perf_counter(), []
                for prompt in PROMPTS:
                    outs.append(server.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens))
                rates[way].append(len(PROMPTS) * args.new_tokens / (time.perf_counter() - t))
                texts[way] = outs
        select("rows")
        same = "yes" if texts["weight"] == texts["rows"] else "no"
        name = Path(source).name
        rows.append(f"| {name} | {', '.join(f'{r:.2f}' for r in rates['weight'])} | "
                    f"{', '.join(f'{r:.2f}' for r in rates['rows'])} | "
                    f"**{max(rates['rows']) / max(rates['weight']):.2f}** | {same} |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--model", action="append", default=[], help="another model folder to decode (repeatable)")
    args = ap.parse_args()
    torch.manual_seed(0)
    from compare import smollm2

    print(f"8-bit, no-grad forward of one layer, fp32, {torch.get_num_threads()} threads\n")
    layers = layer_table(args)
    print(f"\ngreedy decoding, 8-bit, {args.new_tokens} new tokens × {len(PROMPTS)} prompts per run\n")
    decode = decode_table([str(smollm2()), *args.model], args)
    print("\n" + layers + "\n\n" + decode)


if __name__ == "__main__":
    main()
