"""`qtrain run`: config → data → frozen quantized base → PEFT methods → training loop → adapter and report.

Data is prepared before the model is loaded, so a bad file fails in seconds, not after a multi-GB load. The
run folder receives the resolved config first, then one metrics line per logged step, then the adapter and a
summary; nothing in a folder that holds another run is touched unless `--overwrite` is given.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from qtrain import compiled, sharding
from qtrain.arch import Arch
from qtrain.config import RunConfig
from qtrain.errors import QTrainError
from qtrain.gpus import allocator_settings, prefer_expandable_segments
from qtrain.locate import SMOLLM2_ALIAS


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# what a run and the commands run on its folder (eval, report) write there: --overwrite removes these, and only these
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "adapter", "checkpoints", "tensorboard", "eval.json",
             "report.md", "report.png")


def check_output_dir(cfg: RunConfig, overwrite: bool, resume_step: int | None = None,
                     resumed_from: Path | None = None) -> bool:
    """Whether `output.dir` holds a run that this one replaces (with `overwrite`); a folder holding files is
    refused unless the run is resumed from one of its own checkpoints (`resumed_from`) or `overwrite` is given.
    Checked first; nothing is removed until the run is ready to train (`prepare_output_dir`), so a data or memory
    error leaves the earlier run whole."""
    from qtrain.checkpoint import step_dirs

    out = Path(cfg.output.dir).expanduser()
    if out.exists() and not out.is_dir():
        raise QTrainError(f"output.dir: {out} is a file; choose a folder path")
    held = {f.name for f in out.iterdir()} if out.is_dir() else set()
    if held == {"config.yaml"} and resume_step is None and not written_by_qtrain(out / "config.yaml"):
        raise QTrainError(f"output.dir: {out} holds a config.yaml that no run wrote (yours?), and a run writes its "
                          "resolved config there; choose another output.dir, such as a folder inside this one")
    # Empty, or only the config of a run that failed before its first step: no run to protect.
    holds_run = not held <= {"config.yaml"}
    if resume_step is not None and holds_run and resumed_from is not None \
            and not resumed_from.resolve().is_relative_to(out.resolve()):
        raise QTrainError(f"output.dir: {out} holds another run than the one {resumed_from} belongs to, and "
                          "--resume would mix the two; continue from that checkpoint in a new output.dir "
                          "(--output-dir), or resume the run in its own folder")
    if resume_step is None and holds_run and not overwrite:
        saved = step_dirs(out / "checkpoints")
        hint = f"continue it with --resume (its newest checkpoint is {saved[0].name}), " if saved else ""
        raise QTrainError(f"output.dir: {out} already holds files (another run?); {hint}choose a new "
                          "output.dir, or pass --overwrite to replace that run's files")
    return resume_step is None and holds_run


def prepare_output_dir(cfg: RunConfig, overwrite: bool, resume_step: int | None = None) -> Path:
    """Make `output.dir` ready (`check_output_dir` first): the replaced run's files removed, or a resumed run's
    metrics cut back to the checkpoint's step; the resolved config written."""
    out = Path(cfg.output.dir).expanduser()
    if check_output_dir(cfg, overwrite, resume_step):
        for name in RUN_FILES:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    if resume_step is not None and metrics.is_file():  # drop what was logged after the checkpoint
        kept = [line for line in metrics.read_text().splitlines(keepends=True)
                if line.strip() and _logged_step(line) <= resume_step]
        metrics.write_text("".join(kept))
    elif resume_step is None:
        metrics.unlink(missing_ok=True)
    (out / "config.yaml").write_text(CONFIG_HEADER + yaml.safe_dump(with_absolute_paths(cfg.to_dict()),
                                                                    sort_keys=False))
    return out


CONFIG_HEADER = "# written by qtrain run: this folder's run, its config resolved (auto kept as asked)\n"


def written_by_qtrain(config: Path) -> bool:
    """Whether a run folder's config.yaml is one a run wrote (`CONFIG_HEADER`), not a user's own file."""
    with open(config, encoding="utf-8", errors="replace") as f:
        return f.readline() == CONFIG_HEADER


def with_absolute_paths(raw: dict) -> dict:
    """`raw` (a config as a dict) with its local paths absolute: `model.path` and `data.train`/`eval` where they
    name something on this machine (not an alias or a hub id), and `output.dir`. The run folder's config.yaml
    keeps them so: `export`, `eval` and `generate --config` read it from wherever they are run, and paths
    relative to where training ran would not resolve there."""
    raw = {**raw, "model": dict(raw["model"]), "data": dict(raw["data"]), "output": dict(raw["output"])}
    for section, key in (("model", "path"), ("data", "train"), ("data", "eval")):
        value = raw[section].get(key)
        if value and value != SMOLLM2_ALIAS and Path(value).expanduser().exists():
            raw[section][key] = str(Path(value).expanduser().resolve())
    raw["output"]["dir"] = str(Path(raw["output"]["dir"]).expanduser().resolve())
    return raw


def _logged_step(line: str) -> float:
    try:
        return json.loads(line).get("step", math.inf)
    except (ValueError, AttributeError):
        return math.inf  # a line cut short by a crash


def schedule(cfg: RunConfig, n_examples: int, num_processes: int = 1) -> tuple[int, int]:
    """(optimizer steps, micro-batches of the last one). `max_steps`: full steps. `epochs`: exactly that many
    passes over the data, so where the accumulation does not divide them the last step is shorter (its gradient
    still the mean over its target tokens), rather than taking micro-batches of a further epoch."""
    t = cfg.training
    accum = t.gradient_accumulation_steps
    if t.max_steps is not None:
        return t.max_steps, accum
    per_epoch = math.ceil(n_examples / (t.micro_batch_size * num_processes))  # micro-batches, each process
    micro = max(1, math.ceil((t.epochs or 1.0) * per_epoch))
    steps = math.ceil(micro / accum)
    return steps, micro - (steps - 1) * accum


def check_skip_modules(cfg: RunConfig, arch: Arch) -> None:
    """A `quantization.skip_modules` name that matches no linear layer (a typo) would quantize what it meant to
    keep; refused, naming the layers there are. `lm_head`, the default, names the output head."""
    names = [*arch.linears(), "lm_head"]
    for k in cfg.quantization.skip_modules:
        if not any(n == k or n.endswith("." + k) for n in names):
            short = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise QTrainError(f"quantization.skip_modules: {k!r} matches no linear layer of this model; its linear "
                              f"layers are named {short}")


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


def _as_main_decided(cfg: RunConfig, accelerator) -> RunConfig:
    """`cfg` with the main process's micro-batch, accumulation and gradient checkpointing (ints, not objects:
    nothing is pickled between processes)."""
    from accelerate.utils import broadcast

    t = cfg.training
    micro, accumulation, checkpointing = broadcast(torch.tensor(
        [t.micro_batch_size, t.gradient_accumulation_steps, int(t.gradient_checkpointing)],
        device=accelerator.device)).tolist()
    return cfg.model_copy(update={"training": t.model_copy(update={
        "micro_batch_size": micro, "gradient_accumulation_steps": accumulation,
        "gradient_checkpointing": bool(checkpointing)})})


def apply_switches(model: torch.nn.Module, cfg: RunConfig, device: torch.device):
    """Turn on what `training` and `model` ask for around the loaded, adapted model, in the order they compose:
    fused ops (the tiled MLP's chunks then run the fused MLP), checkpointing with its offload, the tiled MLP,
    the embeddings on the host, then the compiled blocks (around the checkpoints). Returns (the ActivationOffload
    or None, what fused_ops switched or None)."""
    from qtrain.compiled import compile_blocks
    from qtrain.fused import backend_name, enable_fused_ops
    from qtrain.modeling import enable_checkpointing
    from qtrain.offload import ActivationOffload, put_embeddings_on_host
    from qtrain.tiling import enable_tiled_mlp

    t = cfg.training
    fused = None
    if t.fused_ops is True:
        fused = {**enable_fused_ops(model), "backend": backend_name(device)}
    offload = ActivationOffload() if t.gradient_checkpointing and t.activation_offload is True else None
    if t.gradient_checkpointing:
        enable_checkpointing(model, offload)
    if isinstance(t.mlp_chunk_tokens, int):
        enable_tiled_mlp(model, t.mlp_chunk_tokens)
    if cfg.model.embeddings_on_host is True:
        put_embeddings_on_host(model, device)
    if t.compile is True:
        compile_blocks(model)
    return offload, fused


def run(cfg: RunConfig, overwrite: bool = False, resume: str | None = None,
        allow_config_change: bool = False) -> dict[str, Any]:
    """Train as `cfg` says. `resume`: "latest" (the newest valid checkpoint in output.dir) or a checkpoint or
    run folder; the run then continues exactly where that checkpoint left it."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from qtrain.adapter_io import save_adapter
    from qtrain.checkpoint import (Checkpointer, check_resumable, check_same_length, check_trainable_matches,
                                   resume_point, stop_on_signals)
    from qtrain.data import Batches, pack, prepare
    from qtrain.evaluate import (eval_loss, exact_match, forgetting_lines, reference_pairs, score_model,
                                 split_held_out)
    from qtrain.logs import RunLogger
    from qtrain.methods import build_methods
    from qtrain.planner import check_before_loading
    from qtrain.modeling import footprint, load_model, load_tokenizer, resolve_compute_dtype, resolve_model_path
    from qtrain.train import mean_batch_loss, peak_memory_bytes, train

    t0 = time.perf_counter()
    if not torch.cuda.is_initialized():  # torch reads it at the first CUDA call, a few lines below
        prefer_expandable_segments()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        resolve_compute_dtype(cfg.quantization.compute_dtype, device), "no")
    # DDP's gradients as views of its all-reduce buckets: one copy of them, not two (the planner counts one)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=precision,
                              kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True)])
    main = accelerator.is_main_process
    fsdp = sharding.requested() if accelerator.num_processes > 1 else None
    shards = accelerator.num_processes if fsdp else 1
    if fsdp:
        sharding.check_supported(cfg.training.optimizer)
    say = print if main else (lambda *a, **k: None)
    if resume and overwrite:
        raise QTrainError("--resume continues the run in output.dir and --overwrite deletes it; pass one of them")
    ckpt = resume_point(Path(cfg.output.dir).expanduser(), resume, say) if resume else None
    # --resume with nothing to resume from (`resume_point` allowed it): what is there goes, as under --overwrite
    replace = overwrite or bool(resume and ckpt is None)
    if main:  # refused now; emptied only once the data, the model and the plan have passed (below)
        check_output_dir(cfg, replace, ckpt.step if ckpt else None, ckpt.path if ckpt else None)
    asked = cfg  # what config.yaml keeps: `auto` as written, not as decided below
    seed_everything(cfg.training.seed)

    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.model)
    train_set, stats = prepare(cfg.data.train, cfg.data, tokenizer, "data.train")
    say(f"qtrain: data.train: {stats.line()}")
    eval_set = None
    if cfg.data.eval:
        eval_set, eval_stats = prepare(cfg.data.eval, cfg.data, tokenizer, "data.eval")
        say(f"qtrain: data.eval: {eval_stats.line()}")
    elif cfg.data.eval_fraction > 0:
        train_set, eval_set = split_held_out(train_set, cfg.data.eval_fraction, cfg.training.seed)
        say(f"qtrain: holding out {len(eval_set)} of {stats.examples} training examples for evaluation "
            "(data.eval_fraction)")
    if cfg.data.packing:  # after the eval split: evaluation stays one example per row
        train_set, packing = pack(train_set, cfg.data.max_seq_len)
        say(f"qtrain: data.train: {packing.line()}")

    arch = Arch.from_path(model_path)
    check_skip_modules(cfg, arch)
    saved = ckpt.state.get("config", {}).get("training", {}) if ckpt else {}  # what the interrupted run decided
    decided = saved.get("gradient_checkpointing")
    if cfg.training.gradient_checkpointing == "auto" and isinstance(decided, bool):  # as the interrupted run did
        cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"gradient_checkpointing": decided})})
        say(f"qtrain: gradient_checkpointing auto → {'on' if decided else 'off'}, as in the checkpoint resumed")
    # chunking reassociates gradient sums; Triton and the compiler round their own ways
    for key in ("mlp_chunk_tokens", "fused_ops", "compile", "loss_chunk_size"):
        if getattr(cfg.training, key) == "auto" and saved.get(key, "auto") != "auto":
            cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={key: saved[key]})})
    split = {k: saved.get(k) for k in ("micro_batch_size", "gradient_accumulation_steps")}
    if cfg.training.micro_batch_size == "auto" and all(isinstance(v, int) for v in split.values()):
        # likewise: re-deciding against today's free memory would be refused below as a changed config
        cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update=split)})
        say(f"qtrain: micro_batch_size auto → {split['micro_batch_size']} (gradient accumulation "
            f"{split['gradient_accumulation_steps']}), as in the checkpoint resumed")
    fused_auto = cfg.training.fused_ops == "auto"
    cfg = check_before_loading(cfg, json.loads((model_path / "config.json").read_text()), device.type, say, shards,
                               replicas=1 if fsdp else accelerator.num_processes, rows=len(train_set))
    if accelerator.num_processes > 1:  # `auto` read this process's free memory: all train as the main one decided
        cfg = _as_main_decided(cfg, accelerator)
    cfg = compiled.decide(cfg, device.type, bool(fsdp), fused_auto, say)
    if ckpt:  # against the resolved config (micro_batch_size: auto is a number by now)
        check_resumable(ckpt, cfg.to_dict(), cfg.fingerprint(), allow_config_change, say)
    keep_dense = set().union(*(block.full_precision_linears(arch) for block in cfg.peft))
    loaded = load_model(cfg.model, cfg.quantization, accelerator.device, path=model_path, skip_quantize=keep_dense)
    model = loaded.model
    model.config.use_cache = False
    fp = footprint(model)
    base_params = count_parameters(model)
    say(f"qtrain: base {model_path.name}: {base_params / 1e6:.1f}M parameters, "
        f"{cfg.quantization.bits}-bit linears {fp['quantized_linear_bytes'] / 2**20:.1f} MiB + other weights "
        f"({loaded.compute_dtype}) {fp['other_param_bytes'] / 2**20:.1f} MiB, compute dtype {loaded.compute_dtype}")

    pairs = []
    if cfg.data.eval and cfg.eval.exact_match and cfg.data.format != "text":
        pairs = reference_pairs(cfg.data.eval, cfg.data, tokenizer, cfg.eval.max_examples)

    def score(m: torch.nn.Module) -> dict[str, Any]:
        return score_model(m, tokenizer, cfg, accelerator.device, eval_set, pairs)

    scores: dict[str, dict[str, Any]] = {}
    if cfg.eval.before_training:
        scores["base"] = score(model)
        if pairs:
            say(f"qtrain: base model exact match on data.eval: {scores['base']['exact_match']:.1%} "
                f"({len(pairs)} examples)")

    torch.manual_seed(cfg.training.seed)  # adapter init independent of what ran before
    methods = build_methods(cfg.peft)
    params: dict[str, torch.nn.Parameter] = {}
    groups: list[dict[str, Any]] = []
    for method in methods:
        mine = method.attach(model)
        params.update(mine)
        groups += method.param_groups(mine, cfg.training.learning_rate)
        if method.describe():
            say(f"qtrain: {method.describe()}")
    n_trainable = sum(p.numel() for p in params.values())
    if ckpt:  # before the run folder is touched
        check_trainable_matches(ckpt, params)
    say(f"qtrain: trainable parameters: {n_trainable:,} ({100 * n_trainable / base_params:.3f}% of the base) "
        f"in {', '.join(m.name for m in methods)}")
    t = cfg.training
    offload, fused = apply_switches(model, cfg, accelerator.device)
    if fused:
        say(f"qtrain: fused_ops on: {fused['rms_norm']} RMSNorms and {fused['swiglu']} SwiGLU MLPs "
            f"({fused['backend']})")
    if t.compile is True:
        say(f"qtrain: compile on: each decoder block's training forward and backward through torch.compile "
            f"({compiled.BACKEND}); the first step compiles them")
    if offload or isinstance(t.mlp_chunk_tokens, int) or cfg.model.embeddings_on_host is True:
        say(f"qtrain: memory savers: activation_offload {'on' if offload else 'off'}, mlp_chunk_tokens "
            f"{t.mlp_chunk_tokens}, embeddings_on_host {'on' if cfg.model.embeddings_on_host is True else 'off'}")
    calibration = Batches(train_set, cfg.training.micro_batch_size, cfg.training.seed, tokenizer.pad_token_id)
    for method in methods:  # data-dependent init (a sparse mask): same batches, same result on every process
        method.calibrate(model, calibration,
                         lambda m, b: mean_batch_loss(m, b, cfg.training.loss_chunk_size, accelerator))
    held = None  # bytes of parameters this process holds, when sharded
    if fsdp:  # FSDP2, on any device (qtrain.sharding says why not accelerate's)
        model = sharding.shard_model(model, fsdp)
        params, groups = sharding.reshard_params(model, params, groups)
        held = sharding.held_parameter_bytes(model)
        say(f"qtrain: FSDP2: base and adapters sharded over {shards} processes; the main one holds "
            f"{held / 2**20:.1f} MiB of parameters")
    elif accelerator.num_processes > 1:
        model = accelerator.prepare_model(model)

    steps, last_accum = schedule(cfg, len(train_set), accelerator.num_processes)
    if ckpt and ckpt.step > steps:
        raise QTrainError(f"--resume: {ckpt.path} is at step {ckpt.step}, past the {steps} steps this run is long; "
                          "resume with the run's length (training.max_steps or epochs), or resume an earlier "
                          "checkpoint")
    if cfg.training.warmup_steps >= steps:
        say(f"qtrain: warning: training.warmup_steps ({cfg.training.warmup_steps}) is not shorter than the run "
            f"({steps} steps): the learning rate never reaches training.learning_rate")
    if ckpt:
        check_same_length(ckpt, steps, cfg.training.lr_scheduler, allow_config_change, say)
        say(f"qtrain: resuming from {ckpt.path} (step {ckpt.step} of {steps})")
    out = prepare_output_dir(asked, replace, ckpt.step if ckpt else None) if main \
        else Path(cfg.output.dir).expanduser()
    checkpoints = Checkpointer(out / "checkpoints", params, cfg.to_dict(), cfg.fingerprint(),
                               cfg.training.save_every, cfg.training.keep_last, resume_from=ckpt, writer=main,
                               say=say)
    batches = Batches(train_set, cfg.training.micro_batch_size, cfg.training.seed, tokenizer.pad_token_id,
                      rank=accelerator.process_index, world=accelerator.num_processes)
    show_bar = cfg.logging.progress and sys.stderr.isatty() and main
    logger = RunLogger(out, steps, enabled=main, console=not show_bar, tensorboard=cfg.logging.tensorboard,
                       resumed_at=ckpt.step if ckpt else 0)
    every = cfg.training.eval_every

    def log(record: dict[str, Any]) -> None:
        logger(record)
        if every and eval_set is not None and record["step"] % every == 0:
            bare = accelerator.unwrap_model(model)  # a data-parallel wrapper has no generate()
            ev = eval_loss(bare, eval_set, cfg.training.micro_batch_size, tokenizer.pad_token_id,
                           cfg.training.loss_chunk_size, accelerator.device)
            if pairs and cfg.eval.during_training:
                em = exact_match(bare, tokenizer, pairs[:cfg.eval.during_training], cfg.eval.max_new_tokens,
                                 accelerator.device)
                ev.update(exact_match=em["exact_match"], samples=em["samples"][:3])
            logger({"step": record["step"], **ev})

    processes = f" × {accelerator.num_processes} processes" if accelerator.num_processes > 1 else ""
    shorter = f" (the last one {last_accum} micro-batches: the epochs end there)" \
        if last_accum != cfg.training.gradient_accumulation_steps else ""
    say(f"qtrain: training {steps} steps × {cfg.training.gradient_accumulation_steps} × "
        f"{cfg.training.micro_batch_size} {'packed rows' if cfg.data.packing else 'examples'}{processes}{shorter}")
    compiled_before = compiled.activity()
    try:
        with stop_on_signals(say) as stop:
            result = train(model, groups, batches, cfg.training, steps, accelerator, log, progress=show_bar,
                           checkpoints=checkpoints, stop=stop, last_accum=last_accum)
    finally:
        logger.close()
    calls, breaks = (a - b for a, b in zip(compiled.activity(), compiled_before))
    if cfg.training.compile and result.losses and (calls == 0 or breaks):
        what = ("no decoder block ran compiled" if calls == 0
                else f"the compiler broke the blocks into pieces ({breaks} graph breaks)")
        say(f"qtrain: warning: training.compile is on, but {what}: the steps are right, without the speed "
            "compiling is for (this torch or transformers traces the blocks otherwise than those qtrain is tested "
            "with)")
    if result.stopped:
        say(f"qtrain: stopped after step {result.steps} of {steps}; checkpoint {result.checkpoint}")
        return {"stopped": True, "steps": result.steps, "checkpoint": str(result.checkpoint)}
    model = accelerator.unwrap_model(model)

    applied = [x for x in result.losses if math.isfinite(x)] or [None]  # a skipped step's loss is no loss
    summary: dict[str, Any] = {
        "steps": result.steps, "train_seconds": round(result.seconds, 1), "first_loss": applied[0],
        "final_loss": applied[-1], "trainable_parameters": n_trainable, "base_parameters": base_params,
        "base_footprint_bytes": fp, "shards": shards, "parameter_bytes_per_process": held,
        # as run, with `auto` resolved (config.yaml keeps what the user wrote)
        **{k: getattr(cfg.training, k) for k in ("micro_batch_size", "gradient_accumulation_steps",
                                                  "gradient_checkpointing", "activation_offload",
                                                  "mlp_chunk_tokens", "fused_ops", "compile")},
        "fused_ops_backend": fused["backend"] if fused else None,
        "compiled_block_calls": calls, "graph_breaks": breaks,
        "embeddings_on_host": cfg.model.embeddings_on_host,
    }
    if offload is not None:
        summary["offload"] = offload.stats
    full = sharding.full_tensors(params)  # every process takes part in gathering a sharded run's adapter
    if main:
        save_adapter(out / "adapter", methods, full, base_model=cfg.model.path)
        say(f"qtrain: adapter written to {out / 'adapter'}")
    scores["trained"] = score(model)
    summary.update({k: v for k, v in scores["trained"].items() if k.startswith("eval_")})
    summary["exact_match"] = {k: v["exact_match"] for k, v in scores.items() if "exact_match" in v}
    summary["samples"] = scores["trained"].get("samples", [])
    summary["forgetting"] = {k: {m: v[m] for m in ("reference_perplexity", "eval_perplexity", "exact_match")
                                 if m in v} for k, v in scores.items()}
    summary["total_seconds"] = round(time.perf_counter() - t0, 1)
    summary["peak_mem_mb"] = round(peak_memory_bytes(accelerator.device) / 2**20, 1)
    if accelerator.device.type == "cuda":  # what the peak above was allocated under (`prefer_expandable_segments`)
        summary["peak_reserved_mb"] = round(torch.cuda.max_memory_reserved(accelerator.device) / 2**20, 1)
        summary["cuda_allocator_conf"] = allocator_settings()
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        losses = f"{applied[0]:.4f} → {applied[-1]:.4f}" if applied[0] is not None else "never finite"
        say(f"qtrain: loss {losses} in {result.steps} steps "
            f"({summary['train_seconds']}s); peak memory {summary['peak_mem_mb']:.0f} MiB")
        if "eval_loss" in summary:
            say(f"qtrain: eval loss {summary['eval_loss']:.4f} (perplexity {summary['eval_perplexity']:.2f})")
        for k, v in summary["exact_match"].items():
            say(f"qtrain: exact match on data.eval, {k}: {v:.1%}")
        if "base" in scores:
            say("qtrain: forgetting report (what training cost and gained):")
            for line in forgetting_lines(summary["forgetting"]["base"], summary["forgetting"]["trained"]):
                say(f"  {line}")
    return summary
