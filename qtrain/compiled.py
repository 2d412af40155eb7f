"""Compiled decoder blocks (`training.compile`): each block's training forward, and so its backward, as one
torch.compile graph.

Where a step is short (a small model, or a large one at micro-batch 1) its time is host work: one Python call,
one dispatch and one kernel launch per operator, ~580 operators per LoRA'd Llama block and step. Compiled, a
block's forward is one call of generated code and its backward another; elementwise chains (RMSNorm, rotary
embedding, silu·up, residual adds, LoRA's scale) become single fused kernels and the matmuls stay library
GEMMs. LoRA's `LoRAFunction` and the frozen weights' products are traced into the graph, without a graph break
for the stock Llama-family blocks (tested). A small weight is dequantized in the graph by torch operators the
compiler fuses into one kernel; a big one (above `quantization.IN_GRAPH_MAX_BYTES`) is multiplied by
`qtrain::frozen_mm`, an operator that dequantizes, multiplies and frees inside, so the backward, which needs
each weight for the recompute and again for the input gradient, never holds a block's dense weights at once.

With gradient checkpointing the checkpoint is inside the compiled function: `torch.utils.checkpoint` becomes
part of the graph, the block saves only its inputs, and the compiled backward recomputes just what it reads.
That replaces LoRA's `recompute_tail` and `qtrain.modeling._checkpoint`'s recompute flag, neither of which code
under compile reads (`modeling.recomputing` is False there). Dropout masks are replayed in the recompute
(tested: the same gradients with and without checkpointing); they are drawn by the compiler's generator, not
eager torch's, so a compiled run's masks differ from an uncompiled run's at the same seed. Offloaded
checkpoints still wrap the block: the inputs the compiled function keeps go to the host.

One graph per block class and input signature (the first block's input needs no gradient: two graphs for a
Llama); the first new sequence length turns the length into a symbol, so a run whose batches vary in length
compiles at most twice that (tested), not once per length. Evaluation and generation run the plain forward:
they are not compiled (generation's growing length would recompile every token). Not combined with the tiled
MLP or fused ops (`qtrain.tiling`, `qtrain.fused`): their autograd functions re-enter autograd and cannot be
traced, so a block holding one would run uncompiled; the compiler fuses the norm and silu·up itself.

Blocks are switched like the other switches (`qtrain.tiling`): a flag on each decoder layer instance, read by
qtrain's checkpoint function, and, without checkpointing, the instance's own `forward`.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Callable

import torch
import torch.utils.checkpoint
from torch import nn

from qtrain.errors import QTrainError
from qtrain.memory import compiles_by_default
from qtrain.surgery import decoder_layers

if TYPE_CHECKING:
    from qtrain.config import RunConfig

BACKEND = "inductor"  # torch.compile's backend (tests use "aot_eager": the same graph, run by eager kernels)
_COMPILED: dict[tuple[Callable, bool, str], Callable] = {}
# No bounds check on indirect indexing: a block's only table lookups are its 4-bit weights' codes, indexed by
# unpacked 4- and 8-bit values, in range by construction. On a GPU the check is a device-side assert per lookup;
# torch 2.11's CPU code generator could not even compile it in bf16.
INDUCTOR_OPTIONS = {"assert_indirect_indexing": False}


def _configure() -> None:
    import torch._dynamo

    # transformers' kernel-hub wrapper around attention sets and resets a module-level variable inside each
    # block's forward; under a compiled checkpoint that is a "side effect" dynamo would otherwise refuse to trace
    # (it would run the block uncompiled). The value is restored before the block returns, so not replaying it
    # in the recompute changes nothing.
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    # torch warns, once per process, that a checkpoint given a policy (`_recompute_everything`) must not hold
    # in-place operators. The blocks' (LoRA's `addmm_` into the base product, the dequantization into a new
    # buffer) write only tensors made in the same call, which the compiler functionalizes; the traced gradients
    # equal eager's bit for bit (tests/test_compile.py). The warning would only alarm every run's log.
    logging.getLogger("torch._higher_order_ops.wrap").addFilter(_not_the_in_place_warning)  # (adds it once)


def _not_the_in_place_warning(record: logging.LogRecord) -> bool:
    return "context_fn is passed to torch.utils.checkpoint" not in record.getMessage()


def _always_recompute(ctx, op, *args, **kwargs):
    return torch.utils.checkpoint.CheckpointPolicy.PREFER_RECOMPUTE


def _recompute_everything():
    """A compiled checkpoint's policy, stated rather than left to torch: every operator recomputed. Plain
    checkpointing means that, but torch 2.11 tags only the operators dynamo sees, not those inside an
    autograd.Function (LoRA's, the frozen base's), so the compiler saved every product of the block: the
    activations checkpointing is there to drop. Given a policy, it tags each operator as it traces it. torch 2.13
    implements plain checkpointing with this very policy."""
    return torch.utils.checkpoint.create_selective_checkpoint_contexts(_always_recompute)


def compiled_block(forward: Callable, checkpointed: bool) -> Callable:
    """`forward` (a decoder block class's plain forward, `self` first) through torch.compile, inside
    `torch.utils.checkpoint` when `checkpointed`; one compiled function per (forward, checkpointed, backend)."""
    key = (forward, checkpointed, BACKEND)
    fn = _COMPILED.get(key)
    if fn is None:
        _configure()
        if checkpointed:
            def block(*args, **kwargs):
                return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False,
                                                         context_fn=_recompute_everything, **kwargs)
            functools.update_wrapper(block, forward)
        else:
            block = forward
        # dynamic=None: a second sequence length makes that dimension symbolic (batches are padded to their own
        # longest row, so lengths vary) instead of one graph per length up to dynamo's recompile limit
        options = INDUCTOR_OPTIONS if BACKEND == "inductor" else None
        compiled = torch.compile(block, backend=BACKEND, dynamic=None, options=options)

        def fn(*args, **kwargs):
            _CALLS[0] += 1
            return compiled(*args, **kwargs)
        _COMPILED[key] = fn
    return fn


_CALLS = [0]  # calls of compiled blocks in this process


def activity() -> tuple[int, int]:
    """(compiled block calls, graph breaks) so far in this process: `qtrain run` reports the difference a run
    made, so a run that compiled nothing, or compiled its blocks in pieces, does not pass for a compiled one
    (under transformers 5.17 no checkpointed block reached its compiled function, and nothing said so)."""
    from torch._dynamo.utils import counters

    return _CALLS[0], sum(counters["graph_break"].values())


_CACHES = ("cache", "past_key_values", "past_key_value", "layer_past")


def runs_compiled(layer: object, kwargs: dict) -> bool:
    """Whether this call of a block takes its compiled forward: a compiled block, given no KV cache (prefix
    tuning's, or generation's: its per-layer index would make one graph per layer)."""
    return getattr(layer, "_qtrain_compiled", False) and all(kwargs.get(k) is None for k in _CACHES)


def plain_forward(layer: nn.Module) -> Callable:
    """The block class's own forward: transformers' checkpointing wrapper `functools.wraps` it."""
    f = type(layer).forward
    return getattr(f, "__wrapped__", f)


class _CompiledForward:
    """The instance `forward` of a compiled block without checkpointing: compiled in training (`runs_compiled`),
    plain otherwise."""

    def __init__(self, layer: nn.Module):
        self.layer, self.plain = layer, plain_forward(layer)

    def __call__(self, *args, **kwargs):
        layer = self.layer
        if layer.training and torch.is_grad_enabled() and runs_compiled(layer, kwargs):
            return compiled_block(self.plain, False)(layer, *args, **kwargs)
        return self.plain(layer, *args, **kwargs)


def probe(device_type: str) -> str | None:
    """None when torch.compile builds and runs a small kernel and its backward on this device (inductor needs a C
    compiler on a CPU, Triton's toolchain on a GPU), else what went wrong, in one line."""
    try:
        x = torch.arange(8.0, device=device_type, requires_grad=True)
        torch.compile(lambda t: (t.sin() * 2).sum(), backend=BACKEND, dynamic=False)(x).backward()
        if not torch.allclose(x.grad, 2 * x.detach().cos()):
            return "a compiled test kernel computed a wrong gradient"
    except Exception as e:  # any failure to build or run means the blocks would fail the same way
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    return None


def decide(cfg, device_type: str, sharded: bool, fused_auto: bool, say,
           can_compile: Callable[[str], str | None] = probe) -> "RunConfig":
    """`cfg` with `training.compile` decided: `auto` is on for a CUDA GPU unless the tiled MLP is on (the
    savers' `auto` may have just turned it on), the model is sharded, or `fused_ops` was asked for. A block the
    compiler fuses needs no fused ops, so an `auto` fused_ops goes off under compile (`fused_auto`: the config
    left it to `auto`; the planner counts a compiled block as a fused one). Compiling is tried first on a tiny
    function (`can_compile`): where it fails, `auto` turns compile off and says why, and `true` is refused."""
    t = cfg.training
    tiled = isinstance(t.mlp_chunk_tokens, int)
    if t.compile == "auto":
        on = compiles_by_default(device_type, tiled, sharded, "auto" if fused_auto else t.fused_ops)
    elif t.compile and tiled:  # only the savers' auto can have tiled it (the config refuses both)
        say(f"qtrain: compile off: the run needs the tiled MLP (mlp_chunk_tokens auto → {t.mlp_chunk_tokens}), "
            "whose blocks cannot be compiled")
        on = False
    else:
        on = t.compile
    why = can_compile(device_type) if on else None
    if why and t.compile is True:
        raise QTrainError(f"training.compile: true, but torch.compile cannot build kernels on this machine ({why}); "
                          "install what its backend needs (a C compiler; Triton on a GPU) or set training.compile: "
                          "false or auto")
    if why:
        say(f"qtrain: compile off: torch.compile cannot build kernels here ({why}); the blocks run uncompiled")
        on = False
    update = {"compile": on}
    if on and fused_auto:
        update["fused_ops"] = False
    return cfg.model_copy(update={"training": t.model_copy(update=update)})


def compile_blocks(model: nn.Module) -> int:
    """Compile every decoder block's training forward (module docstring); returns how many. Call after
    checkpointing is set up: a checkpointed block is compiled with its checkpoint, by qtrain's checkpoint
    function; any other gets its own instance forward."""
    layers = [layer for _, layer in decoder_layers(model)]
    for layer in layers:
        layer._qtrain_compiled = True
        if not getattr(layer, "gradient_checkpointing", False):
            layer.forward = _CompiledForward(layer)
    return len(layers)


def uncompile_blocks(model: nn.Module) -> None:
    for _, layer in decoder_layers(model):
        vars(layer).pop("_qtrain_compiled", None)
        if isinstance(vars(layer).get("forward"), _CompiledForward):
            del layer.forward
