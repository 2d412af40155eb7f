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


@pytest.mark.parametrize("section,values,expect", [
    ("training", {"seed": -1}, "training.seed: input should be greater than or equal to 0, got -1"),
    ("training", {"seed": 2**32}, "training.seed: input should be less than 4294967296"),
    ("training", {"adam_betas": [1.5, 0.9]}, "training.adam_betas.0: input should be less than 1, got 1.5"),
    ("training", {"epochs": float("inf")}, "training.epochs: input should be a finite number"),
    ("training", {"weight_decay": float("nan")}, "training.weight_decay: input should be a finite number"),
    ("output", {"dir": ""}, "output.dir: string should have at least 1 character"),
])
def test_values_that_would_fail_once_the_run_started_are_refused_at_validation(section, values, expect):
    """Each passed validation and then stopped the run with a traceback (numpy's seed, torch's betas, an
    infinite step count), or meant the current directory (an empty output.dir)."""
    assert any(p.startswith(expect) for p in problems({**MINIMAL, section: values})), problems(
        {**MINIMAL, section: values})


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
    assert validate_config({**MINIMAL, "peft": [prefix, {"method": "lora"}]})  # prompt_tuning beside it: refused
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


def test_a_target_modules_string_must_be_a_valid_regex(tmp_path, capsys):
    """A string is a regex over full module names (peft's rule): a broken one fails validation, not the run after
    the model loaded. List items are plain names, matched as such, so they are not regexes to check."""
    from qtrain.cli import main

    assert validate_config({**MINIMAL, "peft": [{"method": "lora", "target_modules": r"model\.layers\.0\..*_proj"}]})
    assert validate_config({**MINIMAL, "peft": [{"method": "lora", "target_modules": ["foo("]}]})
    for block in ({"method": "lora", "target_modules": "foo("}, {"method": "ia3", "feedforward_modules": "foo("}):
        found = problems({**MINIMAL, "peft": [block]})
        assert len(found) == 1 and "'foo(' is not a valid regex" in found[0] and "list module names" in found[0]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    assert main(["run", str(path), "--set", "peft.0.target_modules=foo(", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "peft.0.target_modules: the string 'foo(' is not a valid regex" in err and "Traceback" not in err


def test_booleans_are_refused_where_numbers_are_expected(tmp_path):
    """pydantic alone reads `max_steps: yes` as 1 and `learning_rate: true` as 1.0; fields that take a boolean
    (`bool`, `bool | Literal["auto"]`) still do."""
    for item, key, expected in [("training.max_steps=true", "training.max_steps", "an integer"),
                                ("training.micro_batch_size=true", "training.micro_batch_size", "an integer or 'auto'"),
                                ("training.learning_rate=true", "training.learning_rate", "a number"),
                                ("training.adam_betas=[yes, 0.9]", "training.adam_betas", "a number"),
                                ("peft.0.r=true", "peft.0.r", "an integer"),
                                ("peft.0.rank_pattern={v_proj: on}", "peft.0.rank_pattern", "an integer"),
                                ("quantization.bits=true", "quantization.bits", "4, 8 or 'none'")]:
        assert problems(apply_overrides(MINIMAL, [item])) == [
            f"{key}: expected {expected}, got the boolean true (YAML reads yes/no and on/off as booleans too)"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL) + "training:\n  max_steps: yes\n")
    with pytest.raises(ConfigError, match="training.max_steps: expected an integer, got the boolean true"):
        load_config(path)
    cfg = validate_config({**MINIMAL, "training": {"gradient_checkpointing": False, "compile": True},
                           "model": {"embeddings_on_host": False}, "peft": [{"method": "lora", "dora": True}]})
    assert (cfg.training.gradient_checkpointing, cfg.training.compile, cfg.model.embeddings_on_host,
            cfg.peft[0].dora) == (False, True, False, True)


def test_a_value_that_fits_no_member_of_a_union_names_the_key():
    """Not pydantic's member tags (`training.micro_batch_size.constrained-int`, `.literal['auto']`): one problem."""
    assert problems(apply_overrides(MINIMAL, ["training.micro_batch_size=0", "training.loss_chunk_size=0",
                                              "training.gradient_checkpointing=maybe"])) == [
        "training.micro_batch_size: should be greater than 0 or 'auto', got 0",
        "training.gradient_checkpointing: should be a valid boolean or 'auto', got 'maybe'",
        "training.loss_chunk_size: should be greater than 0 or 'auto', got 0"]


def test_a_problem_an_override_caused_names_the_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    with pytest.raises(ConfigError) as e:
        load_config(path, ["training.max_steps=-1"])
    assert str(e.value).startswith("--set: 1 problem")
    assert e.value.problems == ["training.max_steps: input should be greater than 0, got -1 "
                                "(set by --set training.max_steps=-1)"]
    path.write_text(yaml.safe_dump({**MINIMAL, "training": {"max_steps": 3}}))
    with pytest.raises(ConfigError) as e:  # a check across keys names the override it involves
        load_config(path, ["training.epochs=1", "peft=[{method: lora, r: 0}]"])
    assert e.value.problems == [
        "peft.0.r: input should be greater than 0, got 0 (set by --set peft=[{method: lora, r: 0}])",
        "training: set either training.max_steps or training.epochs, not both (max_steps counts optimizer steps) "
        "(set by --set training.epochs=1)"]
    path.write_text(yaml.safe_dump({**MINIMAL, "training": {"warmup_steps": -1}}))
    with pytest.raises(ConfigError) as e:  # the file's own problem keeps the file's name
        load_config(path, ["training.max_steps=-1"])
    assert str(e.value).startswith(f"{path}: 2 problems")
    assert e.value.problems == [
        "training.max_steps: input should be greater than 0, got -1 (set by --set training.max_steps=-1)",
        "training.warmup_steps: input should be greater than or equal to 0, got -1"]


def test_a_directory_is_not_a_config_file(tmp_path, capsys):
    from qtrain.cli import main

    assert main(["run", str(tmp_path), "--dry-run"]) == 2
    assert f"{tmp_path}: 1 problem:\n  - is a directory; pass the YAML file inside it\n" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(MINIMAL))  # a run folder
    assert main(["run", str(tmp_path), "--dry-run"]) == 2
    assert f"is a directory; pass the YAML file inside it, e.g. '{tmp_path / 'config.yaml'}'" in capsys.readouterr().err


def test_prompt_and_prefix_tuning_together_are_refused():
    """Each is peft's one `prompt_embeddings` tensor: the adapter kept one and could not be loaded."""
    found = problems({**MINIMAL, "peft": [{"method": "prompt_tuning", "num_virtual_tokens": 2},
                                          {"method": "prefix_tuning", "num_virtual_tokens": 2}]})
    assert any(p.startswith("peft.1.method: prefix_tuning beside prompt_tuning (peft.0); both prepend learned "
                            "virtual positions") for p in found), found
