"""Adapter folders: `adapter_config.json` + `adapter_model.safetensors` in peft's layout, plus `qtrain.json`.

Tensor names are peft's: `base_model.model.` + the parameter's path in the wrapped model (e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`). `adapter_config.json` is what peft reads;
`qtrain.json` records every method block of the run, so qtrain can rebuild runs that mix methods. Folders are
written to a temporary sibling and renamed into place, so an existing adapter is never half-overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qtrain.errors import QTrainError
from qtrain.methods import Method, build_methods
from qtrain.methods.blocks import METHOD_BLOCKS

PEFT_PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the hub model the shipped GGUF was made from


def portable_base_model(name: str) -> str:
    """What adapter_config.json and qtrain.json say the base is: a hub id other machines can resolve, never a local
    path.

    The shipped alias becomes SmolLM2's hub id; a local folder becomes its folder name (peft, vLLM and llama.cpp's
    converter take the base from their own argument then; an absolute path would only leak this machine's layout).
    """
    from qtrain.modeling import SMOLLM2_ALIAS

    if name == SMOLLM2_ALIAS:
        return SMOLLM2_HUB_ID
    local = Path(name).expanduser()
    if local.is_absolute() or local.exists() or name.startswith("."):
        return local.resolve().name
    return name


def check_out(out: Path, overwrite: bool, reads: list[Path], ours: str) -> None:
    """Refuse an --out folder whose replacement (`publish_dir`) would lose what the user has: one that is, holds,
    or lies inside what the command reads (`reads`); an existing one without --overwrite; and with it, one that
    holds files other than an earlier output of this command (marked by its file `ours`)."""
    target = out.resolve()
    for read in reads:
        read = read.resolve()
        if target == read or read.is_relative_to(target) or target.is_relative_to(read):
            where = "is" if target == read else "holds" if read.is_relative_to(target) else "lies inside"
            raise QTrainError(f"--out: {out} {where} {read}, which this command reads and replacing --out would "
                              "delete; choose a folder outside it")
    if not out.exists():
        return
    if not overwrite:
        raise QTrainError(f"--out: {out} already exists; choose a new folder or pass --overwrite")
    if not out.is_dir():
        raise QTrainError(f"--out: {out} is a file; choose a folder path")
    files = sorted(f.name for f in out.iterdir())
    if files and ours not in files:
        raise QTrainError(f"--out: {out} holds files this command did not write (e.g. {files[0]}); --overwrite "
                          f"replaces only an earlier output of it (a folder with {ours}); choose a new folder, or "
                          "move those files away first")


def publish_dir(tmp: Path, directory: Path) -> None:
    """Move the finished folder `tmp` to `directory` (same filesystem), replacing an old one only at the end."""
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    old = None
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_adapter(directory: str | Path, methods: list[Method], params: dict[str, nn.Parameter],
                 base_model: str) -> Path:
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # copies: a bnb optimizer's segments make parameters views of one buffer, which safetensors refuses to write
    tensors = {PEFT_PREFIX + name: p.detach().to("cpu", copy=True).contiguous() for name, p in params.items()}
    for m in methods:  # peft's names where they differ (e.g. prompt tuning's `prompt_embeddings`)
        tensors = m.to_file(tensors)
    portable = portable_base_model(base_model)
    peft_configs = [c for c in (m.adapter_config(portable) for m in methods) if c is not None]
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if len(peft_configs) == 1 and len(methods) == 1:  # peft would silently drop a mix's other methods
            (tmp / "adapter_config.json").write_text(json.dumps(peft_configs[0], indent=2) + "\n")
        (tmp / "qtrain.json").write_text(json.dumps(
            {"base_model": portable, "methods": [m.block.model_dump(mode="json") for m in methods]}, indent=2) + "\n")
        publish_dir(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def load_adapter(model: nn.Module, directory: str | Path) -> tuple[list[Method], dict[str, nn.Parameter]]:
    """Attach the methods saved in `directory` to `model` and load their weights."""
    directory = Path(directory)
    meta_file = directory / "qtrain.json"
    if not meta_file.is_file() or not (directory / WEIGHTS).is_file():
        raise QTrainError(f"{directory}: not a qtrain adapter folder (needs qtrain.json and {WEIGHTS})")
    meta = json.loads(meta_file.read_text())
    blocks = [METHOD_BLOCKS[b["method"]].model_validate(b) for b in meta["methods"]]
    methods = build_methods(blocks)
    params: dict[str, nn.Parameter] = {}
    for m in methods:
        params.update(m.attach(model))
    saved = load_file(str(directory / WEIGHTS))
    for m in methods:
        saved = m.from_file(saved)
    names = {PEFT_PREFIX + n for n in params}
    problem = None
    if set(saved) != names:
        missing, extra = sorted(names - set(saved)), sorted(set(saved) - names)
        problem = f"missing {missing[:3]}, unexpected {extra[:3]}"
    elif wrong := [(n, tuple(saved[PEFT_PREFIX + n].shape), tuple(p.shape)) for n, p in params.items()
                   if saved[PEFT_PREFIX + n].shape != p.shape]:
        problem = f"{wrong[0][0]} is {wrong[0][1]} in the adapter and {wrong[0][2]} here" + \
            (f", and {len(wrong) - 1} more differ" if len(wrong) > 1 else "")
    if problem:
        for m in reversed(methods):  # the model as it was: a server keeps serving its other adapters
            m.detach(model)
        raise QTrainError(f"{directory}: adapter weights do not match this model ({problem}); it was trained on "
                          f"another base ({meta.get('base_model')!r}): load it on that one")
    with torch.no_grad():
        for name, p in params.items():
            if p.is_meta:  # attached to a skeleton (export): the saved tensor becomes the parameter's storage
                value = saved[PEFT_PREFIX + name].to(p.dtype)
                torch.utils.swap_tensors(p, nn.Parameter(value, requires_grad=p.requires_grad))
            else:
                p.copy_(saved[PEFT_PREFIX + name])
    return methods, params
