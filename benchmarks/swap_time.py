"""Switching adapters on one loaded base vs reloading the base, on the shipped SmolLM2-135M-Instruct.

Two LoRA adapters (r=16 on every linear layer, random A and B, as a trained one would be) are registered with
a `qtrain.serve.Server` on the 4-bit base; the script times switching between them and the bare base
(detach + attach + read the adapter file), and, for comparison, what serving a different adapter costs without
hot-swapping: loading (and quantizing) the base again, then loading the adapter.

    python benchmarks/swap_time.py [--model smollm2-135m-instruct] [--bits 4] [--switches 20] [--reloads 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    from torch import nn

    from qtrain.adapter_io import load_adapter, save_adapter
    from qtrain.config import ModelSection, QuantizationSection
    from qtrain.methods import build_methods
    from qtrain.methods.blocks import LoRABlock
    from qtrain.modeling import build_skeleton, load_model, resolve_model_path
    from qtrain.serve import Server

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--bits", default="4")
    ap.add_argument("--switches", type=int, default=20)
    ap.add_argument("--reloads", type=int, default=3)
    args = ap.parse_args()
    section = ModelSection(path=args.model)
    quant = QuantizationSection(bits=args.bits if args.bits == "none" else int(args.bits))
    path = resolve_model_path(section)
    cpu = torch.device("cpu")

    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for i, name in enumerate(["a", "b"]):
            skeleton = build_skeleton(section, path, torch.float32)
            methods = build_methods([LoRABlock(method="lora", r=16, alpha=32, target_modules="all-linear")])
            params = methods[0].attach(skeleton)
            g = torch.Generator().manual_seed(i)
            real = {n: nn.Parameter(torch.randn(p.shape, generator=g) * 0.01) for n, p in params.items()}
            folders[name] = save_adapter(Path(tmp) / name, methods, real, base_model=args.model)
        adapter_mb = (folders["a"] / "adapter_model.safetensors").stat().st_size / 2**20

        t0 = time.perf_counter()
        server = Server(load_model(section, quant, cpu, path=path))
        first_load = time.perf_counter() - t0
        for name, folder in folders.items():
            server.add_adapter(name, folder)
        order = ["a", "b", None]
        switch = []
        for k in range(args.switches):
            t = time.perf_counter()
            server.use(order[k % 3])
            switch.append(time.perf_counter() - t)

        reload = []
        for k in range(args.reloads):
            t = time.perf_counter()
            model = load_model(section, quant, cpu, path=path).model
            load_adapter(model, folders["ab"[k % 2]])
            reload.append(time.perf_counter() - t)
            del model

    result = {
        "model": path.name, "bits": args.bits, "adapter": f"LoRA r=16 all-linear, {adapter_mb:.1f} MiB",
        "switch_ms_median": round(1000 * statistics.median(switch), 1),
        "switch_ms_max": round(1000 * max(switch), 1),
        "reload_base_and_adapter_s_median": round(statistics.median(reload), 2),
        "first_load_s": round(first_load, 2),
        "speedup": round(statistics.median(reload) / statistics.median(switch)),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
