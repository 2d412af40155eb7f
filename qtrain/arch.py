"""A model's shapes from its config.json alone: what the planner and closed-form parameter counts need.

No weights and no torch: `Arch.from_config(dict)` reads the Llama-family fields (Llama, Mistral, Qwen2/3,
Gemma, Phi-3 style configs use the same names) and lists every linear layer by its full module name, as the
loaded model will name it, with its (in, out) shape. Methods compute their trainable-parameter count from
this, and a test checks each count against the real model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtrain.errors import QTrainError


@dataclass(frozen=True)
class Arch:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_embeddings: bool
    attention_bias: bool = False
    model_type: str = "llama"
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, cfg: dict[str, Any], source: str = "model config") -> "Arch":
        """The shapes in a config.json's dict; a missing or garbled value is a `QTrainError` naming `source` (the
        file, where the caller knows it), the key and the value."""
        cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else cfg
        if not isinstance(cfg, dict):
            raise QTrainError(f"{source}: not a JSON object; give a model's config.json")

        def size(key: str, default: int | None = None) -> int:
            if key not in cfg and default is None:
                raise QTrainError(f"{source}: missing {key!r}; qtrain reads decoder configs of the Llama family "
                                  "(hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, ...)")
            value = cfg.get(key)
            if value is None and default is not None:
                return default
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise QTrainError(f"{source}: {key} is {json.dumps(value)}, not a positive whole number; fix that "
                                  "value or restore the model's original config.json")
            return value

        def flag(key: str, default: bool) -> bool:
            value = cfg.get(key)
            if value is None:
                return default
            if not isinstance(value, bool):
                raise QTrainError(f"{source}: {key} is {json.dumps(value)}, not true or false; fix that value or "
                                  "restore the model's original config.json")
            return value

        hidden, heads = size("hidden_size"), size("num_attention_heads")
        return cls(
            hidden=hidden, intermediate=size("intermediate_size"), layers=size("num_hidden_layers"),
            heads=heads, kv_heads=size("num_key_value_heads", heads), head_dim=size("head_dim", hidden // heads),
            vocab=size("vocab_size"), tie_embeddings=flag("tie_word_embeddings", False),
            attention_bias=flag("attention_bias", cfg.get("model_type") == "qwen2"),
            model_type=str(cfg.get("model_type", "llama")), mlp_bias=flag("mlp_bias", False),
        )

    @classmethod
    def from_path(cls, path: str | Path) -> "Arch":
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        try:
            return cls.from_config(json.loads(file.read_text(encoding="utf-8")), f"model config {file}")
        except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError
            raise QTrainError(f"model config: cannot read {file} ({e}); give a model folder or its config.json")

    def linears(self) -> dict[str, tuple[int, int]]:
        """Full module name → (in_features, out_features) for every linear layer but the output head."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = {
            "self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, self.intermediate),
            "mlp.up_proj": (h, self.intermediate), "mlp.down_proj": (self.intermediate, h),
        }
        return {f"model.layers.{i}.{name}": shape for i in range(self.layers) for name, shape in per_layer.items()}

    def block_parameters(self) -> dict[str, int]:
        """Full parameter name → size of every parameter inside the decoder layers (weights, biases, norms), for
        the Llama, Mistral, Qwen2 and Qwen3 layouts."""
        sizes: dict[str, int] = {}
        biased = {"q_proj", "k_proj", "v_proj"} | ({"o_proj"} if self.model_type != "qwen2" else set())
        for name, (i, o) in self.linears().items():
            sizes[f"{name}.weight"] = i * o
            short = name.rsplit(".", 1)[-1]
            if (self.attention_bias and short in biased) or (self.mlp_bias and name.split(".")[-2] == "mlp"):
                sizes[f"{name}.bias"] = o
        for i in range(self.layers):
            sizes[f"model.layers.{i}.input_layernorm.weight"] = self.hidden
            sizes[f"model.layers.{i}.post_attention_layernorm.weight"] = self.hidden
            if self.model_type == "qwen3":
                sizes[f"model.layers.{i}.self_attn.q_norm.weight"] = self.head_dim
                sizes[f"model.layers.{i}.self_attn.k_norm.weight"] = self.head_dim
        return sizes


def matches(name: str, targets: list[str] | str) -> bool:
    """peft's target rule: a list matches the full module name or its last components (`q_proj` matches
    `model.layers.0.self_attn.q_proj`); a string is a regex that must match the full name."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def pattern_key(patterns: dict[str, Any], name: str) -> str | None:
    """peft's rank/alpha pattern rule: the first key K for which `(.*\\.)?K$` matches `name` from its start."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", name)), None)
