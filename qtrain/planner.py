"""`qtrain plan`: will this config fit, and if not, what should change? Built on `qtrain.memory`'s prediction.

The solver only ever re-runs the prediction on modified setups (it is monotone in micro-batch and sequence
length, so a doubling-then-bisection search finds the largest that fits), and suggestions are single changes
a user can make with `--set`, ranked so that the least disruptive change that fits comes first. Every modified
setup has the config's `auto` decided afresh (`Autos`), as a run of it would decide them. `qtrain run`
calls `check_before_loading` to resolve `micro_batch_size: auto`, `gradient_checkpointing: auto` and the `auto`
of the memory savers (fused ops, input embeddings on the host, the tiled MLP, offloaded checkpoints:
`qtrain.savers`)
and to warn when the budget is exceeded.
Nothing here imports torch (except `device_memory`, which only a run calls).
"""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from qtrain.config import RunConfig
from qtrain.errors import QTrainError
from qtrain.gpus import GPU, fmt_bytes, gpu_profile, parse_bytes
from qtrain.memory import (CUDA_CONTEXT, Estimate, Setup, estimate, lora_like, read_model_config,
                           setup_from_config)
from qtrain.savers import AUTO_MLP_CHUNK, auto_memory_savers, autos, can_host_embeddings, with_savers, without_savers
from qtrain.savers import resolve as resolve_savers


# ------------------------------------------------------------------------------------------------ what fits


@dataclass
class Suggestion:
    change: str
    overrides: list[str]  # the `--set` values that make the change
    peak: int
    fits: bool


def _largest(fits_at, limit: int) -> int:
    """The largest n in [1, limit] with fits_at(n), for a predicate true up to some n and false after; 0 if none."""
    if not fits_at(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits_at(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # fits_at(lo) and not fits_at(hi) (or hi past the limit)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits_at(mid) else (lo, mid)
    return lo


@dataclass(frozen=True)
class Autos:
    """The `auto` a config leaves to `qtrain run`, and what the run decides them from besides the setup. A run
    decides them for its own setup, so the planner decides them afresh for every changed setup it prices (a
    suggestion, another sequence length or micro-batch): the savers `auto` needs at 8192 tokens are not those it
    takes at 1637. `Autos()` (no config): nothing is left to decide, a setup is priced as it stands."""

    cfg: RunConfig | None = None
    processes: int = 1  # the run's processes (FSDP or data-parallel): each takes micro-batches of its own
    rows: int | None = None  # training rows (examples, or packed rows), where known (`qtrain run`)
    fixed: frozenset[str] = frozenset()  # keys a change sets, so no longer `auto`

    @property
    def keys(self) -> set[str]:
        if self.cfg is None:
            return set()
        t = self.cfg.training
        asked = {k for k in ("micro_batch_size", "gradient_checkpointing") if getattr(t, k) == "auto"}
        return (autos(self.cfg) | asked) - self.fixed

    def fixing(self, *overrides: str) -> Autos:
        """These, less the keys that `overrides` (`--set` items) set."""
        return replace(self, fixed=self.fixed | {o.partition("=")[0].rsplit(".", 1)[-1] for o in overrides})

    def decide(self, s: Setup, budget: int) -> Setup:
        """`s`, the setup as the config states it, with these decided in `check_before_loading`'s order: the
        micro-batch, gradient checkpointing, then the memory savers."""
        keys = self.keys
        if "micro_batch_size" in keys:
            micro, accumulation = auto_micro_batch(self.cfg, s, budget, self.processes, self.rows)
            s = replace(s, micro_batch=micro, accumulation=accumulation)
        if "gradient_checkpointing" in keys:
            s = replace(s, checkpointing=auto_checkpointing(s, budget))
        return auto_memory_savers(s, budget, keys) if keys else s


def largest_micro_batch(s: Setup, budget: int, limit: int = 4096, autos: Autos | None = None) -> int:
    """The largest micro-batch (up to `limit`) that fits `budget`, the `autos` other than the micro-batch's
    decided afresh for each (as a run with that micro-batch decides them)."""
    autos = (autos or Autos()).fixing("training.micro_batch_size")
    return _largest(lambda m: estimate(autos.decide(replace(s, micro_batch=m), budget)).peak <= budget, limit)


def longest_sequence(s: Setup, budget: int, limit: int = 1 << 20, autos: Autos | None = None) -> int:
    """The longest sequence (up to `limit` tokens) that fits `budget`, `autos` decided afresh for each length."""
    autos = autos or Autos()
    return _largest(lambda t: estimate(autos.decide(replace(s, seq_len=t), budget)).peak <= budget, limit)


def _with_blocks(s: Setup, **update: Any) -> Setup:
    return replace(s, blocks=tuple(b.model_copy(update=update) if lora_like(b) else b for b in s.blocks))


def suggestions(base: Setup, budget: int, autos: Autos | None = None) -> list[Suggestion]:
    """Single changes that lower the peak, each with its new prediction: those that fit first, least
    disruptive first (the order below), then the rest by peak. A change predicted not to lower it here is left
    out (LoRA on q_proj and v_proj only, when it targets q_proj alone; 8-bit states of tensors bnb keeps in
    32-bit). `base`: the setup as the config states it; each change is priced as re-planning the config with
    it would: `autos` decided afresh for the changed setup, less what the change sets."""
    autos = autos or Autos()
    s = autos.decide(base, budget)  # as planned: what is offered follows from it, what it costs from `base`
    lora = [i for i, b in enumerate(s.blocks) if lora_like(b)]
    options: list[tuple[str, list[str], Setup]] = []
    if not s.checkpointing:
        options.append(("enable gradient checkpointing (recompute each layer in backward, ~30% slower)",
                        ["training.gradient_checkpointing=true"], replace(base, checkpointing=True)))
    if s.optimizer in ("adamw", "paged_adamw_32bit"):
        options.append(("8-bit AdamW states (bnb; 2 bytes per parameter instead of 8)",
                        ["training.optimizer=adamw_8bit"], replace(base, optimizer="adamw_8bit")))
    if s.optimizer in ("adamw", "adamw_8bit") and s.device == "cuda":
        options.append(("paged 8-bit AdamW (states can move to host RAM under pressure)",
                        ["training.optimizer=paged_adamw_8bit"], replace(base, optimizer="paged_adamw_8bit")))
    over = estimate(s).peak > budget
    effective = s.micro_batch * s.accumulation
    fixed_micro = autos.fixing("training.micro_batch_size")
    m = max((d for d in range(1, s.micro_batch) if effective % d == 0 and estimate(fixed_micro.decide(
        replace(base, micro_batch=d, accumulation=effective // d), budget)).peak <= budget), default=0) if over else 0
    if m:
        options.append((f"micro-batch {m} with gradient accumulation {effective // m} (keeps the effective "
                        f"batch of {effective})", [f"training.micro_batch_size={m}",
                        f"training.gradient_accumulation_steps={effective // m}"],
                        replace(base, micro_batch=m, accumulation=effective // m)))
    if s.bits != 4:
        options.append(("store the base in 4-bit NF4", ["quantization.bits=4"], replace(base, bits=4)))
    if not s.fused:
        options.append(("fused RMSNorm and silu·up (keep 16-bit inputs, rebuild the rest in backward; same "
                        "gradients)", ["training.fused_ops=true"], replace(base, fused=True)))
    if s.mlp_chunk is None and s.micro_batch * s.tokens > AUTO_MLP_CHUNK:
        options.append((f"tiled MLP ({AUTO_MLP_CHUNK}-token chunks in forward and backward; same gradients)",
                        [f"training.mlp_chunk_tokens={AUTO_MLP_CHUNK}"], replace(base, mlp_chunk=AUTO_MLP_CHUNK)))
    if s.checkpointing and not s.offload and s.device == "cuda":
        options.append(("offload the checkpointed layer inputs to host memory (same gradients)",
                        ["training.activation_offload=true"], replace(base, offload=True)))
    if not s.host_embeddings and can_host_embeddings(s):
        options.append(("keep the input embeddings in host memory", ["model.embeddings_on_host=true"],
                        replace(base, host_embeddings=True)))
    ranks = {s.blocks[i].r for i in lora}
    if lora and max(ranks) > 1:
        r = max(1, max(ranks) // 2)
        options.append((f"LoRA rank {r}", [f"peft.{i}.r={r}" for i in lora], _with_blocks(base, r=r)))
    if lora and any(s.blocks[i].target_modules != ["q_proj", "v_proj"] for i in lora):
        options.append(("LoRA on q_proj and v_proj only", [f"peft.{i}.target_modules=[q_proj,v_proj]" for i in lora],
                        _with_blocks(base, target_modules=["q_proj", "v_proj"])))
    t = longest_sequence(base, budget, s.seq_len - 1, autos) if over and s.seq_len > 1 else 0
    if t:
        options.append((f"data.max_seq_len {t} (longer examples are truncated)", [f"data.max_seq_len={t}"],
                        replace(base, seq_len=t)))
    out, current = [], estimate(s).peak
    for rank, (change, overrides, new) in enumerate(options):
        peak = estimate(autos.fixing(*overrides).decide(new, budget)).peak
        if peak >= current:
            continue
        out.append((peak > budget, rank if peak <= budget else peak, Suggestion(change, overrides, peak,
                                                                                  peak <= budget)))
    return [sug for *_, sug in sorted(out, key=lambda x: (x[0], x[1]))]


# ------------------------------------------------------------------------------------------------ the plan


@dataclass
class Plan:
    setup: Setup
    estimate: Estimate
    budget: int | None
    budget_source: str
    max_micro_batch: int | None = None
    max_seq_len: int | None = None
    max_seq_len_without_savers: int | None = None  # fused ops, host embeddings, tiled MLP, offload all off
    max_seq_len_with_savers: int | None = None  # all of them on (where they apply)
    suggestions: list[Suggestion] = field(default_factory=list)
    faster: Suggestion | None = None  # a change that speeds the run up and still fits the budget

    @property
    def verdict(self) -> str:
        if self.budget is None:
            return "no budget: pass --gpu NAME or --budget SIZE, or set training.memory_budget"
        peak, paged = self.estimate.peak, self.estimate.details["pageable_optimizer_states"]
        if peak <= self.budget:
            return "fits"
        if peak - paged <= self.budget:
            return "fits only by paging optimizer states to host RAM (slower steps)"
        return "does not fit"

    def to_dict(self) -> dict[str, Any]:
        s = self.setup
        return {
            "peak_bytes": self.estimate.peak, "components": self.estimate.components,
            "details": self.estimate.details, "budget_bytes": self.budget, "budget_source": self.budget_source,
            "headroom_bytes": None if self.budget is None else self.budget - self.estimate.peak,
            "verdict": self.verdict, "fits": self.verdict == "fits",
            "setup": {"micro_batch": s.micro_batch, "seq_len": s.seq_len, "extra_tokens": s.tokens - s.seq_len,
                      "extra_keys": s.keys - s.tokens,
                      "gradient_accumulation_steps": s.accumulation, "bits": s.bits, "device": s.device,
                      "compute_bytes": s.compute_bytes, "checkpointing": s.checkpointing, "optimizer": s.optimizer,
                      "attention": s.attention, "shards": s.shards, "data_parallel": s.data_parallel,
                      "arch": asdict(s.arch)},
            "max_micro_batch": self.max_micro_batch, "max_seq_len": self.max_seq_len,
            "max_seq_len_without_savers": self.max_seq_len_without_savers,
            "max_seq_len_with_savers": self.max_seq_len_with_savers, "host_bytes": self.estimate.details["host_bytes"],
            "memory_savers": {"embeddings_on_host": s.host_embeddings, "mlp_chunk_tokens": s.mlp_chunk,
                              "activation_offload": s.offload, "fused_ops": s.fused},
            "suggestions": [asdict(x) for x in self.suggestions],
            "faster": None if self.faster is None else asdict(self.faster),
        }


def resolve_budget(cfg: RunConfig, gpu: str | None = None, budget: str | None = None) -> tuple[int | None, str]:
    if gpu and budget:
        raise QTrainError("qtrain plan: give either --gpu or --budget, not both")
    if gpu:
        profile: GPU = gpu_profile(gpu)
        return profile.usable, f"--gpu {profile.name}"
    if budget:
        return parse_bytes(budget, "--budget"), "--budget"
    if cfg.training.memory_budget is not None:
        return parse_bytes(cfg.training.memory_budget, "training.memory_budget"), "training.memory_budget"
    return None, "none"


def make_plan(cfg: RunConfig, model_cfg: dict[str, Any], budget: int | None, source: str = "",
              device: str = "cuda", shards: int = 1, replicas: int = 1) -> Plan:
    """Predict the peak for `cfg` (per device, parameters and optimizer states divided over `shards` devices
    under FSDP; `replicas`: the processes of a data-parallel run, each holding everything); with a budget also
    solve what fits. The `auto` are decided as the run's processes will (`Autos`): `micro_batch_size: auto`
    becomes the largest micro-batch that fits (1 without a budget), accumulation adjusted as `qtrain run` would."""
    base = setup_from_config(cfg, model_cfg, device, shards=shards, data_parallel=replicas > 1)
    autos = Autos(cfg, processes=max(shards, replicas))
    s = base if budget is None else autos.decide(base, budget)
    plan = Plan(s, estimate(s), budget, source)
    if budget is not None:
        plan.max_micro_batch = largest_micro_batch(base, budget, autos=autos)
        at_micro = autos.fixing("training.micro_batch_size")  # "sequences up to … at micro-batch M"
        plan.max_seq_len = longest_sequence(replace(base, micro_batch=s.micro_batch, accumulation=s.accumulation),
                                            budget, autos=at_micro)
        plan.max_seq_len_without_savers = longest_sequence(without_savers(s), budget)
        # a chunk `auto` chose at this length is no bound: it takes smaller ones at longer lengths
        plan.max_seq_len_with_savers = longest_sequence(with_savers(replace(s, mlp_chunk=base.mlp_chunk)), budget)
        plan.suggestions = suggestions(base, budget, autos)
        plan.faster = faster(base, budget, autos)
    return plan


def faster(base: Setup, budget: int, autos: Autos | None = None) -> Suggestion | None:
    """Turning gradient checkpointing off, when the run fits `budget` without it (what `auto` would do)."""
    autos = autos or Autos()
    s = autos.decide(base, budget)
    off = autos.fixing("training.gradient_checkpointing").decide(replace(base, checkpointing=False), budget)
    if not s.checkpointing or estimate(off).peak > budget * (1 - AUTO_OFF_HEADROOM):
        return None
    return Suggestion("turn gradient checkpointing off (no recompute: 12-38 % shorter steps measured on CPU)",
                      ["training.gradient_checkpointing=false"], estimate(off).peak, True)


def auto_micro_batch(cfg: RunConfig, s: Setup, budget: int, processes: int = 1,
                     rows: int | None = None) -> tuple[int, int]:
    """(micro-batch, accumulation) for `micro_batch_size: auto`: the largest micro-batch that fits, and no more
    than a process's share of the `rows` the data has (a larger one would only repeat them); with
    `training.effective_batch_size`, the largest that fits of the divisors of each process's share of it, so that
    micro-batch × accumulation × `processes` is the effective batch."""
    t = cfg.training
    cap = 4096 if rows is None else min(4096, max(1, -(-rows // processes)))
    if t.effective_batch_size is None:
        return max(1, largest_micro_batch(s, budget, limit=cap)), t.gradient_accumulation_steps
    e = t.effective_batch_size
    if e % processes:
        raise QTrainError(f"training.effective_batch_size: {e} examples per step cannot be shared by the run's "
                          f"{processes} processes (each takes micro-batch × accumulation of them); set it to a "
                          f"multiple of {processes}, e.g. {-(-e // processes) * processes}")
    share = e // processes
    fitting = [m for m in range(1, min(share, cap) + 1)
               if share % m == 0 and estimate(replace(s, micro_batch=m, accumulation=share // m)).peak <= budget]
    m = max(fitting, default=1)
    return m, share // m


# `gradient_checkpointing: auto` turns the recompute off only with this share of the budget to spare: it buys
# speed, and running out of memory would cost the run (the planner's worst under-prediction measured is ~4 %,
# and a GPU allocator's fragmentation comes on top)
AUTO_OFF_HEADROOM = 0.10


def auto_checkpointing(s: Setup, budget: int) -> bool:
    """`gradient_checkpointing: auto`: off (the faster run) when the prediction without it fits `budget` with
    AUTO_OFF_HEADROOM to spare."""
    return estimate(replace(s, checkpointing=False)).peak > budget * (1 - AUTO_OFF_HEADROOM)


# ------------------------------------------------------------------------------------------------ memory savers

# ------------------------------------------------------------------------------------------------ output

_ROWS = {
    "quantized_weights": "frozen linears, {bits} (packed values, absmax, double-quant constants)",
    "other_weights": "embeddings, head, norms, unquantized linears ({dtype})",
    "trainable_params": "trainable parameters, fp32 ({count:,})",
    "gradients": "their gradients alive at the peak, fp32 ({gradients} in all)",
    "optimizer_states": "optimizer states ({optimizer})",
    "activations": "activations saved for backward ({ckpt})",
    "layer_backward": "one layer's backward (recomputed activations, gradients)",
    "logits_and_loss": "logits and loss of one {chunk}-token chunk (fp32 softmax and gradient)",
    "dequant_scratch": "dequantization scratch ({scratch})",
    "optimizer_step": "optimizer step temporaries",
    "gathered_weights": "FSDP: weights gathered whole (root group + 2 layers, with their trained tensors)",
    "runtime_overhead": "{runtime}",
}


def render(plan: Plan) -> str:
    s, est = plan.setup, plan.estimate
    d = est.details
    fill = {"bits": f"{s.bits}-bit" if s.bits else "not quantized", "dtype": f"{s.compute_bytes * 8}-bit floats",
            "count": d["trainable_parameter_count"], "optimizer": s.optimizer,
            "gradients": fmt_bytes(d["gradient_bytes"]),
            "ckpt": ("checkpointing: layer inputs" + (", offloaded" if s.offload else "")) if s.checkpointing
            else "no checkpointing",
            "chunk": min(s.loss_chunk, s.micro_batch * (s.seq_len - 1)),
            "scratch": "the MLP's dense weights, held through a tiled MLP call"
            if s.mlp_chunk is not None and s.micro_batch * s.tokens > s.mlp_chunk else "one dense weight",
            "runtime": "CUDA context and cuBLAS workspace" if s.device == "cuda" else "Python + torch runtime"}
    prefix = f" (+ {s.keys - s.tokens} prefix keys/values per layer)" if s.keys > s.tokens else ""
    lines = [f"qtrain plan: micro-batch {s.micro_batch} × {s.tokens} tokens{prefix} × {s.accumulation} "
             "accumulation, "
             f"{s.arch.layers} layers, hidden {s.arch.hidden}, vocab {s.arch.vocab}, {s.attention} attention, "
             f"on {s.device}" + (f", sharded over {s.shards} devices (FSDP2): per device" if s.shards > 1 else ""),
             "", f"  {'component':<78} {'bytes':>11}"]
    for key, value in est.components.items():
        if value or key in ("activations", "quantized_weights", "gradients"):
            lines.append(f"  {_ROWS[key].format(**fill):<78} {fmt_bytes(value):>11}")
    lines += [f"  {'total peak':<78} {fmt_bytes(est.peak):>11}", ""]
    lines.append(f"  activations: {fmt_bytes(d['activations_per_layer'])} per layer without checkpointing "
                 f"({fmt_bytes(d['activations_no_checkpointing'])} in all), "
                 f"{fmt_bytes(d['activations_per_layer_checkpointed'])} per layer with it "
                 f"({fmt_bytes(d['activations_checkpointing'])} in all, one layer recomputed)")
    if s.attention == "eager":
        lines.append("  eager attention keeps the (heads × tokens × tokens) softmax per layer; sdpa does not")
    savers = [f"input embeddings on the host ({fmt_bytes(d['host_embeddings'])})"] if s.host_embeddings else []
    if s.fused:
        savers.append("fused RMSNorm and silu·up")
    if s.mlp_chunk is not None:
        savers.append(f"tiled MLP ({s.mlp_chunk}-token chunks)")
    if d["host_offloaded_activations"]:
        savers.append(f"checkpointed layer inputs offloaded ({fmt_bytes(d['host_offloaded_activations'])})")
    lines.append(f"  host memory the run adds: {fmt_bytes(d['host_bytes'])}" +
                 (f" ({'; '.join(savers)})" if savers else " (no memory savers on)"))
    if d["pageable_optimizer_states"]:
        lines.append(f"  paged optimizer: {fmt_bytes(d['pageable_optimizer_states'])} of optimizer states live in "
                     "unified memory; under pressure the driver moves them to host RAM and back each step")
    if plan.budget is None:
        lines.append(f"\n  verdict: {plan.verdict}")
        return "\n".join(lines)
    head = plan.budget - est.peak
    lines += ["", f"  budget ({plan.budget_source}) {fmt_bytes(plan.budget)}, headroom {fmt_bytes(head)} "
              f"({head / plan.budget:+.0%})", f"  verdict: {plan.verdict}", "",
              f"  what fits: micro-batch up to {plan.max_micro_batch} at {s.seq_len} tokens; sequences up to "
              f"{plan.max_seq_len} tokens at micro-batch {s.micro_batch}",
              f"  longest sequence: {plan.max_seq_len_without_savers} tokens without the memory savers, "
              f"{plan.max_seq_len_with_savers} with all that apply (fused ops, host embeddings, tiled MLP, offload)"]
    if plan.suggestions:
        lines.append("  changes, ranked (new predicted peak):")
        for sug in plan.suggestions:
            mark = "fits" if sug.fits else "over"
            sets = " --set ".join(sug.overrides)
            lines.append(f"    {fmt_bytes(sug.peak):>11}  {mark}  {sug.change}   [--set {sets}]")
    if plan.faster:
        lines.append(f"  faster, and still fits: {plan.faster.change}, peak {fmt_bytes(plan.faster.peak)}   "
                     f"[--set {plan.faster.overrides[0]}, or =auto to let each run decide]")
    return "\n".join(lines)


def report(cfg: RunConfig, gpu: str | None = None, budget: str | None = None, model_config: str | None = None,
           as_json: bool = False, device: str = "cuda", shards: int = 1, replicas: int = 1) -> str:
    """What `qtrain plan` prints: the breakdown table and what fits, or the same as JSON."""
    size, source = resolve_budget(cfg, gpu, budget)
    plan = make_plan(cfg, read_model_config(cfg, model_config), size, source, device, shards, replicas)
    return json.dumps(plan.to_dict(), indent=2) if as_json else render(plan)


def parallelism(nproc: int | None, fsdp: bool, accelerate_config: str | None) -> tuple[int, bool]:
    """(how many devices `qtrain plan` divides parameters and optimizer states over, how many data-parallel
    processes each hold everything): `--nproc N --fsdp`, or an accelerate config's num_processes when its
    distributed_type is FSDP (`--nproc` overrides its count), shards over N: (N, 1); N processes without FSDP:
    (1, N)."""
    if accelerate_config:
        import yaml

        try:
            acc = yaml.safe_load(open(accelerate_config)) or {}
            assert isinstance(acc, dict)
        except (OSError, yaml.YAMLError, AssertionError) as e:
            raise QTrainError(f"--accelerate-config: cannot read {accelerate_config} as an accelerate config "
                              f"({e or 'not a mapping'})") from None
        processes = acc.get("num_processes", 1)
        if not {"distributed_type", "num_processes"} & set(acc) or isinstance(processes, bool) \
                or not isinstance(processes, int) or processes < 1:
            raise QTrainError(f"--accelerate-config: {accelerate_config} is not an accelerate config (it needs "
                              "distributed_type and a positive whole num_processes, as `accelerate config` writes "
                              f"them; num_processes is {processes!r}); give the file accelerate launch reads")
        fsdp = fsdp or acc.get("distributed_type") == "FSDP"
        nproc = nproc or processes
    if fsdp and not nproc:
        raise QTrainError("--fsdp: give the number of devices to shard over with --nproc N")
    n = max(1, nproc or 1)
    return (n, 1) if fsdp else (1, n)


def device_memory(device_type: str) -> int:
    """Memory a run on this device can use when no budget is configured: the GPU's total, or available RAM
    shared by the processes of a multi-process run on this host (LOCAL_WORLD_SIZE, set by the launcher)."""
    if device_type == "cuda":
        import torch  # only `qtrain run` calls this, with torch already loaded

        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory - CUDA_CONTEXT
    import os

    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // processes


def check_before_loading(cfg: RunConfig, model_cfg: dict[str, Any], device_type: str, say=print,
                         shards: int = 1, replicas: int = 1, rows: int | None = None) -> RunConfig:
    """What `qtrain run` asks before loading the model: resolve `micro_batch_size: auto`, then
    `gradient_checkpointing: auto`, then the memory savers' `auto` (returns a copy of `cfg` with them set) and
    warn when the prediction exceeds the budget. `shards`: the processes an FSDP run shards over (the prediction
    is then per device); `replicas`: the processes of a data-parallel (DDP) run; `rows`: the training rows
    (examples, or packed rows), which bound `micro_batch_size: auto`."""
    device = "cuda" if device_type == "cuda" else "cpu"
    setup = functools.partial(setup_from_config, model_cfg=model_cfg, device=device, shards=shards,
                              data_parallel=replicas > 1)
    t = cfg.training
    processes = max(shards, replicas)
    if t.effective_batch_size is not None and t.micro_batch_size != "auto" and \
            t.micro_batch_size * t.gradient_accumulation_steps * processes != t.effective_batch_size:
        raise QTrainError(
            f"training.effective_batch_size ({t.effective_batch_size}) must equal micro_batch_size "
            f"({t.micro_batch_size}) × gradient_accumulation_steps ({t.gradient_accumulation_steps}) × processes "
            f"({processes}) = {t.micro_batch_size * t.gradient_accumulation_steps * processes}; change one of them, "
            "or set micro_batch_size: auto to have the accumulation derived")
    budget = None if t.memory_budget is None else parse_bytes(t.memory_budget, "training.memory_budget")
    auto = autos(cfg)
    if "auto" in (t.micro_batch_size, t.gradient_checkpointing) or auto:
        limit = budget if budget is not None else device_memory(device)
        limit_text = f"{'training.memory_budget' if budget is not None else 'device memory'} {fmt_bytes(limit)}"
    if t.micro_batch_size == "auto":
        micro, accumulation = auto_micro_batch(cfg, setup(cfg), limit, processes, rows)
        cfg = cfg.model_copy(update={"training": t.model_copy(update={
            "micro_batch_size": micro, "gradient_accumulation_steps": accumulation})})
        say(f"qtrain: micro_batch_size auto → {micro} (gradient accumulation {accumulation}, {limit_text})")
    if t.gradient_checkpointing == "auto":
        s = setup(cfg)
        on = auto_checkpointing(s, limit)
        cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"gradient_checkpointing": on})})
        without = estimate(replace(s, checkpointing=False)).peak
        say(f"qtrain: gradient_checkpointing auto → {'on' if on else 'off'} (predicted peak without it "
            f"{fmt_bytes(without)}, {'within' if without <= limit else 'over'} {limit_text})")
    if auto:
        cfg = resolve_savers(cfg, setup(cfg), limit, auto, limit_text, say)
    peak = estimate(setup(cfg)).peak
    if budget is not None and peak > budget:
        where = " --device cpu" if device == "cpu" else ""  # plan's default is cuda: other overheads and dtype
        where += f" --nproc {processes}" if processes > 1 else ""
        where += " --fsdp" if shards > 1 else ""
        print(f"qtrain: warning: the planner predicts a peak of {fmt_bytes(peak)}, over training.memory_budget "
              f"{fmt_bytes(budget)}; `qtrain plan CONFIG --budget {t.memory_budget}{where}` lists changes that fit",
              file=sys.stderr)
    return cfg
