"""The memory savers' `auto`: which of fused ops, input embeddings on the host, the tiled MLP and offloaded
checkpoints a run needs, decided from `qtrain.memory`'s prediction before anything is loaded.

Each saver is an opt-in layer beside the plain code it replaces (`qtrain.fused`, `qtrain.offload`,
`qtrain.tiling`) and costs something (a recompute, host traffic, smaller GEMMs), so `auto` turns one on only
while the run does not fit its budget, cheapest first, except where one is free (fused ops on a GPU, which are
also fewer kernels; a large embedding table, a gather of a few rows). `qtrain plan` reports what the savers
reach (`with_savers`, `without_savers`); `qtrain run` applies what `resolve` decided. No torch here.
"""

from __future__ import annotations

from dataclasses import replace

from qtrain.config import RunConfig
from qtrain.gpus import fmt_bytes
from qtrain.memory import LOSS_CHUNK_CPU, Setup, estimate


AUTO_MLP_CHUNK = 4096  # tokens per chunk of `mlp_chunk_tokens: auto` (a 4096 x 4096 x 14336 GEMM stays efficient)
SMALLER_MLP_CHUNKS = (2048, 1024)  # what auto tries next where even offload leaves the run over its budget
HOST_EMBEDDINGS_MIN = 256 * 2**20  # `embeddings_on_host: auto` moves a table at least this large even when it fits


def autos(cfg: RunConfig) -> set[str]:
    """Which of the memory savers the config leaves to `auto`."""
    t = cfg.training
    return {name for name, value in (("embeddings_on_host", cfg.model.embeddings_on_host),
                                     ("fused_ops", t.fused_ops), ("mlp_chunk_tokens", t.mlp_chunk_tokens),
                                     ("activation_offload", t.activation_offload),
                                     ("loss_chunk_size", t.loss_chunk_size)) if value == "auto"}


def can_host_embeddings(s: Setup) -> bool:
    """Input embeddings on the host apply on a GPU to an untied table that no method replaces, in a run of one
    process (the setup's, not this process's: `qtrain plan --nproc N` plans for N)."""
    return (s.device == "cuda" and not s.arch.tie_embeddings and s.shards == 1 and not s.data_parallel
            and not any(b.method in ("prompt_tuning", "unfreeze") for b in s.blocks))


def auto_memory_savers(s: Setup, budget: int, auto: set[str]) -> Setup:
    """Resolve the `auto` among `fused_ops`, `embeddings_on_host`, `mlp_chunk_tokens` and `activation_offload`:
    each is turned on, in that order (cheapest first), only while the run does not fit `budget`, except fused
    ops on a GPU (fewer kernels as well as less memory: always on) and a large embedding table
    (HOST_EMBEDDINGS_MIN), which goes to the host on a GPU anyway: it costs one gather of the batch's rows. A
    tiled MLP that offload made unnecessary is turned off again, and one that is not enough even with offload
    gets smaller chunks (2048, then 1024 tokens: a chunk's insides are ~150 KiB per token on Llama-3-8B, and
    GEMMs of 1024 tokens still run near a GPU's rate). On CPU the host is the device: neither host option
    applies; fused ops (which cost a recompute there) and the tiled MLP are the savers left. Before all of
    them, a GPU's larger loss chunk (`loss_chunk_size: auto`) goes back to the CPU's 128 tokens."""
    fits = lambda x: estimate(x).peak <= budget  # noqa: E731
    if "loss_chunk_size" in auto and s.loss_chunk > LOSS_CHUNK_CPU and not fits(s):
        s = replace(s, loss_chunk=LOSS_CHUNK_CPU)
    if "fused_ops" in auto and (s.device == "cuda" or not fits(s)):
        s = replace(s, fused=True)
    if "embeddings_on_host" in auto and can_host_embeddings(s) and (
            s.arch.vocab * s.arch.hidden * s.compute_bytes >= HOST_EMBEDDINGS_MIN or not fits(s)):
        s = replace(s, host_embeddings=True)
    tiled_by_auto = False
    if "mlp_chunk_tokens" in auto and not fits(s) and s.micro_batch * s.tokens > AUTO_MLP_CHUNK:
        s, tiled_by_auto = replace(s, mlp_chunk=AUTO_MLP_CHUNK), True
    if "activation_offload" in auto and s.device == "cuda" and s.checkpointing and not fits(s):
        s = replace(s, offload=True)
        if tiled_by_auto and fits(replace(s, mlp_chunk=None)):
            s = replace(s, mlp_chunk=None)
    for chunk in SMALLER_MLP_CHUNKS:
        if not tiled_by_auto or s.mlp_chunk is None or fits(s) or s.micro_batch * s.tokens <= chunk:
            break
        s = replace(s, mlp_chunk=chunk)
    return s


def without_savers(s: Setup) -> Setup:
    return replace(s, host_embeddings=False, mlp_chunk=None, offload=False, fused=False)


def with_savers(s: Setup) -> Setup:
    return replace(s, host_embeddings=s.host_embeddings or can_host_embeddings(s), fused=True,
                   loss_chunk=min(s.loss_chunk, LOSS_CHUNK_CPU),
                   mlp_chunk=s.mlp_chunk or SMALLER_MLP_CHUNKS[-1], offload=s.checkpointing and s.device == "cuda")


def resolve(cfg: RunConfig, s: Setup, limit: int, auto: set[str], limit_text: str, say) -> RunConfig:
    """`cfg` with the `auto` memory savers decided (`auto_memory_savers`), each decision said (`qtrain run`)."""
    before, device_chunk = estimate(s).peak, s.loss_chunk
    s = auto_memory_savers(s, limit, auto)
    t, m = cfg.training, cfg.model
    decided = {"embeddings_on_host": s.host_embeddings, "mlp_chunk_tokens": s.mlp_chunk,
               "activation_offload": s.offload and s.checkpointing, "fused_ops": s.fused,
               "loss_chunk_size": s.loss_chunk}
    training = {k: v for k, v in decided.items() if k in auto and k != "embeddings_on_host"}
    cfg = cfg.model_copy(update={"training": t.model_copy(update=training), "model": m.model_copy(
        update={k: v for k, v in decided.items() if k in auto and k == "embeddings_on_host"})})
    smaller_chunk = "loss_chunk_size" in auto and s.loss_chunk != device_chunk  # the device's own chunk is no news
    said = sorted(k for k in auto if k != "loss_chunk_size" or smaller_chunk)
    if not smaller_chunk and not any(decided[k] for k in said):
        return cfg  # the usual case (everything fits): nothing to say, full speed
    shown = {True: "on", False: "off", None: "off"}
    say("qtrain: memory savers auto → " + ", ".join(f"{k} {shown.get(decided[k], decided[k])}" for k in said)
        + f" (predicted peak {fmt_bytes(before)} without them, {fmt_bytes(estimate(s).peak)} with these, "
          f"{limit_text})")
    return cfg
