"""The fixed cost of a training step: ATen operators, device reads and host time where the arithmetic is nothing.

A deep, narrow random Llama (32 layers, 64 wide, 16 tokens; 4-bit NF4, LoRA r=16 on every linear, checkpointing,
AdamW) makes a step's time almost all host-side work: Python, autograd and one dispatch per operator. On a GPU
that work is what a small model's step (or a large one's at micro-batch 1) waits on, so the operator count and
this host time are what a GPU's fixed cost scales with; the same operators run on both. qtrain's step and the
documented baseline's (transformers + bitsandbytes + peft, `prepare_model_for_kbit_training`) are measured side
by side, alternating, in one process.

    python benchmarks/host_overhead.py [--layers 32] [--steps 20] [--profile]
    python benchmarks/host_overhead.py --fused    # also qtrain with training.fused_ops on its Triton path
    python benchmarks/host_overhead.py --compiled # also qtrain with training.compile (inductor, C++ on a CPU)
    python benchmarks/host_overhead.py --optimizer paged_adamw_8bit  # both sides on bitsandbytes' optimizer
    python benchmarks/host_overhead.py --compiled --opaque  # also compiled with every weight through frozen_mm

`--fused` counts what a GPU step would launch with the fused RMSNorm/SwiGLU kernels: the Triton kernels run on
the CPU under Triton's interpreter (this sets TRITON_INTERPRET=1 before anything imports Triton), each call
counted as one launch and the interpreter's own work inside it not counted; the interpreter is slow, so that
run's host time is not measured.

`--compiled` adds qtrain with its decoder blocks through torch.compile (`training.compile`), timed beside the
others after its compile (reported). Its operators are not counted: a
compiled block's operators run inside generated code (C++ loops on a CPU, Triton kernels on a GPU), and dynamo
stops using a compiled frame once it has met the dispatch mode that counts. The host time per step is the
comparable figure.
"""

from __future__ import annotations

import os
import sys

if "--fused" in sys.argv:  # before torch, transformers or bitsandbytes import Triton
    os.environ["TRITON_INTERPRET"] = "1"

import argparse
import collections
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
READS_BACK = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal"}
# operators that only make a new view of a tensor (or detach it) or allocate one: host work, but no kernel on a GPU
# (the caching allocator hands out memory without the device)
VIEWS = {"detach", "view", "_unsafe_view", "permute", "transpose", "t", "slice", "select", "expand", "unsqueeze",
         "squeeze", "alias", "as_strided", "unbind", "split", "split_with_sizes", "narrow", "_reshape_alias",
         "lift_fresh", "empty", "new_empty", "empty_like", "empty_strided", "new_empty_strided"}


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = collections.Counter()
        self.paused = False  # inside a Triton kernel's launch (counted once by `count_launches`)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.count[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_launches(mode: Ops) -> None:
    """Count each call of a `qtrain.triton_kernels` function as one launch, and nothing it does inside."""
    from qtrain import triton_kernels

    for name in ("rms_norm_forward", "rms_norm_backward", "swiglu_forward", "swiglu_backward"):
        def launch(*args, _f=getattr(triton_kernels, name), _name=name):
            mode.count[f"triton {_name}"] += 1
            mode.paused = True
            try:
                return _f(*args)
            finally:
                mode.paused = False
        setattr(triton_kernels, name, launch)


def qtrain_step(folder: Path, tokens: int, fused: bool = False, compiled: bool = False, optimizer: str = "adamw",
                attention: str = "sdpa"):
    from accelerate import Accelerator

    from qtrain.config import ModelSection, QuantizationSection, TrainingSection
    from qtrain.methods import build_methods
    from qtrain.methods.blocks import LoRABlock
    from qtrain.modeling import enable_checkpointing, load_model
    from qtrain.train import grad_norm_of, make_optimizer, read_on_host, step_gradients

    loaded = load_model(ModelSection(path=str(folder), attn_implementation=attention), QuantizationSection(bits=4),
                        torch.device("cpu"))
    (lora,) = build_methods([LoRABlock(method="lora", r=16, alpha=32, dropout=0.0)])
    params = list(lora.attach(loaded.model).values())
    if fused:
        from qtrain.fused import backend_name, enable_fused_ops

        assert backend_name(torch.device("cpu")) == "triton", "the Triton path needs triton installed"
        enable_fused_ops(loaded.model)
    enable_checkpointing(loaded.model)
    if compiled:
        from qtrain.compiled import compile_blocks

        compile_blocks(loaded.model)
    model, acc = loaded.model.train(), Accelerator(cpu=True)
    opt = make_optimizer([{"params": params, "lr": 1e-4}], TrainingSection(optimizer=optimizer))
    ids = torch.randint(0, 300, (1, tokens))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}

    def step():
        loss_sum, n = step_gradients(model, [batch], acc, 128)
        read_on_host(loss_sum, n, grad_norm_of(params, 1.0, acc))
        t0 = time.perf_counter()
        opt.step()
        step.optimizer_times.append(time.perf_counter() - t0)
        opt.zero_grad(set_to_none=True)
    step.optimizer_times = []  # the optimizer step's share of each step's host time
    return step


def every_weight_opaque(step):
    """`step` with quantization.IN_GRAPH_MAX_BYTES = 0 while it runs (it is read, and guarded, when tracing)."""
    import qtrain.quantization as quantization

    def run():
        limit, quantization.IN_GRAPH_MAX_BYTES = quantization.IN_GRAPH_MAX_BYTES, 0
        try:
            step()
        finally:
            quantization.IN_GRAPH_MAX_BYTES = limit
    run.optimizer_times = step.optimizer_times
    return run


def peft_step(folder: Path, tokens: int, optimizer: str = "adamw"):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    m = AutoModelForCausalLM.from_pretrained(folder, quantization_config=qc, dtype=torch.float32,
                                             device_map={"": "cpu"})
    m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=True)
    m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                     task_type="CAUSAL_LM")).train()
    trainable = [p for p in m.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(trainable, lr=1e-4, fused=True)
    else:  # bitsandbytes' own class, as the QLoRA recipe uses it
        import bitsandbytes as bnb

        opt = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
               "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[optimizer](trainable, lr=1e-4)
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
    ap.add_argument("--hidden", type=int, default=64, help="width (LoRA matrices of r x hidden: 4096 elements at "
                    "256, where bnb's 8-bit optimizers keep 8-bit states)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--profile", action="store_true",
                    help="cProfile qtrain's step (the compiled one with --compiled): where the host time goes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the operators are tiny; "
                    "more threads measure OpenMP's wake-ups, not dispatch)")
    ap.add_argument("--compiled", action="store_true", help="also qtrain with training.compile (timed)")
    ap.add_argument("--opaque", action="store_true", help="with --compiled: also compiled with every weight "
                    "multiplied by qtrain::frozen_mm, as a big model's are (quantization.IN_GRAPH_MAX_BYTES)")
    ap.add_argument("--eager-attention", action="store_true", help="with --compiled: also compiled with eager "
                    "attention (no sdpa: a checkpointed compiled block wraps each sdpa, an op aten tags random, in "
                    "the partitioner's RNG-state operators)")
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw_8bit", "paged_adamw_8bit",
                                                             "paged_adamw_32bit"],
                    help="both sides' optimizer (default adamw: torch's fused; the 8-bit ones: bnb's class for peft)")
    ap.add_argument("--fused", action="store_true", help="also count a step with training.fused_ops on its Triton "
                    "path (kernels under Triton's interpreter: counted, not timed)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from conftest import make_llama_folder

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_llama_folder(Path(tmp) / "deep", tie=False, layers=a.layers, hidden=a.hidden)
        steps = {"qtrain": qtrain_step(folder, a.tokens, optimizer=a.optimizer),
                 "peft": peft_step(folder, a.tokens, a.optimizer)}
        if a.compiled:
            steps["qtrain compiled"] = qtrain_step(folder, a.tokens, compiled=True, optimizer=a.optimizer)
            t0 = time.perf_counter()
            steps["qtrain compiled"]()  # compiles the blocks (two graphs: the first block's input needs no grad)
            print(f"qtrain compiled: first step (compiling) {time.perf_counter() - t0:.1f} s")
        if a.compiled and a.eager_attention:
            steps["qtrain compiled eager-attn"] = qtrain_step(folder, a.tokens, compiled=True, optimizer=a.optimizer,
                                                              attention="eager")
            steps["qtrain compiled eager-attn"]()
        if a.compiled and a.opaque:
            steps["qtrain compiled opaque"] = every_weight_opaque(
                qtrain_step(folder, a.tokens, compiled=True, optimizer=a.optimizer))
            steps["qtrain compiled opaque"]()
        # not the compiled steps: dynamo stops running a compiled frame once it has met a dispatch mode
        counted = {k: v for k, v in steps.items() if "compiled" not in k}
        if a.fused:
            counted["qtrain fused (Triton)"] = qtrain_step(folder, a.tokens, fused=True, optimizer=a.optimizer)
        for name, step in counted.items():
            step()  # warm-up
            mode = Ops()
            if "Triton" in name:
                count_launches(mode)
            with mode:
                step()
            reads = sum(mode.count[k] for k in READS_BACK)
            total = sum(mode.count.values())
            kernels = total - sum(v for k, v in mode.count.items() if k in VIEWS)
            top = [f"{k} {v}" for k, v in mode.count.most_common(30) if k not in VIEWS][:7]
            print(f"{name:7s} ATen operators (+ Triton launches) per step: {total:6d}, of which kernels "
                  f"{kernels:6d}   value reads: {reads}   top kernels: {', '.join(top)}")
        times = {name: [] for name in steps}
        for _ in range(a.steps):  # alternating, so drift hits both
            for name, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, v in med.items():
            opt_times = getattr(steps[k], "optimizer_times", None)
            share = f", optimizer step {statistics.median(opt_times[-a.steps:]) * 1e3:.1f} ms" if opt_times else ""
            print(f"{k:15s} host time per step: {v * 1e3:7.1f} ms (median of {a.steps}; "
                  f"{v * 1e6 / a.layers:.0f} µs per layer{share})")
        print(f"peft / qtrain: {med['peft'] / med['qtrain']:.2f}x")
        if a.compiled:
            print(f"peft / qtrain compiled: {med['peft'] / med['qtrain compiled']:.2f}x, qtrain / qtrain compiled: "
                  f"{med['qtrain'] / med['qtrain compiled']:.2f}x")
        if a.profile:
            import cProfile
            import pstats

            name = "qtrain compiled" if a.compiled else "qtrain"
            print(f"cProfile of {name}'s step (5 steps):")
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(5):
                steps[name]()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
