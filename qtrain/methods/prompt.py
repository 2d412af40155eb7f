"""Prompt tuning and prefix tuning: trainable virtual tokens, by input embeddings or by per-layer keys/values.

Both change what the model reads, not its weights, and both keep the model a plain transformers model:

- Prompt tuning wraps the input embedding in `PromptEmbedding`: ids 0..V-1 are looked up as before, ids
  V..V+N-1 (V = the embedding's rows) are the N trainable virtual tokens. `rewrite_inputs` prepends those ids
  to every sequence (attention 1, labels IGNORE_INDEX, so virtual positions carry no loss), so
  `model.generate` works unchanged and returns them at the start of its output.
- Prefix tuning registers a `PrefixEncoder` on the model whose `rewrite_inputs` builds a DynamicCache holding
  N trainable key/value positions in every layer and prepends N ones to the attention mask. The decoder then
  treats them as already-seen positions 0..N-1 (real tokens start at position N), in a training forward and
  in `generate` alike (generate takes the cache as given and derives positions from the longer mask).
  Transformers drops the cache inside a checkpointed layer (its recompute would write the cache twice), so
  each layer's attention is also wrapped, by composition, in `PrefixAttention`: called without a cache, it
  hands the attention its layer's prefix itself, through the attention's own seam for earlier positions
  (`cache.update(keys, values)` returns the keys/values to attend to), as `LayerPrefix`. The position ids and
  the N-wider mask were made outside the layer from the cache, and the prefix is computed from the parameters
  inside it, so the recompute rebuilds it and its gradient flows: checkpointing on trains exactly as off.

`qtrain.methods.prepare_inputs(model, inputs)` finds these modules in the model; the training loss and
generation both call it. Files use peft's PROMPT_TUNING / PREFIX_TUNING layout: one tensor,
`prompt_embeddings`, of shape (N, hidden) or (N, layers·2·kv_heads·head_dim); with a projection MLP, peft's
file holds the MLP's output and qtrain stores the MLP's own weights beside it to keep training it.
Neither method can be merged into weights. A method listed after prefix_tuning sees the attention's linears
as `...self_attn.base_block.q_proj` (as after an adapter block): name targets still match.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn

from qtrain.errors import QTrainError
from qtrain.methods import Method
from qtrain.methods.adapters import Bottleneck
from qtrain.methods.blocks import PrefixTuningBlock, PromptTuningBlock
from qtrain.numerics import IGNORE_INDEX
from qtrain.surgery import decoder_layers, replace_modules

PEFT_KEY = "prompt_embeddings"  # the one tensor peft's prompt-learning files hold
FILE_PREFIX = "base_model.model."  # = qtrain.adapter_io.PEFT_PREFIX (not imported: adapter_io imports methods)
NOT_MERGEABLE = ("{} adds virtual positions to every input rather than changing weights, so it cannot be folded "
                 "into the base; serve with the adapter attached")


def _cache_keyword(model: nn.Module) -> str:
    """The keyword `model`'s forward and `generate` take a key/value cache by: `cache` from transformers 5.24
    (where `past_key_values` is deprecated, to go in 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _output_cache(out) -> Any:
    """The key/value cache of a model output, under either of its names (see `_cache_keyword`)."""
    return out["cache"] if "cache" in out else out.past_key_values


def _prepend(inputs: dict[str, Any], key: str, n: int, value: int) -> None:
    """Put `n` columns of `value` in front of inputs[key] (B, T), if present."""
    t = inputs.get(key)
    if t is not None:
        inputs[key] = torch.cat([t.new_full((t.shape[0], n), value), t], dim=1)


# ------------------------------------------------------------------------------------------------ prompt tuning


class PromptEmbedding(nn.Module):
    """The model's input embedding plus N trainable rows, addressed by ids V..V+N-1 (V = base rows)."""

    def __init__(self, base_layer: nn.Embedding, init: torch.Tensor):
        super().__init__()
        self.base_layer = base_layer
        self.prompt_embeddings = nn.Parameter(init.to(torch.float32))  # (N, H) float32 master weights
        self.first_virtual = base_layer.num_embeddings

    @property
    def weight(self) -> torch.Tensor:  # the vocabulary's embeddings, e.g. for a tied head
        return self.base_layer.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        virtual = ids >= self.first_virtual  # (B, T)
        out = self.base_layer(ids.masked_fill(virtual, 0))  # (B, T, H)
        rows = self.prompt_embeddings[(ids - self.first_virtual).clamp(0, len(self.prompt_embeddings) - 1)]
        return torch.where(virtual[..., None], rows.to(out.dtype), out)  # (B, T, H)

    def rewrite_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        ids = inputs["input_ids"]  # (B, T) → (B, N + T)
        n = len(self.prompt_embeddings)
        virtual = torch.arange(self.first_virtual, self.first_virtual + n, device=ids.device).expand(len(ids), n)
        inputs = {**inputs, "input_ids": torch.cat([virtual, ids], dim=1)}
        _prepend(inputs, "attention_mask", n, 1)
        _prepend(inputs, "labels", n, IGNORE_INDEX)
        return inputs


def _init_ids(model: nn.Module, block: PromptTuningBlock | PrefixTuningBlock, vocab: int) -> list[int]:
    """The N tokens the virtual ones start from: init_text repeated/cut to N, or random vocabulary tokens."""
    n = block.num_virtual_tokens
    if block.init_text is None:
        return torch.randint(0, vocab, (n,)).tolist()
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    except (OSError, ValueError) as e:
        raise QTrainError(f"peft.{block.method}.init_text: cannot load the tokenizer of {model.name_or_path} ({e}); "
                          "remove init_text to start from random vocabulary embeddings") from None
    ids = tokenizer(block.init_text, add_special_tokens=False)["input_ids"]
    return (ids * math.ceil(n / len(ids)))[:n]


class PromptTuning(Method):
    name = "prompt_tuning"
    peft_type = "PROMPT_TUNING"
    not_mergeable_reason = NOT_MERGEABLE.format("prompt tuning")

    def __init__(self, block: PromptTuningBlock):
        super().__init__(block)
        self._embedding: PromptEmbedding | None = None
        self._key = ""

    def attach(self, model: nn.Module) -> dict[str, nn.Parameter]:
        base = model.get_input_embeddings()
        if isinstance(base, PromptEmbedding):
            raise QTrainError("peft: two prompt_tuning blocks; use one with the total num_virtual_tokens")
        ids = _init_ids(model, self.block, base.num_embeddings)
        with torch.no_grad():
            init = base(torch.tensor(ids, device=base.weight.device)).float()  # (N, H)
        self._embedding = PromptEmbedding(base, init)
        model.set_input_embeddings(self._embedding)
        name = next(n for n, m in model.named_modules() if m is self._embedding)
        self._key = f"{name}.prompt_embeddings"
        return {self._key: self._embedding.prompt_embeddings}

    def detach(self, model: nn.Module) -> None:
        model.set_input_embeddings(self._embedding.base_layer)
        self._embedding = None

    def to_file(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensors = dict(tensors)
        tensors[PEFT_KEY] = tensors.pop(FILE_PREFIX + self._key)
        return tensors

    def from_file(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensors = dict(tensors)
        if PEFT_KEY in tensors:
            tensors[FILE_PREFIX + self._key] = tensors.pop(PEFT_KEY)
        return tensors

    def adapter_config(self, base_model: str) -> dict[str, Any]:
        b: PromptTuningBlock = self.block
        n, h = self._embedding.prompt_embeddings.shape
        return {
            "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "revision": None, "inference_mode": True, "num_virtual_tokens": n, "token_dim": h,
            "num_transformer_submodules": 1, "num_attention_heads": None, "num_layers": None,
            "modules_to_save": None, "prompt_tuning_init": "TEXT" if b.init_text else "SAMPLE_VOCAB",
            "prompt_tuning_init_text": b.init_text, "tokenizer_name_or_path": base_model if b.init_text else None,
            "tokenizer_kwargs": None,
        }

    def describe(self) -> str:
        b: PromptTuningBlock = self.block
        start = f"the text {b.init_text!r}" if b.init_text else "random vocabulary embeddings"
        return f"prompt_tuning: {b.num_virtual_tokens} virtual tokens prepended to every input, from {start}"


# ------------------------------------------------------------------------------------------------ prefix tuning


class PrefixEncoder(nn.Module):
    """N trainable positions of keys and values for every layer, directly or through an MLP."""

    def __init__(self, n: int, layers: int, kv_heads: int, head_dim: int, hidden: int | None, config,
                 device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.shape = (n, layers, 2, kv_heads, head_dim)
        width = kv_heads * head_dim  # one layer's key (or value) per position
        out = layers * 2 * width
        if hidden is None:
            self.embedding = nn.Embedding(n, out, device=device, dtype=torch.float32)
            self.transform = None
        else:  # peft's reparameterisation: embedding (N, width) → Linear → tanh → Linear → (N, out)
            self.embedding = nn.Embedding(n, width, device=device, dtype=torch.float32)
            self.transform = Bottleneck(width, hidden, "tanh", device, out_features=out, zero_up=False)
        self.config = config
        self.cache_dtype = dtype  # the compute dtype the cache must hold
        self.cache_keyword = "past_key_values"  # set by `PrefixTuning.attach` for the model it is attached to

    def prefixes(self) -> torch.Tensor:
        """(N, layers·2·kv_heads·head_dim): per position, layer 0's key, layer 0's value, layer 1's key, ..."""
        w = self.embedding.weight
        return w if self.transform is None else self.transform(w)

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s prefix keys and values, each (kv_heads, N, head_dim) in the compute dtype: the columns
        of `prefixes()` that belong to it, computed alone (the MLP's up-projection only for its rows), so the
        cache and `PrefixAttention` hold the very same values and a checkpointed layer rebuilds only its own."""
        n, _, _, kv_heads, head_dim = self.shape
        rows = slice(layer * 2 * kv_heads * head_dim, (layer + 1) * 2 * kv_heads * head_dim)
        w = self.embedding.weight
        kv = w[:, rows] if self.transform is None else self.transform(w, rows)  # (N, 2·kv_heads·hd)
        kv = kv.to(self.cache_dtype).view(n, 2, kv_heads, head_dim).permute(1, 2, 0, 3)  # (2, kv_heads, N, hd)
        return kv[0], kv[1]

    def rewrite_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        from transformers import DynamicCache

        if inputs.get("cache") is not None or inputs.get("past_key_values") is not None:
            raise QTrainError("peft: two prefix_tuning blocks; use one with the total num_virtual_tokens")
        batch = len(inputs["input_ids"])
        cache = DynamicCache(config=self.config)
        for i in range(self.shape[1]):
            keys, values = self.layer_kv(i)
            cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), i)  # (B, kv_heads, N, hd)
        inputs = {**inputs, self.cache_keyword: cache}
        if inputs.get("attention_mask") is None:  # unpadded rows come without one (qtrain.train); attention needs it
            inputs["attention_mask"] = torch.ones(inputs["input_ids"].shape, dtype=torch.long,
                                                  device=self.embedding.weight.device)  # ids may be on the host
        _prepend(inputs, "attention_mask", self.shape[0], 1)  # (B, N + T): the prefix is visible to every real token
        return inputs


CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value")  # an attention's cache argument across versions


class LayerPrefix:
    """What an attention module sees as its cache inside a checkpointed layer: `update(keys, values, ...)`, which
    attention calls to get the keys/values to attend to, returns them with this layer's prefix in front, exactly
    as the DynamicCache of `PrefixEncoder.rewrite_inputs` does, and stores nothing (a recompute reads the same)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values  # (kv_heads, N, hd)

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        b = keys.shape[0]  # keys, values: (B, kv_heads, T, hd) → (B, kv_heads, N + T, hd)
        return (torch.cat([self.keys.expand(b, -1, -1, -1), keys], dim=-2),
                torch.cat([self.values.expand(b, -1, -1, -1), values], dim=-2))


class PrefixAttention(nn.Module):
    """A decoder layer's attention (`base_block`, called unchanged) that gets its layer's prefix keys/values from
    the `PrefixEncoder` whenever it is called without a cache, i.e. inside a checkpointed layer."""

    def __init__(self, base_block: nn.Module, encoder: PrefixEncoder, layer: int):
        super().__init__()
        self.base_block = base_block
        self.layer = layer
        self._encoder = (encoder,)  # a reference, not a submodule: its parameters belong to the model once

    def forward(self, *args, **kwargs):
        if any(kwargs.get(k) is not None for k in CACHE_KEYWORDS):  # the prefix is in the cache
            return self.base_block(*args, **kwargs)
        encoder = self._encoder[0]
        mask = kwargs.get("attention_mask")
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        # the prefix's columns were added to the mask by `rewrite_inputs`, outside the layer; without them the
        # inputs did not go through `qtrain.methods.prepare_inputs`
        assert mask is not None and mask.shape[-1] == encoder.shape[0] + hidden.shape[1], \
            "prefix tuning's inputs must go through qtrain.methods.prepare_inputs"
        keyword = next((k for k in CACHE_KEYWORDS if k in kwargs), encoder.cache_keyword)
        return self.base_block(*args, **{**kwargs, keyword: LayerPrefix(*encoder.layer_kv(self.layer))})


def _keys_values(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """(N, layers·2·kv_heads·head_dim): the keys and values `model` computes for `ids` at positions 0..N-1,
    in the prefix layout (per position: layer 0's key, layer 0's value, layer 1's key, ...)."""
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    with torch.no_grad():  # in eval mode, as served (bnb's 8-bit layers compute differently in train mode)
        cache = _output_cache(model.eval()(input_ids=torch.tensor([ids], device=device), use_cache=True))
    model.train(was_training)
    rows = [t[0].transpose(0, 1).reshape(len(ids), -1)  # (1, kv_heads, N, hd) → (N, kv_heads·hd)
            for layer in cache.layers for t in (layer.keys, layer.values)]
    return torch.cat(rows, dim=1).float()


class PrefixTuning(Method):
    name = "prefix_tuning"
    peft_type = "PREFIX_TUNING"
    not_mergeable_reason = NOT_MERGEABLE.format("prefix tuning")
    module_name = "prefix_encoder"

    def __init__(self, block: PrefixTuningBlock):
        super().__init__(block)
        self._encoder: PrefixEncoder | None = None
        self._sites: list[str] = []  # the wrapped attention modules, by full name

    def attach(self, model: nn.Module) -> dict[str, nn.Parameter]:
        b: PrefixTuningBlock = self.block
        vocab = model.config.get_text_config().vocab_size
        start = None if b.projection else _keys_values(model, _init_ids(model, b, vocab))
        if hasattr(model, self.module_name):
            raise QTrainError("peft: two prefix_tuning blocks; use one with the total num_virtual_tokens")
        cfg = model.config.get_text_config()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        hidden = (b.projection_hidden_size or kv_heads * head_dim) if b.projection else None
        embedding = model.get_input_embeddings().weight
        self._encoder = PrefixEncoder(b.num_virtual_tokens, cfg.num_hidden_layers, kv_heads, head_dim, hidden,
                                      model.config, embedding.device, embedding.dtype)
        self._encoder.cache_keyword = _cache_keyword(model)
        if start is not None:
            with torch.no_grad():
                self._encoder.embedding.weight.copy_(start)
        model.add_module(self.module_name, self._encoder)
        self._sites = [f"{name}.self_attn" for name, _ in decoder_layers(model)]
        replace_modules(model, self._sites, lambda site, attn: PrefixAttention(attn, self._encoder,
                                                                               self._sites.index(site)))
        return {f"{self.module_name}.{n}": p for n, p in self._encoder.named_parameters()}

    def detach(self, model: nn.Module) -> None:
        replace_modules(model, self._sites, lambda _, m: m.base_block)
        delattr(model, self.module_name)
        self._encoder, self._sites = None, []

    def to_file(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensors = dict(tensors)
        own = FILE_PREFIX + f"{self.module_name}.embedding.weight"
        if self._encoder.transform is None:
            tensors[PEFT_KEY] = tensors.pop(own)
        else:  # peft serves the MLP's output; the MLP's weights stay in the file to keep training
            with torch.no_grad():
                tensors[PEFT_KEY] = self._encoder.prefixes().detach().to("cpu").contiguous()
        return tensors

    def from_file(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensors = dict(tensors)
        served = tensors.pop(PEFT_KEY, None)
        if self._encoder.transform is None and served is not None:
            tensors[FILE_PREFIX + f"{self.module_name}.embedding.weight"] = served
        return tensors

    def adapter_config(self, base_model: str) -> dict[str, Any]:
        b: PrefixTuningBlock = self.block
        n, layers, _, kv_heads, head_dim = self._encoder.shape
        return {
            "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "revision": None, "inference_mode": True, "num_virtual_tokens": n, "token_dim": kv_heads * head_dim,
            "num_transformer_submodules": 1, "num_attention_heads": kv_heads, "num_layers": layers,
            "encoder_hidden_size": b.projection_hidden_size or kv_heads * head_dim,
            "prefix_projection": b.projection, "init_weights": None, "modules_to_save": None,
        }

    def describe(self) -> str:
        b: PrefixTuningBlock = self.block
        how = (" through a projection MLP" if b.projection else
               f", from the keys/values of {repr(b.init_text) if b.init_text else 'random vocabulary tokens'}")
        return f"prefix_tuning: {b.num_virtual_tokens} key/value positions in every layer{how}"
