"""`qtrain inspect ADAPTER`: what an adapter folder holds and which tools can load it.

Reads only metadata: `adapter_config.json` (peft's), `qtrain.json` (qtrain's record of the method blocks) and
the safetensors header (names, shapes, dtypes; no tensor data). The consumer rules are what those tools check:

- peft: an adapter_config.json with a `peft_type` and tensors in its naming; qtrain writes one only when the run
  used a single method peft has (mixtures load in qtrain only).
- vLLM: LoRA only; it refuses DoRA (`use_dora`), `modules_to_save` (extra saved modules), LoRA bias, and any
  tensor that is not a lora_A/lora_B factor; ranks above its `--max-lora-rank` (default 16) need that flag.
- llama.cpp `convert_lora_to_gguf.py`: LoRA A/B tensors only (norms are passed through; embeddings, lm_head and
  DoRA magnitudes stop it), one `lora_alpha` for all modules (no rank/alpha patterns), and the scale it applies
  is alpha/r, so an rsLoRA adapter converts with the wrong scale; it reads the base's config from
  `base_model_name_or_path` on the hub unless `--base DIR` is given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qtrain.errors import QTrainError

_FACTOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def inspect_adapter(path: str | Path) -> dict[str, Any]:
    """A summary of the adapter at `path` (or a run folder's adapter/): config, tensors, and consumer verdicts."""
    from safetensors import safe_open

    from qtrain.adapter_io import WEIGHTS

    path = Path(path)
    if (path / "adapter").is_dir() and not (path / WEIGHTS).is_file():
        path = path / "adapter"
    if not (path / WEIGHTS).is_file():
        raise QTrainError(f"{path}: no {WEIGHTS}; pass an adapter folder (or a run folder holding adapter/)")
    config = _read_json(path / "adapter_config.json")
    meta = _read_json(path / "qtrain.json")
    tensors: dict[str, tuple[list[int], str]] = {}
    with safe_open(str(path / WEIGHTS), framework="pt") as f:
        for key in f.keys():
            sl = f.get_slice(key)
            tensors[key] = (list(sl.get_shape()), sl.get_dtype())
    ranks = sorted({shape[0] for key, (shape, _) in tensors.items() if key.endswith(".lora_A.weight")})
    info = {
        "path": str(path), "peft_config": config, "qtrain": meta,
        "methods": [b.get("method") for b in (meta or {}).get("methods", [])] or
                   ([str(config["peft_type"]).lower()] if config else []),
        "ranks": ranks, "targets": config.get("target_modules") if config else None,
        "base_model": (config or {}).get("base_model_name_or_path") or (meta or {}).get("base_model"),
        # sparse fine-tuning's int64 mask positions travel with its values, and are no parameters
        "tensors": len(tensors), "parameters": sum(_numel(s) for s, d in tensors.values() if not d.startswith("I")),
        "dtypes": sorted({d for _, d in tensors.values()}),
    }
    info["consumers"] = {"qtrain": _qtrain(meta), "peft": _peft(config, meta), "vLLM": _vllm(config, tensors),
                         "llama.cpp": _llama_cpp(config, tensors)}
    return info


def describe(info: dict[str, Any]) -> str:
    c = info["peft_config"] or {}
    lines = [f"adapter: {info['path']}", f"methods: {', '.join(info['methods']) or 'unknown'}"]
    if c.get("peft_type") == "LORA":
        lines.append(f"lora: r={c.get('r')}, alpha={c.get('lora_alpha')}, rslora={c.get('use_rslora', False)}, "
                     f"dora={c.get('use_dora', False)}, dropout={c.get('lora_dropout')}")
    if info["ranks"]:
        lines.append(f"ranks in the tensors: {', '.join(map(str, info['ranks']))}")
    lines += [f"targets: {info['targets']}", f"base model: {info['base_model']}",
              f"tensors: {info['tensors']} ({info['parameters']:,} parameters, {', '.join(info['dtypes'])})",
              "loads in:"]
    for name, (ok, why) in info["consumers"].items():
        lines.append(f"  {name}: {'yes' if ok else 'no'}{' — ' + why if why else ''}")
    return "\n".join(lines)


def _read_json(file: Path) -> dict[str, Any] | None:
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise QTrainError(f"{file}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _qtrain(meta: dict[str, Any] | None) -> tuple[bool, str]:
    if meta is None:
        return False, "no qtrain.json (not written by qtrain); `qtrain merge-adapters` still reads peft LoRA folders"
    return True, ""


def _peft(config: dict[str, Any] | None, meta: dict[str, Any] | None) -> tuple[bool, str]:
    if config is None or "peft_type" not in config:
        n = len((meta or {}).get("methods", []))
        why = "it mixes several methods" if n > 1 else "peft has no equivalent of this method"
        return False, f"no adapter_config.json: {why}; load it with qtrain (qtrain.adapter_io.load_adapter)"
    return True, ""


def _vllm(config: dict[str, Any] | None, tensors: dict[str, Any]) -> tuple[bool, str]:
    if not config or config.get("peft_type") != "LORA":
        return False, "vLLM serves LoRA adapters only"
    if config.get("use_dora"):
        return False, "vLLM does not support DoRA (use_dora)"
    if config.get("modules_to_save"):
        return False, "vLLM refuses modules_to_save (extra saved modules)"
    if config.get("bias", "none") != "none":
        return False, "vLLM refuses LoRA bias (bias != 'none')"
    extra = [k for k in tensors if not k.endswith(_FACTOR_SUFFIXES)]
    if extra:
        return False, f"tensors other than lora_A/lora_B ({extra[0]}, ...)"
    r = max([int(config.get("r", 0))] + [int(v) for v in (config.get("rank_pattern") or {}).values()])
    return True, f"start vLLM with --max-lora-rank {r}" if r > 16 else ""


def _llama_cpp(config: dict[str, Any] | None, tensors: dict[str, Any]) -> tuple[bool, str]:
    if not config or config.get("peft_type") != "LORA" or "lora_alpha" not in config:
        return False, "convert_lora_to_gguf.py converts LoRA adapters (adapter_config.json with lora_alpha)"
    odd = [k for k in tensors if not k.endswith(_FACTOR_SUFFIXES) and "norm" not in k]
    if odd:
        return False, f"tensors other than lora_A/lora_B stop the converter ({odd[0]}, ...)"
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        return False, "the converter uses one lora_alpha for every module (rank/alpha patterns are ignored)"
    if config.get("use_rslora"):
        return False, "the converter scales by alpha/r, not rsLoRA's alpha/sqrt(r); the result would be wrong"
    base = str(config.get("base_model_name_or_path") or "")
    if "/" not in base:
        return True, f"pass --base DIR (the base's config); {base or 'no base'} is not a hub id"
    return True, ""
