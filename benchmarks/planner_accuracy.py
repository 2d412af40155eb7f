"""How close is `qtrain plan` to what a real training step uses? Predicted vs measured peak over a config grid.

    python benchmarks/planner_accuracy.py            # the whole grid (a few minutes on 2 CPU cores)
    python benchmarks/planner_accuracy.py --only 0 3 # some points

Each grid point runs in a fresh process: it builds a random-weight Llama folder (two sizes, cached under
/tmp), loads it with qtrain's own loader (4-bit, 8-bit or unquantized), attaches the PEFT methods, and runs
two optimizer steps with `qtrain.train.accumulate_gradients` and the configured optimizer (the second step is
the steady state: optimizer states exist). On CPU the measured peak is the maximum of live tensor bytes: a
TorchDispatchMode sees every tensor an op returns, counts each storage once, and a weakref finalizer subtracts
it when it is freed; the model's and optimizer's existing tensors are registered first. This is what the
planner's `tensor_bytes` predicts (its peak minus the runtime overhead). Peak RSS is printed alongside against
the full prediction. On a GPU the measured peak is `torch.cuda.max_memory_allocated`.

Batches have every position as a target (the planner's worst case) except that the last sequence of a
micro-batch is 8 tokens shorter, so a padding mask exists as in real batches.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # name → LlamaConfig fields; "medium" has GQA 4:1, both a realistic vocabulary-to-hidden ratio
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=8000, tie_word_embeddings=True),
    "medium": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
                   num_key_value_heads=2, vocab_size=12000, tie_word_embeddings=False),
}
LORA = {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
QV = ["q_proj", "v_proj"]
# (model, bits, checkpointing, LoRA overrides, micro-batch, seq len, optimizer, attention, compute dtype[, training
# switches]); the switches (fused_ops, mlp_chunk_tokens) are applied as `qtrain run` applies them
FUSED = {"fused_ops": True}
GRID = [
    ("small", 4, False, {}, 2, 256, "adamw", "sdpa", "auto"),
    ("small", 4, True, {}, 4, 256, "adamw", "sdpa", "auto"),
    ("small", 8, False, {"r": 8}, 2, 128, "adamw", "sdpa", "auto"),
    ("small", "none", False, {"r": 64}, 1, 384, "adamw", "sdpa", "auto"),
    ("small", "none", True, {"r": 64}, 4, 256, "adamw_8bit", "sdpa", "auto"),
    ("small", 4, False, {"target_modules": QV}, 4, 128, "adamw", "sdpa", "auto"),
    ("small", 4, False, {}, 2, 256, "adamw", "eager", "auto"),
    ("small", 4, False, {"dropout": 0.1}, 2, 128, "adamw", "sdpa", "bfloat16"),
    ("medium", 4, False, {}, 2, 128, "adamw", "sdpa", "auto"),
    ("medium", 4, True, {}, 4, 256, "adamw", "sdpa", "auto"),
    ("medium", 8, True, {"r": 8}, 2, 256, "adamw_8bit", "sdpa", "auto"),
    ("medium", 8, False, {"r": 32}, 1, 256, "adamw", "sdpa", "auto"),
    ("medium", "none", False, {"r": 4}, 2, 128, "adamw", "sdpa", "auto"),
    ("medium", "none", True, {}, 8, 64, "paged_adamw_8bit", "sdpa", "auto"),
    ("medium", 4, True, {"r": 64, "target_modules": QV}, 2, 192, "adamw", "sdpa", "bfloat16"),
    ("medium", 8, True, {"target_modules": QV}, 4, 256, "adamw", "sdpa", "auto"),
    ("medium", 4, True, {"target_modules": QV}, 4, 256, "adamw", "sdpa", "auto"),
    # fused RMSNorm and silu·up (training.fused_ops) in 16-bit compute, and with the tiled MLP at longer sequences
    ("medium", 4, False, {}, 2, 512, "adamw", "sdpa", "bfloat16", FUSED),
    ("medium", 4, True, {}, 2, 512, "adamw", "sdpa", "bfloat16", FUSED),
    ("medium", 4, True, {}, 1, 4096, "adamw", "sdpa", "bfloat16", {}),
    ("medium", 4, True, {}, 1, 4096, "adamw", "sdpa", "bfloat16", FUSED),
    ("medium", 4, True, {}, 1, 4096, "adamw", "sdpa", "bfloat16", {"mlp_chunk_tokens": 512}),
    ("medium", 4, True, {}, 1, 4096, "adamw", "sdpa", "bfloat16", {**FUSED, "mlp_chunk_tokens": 512}),
    ("small", 4, False, {"target_modules": QV}, 4, 256, "adamw", "sdpa", "auto", FUSED),
    # DoRA: its rescaling keeps W·x and the update in fp32 per token; its weight norm makes three (out, in) fp32
    ("small", 4, False, {"dora": True, "dropout": 0.1}, 2, 128, "adamw", "sdpa", "auto"),
    ("medium", 4, True, {"dora": True}, 2, 256, "adamw", "sdpa", "bfloat16"),
]


def model_folder(name: str) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tokenizer

    size = MODELS[name]
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"qtrain-bench-{name}-{size['hidden_size']}-{size['vocab_size']}"
    if (path / "model.safetensors").is_file():
        return path
    tok = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(**MODELS[name], max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def config_for(point: tuple, model_dir: Path):
    from qtrain.config import validate_config

    _, bits, ckpt, lora, mb, seq, optimizer, attn, dtype, *switches = point
    return validate_config({
        "model": {"path": str(model_dir), "attn_implementation": attn},
        "quantization": {"bits": bits, "compute_dtype": dtype}, "peft": [{**LORA, **lora}],
        "data": {"train": "unused.jsonl", "max_seq_len": seq},
        "training": {"micro_batch_size": mb, "gradient_checkpointing": ckpt, "optimizer": optimizer,
                     "fused_ops": False, "mlp_chunk_tokens": None, "activation_offload": False,
                     **(switches[0] if switches else {})},
    })


class LiveTensorBytes:
    """Peak of the bytes of all live tensor storages, each counted once, while the mode is active."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self
        self.live = self.peak = 0
        self._ids: set[int] = set()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    tracker.add(t)
                return out

        self.mode = Mode()

    def add(self, t) -> None:
        import torch

        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        storage = t.untyped_storage()  # one Python object per storage (PyObject preservation)
        key, n = id(storage), storage.nbytes()
        if key in self._ids:
            return
        self._ids.add(key)
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, n)

    def _free(self, key: int, n: int) -> None:
        self._ids.discard(key)
        self.live -= n


def existing_tensors(model, optimizer):
    """Everything alive before a step: parameters, buffers, bnb quantization constants, optimizer state,
    reused weight buffers."""
    for t in list(model.parameters()) + list(model.buffers()):
        yield t
    for module in model.modules():
        w = getattr(module, "weight", None)
        qs = getattr(w, "quant_state", None)
        if qs is not None:
            yield from (qs.absmax, qs.code)
            if qs.state2 is not None:
                yield from (qs.state2.absmax, qs.state2.code)
        if getattr(w, "SCB", None) is not None:
            yield w.SCB
    for state in optimizer.state.values():
        yield from (v for v in state.values() if hasattr(v, "untyped_storage"))
    from qtrain.quantization import scratch_tensors

    yield from scratch_tensors()  # qtrain's reused dequantization buffers (empty in a baseline process)


def measure(index: int) -> dict:
    """Run one grid point in this process; returns predicted and measured bytes."""
    import resource
    import warnings

    import torch
    from accelerate import Accelerator

    from qtrain.memory import loss_chunk_tokens
    from qtrain.methods import build_methods
    from qtrain.modeling import load_model, resolve_compute_dtype
    from qtrain.planner import estimate, read_model_config, setup_from_config
    from qtrain.run import apply_switches
    from qtrain.train import accumulate_gradients, make_optimizer

    warnings.filterwarnings("ignore")
    point = GRID[index]
    path = model_folder(point[0])
    cfg = config_for(point, path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    est = estimate(setup_from_config(cfg, read_model_config(cfg), device=device))

    dtype = resolve_compute_dtype(cfg.quantization.compute_dtype, torch.device(device))
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")  # as `qtrain run` does
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=precision)
    model = load_model(cfg.model, cfg.quantization, accelerator.device, path=path).model
    model.config.use_cache = False
    params: dict = {}
    for method in build_methods(cfg.peft):
        params.update(method.attach(model))
    apply_switches(model, cfg, accelerator.device)
    model.train()
    optimizer = make_optimizer([{"params": list(params.values()), "lr": 1e-4}], cfg.training)
    mb, seq, vocab = cfg.training.micro_batch_size, cfg.data.max_seq_len, model.config.vocab_size
    g = torch.Generator().manual_seed(index)

    def batch() -> dict:
        ids = torch.randint(0, vocab, (mb, seq), generator=g)
        mask = torch.ones_like(ids)
        if mb > 1:
            mask[-1, -8:] = 0  # a padded last row, as real batches have
        labels = ids.masked_fill(mask == 0, -100)
        return {k: v.to(accelerator.device) for k, v in
                {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}

    tracker = LiveTensorBytes()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with tracker.mode:
        for t in existing_tensors(model, optimizer):
            tracker.add(t)
        for _ in range(2):
            accumulate_gradients(model, [batch()], accelerator, loss_chunk_tokens(cfg.training.loss_chunk_size, device,
                                                                                   model.config.vocab_size))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    measured = torch.cuda.max_memory_allocated() if device == "cuda" else tracker.peak
    return {"index": index, "predicted": est.details["tensor_bytes"], "measured": measured,
            "predicted_total": est.peak, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "seconds": round(time.perf_counter() - start, 1), "components": est.components, "device": device}


def describe(point: tuple) -> str:
    name, bits, ckpt, lora, mb, seq, optimizer, attn, dtype, *switches = point
    targets = lora.get("target_modules", "all-linear")
    targets = targets if isinstance(targets, str) else ",".join(t.split("_")[0] for t in targets)
    shown = {"fused_ops": "fused", "mlp_chunk_tokens": "tiled MLP"}
    extra = ", ".join(f"{shown[k]} {v}" if v is not True else shown[k] for k, v in (switches or [{}])[0].items())
    targets += " DoRA" if lora.get("dora") else ""
    return (f"{name:6} | {str(bits):4} | {'on ' if ckpt else 'off'} | {lora.get('r', LORA['r']):3} | {targets:10} | "
            f"{mb:2} | {seq:4} | {optimizer:16} | {attn:5} | {dtype.replace('auto', 'fp32')} | {extra or '-'}")


# LLaMA-1 shapes (Touvron et al. 2023, Table 2), the models of the QLoRA paper's memory claims
LLAMA1 = {"7B": (4096, 11008, 32, 32), "13B": (5120, 13824, 40, 40), "33B": (6656, 17920, 60, 52),
          "65B": (8192, 22016, 80, 64)}


def published() -> None:
    """Predictions for the setting of the QLoRA paper's memory figures (Dettmers et al. 2023, arXiv:2305.14314):
    NF4 + double quantization, LoRA r=64 on every linear layer, bf16 compute, batch 1 × 512 tokens, gradient
    checkpointing, paged 32-bit AdamW. No torch needed: this is the planner alone."""
    from qtrain.config import validate_config
    from qtrain.memory import estimate, setup_from_config

    print("| model | quantized weights GiB | LoRA params+grads+states GiB | activations and working sets GiB | "
          "predicted peak GiB | pageable GiB |")
    print("|---|---|---|---|---|---|")
    for name, (hidden, inter, layers, heads) in LLAMA1.items():
        model_cfg = {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
                     "num_attention_heads": heads, "vocab_size": 32000, "torch_dtype": "float16"}
        cfg = validate_config({"peft": [{"method": "lora", "r": 64, "alpha": 16, "dropout": 0.05}],
                               "data": {"train": "unused.jsonl", "max_seq_len": 512},
                               "training": {"micro_batch_size": 1, "gradient_checkpointing": True,
                                            "optimizer": "paged_adamw_32bit"}})
        est = estimate(setup_from_config(cfg, model_cfg, device="cuda"))
        c, g = est.components, 2**30
        lora = c["trainable_params"] + c["gradients"] + c["optimizer_states"]
        print(f"| {name} | {c['quantized_weights'] / g:.2f} | {lora / g:.2f} | "
              f"{(est.peak - c['quantized_weights'] - c['other_weights'] - lora - c['runtime_overhead']) / g:.2f} | "
              f"{est.peak / g:.2f} | {est.details['pageable_optimizer_states'] / g:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", type=int, nargs="*", help="grid indices to run (default: all)")
    ap.add_argument("--published", action="store_true", help="planner predictions for the QLoRA paper's setting")
    ap.add_argument("--point", type=int, help=argparse.SUPPRESS)  # internal: run one point, print JSON
    args = ap.parse_args()
    if args.published:
        published()
        return
    if args.point is not None:
        print("RESULT " + json.dumps(measure(args.point)))
        return
    for name in MODELS:  # build the folders once, outside the timed points
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
                        f"import planner_accuracy as b; b.model_folder({name!r})"], check=True)
    print("| # | model | bits | ckpt | r | targets | mb | seq | optimizer | attn | dtype | switches | predicted MiB | "
          "measured MiB | error | RSS MiB | predicted total MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for i in (args.only if args.only else range(len(GRID))):
        proc = subprocess.run([sys.executable, __file__, "--point", str(i)], capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"| {i} | failed: {proc.stderr.strip().splitlines()[-1:]} |")
            continue
        r = json.loads(line[7:])
        err = (r["predicted"] - r["measured"]) / r["measured"]
        worst = max(worst, abs(err))
        print(f"| {i} | {describe(GRID[i])} | {r['predicted'] / 2**20:.1f} | {r['measured'] / 2**20:.1f} | "
              f"{err:+.1%} | {r['rss'] / 2**20:.0f} | {r['predicted_total'] / 2**20:.0f} |", flush=True)
    print(f"\nworst |error| of tensor bytes: {worst:.1%}")


if __name__ == "__main__":
    main()
