"""Where a run's numbers go: `metrics.jsonl` (one JSON object per logged step or evaluation), TensorBoard event
files when asked for, and a plain console line per record when no progress bar is shown (a pipe, a log file, CI).

Only the main process writes. Train records carry `loss`; evaluation records carry `eval_loss` (and exact match
and sample generations when configured), both keyed by `step`, so `qtrain report` can plot them together.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qtrain.errors import QTrainError


class RunLogger:
    def __init__(self, out: Path, total_steps: int, enabled: bool, console: bool, tensorboard: bool,
                 resumed_at: int = 0):
        self.total_steps, self.enabled, self.console = total_steps, enabled, console
        self.file = (out / "metrics.jsonl").open("a") if enabled else None
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise QTrainError("logging.tensorboard: true needs the tensorboard package; "
                                  "`pip install tensorboard`, or set logging.tensorboard: false") from None
            # resumed: the events a killed run logged after its checkpoint are dropped, as metrics.jsonl's lines are
            self.writer = SummaryWriter(log_dir=str(out / "tensorboard"),
                                        purge_step=resumed_at + 1 if resumed_at else None)

    def __call__(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(("eval/" if key.startswith(("eval_", "exact")) else "train/") + key,
                                           value, step)
            self.writer.flush()
        if self.console:
            print(self.line(record), flush=True)

    def line(self, r: dict[str, Any]) -> str:
        if "eval_loss" in r:
            em = f", exact match {r['exact_match']:.1%}" if "exact_match" in r else ""
            return f"eval at step {r['step']}: loss {r['eval_loss']:.4f}, perplexity {r['eval_perplexity']:.3f}{em}"
        if r.get("loss") is None:
            return f"step {r['step']}/{self.total_steps} skipped: non-finite loss or gradient"
        return (f"step {r['step']}/{self.total_steps} loss {r['loss']:.4f} lr {r['lr']:.2e} "
                f"{r['tokens_per_s']:.0f} tok/s, {r['elapsed_s']:.0f}s, peak {r['peak_mem_mb']:.0f} MiB")

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.writer is not None:
            self.writer.close()
