"""`qtrain report RUN_DIR`: a PNG of the loss and learning-rate curves and a short Markdown summary.

Reads only the run folder (config.yaml, metrics.jsonl, summary.json, eval.json when present), so it works on a
run copied from another machine. The picture has two panels sharing the step axis: train loss (log scale, with
eval points when logged) on top, learning rate below.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from qtrain.errors import QTrainError


def _records(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise QTrainError(f"{run}: no metrics.jsonl; give the output.dir of a `qtrain run`")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise QTrainError(f"{path}: no logged steps yet")
    return rows


def plot(rows: list[dict[str, Any]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r.get("loss") is not None]
    evals = [r for r in rows if "eval_loss" in r]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1.3])
    top.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", lw=1.5, label="train loss")
    if evals:
        top.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color="tab:orange",
                 label="eval loss")
    top.set_yscale("log")
    top.set_ylabel("loss (log scale)")
    top.grid(True, which="both", alpha=0.3)
    top.legend()
    top.set_title(title)
    bottom.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:green", lw=1.5)
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("optimizer step")
    bottom.grid(True, alpha=0.3)
    bottom.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _count(n: int | None) -> str:
    return f"{n:,}" if isinstance(n, int) else "?"


def write_report(run_dir: str) -> tuple[Path, Path]:
    run = Path(run_dir)
    rows = _records(run)
    cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    evaluation = json.loads((run / "eval.json").read_text()) if (run / "eval.json").is_file() else {}
    model = cfg.get("model", {}).get("path", "?")
    methods = ", ".join(b.get("method", "?") for b in cfg.get("peft", []))
    png = run / "report.png"
    plot(rows, png, f"{model} · {methods} · {cfg.get('quantization', {}).get('bits', '?')}-bit base")

    train = [r for r in rows if r.get("loss") is not None]
    if not train:
        raise QTrainError(f"{run / 'metrics.jsonl'}: no training steps logged yet")
    # a finished run's summary has every step's loss and the training time; metrics.jsonl only the logged steps
    # (every `log_every`) and elapsed wall time, evaluations and checkpoint saves included
    first = summary.get("first_loss", train[0]["loss"])
    last = summary.get("final_loss", train[-1]["loss"])
    steps, seconds = summary.get("steps", train[-1]["step"]), summary.get("train_seconds", train[-1].get("elapsed_s"))
    md = [f"# qtrain run: {run.name}", "", "![loss and learning rate](report.png)", "",
          "| | |", "|---|---|",
          f"| model | {model} ({cfg.get('quantization', {}).get('bits', '?')}-bit "
          f"{cfg.get('quantization', {}).get('type', '')}) |",
          f"| methods | {methods} |",
          f"| trainable parameters | {_count(summary.get('trainable_parameters'))} of "
          f"{_count(summary.get('base_parameters'))} |",
          f"| steps | {steps} |",
          f"| loss | {first:.4f} → {last:.4f} |",
          f"| time | {seconds if seconds is not None else '?'} s training, {summary.get('total_seconds', '?')} s in "
          "all |",
          f"| peak memory | {summary.get('peak_mem_mb', train[-1].get('peak_mem_mb', '?'))} MiB |"]
    for key in ("eval_loss", "eval_perplexity"):
        if key in summary:
            md.append(f"| {key.replace('_', ' ')} | {summary[key]:.4f} |")
    for name, value in summary.get("exact_match", {}).items():
        md.append(f"| exact match, {name} | {value:.1%} |")
    # formatted here from the numbers, never copied from eval.json's `lines` (an older qtrain's wording)
    from qtrain.evaluate import forgetting_lines

    scores = evaluation if "base" in evaluation else summary.get("forgetting", {})
    lines = forgetting_lines(scores["base"], scores["trained"]) if "base" in scores else []
    if lines:
        md += ["", "## Forgetting report", ""] + [f"- {line}" for line in lines]
    text = run / "report.md"
    text.write_text("\n".join(md) + "\n")
    return png, text
