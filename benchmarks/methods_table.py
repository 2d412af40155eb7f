"""Held-out accuracy of each PEFT method on the shipped date task, with the quickstart's budget.

Every row is `qtrain run configs/quickstart.yaml` (4-bit NF4 SmolLM2-135M-Instruct, 40 steps × 8 examples) with
only the `peft:` block and the learning rate changed (each method at a learning rate suited to it: vectors and
soft prompts need larger steps than low-rank matrices). Prints a Markdown table for the README.

    python benchmarks/methods_table.py [--only NAME ...] [--out runs/methods]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

METHODS = {  # name: (peft block as YAML flow, learning rate)
    "lora r=16 all-linear": ("[{method: lora, r: 16, alpha: 32, dropout: 0.0}]", 1e-3),
    "lora + dora": ("[{method: lora, r: 16, alpha: 32, dropout: 0.0, dora: true}]", 1e-3),
    "ia3": ("[{method: ia3}]", 1e-2),
    "bitfit all-linear": ("[{method: bitfit}]", 1e-2),
    "sparse 1% (gradient)": ("[{method: sparse, density: 0.01, select: gradient}]", 1e-3),
    "adapter houlsby": ("[{method: adapter, placement: houlsby}]", 1e-3),
    "prompt_tuning 20 tokens": ("[{method: prompt_tuning, num_virtual_tokens: 20}]", 3e-2),
    "prefix_tuning 20 tokens": ("[{method: prefix_tuning, num_virtual_tokens: 20}]", 1e-2),
    "unfreeze last 2 blocks": ("[{method: unfreeze, last_n: 2}]", 1e-4),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="run only these rows (by name)")
    ap.add_argument("--out", default="runs/methods")
    args = ap.parse_args()
    rows = []
    for name, (block, lr) in METHODS.items():
        if args.only and name not in args.only:
            continue
        out = Path(args.out) / name.split()[0].replace("+", "").strip()
        if "dora" in name:
            out = out.with_name("dora")
        proc = subprocess.run(
            [sys.executable, "-m", "qtrain", "run", "configs/quickstart.yaml", "--output-dir", str(out),
             "--overwrite", "--set", f"peft={block}", "--set", f"training.learning_rate={lr}",
             "--set", "logging.progress=false", "--set", "eval.before_training=false"],
            cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        s = json.loads((REPO / out / "summary.json").read_text())
        rows.append((name, s["trainable_parameters"], lr, s["first_loss"], s["final_loss"],
                     s["exact_match"].get("trained"), s["forgetting"]["trained"]["reference_perplexity"]))
        print(f"done: {name}", file=sys.stderr, flush=True)
    print("| method | trainable parameters | lr | loss first → last | held-out exact match | general-text ppl |")
    print("|---|---|---|---|---|---|")
    for name, n, lr, first, last, em, ppl in rows:
        print(f"| {name} | {n:,} | {lr:g} | {first:.3f} → {last:.4f} | {em:.0%} | {ppl:.2f} |")


if __name__ == "__main__":
    main()
