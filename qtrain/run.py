"""`qtrain run`: config → data → frozen quantized base → PEFT methods → training loop → adapter and report.

Data is prepared before the model is loaded, so a bad file fails in seconds, not after a multi-GB load. The
run folder receives the resolved config first, then one metrics line per logged step, then the adapter and a
summary; nothing in a folder that holds another run is touched unless `--overwrite` is given.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from qtrain.config import RunConfig
from qtrain.errors import QTrainError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_output_dir(cfg: RunConfig, overwrite: bool) -> Path:
    out = Path(cfg.output.dir)
    if out.exists() and not out.is_dir():
        raise QTrainError(f"output.dir: {out} is a file; choose a folder path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise QTrainError(f"output.dir: {out} already holds files (another run?); choose a new output.dir, "
                          "or pass --overwrite to replace that run's files")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return out


def total_steps(cfg: RunConfig, n_examples: int, num_processes: int = 1) -> int:
    t = cfg.training
    if t.max_steps is not None:
        return t.max_steps
    per_epoch = math.ceil(n_examples / (t.micro_batch_size * num_processes))
    return max(1, math.ceil((t.epochs or 1.0) * per_epoch / t.gradient_accumulation_steps))


def count_parameters(model: torch.nn.Module) -> int:
    """Logical parameter count of the base (a 4-bit weight counts as its unpacked size)."""
    from qtrain.quantization import is_quantized

    total, seen = 0, set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += module.in_features * module.out_features if is_quantized(module) and name == "weight" \
                else p.numel()
    return total


def run(cfg: RunConfig, overwrite: bool = False) -> dict[str, Any]:
    from accelerate import Accelerator

    from qtrain.adapter_io import save_adapter
    from qtrain.arch import Arch
    from qtrain.data import Batches, prepare
    from qtrain.evaluate import eval_loss, exact_match, reference_pairs
    from qtrain.methods import build_methods
    from qtrain.modeling import enable_checkpointing, footprint, load_model, load_tokenizer, resolve_model_path
    from qtrain.train import peak_memory_bytes, train

    t0 = time.perf_counter()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    say = print if main else (lambda *a, **k: None)
    out = prepare_output_dir(cfg, overwrite) if main else Path(cfg.output.dir)
    seed_everything(cfg.training.seed)

    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.model)
    train_set, stats = prepare(cfg.data.train, cfg.data, tokenizer, "data.train")
    say(f"qtrain: data.train: {stats.line()}")
    eval_set = None
    if cfg.data.eval:
        eval_set, eval_stats = prepare(cfg.data.eval, cfg.data, tokenizer, "data.eval")
        say(f"qtrain: data.eval: {eval_stats.line()}")

    arch = Arch.from_path(model_path)
    keep_dense = set().union(*(block.full_precision_linears(arch) for block in cfg.peft))
    loaded = load_model(cfg.model, cfg.quantization, accelerator.device, path=model_path, skip_quantize=keep_dense)
    model = loaded.model
    model.config.use_cache = False
    fp = footprint(model)
    base_params = count_parameters(model)
    say(f"qtrain: base {model_path.name}: {base_params / 1e6:.1f}M parameters, "
        f"{cfg.quantization.bits}-bit linears {fp['quantized_linear_bytes'] / 2**20:.1f} MiB + other weights "
        f"({loaded.compute_dtype}) {fp['other_param_bytes'] / 2**20:.1f} MiB, compute dtype {loaded.compute_dtype}")

    pairs, results = [], {}
    if cfg.data.eval and cfg.eval.exact_match and cfg.data.format != "text":
        pairs = reference_pairs(cfg.data.eval, cfg.data, tokenizer, cfg.eval.max_examples)
    if pairs and cfg.eval.before_training:
        results["base"] = exact_match(model, tokenizer, pairs, cfg.eval.max_new_tokens, accelerator.device)
        say(f"qtrain: base model exact match on data.eval: {results['base']['exact_match']:.1%} "
            f"({results['base']['n']} examples)")

    torch.manual_seed(cfg.training.seed)  # adapter init independent of what ran before
    methods = build_methods(cfg.peft)
    params: dict[str, torch.nn.Parameter] = {}
    groups: list[dict[str, Any]] = []
    for method in methods:
        mine = method.attach(model)
        params.update(mine)
        groups += method.param_groups(mine, cfg.training.learning_rate)
    n_trainable = sum(p.numel() for p in params.values())
    say(f"qtrain: trainable parameters: {n_trainable:,} ({100 * n_trainable / base_params:.3f}% of the base) "
        f"in {', '.join(m.name for m in methods)}")
    if cfg.training.gradient_checkpointing:
        enable_checkpointing(model)
    if accelerator.num_processes > 1:
        model = accelerator.prepare_model(model)

    steps = total_steps(cfg, len(train_set), accelerator.num_processes)
    batches = Batches(train_set, cfg.training.micro_batch_size, cfg.training.seed, tokenizer.pad_token_id)
    metrics = (out / "metrics.jsonl").open("a") if main else None

    def log(record: dict[str, Any]) -> None:
        if metrics:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        if main and not show_bar:
            say(f"step {record['step']}/{steps} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                f"{record['tokens_per_s']:.0f} tok/s")

    show_bar = cfg.logging.progress and sys.stderr.isatty() and main
    say(f"qtrain: training {steps} steps × {cfg.training.gradient_accumulation_steps} × "
        f"{cfg.training.micro_batch_size} examples")
    result = train(model, groups, batches, cfg.training, steps, accelerator, log, progress=show_bar)
    if metrics:
        metrics.close()
    model = accelerator.unwrap_model(model)

    summary: dict[str, Any] = {
        "steps": result.steps, "train_seconds": round(result.seconds, 1), "first_loss": result.losses[0],
        "final_loss": result.losses[-1], "trainable_parameters": n_trainable, "base_parameters": base_params,
        "base_footprint_bytes": fp,
    }
    if main:
        save_adapter(out / "adapter", methods, params, base_model=cfg.model.path)
        say(f"qtrain: adapter written to {out / 'adapter'}")
    if eval_set is not None:
        summary.update(eval_loss(model, eval_set, cfg.training.micro_batch_size, tokenizer.pad_token_id,
                                 cfg.training.loss_chunk_size, accelerator.device))
    if pairs:
        results["trained"] = exact_match(model, tokenizer, pairs, cfg.eval.max_new_tokens, accelerator.device)
    summary["exact_match"] = {k: v["exact_match"] for k, v in results.items()}
    summary["samples"] = results.get("trained", {}).get("samples", [])
    summary["total_seconds"] = round(time.perf_counter() - t0, 1)
    summary["peak_mem_mb"] = round(peak_memory_bytes(accelerator.device) / 2**20, 1)
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        say(f"qtrain: loss {summary['first_loss']:.4f} → {summary['final_loss']:.4f} in {result.steps} steps "
            f"({summary['train_seconds']}s); peak memory {summary['peak_mem_mb']:.0f} MiB")
        if "eval_loss" in summary:
            say(f"qtrain: eval loss {summary['eval_loss']:.4f} (perplexity {summary['eval_perplexity']:.2f})")
        for k, v in summary["exact_match"].items():
            say(f"qtrain: exact match on data.eval, {k}: {v:.1%}")
    return summary
