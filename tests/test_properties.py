"""Property tests: no input makes the config parser or the data formatter fail with anything but a QTrainError
(the CLI's exit 2 with a message). Arbitrary YAML-ish documents, override strings and JSON rows."""

import json
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qtrain.config import DataSection, RunConfig, apply_overrides, load_config, validate_config
from qtrain.errors import QTrainError
from conftest import make_tokenizer

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEYS = ["model", "peft", "data", "training", "quantization", "eval", "logging", "output", "path", "method", "r",
        "lora", "train", "format", "max_steps", "epochs", "learning_rate", "bits", "fields", "dir", "0", "x"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["lora", "4", "none", "nf4", "1e-4", "all-linear"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), inner, max_size=4)),
    max_leaves=12)


def mostly(valid, weight=3):
    """`valid` most of the time, anything at all otherwise."""
    return st.one_of(*[valid] * weight, values)


near_valid = st.fixed_dictionaries(  # valid configs with some values swapped for junk
    {"peft": st.lists(st.fixed_dictionaries({"method": mostly(st.just("lora"), 6)}, optional={
        "r": mostly(st.integers(-1, 64)), "alpha": mostly(st.floats(-1, 64)), "dropout": mostly(st.floats(-1, 1)),
        "target_modules": mostly(st.sampled_from(["all-linear", ["q_proj"], "(", "", []]))}), max_size=2),
     "data": st.fixed_dictionaries({"train": mostly(st.text(max_size=10))}, optional={
         "format": mostly(st.sampled_from(["instruction", "chat", "text", "csv"])),
         "max_seq_len": mostly(st.integers(-1, 4096))})},
    optional={"training": st.fixed_dictionaries({}, optional={
        k: mostly(v) for k, v in {"max_steps": st.integers(-1, 99), "epochs": st.floats(-1, 3),
                                  "learning_rate": st.floats(-1, 1), "optimizer": st.sampled_from(["adamw", "sgd"]),
                                  "save_every": st.integers(-1, 9) | st.none(), "keep_last": st.integers(-1, 9),
                                  "max_bad_steps": st.integers(-1, 9)}.items()}),
        "quantization": st.fixed_dictionaries({}, optional={"bits": mostly(st.sampled_from([4, 8, "none", None, 3]))}),
        "junk": values})


def only_qtrain_errors(fn, *args):
    try:
        return fn(*args)
    except QTrainError as e:
        assert str(e).strip(), "an error must say something"
        return None


@FAST
@given(st.one_of(values, near_valid))
def test_validate_config_accepts_or_explains(raw):
    cfg = only_qtrain_errors(validate_config, raw if isinstance(raw, dict) else {"peft": raw})
    assert cfg is None or isinstance(cfg, RunConfig)


@FAST
@given(near_valid, st.lists(st.text(max_size=20) | st.builds(lambda k, v: f"{k}={v}", st.sampled_from(
    ["training.max_steps", "peft.0.r", "peft.1", "data", "data.train.x", "a.b.c", ".", "training"]),
    st.text(max_size=8)), max_size=3))
def test_overrides_accept_or_explain(raw, overrides):
    updated = only_qtrain_errors(apply_overrides, raw, overrides)
    if updated is not None:
        only_qtrain_errors(validate_config, updated)


@FAST
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200),
                 values.map(lambda v: yaml.safe_dump(v, allow_unicode=True))))
def test_load_config_reads_any_file(content):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.yaml"
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
        only_qtrain_errors(load_config, path)


# ------------------------------------------------------------------------------------------------ data


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) |
                           st.text(max_size=20), lambda inner: st.lists(inner, max_size=3) |
                           st.dictionaries(st.sampled_from(["role", "content", "x"]), inner, max_size=3),
                           max_leaves=8)
text = st.text(max_size=20)
field = st.one_of(text, text, text, json_values)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"]) | json_values,
                                 "content": field})
row = st.fixed_dictionaries({"instruction": field, "output": field}, optional={
    "input": field, "text": field, "messages": st.lists(message, max_size=3) | json_values, "other": json_values})
rows = st.lists(st.one_of(row, row, row, st.dictionaries(st.sampled_from(["instruction", "output", "text", "x"]),
                                                        json_values, max_size=4)), min_size=1, max_size=4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(rows, st.sampled_from(["instruction", "chat", "text"]), st.sampled_from(["auto", "alpaca"]),
       st.integers(1, 64))
def test_prepare_accepts_or_explains_any_rows(tokenizer, rows, fmt, template, max_len):
    from qtrain.data import prepare

    if fmt != "instruction":  # prompt_template applies to instruction rows alone (the config refuses it otherwise)
        template = "auto"
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = DataSection(train=str(path), format=fmt, prompt_template=template, max_seq_len=max_len)
        result = only_qtrain_errors(prepare, str(path), cfg, tokenizer, "data.train")
    if result is not None:
        dataset, stats = result
        assert stats.examples == len(dataset) >= 1
        assert all(len(x) <= max_len for x in dataset["input_ids"])
