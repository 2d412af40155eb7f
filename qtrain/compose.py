"""`qtrain merge-adapters`: several LoRA adapters trained on the same base composed into one LoRA adapter.

Each input adapter i adds Δ_i = s_i · B_i A_i to a module's weight (s_i its alpha/r or alpha/√r). With weights
w_i the methods are:

- `cat`: A = [A_1; A_2; …], B = [w_1 s_1 B_1, w_2 s_2 B_2, …], scale 1, so B·A = Σ w_i Δ_i exactly, at rank Σ r_i.
- `linear` (peft's): A = Σ √(w_i s_i) A_i, B = Σ √(w_i s_i) B_i at a common rank. One adapter at weight 1 is
  reproduced, but for several the product has cross terms B_i A_j: it is not the weighted sum (use `cat`).
- `svd`: Σ w_i Δ_i truncated to `rank` by its SVD: B = U_r Σ_r, A = V_rᵀ. The error ‖Σ w_i Δ_i − B A‖_F is
  √(Σ of the squared discarded singular values). The sum has rank ≤ Σ r_i, so it is decomposed through QR of
  the stacked factors (an (Σr × Σr) SVD), never as a dense (out × in) matrix.
- `ties`: per module, each Δ_i is trimmed to its `density` largest-magnitude entries, a sign is elected per
  entry (the sign of the sum of the trimmed deltas), and the weighted entries agreeing with it are averaged
  (disjoint mean); `dare_linear`: each Δ_i keeps a random `density` share of entries, rescaled by 1/density,
  then the weighted sum; `dare_ties`: DARE's random drop and rescale, then TIES' sign election and disjoint
  mean. These act on dense deltas (elementwise trimming is not low-rank), one module at a time, and are then
  factored back to `rank` by SVD; the truncation error is reported.

A module an adapter does not target contributes zero. Every output module has the same rank (zero-padded
where its matrix is smaller), so the result is one plain LoRA that peft, qtrain and vLLM load.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qtrain.errors import QTrainError

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
_A, _B = ".lora_A.weight", ".lora_B.weight"


@dataclass
class LoraAdapter:
    """A LoRA adapter folder read into memory: per module (full name in the model) its A (r, in) and B (out, r)."""

    path: Path
    config: dict[str, Any]
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]

    @property
    def scaling(self) -> float:
        from qtrain.numerics import lora_scaling

        return lora_scaling(float(self.config["lora_alpha"]), int(self.config["r"]),
                            bool(self.config.get("use_rslora", False)))

    def delta(self, module: str) -> torch.Tensor:
        from qtrain.numerics import lora_delta_weight

        return lora_delta_weight(self.a[module].double(), self.b[module].double(), self.scaling)


def read_lora(path: str | Path) -> LoraAdapter:
    """Read a LoRA adapter in peft's layout (adapter_config.json + adapter_model.safetensors)."""
    from safetensors.torch import load_file

    from qtrain.adapter_io import PEFT_PREFIX, WEIGHTS

    path = Path(path)
    if (path / "adapter").is_dir() and not (path / "adapter_config.json").is_file():
        path = path / "adapter"  # a run folder
    cfg_file, weights = path / "adapter_config.json", path / WEIGHTS
    if not cfg_file.is_file() or not weights.is_file():
        raise QTrainError(f"{path}: not a LoRA adapter folder (needs adapter_config.json and {WEIGHTS})")
    config = json.loads(cfg_file.read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        kind = "DoRA" if config.get("use_dora") else config.get("peft_type")
        raise QTrainError(f"{path}: merge-adapters composes plain LoRA adapters; this one is {kind}")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise QTrainError(f"{path}: per-module ranks (rank_pattern/alpha_pattern) are not supported by "
                          "merge-adapters; train with one rank")
    a, b = {}, {}
    for key, t in load_file(str(weights)).items():
        name = key.removeprefix(PEFT_PREFIX)
        if name.endswith(_A):
            a[name.removesuffix(_A)] = t.float()
        elif name.endswith(_B):
            b[name.removesuffix(_B)] = t.float()
        else:
            raise QTrainError(f"{path}: tensor {key!r} is not a LoRA factor; merge-adapters composes LoRA only")
    if set(a) != set(b):
        raise QTrainError(f"{path}: lora_A and lora_B tensors do not pair up ({sorted(set(a) ^ set(b))[:3]})")
    return LoraAdapter(path, config, a, b)


def merge_adapters(paths: list[str | Path], out: str | Path, weights: list[float] | None = None,
                   method: str = "linear", density: float = 1.0, rank: int | None = None, seed: int = 0,
                   overwrite: bool = False) -> dict[str, Any]:
    """Compose LoRA adapters into one, written at `out` in peft's layout (plus qtrain.json); returns a summary."""
    from qtrain.adapter_io import check_out

    if method not in METHODS:
        raise QTrainError(f"--method: {method!r} is not allowed; choose one of {', '.join(METHODS)}")
    if len(paths) < 1:
        raise QTrainError("merge-adapters: give at least one adapter folder")
    weights = list(weights) if weights is not None else [1.0] * len(paths)
    if len(weights) != len(paths):
        raise QTrainError(f"--weights: {len(weights)} weights for {len(paths)} adapters; give one per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise QTrainError(f"--weights: {' '.join(map(str, weights))}: every weight must be a finite number (nan or "
                          "inf would make the merged adapter nan or inf)")
    if not 0 < density <= 1:
        raise QTrainError(f"--density: {density} must be in (0, 1] (the share of each delta's entries kept)")
    if rank is not None and method in ("cat", "linear"):
        raise QTrainError(f"--rank: {method} keeps the adapters' ranks; --rank applies to svd, ties and dare_*")
    if rank is not None and rank < 1:
        raise QTrainError(f"--rank: {rank} must be a positive integer")
    out = Path(out)
    check_out(out, overwrite, [Path(p) for p in paths], "qtrain.json")  # replaces only an adapter folder
    adapters = [read_lora(p) for p in paths]
    _check_same_base(adapters)
    modules = sorted(set().union(*(ad.a.keys() for ad in adapters)))
    if method == "linear" and len({ad.a[m].shape[0] for ad in adapters for m in ad.a}) > 1:
        raise QTrainError("--method linear: the adapters have different ranks; use cat, svd, ties or dare_*")
    ranks = [int(ad.config["r"]) for ad in adapters]
    target_rank = rank or {"cat": sum(ranks), "linear": ranks[0]}.get(method, sum(ranks))
    gen = torch.Generator().manual_seed(seed)

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    discarded: dict[str, float] = {}
    for m in modules:
        present = [(ad, w) for ad, w in zip(adapters, weights) if m in ad.a]
        if method == "cat":
            a, b = cat_factors(m, adapters, weights)
        elif method == "linear":
            a = sum(_signed_sqrt(w * ad.scaling)[1] * ad.a[m].double() for ad, w in present)
            b = sum(_signed_sqrt(w * ad.scaling)[0] * ad.b[m].double() for ad, w in present)
        elif method == "svd":
            a_cat, b_cat = cat_factors(m, adapters, weights)
            a, b, discarded[m] = svd_factors(b_cat, a_cat, target_rank)
        else:
            merged = merge_deltas([ad.delta(m) for ad, _ in present], [w for _, w in present], method, density, gen)
            a, b, discarded[m] = dense_factors(merged, target_rank)
        factors[m] = (a, b)
    width = max(a.shape[0] for a, _ in factors.values())
    factors = {m: _pad_rank(a, b, width) for m, (a, b) in factors.items()}
    _write(out, adapters, factors, width, overwrite)
    summary = {"method": method, "adapters": [str(p) for p in paths], "weights": weights, "rank": width,
               "modules": len(factors)}
    if discarded:
        total = math.sqrt(sum(v ** 2 for v in discarded.values()))
        summary["truncation_error_fro"] = total
    if method in ("ties", "dare_linear", "dare_ties"):
        summary.update(density=density, seed=seed)
    return summary


def _check_same_base(adapters: list[LoraAdapter]) -> None:
    bases = {ad.config.get("base_model_name_or_path") for ad in adapters}
    if len(bases) > 1:
        raise QTrainError(f"merge-adapters: the adapters name different bases {sorted(map(str, bases))}; "
                          "compose only adapters trained on the same base model")
    for m in set().union(*(ad.a.keys() for ad in adapters)):
        shapes = {(ad.a[m].shape[1], ad.b[m].shape[0]) for ad in adapters if m in ad.a}
        if len(shapes) > 1:
            raise QTrainError(f"merge-adapters: module {m} has different shapes {sorted(shapes)} across the "
                              "adapters; they were not trained on the same base")


def _signed_sqrt(x: float) -> tuple[float, float]:
    """(√|x|, sign(x)·√|x|): factors whose product is x, so a negative weight flips one factor, not a square root.
    peft's `linear` puts the sign on A (B's factor is √|x|), which decides the sign of the cross terms B_i·A_j."""
    r = math.sqrt(abs(x))
    return r, math.copysign(r, x)


def cat_factors(module: str, adapters: list[LoraAdapter], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked factors with B·A = Σ w_i s_i B_i A_i: A (Σr, in), B (out, Σr), in float64."""
    rows, cols = [], []
    for ad, w in zip(adapters, weights):
        if module in ad.a:
            rows.append(ad.a[module].double())
            cols.append(w * ad.scaling * ad.b[module].double())
    return torch.cat(rows, 0), torch.cat(cols, 1)


def svd_factors(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factors of B·A (B (out, R), A (R, in)) without forming it; and the Frobenius error."""
    qb, rb = torch.linalg.qr(b)  # (out, R), (R, R)
    qa, ra = torch.linalg.qr(a.T)  # (in, R), (R, R)
    u, s, vh = torch.linalg.svd(rb @ ra.T)  # core (R, R): B·A = qb · core · qaᵀ
    k = min(rank, s.numel())
    new_b = qb @ u[:, :k] * s[:k]  # (out, k)
    new_a = vh[:k] @ qa.T  # (k, in)
    return new_a, new_b, float(s[k:].pow(2).sum().sqrt())


def dense_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factors of a dense (out, in) delta, and the Frobenius norm of what is discarded."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.numel())
    return vh[:k], u[:, :k] * s[:k], float(s[k:].pow(2).sum().sqrt())


def merge_deltas(deltas: list[torch.Tensor], weights: list[float], method: str, density: float,
                 gen: torch.Generator) -> torch.Tensor:
    """TIES / DARE on dense task deltas of one module (each (out, in)); see the module docstring."""
    stacked = torch.stack(deltas)  # (n, out, in)
    w = torch.tensor(weights, dtype=stacked.dtype).view(-1, 1, 1)
    if method == "ties":
        stacked = magnitude_prune(stacked, density)
    else:  # dare_linear, dare_ties
        keep = torch.rand(stacked.shape, generator=gen, dtype=stacked.dtype) < density
        stacked = stacked * keep / density
    if method == "dare_linear":
        return (w * stacked).sum(0)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).to(stacked.dtype)  # (out, in)
    agree = (stacked.sign() == elected) & (stacked != 0)  # (n, out, in)
    total = (w * stacked * agree).sum(0)
    return total / agree.sum(0).clamp(min=1)


def magnitude_prune(stacked: torch.Tensor, density: float) -> torch.Tensor:
    """Keep each delta's ⌈density·numel⌉ entries of largest magnitude (per delta), zero the rest."""
    flat = stacked.flatten(1)  # (n, out·in)
    k = max(1, math.ceil(density * flat.shape[1]))
    idx = flat.abs().topk(k, dim=1).indices
    kept = torch.zeros_like(flat).scatter(1, idx, flat.gather(1, idx))
    return kept.view_as(stacked)


def _pad_rank(a: torch.Tensor, b: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows of A and columns of B up to `width`: the product is unchanged."""
    extra = width - a.shape[0]
    if extra:
        a = torch.cat([a, a.new_zeros(extra, a.shape[1])], 0)
        b = torch.cat([b, b.new_zeros(b.shape[0], extra)], 1)
    return a, b


def _write(out: Path, adapters: list[LoraAdapter], factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
           rank: int, overwrite: bool) -> None:
    from safetensors.torch import save_file

    from qtrain.adapter_io import PEFT_PREFIX, WEIGHTS, publish_dir

    short = sorted({m.rsplit(".", 1)[-1] for m in factors})
    plain_lists = all(isinstance(t := ad.config.get("target_modules"), list) and all("." not in n for n in t)
                      and not ad.config.get("layers_to_transform") for ad in adapters)
    # Short names are portable but select every layer's module of that name; keep full names otherwise.
    targets = short if plain_lists else sorted(factors)
    config = dict(adapters[0].config)
    config.update(r=rank, lora_alpha=rank, lora_dropout=0.0, use_rslora=False, use_dora=False,
                  target_modules=targets, rank_pattern={}, alpha_pattern={}, layers_to_transform=None,
                  layers_pattern=None, modules_to_save=None, inference_mode=True)
    block = {"method": "lora", "r": rank, "alpha": float(rank), "dropout": 0.0, "target_modules": targets,
             "rslora": False}
    tensors = {}
    for m, (a, b) in factors.items():
        tensors[f"{PEFT_PREFIX}{m}{_A}"] = a.float().contiguous()
        tensors[f"{PEFT_PREFIX}{m}{_B}"] = b.float().contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "qtrain.json").write_text(json.dumps(
            {"base_model": config.get("base_model_name_or_path"), "methods": [block]}, indent=2) + "\n")
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
