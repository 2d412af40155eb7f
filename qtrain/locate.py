"""Where a model's config.json is, found without loading anything (and without importing torch).

The planner reads only this file. A local folder has it; the alias `smollm2-135m-instruct` has it in qtrain's
cache once converted, else in a copy shipped with qtrain (the same file, no weights); a hub id has it in the
Hugging Face cache if it was ever downloaded. Nothing here touches a network.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path

from qtrain.errors import QTrainError

SMOLLM2_ALIAS = "smollm2-135m-instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("QTRAIN_CACHE", Path.home() / ".cache" / "qtrain"))


def model_config_file(path: str, revision: str | None = None) -> Path:
    """The config.json for `model.path` (local folder, alias or an already-downloaded hub id)."""
    if path == SMOLLM2_ALIAS:
        cached = cache_dir() / "models" / SMOLLM2_ALIAS / "config.json"
        if cached.is_file():
            return cached
        return Path(str(resources.files("qtrain.resources") / f"{SMOLLM2_ALIAS}.config.json"))
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise QTrainError(f"model.path: {path!r} has no config.json; point it at a Hugging Face model folder")
        return local / "config.json"
    if local.is_file():
        return local
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" /
                                                                          "huggingface")) / "hub")
        snapshots = hub / f"models--{path.replace('/', '--')}" / "snapshots"
        found = sorted(snapshots.glob(f"{revision or '*'}/config.json"), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
        raise QTrainError(f"model.path: {path!r} is a hub id that is not in the local Hugging Face cache; the "
                          "planner downloads nothing: pass --model-config FILE (that model's config.json)")
    raise QTrainError(f"model.path: {path!r} is neither a local folder, a hub id, nor the alias "
                      f"{SMOLLM2_ALIAS!r}; fix the path or pass --model-config FILE")
