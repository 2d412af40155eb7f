"""Config: strict schema, every problem reported at once with its dotted key, overrides through the validator,
and the CLI's exit code 2 without a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qtrain.config import apply_overrides, load_config, validate_config
from qtrain.errors import ConfigError

MINIMAL = {"peft": [{"method": "lora"}], "data": {"train": "x.jsonl"}}
REPO = Path(__file__).resolve().parents[1]


def problems(raw):
    with pytest.raises(ConfigError) as e:
        validate_config(raw)
    return e.value.problems


def test_defaults_live_in_the_schema():
    cfg = validate_config(MINIMAL)
    assert (cfg.quantization.bits, cfg.quantization.type, cfg.quantization.double_quant) == (4, "nf4", True)
    assert cfg.peft[0].r == 16 and cfg.peft[0].target_modules == "all-linear"
    assert cfg.model.trust_remote_code is False


def test_unknown_keys_suggest_the_right_one():
    raw = {**MINIMAL, "training": {"learnig_rate": 1e-4}, "peft": [{"method": "lora", "rr": 4}]}
    found = problems(raw)
    assert any("training.learnig_rate: unknown key; did you mean 'training.learning_rate'?" in p for p in found)
    assert any("peft.0.rr: unknown key; did you mean 'peft.0.r'?" in p for p in found)
    assert len(found) == 2  # all problems at once


def test_wrong_types_and_impossible_values_name_key_and_value():
    raw = {**MINIMAL, "training": {"learning_rate": "3e-4x", "micro_batch_size": 0, "optimizer": "sgd"},
           "quantization": {"bits": 3}}
    text = "\n".join(problems(raw))
    assert "training.learning_rate" in text and "'3e-4x'" in text
    assert "training.micro_batch_size" in text
    assert "training.optimizer: 'sgd' is not allowed" in text and "paged_adamw_8bit" in text
    assert "quantization.bits: 3 is not allowed" in text


def test_max_steps_and_epochs_are_exclusive():
    assert any("either training.max_steps or training.epochs" in p
               for p in problems({**MINIMAL, "training": {"max_steps": 3, "epochs": 1}}))


def test_unknown_method_and_missing_sections():
    found = problems({"peft": [{"method": "lorax"}]})
    assert any("peft.0: unknown method 'lorax'" in p for p in found)
    assert any(p.startswith("data: required") for p in found)


def test_prefix_tuning_rules_are_checked_before_anything_loads():
    """Prefix tuning trains under gradient checkpointing (on, off or auto); what stays impossible is refused by
    the validator: two blocks of virtual positions of one kind (one paragraph naming field, value and fix), and
    packing (tests/test_packing.py)."""
    prefix = {"method": "prefix_tuning", "num_virtual_tokens": 8}
    for checkpointing in (True, False, "auto"):
        cfg = validate_config({**MINIMAL, "peft": [prefix], "training": {"gradient_checkpointing": checkpointing}})
        assert cfg.training.gradient_checkpointing == checkpointing
    assert validate_config({**MINIMAL, "peft": [prefix, {"method": "prompt_tuning"}, {"method": "lora"}]})
    for method in ("prefix_tuning", "prompt_tuning"):
        found = problems({**MINIMAL, "peft": [{"method": "lora"}, {"method": method, "num_virtual_tokens": 8},
                                               {"method": method, "num_virtual_tokens": 16}]})
        assert found == [f"peft.2.method: a second {method} block (the first is peft.1); a model takes one set of "
                         f"virtual positions, so use one {method} block with num_virtual_tokens: 24 (their total)"]


def test_overrides_go_through_the_validator():
    raw = apply_overrides(MINIMAL, ["peft.0.r=4", "quantization.bits=none", "training.max_steps=7"])
    cfg = validate_config(raw)
    assert (cfg.peft[0].r, cfg.quantization.bits, cfg.training.max_steps) == (4, "none", 7)
    assert any("training.max_steps" in p for p in problems(apply_overrides(MINIMAL, ["training.max_steps=-1"])))
    with pytest.raises(ConfigError, match="peft has no item '2'"):
        apply_overrides(MINIMAL, ["peft.2.r=4"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        apply_overrides(MINIMAL, ["training.max_steps"])


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  path: x\npeft: [\n")
    with pytest.raises(ConfigError, match="line"):
        load_config(path)


def test_cli_reports_config_errors_with_exit_2_and_no_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "training": {"learnig_rate": 1e-4}}))
    proc = subprocess.run([sys.executable, "-m", "qtrain", "run", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "did you mean 'training.learning_rate'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_validate(config):
    proc = subprocess.run([sys.executable, "-m", "qtrain", "run", str(REPO / "configs" / config), "--dry-run"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["peft"]
