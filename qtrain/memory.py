"""The memory model behind `qtrain plan`: one training step's peak, predicted from the model's config.json alone.

The prediction models what qtrain's own loop keeps alive, not a generic transformer: the frozen base as the
loader stores it (bnb 4/8-bit packed weights and their constants, everything else in the compute dtype), the
trainable parameters as fp32 masters with their gradients and optimizer states, and the activations autograd
saves in one micro-batch's forward: per decoder layer the fp32 inputs of the two RMSNorms, the rotated q/k/v
and attention output (repeat_kv copies when a padding mask is present), the MLP's gate/silu/up tensors, and each
LoRA's input (shared when fp32, one copy per wrapper under 16-bit autocast or dropout) and rank-r intermediate.
With checkpointing only each layer's input survives, and one layer is recomputed in backward (a quantized linear
saves nothing of its own: `quantization.FrozenMatmul`). The loss never builds the full logits: the output head
runs on target positions in chunks of `training.loss_chunk_size`, each chunk's gradient made in forward over its
own logits, so the logits term is one chunk of fp32 logits.
Each quantized linear call dequantizes its weight, so one dense weight is scratch (on CPU a buffer kept all run).
The peak is the larger of the backward phase (saved activations + the biggest transient) and the optimizer step.
Gradients exist from their layer's backward on (the loop sets them to None after each step), so the backward
peaks in the layer where the activations still kept below it plus the gradients made above it are most; with
gradient accumulation every gradient exists from the second micro-batch on.
Four memory savers move terms: fused ops (`qtrain.fused`) keep the norms' 16-bit inputs instead of their fp32
upcasts and no silu(gate); offloaded checkpoints (`qtrain.offload`) leave two layer inputs of the L on the
device and put L in host memory; the tiled MLP (`qtrain.tiling`) keeps each layer's MLP input instead of its
insides, which then exist for one chunk, beside the MLP's dense weights held through the call; input embeddings
on the host move the table (vocab × hidden) to host memory. `details["host_bytes"]` is what the run adds there.

Methods are accounted for through their config blocks only: `trainable_parameters(arch)`,
`full_precision_linears(arch)` (stored unquantized), `extra_tokens()` (longer sequences) and `extra_keys()`
(prefix tuning: every layer attends to N more key/value positions, so its saved keys/values and the attention
mask grow, the mask is always built and GQA keys/values are repeated to all heads); blocks that name
`target_modules`/`r` (LoRA-like) are modelled per targeted linear. The formulas live here rather than in
`qtrain.numerics` because planning must not import torch. `benchmarks/planner_accuracy.py` measures them;
`qtrain.planner` builds the verdict, the what-fits solver and the report on top.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtrain.arch import Arch, matches
from qtrain.config import RunConfig
from qtrain.errors import QTrainError
from qtrain.gpus import MiB
from qtrain.locate import model_config_file
from qtrain.methods.blocks import SparseBlock, check_unfreeze_overlap, targeted

DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}
CUDA_CONTEXT = 512 * MiB  # CUDA context + cuBLAS workspace, outside torch's allocator (typical on CUDA 12)
CPU_RUNTIME = 576 * MiB  # RSS of a `qtrain run` process before its tensors (Python, torch, transformers, bnb,
# accelerate, datasets, the tokenizer: 578 MiB measured with a 64-wide model, whose tensors are a few MiB)
BNB_MIN_8BIT = 4096  # bnb keeps optimizer state of tensors smaller than this in 32-bit (min_8bit_size)
BNB_PAGED_MIN = 100_000  # bnb pages only state tensors of at least this many elements
BNB_STATE_BLOCK = 256  # bnb's blockwise 8-bit optimizer state: one absmax per this many elements
# The most elements one bnb update call takes (qtrain.optimizers._Segment: parameters laid end to end, each on
# 256-element blocks), and the bytes per element its update holds for the moment: the gradients gathered into one
# fp32 tensor; on a CPU also bnb's fp32 copies of the two states, the scaled gradient and the denominator.
OPTIMIZER_SEGMENT_ELEMENTS = {"cuda": 1 << 24, "cpu": 1 << 20}
SEGMENT_SCRATCH_BYTES = {"cuda": 4, "cpu": 20}
GROUPS = {"attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o_in": ("self_attn.o_proj",),
          "mlp_in": ("mlp.gate_proj", "mlp.up_proj"), "down_in": ("mlp.down_proj",)}


@dataclass(frozen=True)
class Setup:
    """Everything the prediction depends on; the solver explores by `replace`-ing fields."""

    arch: Arch
    blocks: tuple[Any, ...]
    bits: int | None
    double_quant: bool = True
    blocksize: int = 64
    skip_modules: tuple[str, ...] = ("lm_head",)
    compute_bytes: int = 2
    micro_batch: int = 1
    seq_len: int = 512
    checkpointing: bool = True
    optimizer: str = "adamw"
    attention: str = "sdpa"
    loss_chunk: int = 128  # training.loss_chunk_size
    device: str = "cuda"
    offload: bool = False  # training.activation_offload: checkpointed layer inputs in host memory
    mlp_chunk: int | None = None  # training.mlp_chunk_tokens: the tiled MLP's chunk
    host_embeddings: bool = False  # model.embeddings_on_host (untied models only)
    fused: bool = False  # training.fused_ops: norms and silu·up keep only their 16-bit inputs (qtrain.fused)
    compiled: bool = False  # training.compile in effect: a block's in-graph dense weights kept (IN_GRAPH_MAX_BYTES)
    shards: int = 1  # devices the parameters and optimizer states are sharded over (FSDP2, `qtrain.sharding`)
    accumulation: int = 1  # micro-batches per optimizer step: after the first, every gradient exists in backward
    data_parallel: bool = False  # one of several processes that each hold everything (DDP): its gradient buckets
    # hold every gradient all run (`qtrain run` makes the gradients views of them: no second copy)

    @property
    def tokens(self) -> int:  # positions per sequence, prompt tuning's virtual tokens included
        return self.seq_len + sum(b.extra_tokens() for b in self.blocks)

    @property
    def keys(self) -> int:  # key/value positions each layer's attention reads: prefix tuning's prefix included
        return self.tokens + sum(b.extra_keys() for b in self.blocks)

    @property
    def masked(self) -> bool:  # transformers builds an attention mask: keys longer than queries (prefix tuning);
        # padding goes in as no mask at all (qtrain.train.without_right_padding_mask: `collate` pads on the right)
        return self.keys > self.tokens


@dataclass
class Estimate:
    components: dict[str, int]  # contributions to the peak; they sum to `peak`
    details: dict[str, int]  # the other sizes worth knowing (both checkpointing modes, working sets, paging)
    peak: int


def lora_like(block: Any) -> bool:
    return hasattr(block, "target_modules") and hasattr(block, "r")


def _targeted(block: Any, name: str) -> bool:
    return block.target_modules == "all-linear" or matches(name, block.target_modules)


def _rank(block: Any, name: str) -> int:
    return block.rank_for(name) if hasattr(block, "rank_for") else block.r


def quantized_linear_bytes(n_in: int, n_out: int, bits: int | None, compute_bytes: int, double_quant: bool = True,
                           blocksize: int = 64) -> int:
    """Stored bytes of one linear's weight, exactly as `qtrain.quantization.weight_nbytes` counts them."""
    n = n_in * n_out
    if bits == 4:
        blocks = math.ceil(n / blocksize)
        if double_quant:  # absmax → uint8 per block, plus fp32 absmax per 256 blocks and a 256-entry fp32 code
            return (n + 1) // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 * 256
        return (n + 1) // 2 + 4 * blocks
    if bits == 8:
        return n + 4 * n_out  # int8 values + one fp32 scale per output row
    return n * compute_bytes


def packed_linear_bytes(n_in: int, n_out: int, bits: int | None, compute_bytes: int) -> int:
    """The part of `quantized_linear_bytes` that is the weight parameter itself (what FSDP shards): the packed
    values; the quantization constants are attributes beside it, kept whole on every device."""
    n = n_in * n_out
    return (n + 1) // 2 if bits == 4 else n if bits == 8 else n * compute_bytes


_LAYOUTS: dict[tuple[Any, ...], tuple[list[int], list[dict[str, int] | None]]] = {}


def _layout(s: Setup) -> tuple[list[int], list[dict[str, int] | None], list[int]]:
    """(element counts of the trainable tensors, per block: targeted linear → rank, or None if not LoRA-like,
    per decoder layer: the elements of its LoRA-like tensors, whose gradients its backward makes).

    bnb decides 8-bit vs 32-bit optimizer state per tensor, hence the sizes. Cached per (arch, blocks): the
    solver re-estimates the same model many times, and target matching is the slow part on 80-layer models."""
    key = (s.arch, tuple(b.model_dump_json() for b in s.blocks))
    if key not in _LAYOUTS:
        sizes: list[int] = []
        targets: list[dict[str, int] | None] = []
        per_layer = [0] * s.arch.layers
        for b in s.blocks:
            if lora_like(b):
                chosen = {name: _rank(b, name) for name in s.arch.linears() if _targeted(b, name)}
                for name, (i, o) in s.arch.linears().items():
                    if name in chosen:
                        tensors = [chosen[name] * i, chosen[name] * o] + ([o] if getattr(b, "dora", False) else [])
                        sizes += tensors
                        per_layer[int(name.split(".")[2])] += sum(tensors)  # model.layers.{i}.…
                targets.append(chosen)
            else:
                sizes += [n] if (n := b.trainable_parameters(s.arch)) > 0 else []
                targets.append(None)
        if len(_LAYOUTS) > 256:
            _LAYOUTS.clear()
        _LAYOUTS[key] = (sizes, targets, per_layer)
    return _LAYOUTS[key]


def _layer_gradients(s: Setup) -> list[int]:
    """Bytes of the fp32 gradients each decoder layer's LoRA-like tensors get; their layer's backward makes them.
    Other methods' tensors (prompts, adapters, unfrozen layers, ...) are not attributed to a layer."""
    return [4 * n for n in _layout(s)[2]]


def _optimizer_state(s: Setup, sizes: list[int]) -> tuple[int, int]:
    """(bytes of optimizer state, bytes of it bnb pages: unified memory the driver may move to host RAM)."""
    eight = s.optimizer in ("adamw_8bit", "paged_adamw_8bit")
    total = paged = 0
    for n in sizes:
        b = 2 * n + 8 * math.ceil(n / BNB_STATE_BLOCK) if eight and n >= BNB_MIN_8BIT else 8 * n  # m, v
        total += b
        if s.optimizer.startswith("paged") and s.device == "cuda" and n >= BNB_PAGED_MIN:
            paged += b
    return total + (2 * 256 * 4 if eight else 0), paged  # + bnb's two 256-entry quantization maps


def _layer_saved_per_token(s: Setup, layer: int) -> tuple[float, float]:
    """Bytes per token decoder layer `layer` keeps for backward (no checkpointing), and the part of them its
    MLP keeps (gate, silu, up and its LoRAs' inputs and intermediates: what the tiled MLP does not keep)."""
    a, e = s.arch, s.compute_bytes
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    # a mask makes transformers repeat k/v to all heads
    kv_saved = q if a.kv_heads < a.heads and (s.masked or s.attention == "eager") else kv
    # both RMSNorms keep their input upcast to fp32; fused, their input as it is (the first one's is the layer
    # input, which a checkpointed layer keeps anyway: `estimate` takes it off the recomputed layer)
    total = 2 * a.hidden * (e if s.fused else 4)
    total += (q + 2 * kv_saved * s.keys / s.tokens) * e  # rotated q, and k and v with any prefix in front
    if s.attention == "sdpa":
        total += q * e + a.heads * 4  # its own output and the fp32 log-sum-exp per head
        # torch turns a boolean mask into a float one in the compute dtype, kept by every layer's sdpa: where a
        # prefix forces the mask (padding makes none: `Setup.masked`)
        total += s.keys * e if s.masked else 0
    else:  # eager: softmax output (fp32) and the copy in the compute dtype that multiplies v
        total += a.heads * s.keys * (4 + (e if e != 4 else 0))
    mlp = (2 if s.fused else 3) * a.intermediate * e  # gate, silu(gate), up; fused: silu(gate) is rebuilt
    total += mlp
    size = {"attn_in": a.hidden, "o_in": q, "mlp_in": a.hidden, "down_in": a.intermediate}
    targets, shapes = _layout(s)[1], a.linears()
    for group, names in GROUPS.items():
        before = total
        shared = copies = 0  # the input itself kept once; fp32 copies kept per LoRA wrapper
        for b, chosen in zip(s.blocks, targets):
            if chosen is None:  # a method we cannot see into: assume it keeps each input once, if it keeps any
                shared = max(shared, int(b.keeps_linear_inputs))
                continue
            ranks = [chosen[full] for n in names if (full := f"model.layers.{layer}.{n}") in chosen]
            hit = len(ranks)
            total += sum(ranks) * e  # A's output, saved by B
            if getattr(b, "dora", False):  # DoRA's rescaling keeps W·x and the update, fp32, for m's gradient
                total += sum(8 * shapes[full][1] for n in names if (full := f"model.layers.{layer}.{n}") in chosen)
            dropout = getattr(b, "dropout", 0) > 0
            # dropout's mask: bool from CUDA's fused kernel; on a CPU the scaled noise, in the input's dtype
            total += hit * size[group] * dropout * (1 if s.device == "cuda" else e)
            # A saves its own input: shared by all wrappers without dropout when fp32 or when LoRA's fused path
            # runs (it casts nothing); otherwise a new tensor per wrapper (the dropped-out input, or autocast's
            # 16-bit copy of the fp32 upcast in the composed path)
            if (e == 4 or _fused_lora(b)) and not dropout:
                shared = max(shared, min(hit, 1))
            else:
                copies += hit
        total += size[group] * e * (shared + copies)
        if group in ("mlp_in", "down_in"):
            mlp += total - before
    return total, mlp


def _fused_lora(block: Any) -> bool:
    """Does this block train through `LoRAFunction` (plain LoRA, not DoRA)?"""
    return getattr(block, "method", None) == "lora" and not getattr(block, "dora", False)


def _layer_transients_per_token(s: Setup) -> tuple[float, float, float]:
    """Bytes per token alive beside a layer's saved activations at the two peaks of its backward, and the part
    of the first that a tiled MLP's chunks also make (per chunk token), measured with a live-tensor count
    (benchmarks/planner_accuracy.py):

    - the MLP's backward: the gradient of the down projection's input, then those of silu(gate) and up (fused:
      of gate and up) while silu(gate)·up's saved factors are still alive: two (tokens × intermediate) tensors,
      beside the incoming residual gradient. Where no LoRA keeps the down projection's input, nothing
      intermediate-sized was freed before them: one more (measured: -3.8 % without it at LoRA q,v with
      checkpointing).
    - a norm's backward, after the MLP's tensors are freed: transformers' RMSNorm makes ~five (tokens × hidden)
      fp32 gradients and temporaries beside the incoming 16-bit one; the fused norm, the 16-bit input gradient
      it writes beside the incoming one (its fp32 temporaries are one chunk's: `norm_chunk_bytes`).
    Returned as (MLP backward, norm backward, the MLP's extra intermediate-sized part)."""
    a, e = s.arch, s.compute_bytes
    down = "model.layers.{}." + GROUPS["down_in"][0]
    kept = any(b.keeps_linear_inputs if chosen is None else any(down.format(i) in chosen for i in range(a.layers))
               for b, chosen in zip(s.blocks, _layout(s)[1]))
    inter_t = 0 if kept else a.intermediate * e
    mlp = 2 * a.intermediate * e + inter_t + a.hidden * e
    norm = 2 * a.hidden * e if s.fused else 5 * a.hidden * 4 + a.hidden * e
    return mlp, norm, inter_t


LOSS_CHUNK_CPU = 128  # `loss_chunk_size: auto` on CPU (config docstring), and what the savers fall back to
LOSS_CHUNK_LOGITS = 256 * MiB  # `auto` on a GPU: the fp32 logits of one chunk at most this large
LOSS_CHUNK_MAX = 2048


def loss_chunk_tokens(value: int | str, device: str, vocab: int) -> int:
    """`training.loss_chunk_size` as a number: itself, or what `auto` is for `device` and a `vocab`-sized head."""
    if value != "auto":
        return int(value)
    if device != "cuda":
        return LOSS_CHUNK_CPU
    chunk = LOSS_CHUNK_CPU
    while chunk * 2 <= LOSS_CHUNK_MAX and chunk * 2 * vocab * 4 <= LOSS_CHUNK_LOGITS:
        chunk *= 2
    return chunk


def compiles_by_default(device: str, tiled: bool, sharded: bool, fused_ops: bool | str) -> bool:
    """What `training.compile: auto` is (`qtrain.compiled.decide`, and the planner): on for a CUDA GPU unless the
    MLP is tiled, the model is sharded, or `fused_ops: true` was asked for."""
    return device == "cuda" and not tiled and not sharded and fused_ops is not True


# A compiled block's backward keeps a weight it dequantizes in the graph from the recompute to the input
# gradient; weights above this many dense bytes are multiplied by `qtrain::frozen_mm` instead, which holds one
# at a time (qtrain.quantization reads the limit from here)
IN_GRAPH_MAX_BYTES = 8 * MiB

FUSED_CHUNK_ELEMENTS = 1 << 20  # the fused norm's chunk on its plain path (qtrain.fused): 4 MiB per fp32 temporary


def norm_chunk_bytes(s: Setup, n_tok: int) -> int:
    """The fused norm's fp32 temporaries while it differentiates one chunk of rows (about seven of them)."""
    return 7 * 4 * min(FUSED_CHUNK_ELEMENTS, n_tok * s.arch.hidden) if s.fused else 0


PINNED_PIECE = 1 << 20  # bytes: what an offloaded input's pinned pieces may waste at most (`pinned_pieces`)


def pinned_bytes(n: int) -> int:
    """Host bytes torch's pinned-memory allocator takes for an n-byte tensor: it rounds each block up to a power
    of two (its free lists are indexed by them; CachingHostAllocator), and keeps freed blocks for reuse. One
    768 MiB tensor (98,304 tokens of an 8B layer input) takes 1 GiB."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def pinned_pieces(n: int, piece: int = PINNED_PIECE) -> list[int]:
    """Power-of-two block sizes, largest first, that hold n bytes with less than `piece` to spare: n's set bits
    from the largest down to `piece`, then the rest's power of two. How `qtrain.offload` holds an input in
    pinned memory: 768 MiB as 512 + 256 MiB pieces, where one block would take 1 GiB."""
    sizes = [1 << b for b in range(n.bit_length() - 1, -1, -1) if n >> b & 1 and 1 << b >= piece]
    rest = n - sum(sizes)
    return sizes + [pinned_bytes(rest)] if rest else sizes


def estimate(s: Setup) -> Estimate:
    a, e = s.arch, s.compute_bytes
    dense = set().union(*(b.full_precision_linears(a) for b in s.blocks))
    quant = full = packed = 0
    big = 0  # the largest dense weight a quantized linear materialises
    mlp_dense = {}  # per layer: the dense MLP weights the tiled MLP holds through one call (dequantize_once)
    in_graph = {}  # per layer: the dense weights a compiled block's backward keeps (IN_GRAPH_MAX_BYTES)
    opaque = 0  # the largest dense weight above that limit (qtrain::frozen_mm's one at a time)
    for name, (i, o) in a.linears().items():
        if name in dense:  # trained fully: fp32 masters, counted with the trainable parameters
            continue
        if s.bits is None or any(name == k or name.endswith("." + k) for k in s.skip_modules):
            full += i * o * e
        else:
            quant += quantized_linear_bytes(i, o, s.bits, e, s.double_quant, s.blocksize)
            packed += packed_linear_bytes(i, o, s.bits, e)
            big = max(big, i * o)
            if i * o * e <= IN_GRAPH_MAX_BYTES:
                layer_name = re.match(r"(.*?\.\d+)\.|", name).group(1) or name  # model.layers.3.mlp.x -> …3
                in_graph[layer_name] = in_graph.get(layer_name, 0) + i * o * e
            else:
                opaque = max(opaque, i * o * e)
            if ".mlp." in name:
                layer_name = name.split(".mlp.")[0]
                mlp_dense[layer_name] = mlp_dense.get(layer_name, 0) + i * o * e
    embed = a.vocab * a.hidden * e
    on_host = embed if s.host_embeddings and not a.tie_embeddings else 0  # HostEmbedding: the table stays in RAM
    # and, on a GPU, gathers the batch's rows into a pinned buffer
    host_rows = pinned_bytes(s.micro_batch * s.tokens * a.hidden * e) if on_host and s.device == "cuda" else 0
    other = full + embed * (1 if a.tie_embeddings else 2) - on_host + (2 * a.layers + 1) * a.hidden * e
    if a.attention_bias:
        other += a.layers * (a.heads + 2 * a.kv_heads) * a.head_dim * e
    sizes = _layout(s)[0]
    trainable = 4 * sum(sizes)
    states, paged = _optimizer_state(s, sizes)
    gathered = _gathered(s, packed + full, trainable) if s.shards > 1 else 0
    if s.shards > 1:  # each device keeps 1/N of every parameter, gradient and optimizer state (the constants whole)
        quant, other, trainable, states, paged = (quant - packed + _share(packed, s), _share(other, s),
                                                  _share(trainable, s), _share(states, s), _share(paged, s))
    # torch's foreach AdamW (default on CUDA) holds one temporary per parameter, on a CPU ~none; bnb's update
    # one segment's temporaries
    if s.optimizer == "adamw":
        opt_scratch = trainable if s.device == "cuda" else 4 * max(sizes, default=0)
    else:
        segment = min(OPTIMIZER_SEGMENT_ELEMENTS[s.device],
                      sum(math.ceil(n / BNB_STATE_BLOCK) * BNB_STATE_BLOCK for n in sizes))
        opt_scratch = max(segment * SEGMENT_SCRATCH_BYTES[s.device], 4 * max(sizes, default=0))

    n_tok = s.micro_batch * s.tokens
    targets = s.micro_batch * (s.seq_len - 1)  # worst case: every position is a target
    chunk = min(s.loss_chunk, targets)
    mask = s.micro_batch * s.tokens * s.keys * (e if s.attention == "eager" else 1) if s.masked or \
        s.attention == "eager" else 0
    shared = 2 * s.micro_batch * s.tokens * a.head_dim * e + mask  # rotary cos/sin, attention mask
    if e != 4:  # the prefix cast from its fp32 parameters to the compute dtype, per layer
        shared += a.layers * 2 * a.kv_heads * a.head_dim * (s.keys - s.tokens) * e
    # alive from the loss to the final norm's backward, freed before any layer's: the final norm's fp32 input
    # (fused: its input as it is) and the gathered targets' gradient the loss made in forward
    loss_saved = n_tok * a.hidden * (e if s.fused else 4) + targets * a.hidden * e
    parts = [_layer_saved_per_token(s, i) for i in range(a.layers)]
    per_layer = [total * n_tok for total, _ in parts]
    layer_ckpt = n_tok * a.hidden * e  # checkpointing keeps each layer's input
    mlp_t, norm_t, inter_t = _layer_transients_per_token(s)
    mlp_inside = max(mlp for _, mlp in parts)  # per token: what the MLP keeps (its insides, its LoRAs' inputs)
    tiled = s.mlp_chunk is not None and n_tok > s.mlp_chunk  # shorter runs take the plain MLP (qtrain.tiling)
    if tiled:  # a layer keeps its MLP's input instead of the MLP's insides; those exist for one chunk at a time
        kept = [(total - mlp + a.hidden * e) * n_tok for total, mlp in parts]
        # one chunk's insides and gradients, beside the incoming gradient and the chunked input gradient
        mlp_moment = (mlp_inside + inter_t + 2 * a.intermediate * e) * s.mlp_chunk + 2 * a.hidden * e * n_tok
        mlp_freed = a.hidden * e * n_tok  # the MLP input the tiled MLP kept
    else:
        kept = per_layer
        mlp_moment, mlp_freed = mlp_t * n_tok, mlp_inside * n_tok
    norm_moment = norm_t * n_tok + norm_chunk_bytes(s, n_tok) - mlp_freed
    layer = max(kept)
    if s.fused and s.checkpointing:  # the recomputed layer's first norm keeps the layer input the checkpoint holds
        layer -= n_tok * a.hidden * e
    offloaded = a.layers * (sum(pinned_pieces(layer_ckpt)) if s.device == "cuda" else layer_ckpt) \
        if s.checkpointing and s.offload else 0
    # offloaded: on the device only the input being recomputed and the next one, prefetched
    ckpt_inputs = min(2, a.layers) * layer_ckpt if offloaded else a.layers * layer_ckpt
    recompute = layer if s.checkpointing else 0  # the one layer re-run during its backward
    layer_ws = recompute + max(mlp_moment, norm_moment)  # the layer's backward peaks at its MLP or at a norm
    # the dense weight of one quantized linear, in the compute dtype: a new tensor per matmul on CUDA (recycled by
    # the caching allocator), one buffer reused all run on CPU (quantization.matmul_weight), alive at every phase
    scratch = big * e if s.bits else 0
    kept_scratch = scratch if s.device == "cpu" else 0
    held = max(mlp_dense.values(), default=0) if tiled else 0  # beside the CPU buffer, which stays
    # one loss chunk (numerics.HeadCrossEntropy): fp32 logits turned into their gradient in place, plus its
    # 16-bit copy for the matmul under 16-bit compute; the final hidden states, the targets' rows of them, and
    # what stays until the final norm's backward
    loss_ws = chunk * a.vocab * (4 + (e if e < 4 else 0)) + n_tok * a.hidden * e + targets * a.hidden * e \
        + loss_saved
    overhead = CUDA_CONTEXT if s.device == "cuda" else CPU_RUNTIME

    # The loop sets the gradients to None after each step, so in a step of one micro-batch a layer's gradients
    # appear in its backward: none in the loss phase, those of layers k..L-1 in layer k's backward, beside what
    # layers 0..k keep (`below`). That backward peaks at the k with the most of both: the top layer when a layer
    # keeps more than its gradients take, else the bottom one. Gradients of tensors no decoder layer owns count
    # from the start, and all of them from a second micro-batch on, under DDP (its buckets) and under FSDP (its
    # reduce-scatter unmodelled).
    progressive = s.accumulation == 1 and s.shards == 1 and not s.data_parallel
    layer_grads = _layer_gradients(s) if progressive else [0] * a.layers
    grads_always = trainable - sum(layer_grads)
    below = [ckpt_inputs] * a.layers if offloaded else \
        list(itertools.accumulate(layer_ckpt if s.checkpointing else n for n in kept))
    grads_from = list(itertools.accumulate(reversed(layer_grads)))[::-1]
    top = max(range(a.layers), key=lambda k: (below[k] + grads_from[k], k))

    comp = {"quantized_weights": quant, "other_weights": other, "trainable_params": trainable,
            "gradients": trainable, "optimizer_states": states, "activations": 0, "layer_backward": 0,
            "logits_and_loss": 0, "dequant_scratch": kept_scratch, "optimizer_step": 0, "gathered_weights": 0,
            "runtime_overhead": overhead}
    transient_scratch = max(scratch - kept_scratch, held, _dense_method_scratch(s))
    if s.compiled and not tiled and s.bits:  # qtrain.compiled is off beside the tiled MLP
        transient_scratch = max(transient_scratch, max(in_graph.values(), default=0) + opaque)
    loss_phase = shared + below[-1] + grads_always + loss_ws
    layer_phase = shared + below[top] + grads_always + grads_from[top] + layer_ws + transient_scratch
    if gathered + max(loss_phase, layer_phase) >= trainable + opt_scratch:
        comp["gathered_weights"] = gathered
        if loss_phase >= layer_phase:
            comp["activations"], comp["gradients"], comp["logits_and_loss"] = shared + below[-1], grads_always, loss_ws
        else:
            comp["activations"], comp["gradients"] = shared + below[top], grads_always + grads_from[top]
            comp["layer_backward"], comp["dequant_scratch"] = layer_ws, kept_scratch + transient_scratch
    else:
        comp["optimizer_step"] = opt_scratch
    details = {
        "activations_per_layer": int(layer), "activations_per_layer_checkpointed": int(layer_ckpt),
        "activations_no_checkpointing": int(shared + sum(kept)),
        "activations_checkpointing": int(shared + ckpt_inputs + layer),
        "logits_and_loss": int(loss_ws), "layer_backward": int(layer_ws),
        "dequant_scratch": int(kept_scratch + transient_scratch),
        "optimizer_step": int(opt_scratch), "attention_mask": int(mask), "pageable_optimizer_states": paged,
        "trainable_parameter_count": sum(sizes), "gradient_bytes": int(trainable),
        "gathered_weights": int(gathered), "tensor_bytes": 0,
        # host memory the run adds: offloaded layer inputs (pinned on a GPU) and the input embedding table
        "host_offloaded_activations": int(offloaded), "host_embeddings": int(on_host + host_rows),
        "host_bytes": int(offloaded + on_host + host_rows),
    }
    comp = {k: int(v) for k, v in comp.items()}
    details["tensor_bytes"] = sum(comp.values()) - overhead
    # what torch's allocator holds of it (`max_memory_allocated`): bnb's paged states are CUDA managed memory
    details["allocator_bytes"] = details["tensor_bytes"] - paged
    return Estimate(comp, details, sum(comp.values()))


def _dense_method_scratch(s: Setup) -> int:
    """Float32 (out, in) matrices a method makes for one layer at a time, for the largest layer it targets:
    sparse fine-tuning's one (`qtrain.methods.sparse`: the delta in forward, its gradient in backward); DoRA's
    three for its weight norm (the dequantized weight, B·A, their sum)."""
    def per_layer(b: Any) -> int:
        return 1 if isinstance(b, SparseBlock) else 3 if getattr(b, "dora", False) else 0
    return max((4 * per_layer(b) * i * o for b in s.blocks if per_layer(b)
                for i, o in targeted(s.arch, b.target_modules).values()), default=0)


def _share(n: int, s: Setup) -> int:
    return math.ceil(n / s.shards)


def _gathered(s: Setup, layer_weights: int, trainable: int) -> int:
    """Bytes FSDP2 holds whole beyond each device's shards while a sharded run goes forward and back: the root
    group (embeddings, head, final norm), gathered for the whole forward and backward, and two decoder layers
    (the running one and the one prefetched), each with its trainable parameters and their unsharded gradient
    before the reduce-scatter. A layer's trainables are its LoRA-like blocks' share, or all of another block's
    (e.g. one unfrozen layer): an upper bound for methods spread over every layer."""
    a, e = s.arch, s.compute_bytes
    root = a.vocab * a.hidden * e * (1 if a.tie_embeddings else 2) + a.hidden * e
    layer = layer_weights // a.layers + 2 * a.hidden * e
    if a.attention_bias:
        layer += (a.heads + 2 * a.kv_heads) * a.head_dim * e
    trained, linears = 0, a.linears()
    for b, chosen in zip(s.blocks, _layout(s)[1]):
        if chosen is None:
            trained += 4 * b.trainable_parameters(a)
        else:
            per_layer = [0] * a.layers
            for name, r in chosen.items():  # names are model.layers.<i>.<...>
                i, o = linears[name]
                per_layer[int(name.split(".")[2])] += 4 * (r * (i + o) + (o if getattr(b, "dora", False) else 0))
            trained += max(per_layer)
    return root - _share(root, s) + 2 * (layer + 2 * trained)


# ------------------------------------------------------------------------------------------------ from a config


def read_model_config(cfg: RunConfig, model_config: str | Path | None = None) -> dict[str, Any]:
    """The model's config.json as a dict: `--model-config FILE`, else found from `model.path` (never weights)."""
    file = Path(model_config) if model_config else model_config_file(cfg.model.path, cfg.model.revision)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError
        if model_config:
            raise QTrainError(f"--model-config: cannot read {file} ({e}); give a model's config.json") from None
        raise QTrainError(f"model.path: cannot read {file} ({e}); repair that config.json, or give a readable "
                          "one with --model-config FILE") from None
    Arch.from_config(data, f"{'--model-config' if model_config else 'model config'} {file}")  # names the file
    return data


def setup_from_config(cfg: RunConfig, model_cfg: dict[str, Any], device: str = "cuda",
                      micro_batch: int | None = None, shards: int = 1, data_parallel: bool = False) -> Setup:
    """The planner's view of a run. `device` decides `compute_dtype: auto` (bf16/fp16 on GPU, fp32 on CPU);
    `gradient_checkpointing: auto` counts as on until `qtrain.planner.auto_checkpointing` decides it;
    `fused_ops: auto` as on for a GPU (where it always is) and off for a CPU, and on under `compile: true`;
    `loss_chunk_size: auto` as the device's chunk (`loss_chunk_tokens`); the `auto` of `activation_offload`,
    `mlp_chunk_tokens` and `embeddings_on_host` as off until `qtrain.savers.auto_memory_savers` decides them;
    `shards`: the devices an FSDP run shards over (1: every device holds everything); `data_parallel`: the run is
    one of several processes that each hold everything (DDP)."""
    q, t = cfg.quantization, cfg.training
    compute = q.compute_dtype if q.compute_dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    mb = micro_batch or (t.micro_batch_size if isinstance(t.micro_batch_size, int) else 1)
    arch = Arch.from_config(model_cfg)
    check_unfreeze_overlap(cfg.peft, arch)
    return Setup(
        arch=arch, blocks=tuple(cfg.peft), bits=None if q.bits == "none" else int(q.bits),
        double_quant=q.double_quant, blocksize=q.blocksize, skip_modules=tuple(q.skip_modules),
        compute_bytes=DTYPE_BYTES[compute], micro_batch=mb,
        seq_len=cfg.data.max_seq_len, checkpointing=t.gradient_checkpointing is not False, optimizer=t.optimizer,
        attention=cfg.model.attn_implementation, loss_chunk=loss_chunk_tokens(t.loss_chunk_size, device, arch.vocab),
        device=device, shards=shards, accumulation=t.gradient_accumulation_steps, data_parallel=data_parallel,
        offload=t.activation_offload is True, host_embeddings=cfg.model.embeddings_on_host is True,
        # as auto_memory_savers decides; a compiled block (`qtrain.compiled`) is counted as a fused one: the
        # compiler fuses the norm and silu·up, keeping no more than the fused functions do
        fused=t.fused_ops is True or (t.fused_ops == "auto" and device == "cuda") or t.compile is True,
        # as `qtrain.compiled.decide` decides it where the run starts (a tiled MLP, decided later, turns it off)
        compiled=t.compile is True or (t.compile == "auto" and compiles_by_default(
            device, isinstance(t.mlp_chunk_tokens, int), shards > 1, t.fused_ops)),
        mlp_chunk=t.mlp_chunk_tokens if isinstance(t.mlp_chunk_tokens, int) else None,
    )
