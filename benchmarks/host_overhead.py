"""The fixed cost of a training step: ATen operators, device reads and host time where the arithmetic is nothing.

A deep, narrow random Llama (32 layers, 64 wide, 16 tokens; 4-bit NF4, LoRA r=16 on every linear, checkpointing,
AdamW) makes a step's time almost all host-side work: Python, autograd and one dispatch per operator. On a GPU
that work is what a small model's step (or a large one's at micro-batch 1) waits on, so the operator count and
this host time are what a GPU's fixed cost scales with; the same operators run on both. qtrain's step and the
documented baseline's (transformers + bitsandbytes + peft, `prepare_model_for_kbit_training`) are measured side
by side, alternating, in one process.

    python benchmarks/host_overhead.py [--layers 32] [--steps 20] [--profile]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
READS_BACK = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal"}


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def qtrain_step(folder: Path, tokens: int):
    from accelerate import Accelerator

    from qtrain.config import ModelSection, QuantizationSection, TrainingSection
    from qtrain.methods import build_methods
    from qtrain.methods.blocks import LoRABlock
    from qtrain.modeling import enable_checkpointing, load_model
    from qtrain.train import grad_norm_of, make_optimizer, read_on_host, step_gradients

    loaded = load_model(ModelSection(path=str(folder)), QuantizationSection(bits=4), torch.device("cpu"))
    (lora,) = build_methods([LoRABlock(method="lora", r=16, alpha=32, dropout=0.0)])
    params = list(lora.attach(loaded.model).values())
    enable_checkpointing(loaded.model)
    model, acc = loaded.model.train(), Accelerator(cpu=True)
    opt = make_optimizer([{"params": params, "lr": 1e-4}], TrainingSection())
    ids = torch.randint(0, 300, (1, tokens))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}

    def step():
        loss_sum, n = step_gradients(model, [batch], acc, 128)
        read_on_host(loss_sum, n, grad_norm_of(params, 1.0, acc))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def peft_step(folder: Path, tokens: int):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    m = AutoModelForCausalLM.from_pretrained(folder, quantization_config=qc, dtype=torch.float32,
                                             device_map={"": "cpu"})
    m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=True)
    m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                     task_type="CAUSAL_LM")).train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, fused=True)
    ids = torch.randint(0, 300, (1, tokens))

    def step():
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.requires_grad], 1.0)
        loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--profile", action="store_true", help="cProfile qtrain's step: where the host time goes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the operators are tiny; "
                    "more threads measure OpenMP's wake-ups, not dispatch)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from conftest import make_llama_folder

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_llama_folder(Path(tmp) / "deep", tie=False, layers=a.layers, hidden=64)
        steps = {"qtrain": qtrain_step(folder, a.tokens), "peft": peft_step(folder, a.tokens)}
        for name, step in steps.items():
            step()  # warm-up
            mode = Ops()
            with mode:
                step()
            reads = sum(mode.count[k] for k in READS_BACK)
            print(f"{name:7s} ATen operators per step: {sum(mode.count.values()):6d}   value reads: {reads}   "
                  f"top: {', '.join(f'{k} {v}' for k, v in mode.count.most_common(6))}")
        times = {name: [] for name in steps}
        for _ in range(a.steps):  # alternating, so drift hits both
            for name, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, v in med.items():
            print(f"{k:7s} host time per step: {v * 1e3:7.1f} ms (median of {a.steps}; "
                  f"{v * 1e6 / a.layers:.0f} µs per layer)")
        print(f"peft / qtrain: {med['peft'] / med['qtrain']:.2f}x")
        if a.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            for _ in range(5):
                steps["qtrain"]()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
