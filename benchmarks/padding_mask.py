"""Right-padded rows with and without their attention mask: one qtrain training step each, side by side.

    python benchmarks/padding_mask.py                    # SmolLM2 (shipped), 4-bit, LoRA r=16, 8 x 256
    python benchmarks/padding_mask.py --seq 512 --steps 5

qtrain gives right-padded batches no attention mask (`qtrain.train.without_right_padding_mask`): causal
attention alone gives their real tokens the same result. The other side is the same step given the mask, as
transformers + peft are given it: transformers then attends through a masked kernel wherever a row is padded.
Rows are padded from half their length up (row i keeps T/2 + i·T/(2B) tokens), checkpointing on, float32;
the steps alternate, the first of each is a warm-up, medians are printed with their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    from accelerate import Accelerator

    import qtrain.train as train
    from qtrain.config import ModelSection, QuantizationSection
    from qtrain.methods import build_methods
    from qtrain.methods.blocks import LoRABlock
    from qtrain.modeling import enable_checkpointing, load_model

    torch.manual_seed(0)
    loaded = load_model(ModelSection(path=a.model), QuantizationSection(bits=4), torch.device("cpu"))
    (lora,) = build_methods([LoRABlock(method="lora", r=16, alpha=32, dropout=0.0)])
    lora.attach(loaded.model)
    enable_checkpointing(loaded.model)
    model, acc = loaded.model.train(), Accelerator(cpu=True)
    ids = torch.randint(10, loaded.model.config.vocab_size, (a.batch, a.seq))
    mask = torch.ones_like(ids)
    for i in range(a.batch):
        mask[i, a.seq // 2 + i * a.seq // (2 * a.batch):] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    strip = train.without_right_padding_mask
    sides = {"with the mask": lambda b: b, "qtrain (no mask)": strip}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for step in range(a.steps + 1):
        for name, prepare in sides.items():
            train.without_right_padding_mask = prepare
            t0 = time.perf_counter()
            train.step_gradients(model, [batch], acc, 128)
            if step:
                times[name].append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    train.without_right_padding_mask = strip
    med = {k: statistics.median(v) for k, v in times.items()}
    real = int(mask.sum())
    for name, s in med.items():
        print(f"{name:17s} {s:6.2f} s/step  {real / s:6.0f} real tokens/s")
    print(f"qtrain / with the mask: {med['with the mask'] / med['qtrain (no mask)']:.2f}x "
          f"({a.batch} x {a.seq}, {real} real tokens, median of {a.steps})")


if __name__ == "__main__":
    main()
