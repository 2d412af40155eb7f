"""Hostile and bad inputs through the real CLI: each stops with a named error (file, line or key), exit code 2,
no traceback, and nothing already on disk changed. Plus the security promises: safetensors only, no remote code
unless asked, no network for local models."""

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qtrain.config import DataSection, ModelSection, load_config
from qtrain.errors import QTrainError
from conftest import make_tokenizer, write_config

REPO = Path(__file__).resolve().parents[1]
ROWS = [{"instruction": "Rewrite the date.", "input": f"March {i}, 2021", "output": f"2021-03-0{i}"}
        for i in range(1, 5)]


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def model_variant(tiny_model_dir, folder, edit_config=None, edit_tokenizer=None):
    shutil.copytree(tiny_model_dir, folder)
    for name, edit in (("config.json", edit_config), ("tokenizer_config.json", edit_tokenizer)):
        if edit:
            data = json.loads((folder / name).read_text())
            edit(data)
            (folder / name).write_text(json.dumps(data))
    return folder


def snapshot(root):
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_hostile_inputs_fail_with_a_named_error_and_damage_nothing(tiny_model_dir, tmp_path, capsys):
    from qtrain.cli import main

    good = jsonl(tmp_path / "good.jsonl", ROWS)
    cases = {}  # name -> (config overrides or extra args, expected message pattern)

    def case(name, *args, data=None, model=None, expect):
        folder = tmp_path / name
        folder.mkdir()
        config = write_config(folder, model or tiny_model_dir, data or good)
        cases[name] = ([str(config), *args], expect, folder)

    case("malformed_jsonl", data=jsonl(tmp_path / "bad.jsonl", [ROWS[0], '{"instruction": "x", "output": ']),
         expect=r"bad\.jsonl:2: not valid JSON")
    case("missing_field", data=jsonl(tmp_path / "nofield.jsonl", [{"instruction": "x", "input": "y"}]),
         expect=r"nofield\.jsonl:1: missing field 'output'")
    case("empty_dataset", data=jsonl(tmp_path / "empty.jsonl", []),
         expect=r"data\.train: .*empty\.jsonl' is empty")
    case("non_text_field", data=jsonl(tmp_path / "numbers.jsonl", [{**r, "output": i} for i, r in enumerate(ROWS)]),
         expect=r"numbers\.jsonl:1: field 'output' must be text, got int")
    not_utf8 = tmp_path / "latin1.jsonl"
    not_utf8.write_bytes(json.dumps(ROWS[0]).encode() + b'\n{"instruction": "caf\xe9", "input": "", "output": "x"}\n')
    case("not_utf8", data=not_utf8, expect=r"latin1\.jsonl:2: not UTF-8 text .*; save the file as UTF-8")
    case("all_masked", "--set=data.max_seq_len=4", expect=r"data\.train: no example .* response token left")
    case("unknown_architecture", model=model_variant(
        tiny_model_dir, tmp_path / "qwerty-model", lambda c: c.update(model_type="qwerty")),
         expect=r"model\.path: .*qwerty-model.*qwerty")
    truncated = model_variant(tiny_model_dir, tmp_path / "truncated-model")
    (truncated / "config.json").write_text((truncated / "config.json").read_text()[:40])
    case("config_json_not_json", model=truncated,
         expect=r"model\.path: .*truncated-model/config\.json is not valid JSON "
                r"\(Unterminated string.*: line \d+, column \d+\); fix or restore")
    case("remote_code_not_trusted", model=model_variant(
        tiny_model_dir, tmp_path / "remote-model",
        lambda c: c.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig"})),
         expect=r"model\.path: .*ships its own code .*set model\.trust_remote_code: true if you trust it")
    (tmp_path / "remote-model" / "evil.py").write_text(f"open({str(tmp_path / 'PWNED')!r}, 'w')\n")
    case("output_dir_of_another_run", expect=r"output\.dir: .* already holds files.*--resume .*step-3.*--overwrite")
    other = tmp_path / "output_dir_of_another_run" / "run"
    (other / "checkpoints" / "step-3").mkdir(parents=True)
    (other / "config.yaml").write_text("model: {path: someone-else}\n")
    (other / "checkpoints" / "step-3" / "trainable.safetensors").write_bytes(b"precious")
    case("resume_path_escaping_its_folder", f"--resume={tmp_path / 'evil-ckpt' / 'step-1'}",
         expect=r"names a file '\.\./\.\./secret' outside its folder")
    (tmp_path / "evil-ckpt" / "step-1").mkdir(parents=True)
    (tmp_path / "evil-ckpt" / "step-1" / "manifest.json").write_text(json.dumps(
        {"format": 1, "step": 1, "files": {n: {"bytes": 0, "sha256": ""} for n in
                                           ["../../secret", "trainable.safetensors", "optimizer.safetensors",
                                            "optimizer.json", "rng.safetensors", "state.json"]}}))
    (tmp_path / "secret").write_text("do not read")
    # --overwrite replaces a run only once the new one is ready to train: bad data leaves the old one whole
    case("overwrite_with_bad_data", "--overwrite", data=jsonl(tmp_path / "bad2.jsonl", ['{"instruction": ']),
         expect=r"bad2\.jsonl:1: not valid JSON")
    old = tmp_path / "overwrite_with_bad_data" / "run"
    (old / "adapter").mkdir(parents=True)
    (old / "adapter" / "adapter_model.safetensors").write_bytes(b"trained for days")
    (old / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    strict = model_variant(tiny_model_dir, tmp_path / "strict-template-model")  # as Mistral's and Llama-2's
    (strict / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + (tiny_model_dir / "chat_template.jinja").read_text())
    case("chat_template_refuses_the_row", "--set=data.system_prompt=Be brief.", model=strict,
         expect=r"good\.jsonl:1: this model's chat template refused the conversation \(TemplateError: System role "
                r"not supported\).*data\.system_prompt adds a system message to every row: leave it unset")
    case("eval_fraction_of_one_example", "--set=data.eval_fraction=0.3", data=jsonl(tmp_path / "one.jsonl", ROWS[:1]),
         expect=r"data\.eval_fraction: 0\.3 of the 1 usable training examples leaves 0 for training and 1 for "
                r"evaluation.*a separate data\.eval file")
    pretty = tmp_path / "object.json"
    pretty.write_text(json.dumps(ROWS[0], indent=2))
    case("json_object_not_rows", data=pretty, expect=r"object\.json: holds one JSON object; give one example per "
                                                     r"object, as a JSON array")
    array = tmp_path / "array.json"
    array.write_text(json.dumps([ROWS[0], {"instruction": "x", "input": "y"}], indent=2))
    case("json_array_row_missing_a_field", data=array,  # named by its place among the examples, not a line
         expect=r"array\.json, example 2: missing field 'output' \(.*this row has \['input', 'instruction'\]\)")
    case("skip_modules_typo", "--set=quantization.skip_modules=[lm_head, q_prj]",
         expect=r"quantization\.skip_modules: 'q_prj' matches no linear layer of this model; its linear layers "
                r"are named \[.*'q_proj'")
    case("allow_config_change_alone", "--allow-config-change",
         expect=r"--allow-config-change lets --resume continue under a changed config.*add --resume")
    case("tokenizer_without_pad_token", model=model_variant(
        tiny_model_dir, tmp_path / "nopad-model", edit_tokenizer=lambda t: t.pop("pad_token")), expect=None)

    before = snapshot(tmp_path)
    # One case through a real `python -m qtrain` process (exit status, stderr); all of them through the same
    # entry point in this process, which spares a torch import per case.
    args, expect, _ = cases["malformed_jsonl"]
    proc = subprocess.run([sys.executable, "-m", "qtrain", "run", *args], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2 and re.search(expect, proc.stderr) and "Traceback" not in proc.stderr, proc.stderr
    for name, (args, expect, folder) in cases.items():
        code = main(["run", *args, "--set=training.max_steps=1"])  # any other exception fails the test
        stderr = capsys.readouterr().err
        if expect is None:
            assert code == 0, f"{name}: {stderr}"
            continue
        assert code == 2 and re.search(expect, stderr, re.S), f"{name}: exit {code}: {stderr}"
        if name not in ("output_dir_of_another_run", "overwrite_with_bad_data"):  # a failed run leaves no run behind
            assert not (folder / "run").exists() or {p.name for p in (folder / "run").iterdir()} <= {"config.yaml"}
    after = snapshot(tmp_path)
    assert {p: after.get(p) for p in before} == before  # nothing that was on disk changed
    assert not (tmp_path / "PWNED").exists()  # the model's own code never ran


def test_output_read_by_a_reader_that_went_away_ends_quietly(tiny_model_dir, dates_file, tmp_path):
    """`qtrain data … | head`: the reader closes the pipe; qtrain stops as `cat` would, without a traceback."""
    import os

    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte
    proc = subprocess.run([sys.executable, "-m", "qtrain", "data", str(write_config(tmp_path, tiny_model_dir,
                                                                                    dates_file)), "--show", "2"],
                          stdout=write, stderr=subprocess.PIPE, text=True, timeout=600)
    os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


def qtrain(args, capsys) -> tuple[int, str]:
    """Exit code and stderr of `qtrain ARGS` in this process (argparse's errors exit through SystemExit)."""
    from qtrain.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_data_that_is_not_utf8_is_named_by_file_and_line(tiny_model_dir, tmp_path, capsys):
    good = json.dumps(ROWS[0]).encode() + b"\n"
    files = {"rows.jsonl": (good + b'{"instruction": "a\xff\xfe", "input": "b", "output": "c"}\n', 2),
             "array.json": (b"[" + good + b', {"instruction": "\xe9", "input": "", "output": "x"}]', 2),
             "rows.csv": (b"instruction,input,output\nx,y,z\ncaf\xe9,y,z\n", 3)}
    config = write_config(tmp_path, tiny_model_dir, tmp_path / "unused.jsonl")
    for name, (data, line) in files.items():
        (tmp_path / name).write_bytes(data)
        code, err = qtrain(["data", config, "--show=1", f"--set=data.train={tmp_path / name}"], capsys)
        assert code == 2 and re.search(rf"{re.escape(name)}:{line}: not UTF-8 text .*; save the file as UTF-8",
                                       err) and "Traceback" not in err, err


@pytest.mark.parametrize("args, expect", [
    (["generate", "--model=m", "--prompt=hi", "--max-new-tokens=0"], "--max-new-tokens: must be at least 1, got 0"),
    (["chat", "--model=m", "--max-new-tokens=-4"], "--max-new-tokens: must be at least 1, got -4"),
    (["run", "c.yaml", "--nproc=0"], "--nproc: must be at least 1, got 0"),
    (["run", "c.yaml", "--nproc", "-1"], "--nproc: must be at least 1, got -1"),
    (["plan", "c.yaml", "--nproc", "-3"], "--nproc: must be at least 1, got -3"),
    (["plan", "c.yaml", "--gpu="], "--gpu: empty"),
    (["plan", "c.yaml", "--budget= "], "--budget: empty"),
    (["data", "c.yaml", "--show=-1"], "--show: must be at least 0, got -1"),
    (["merge-adapters", "a", "--out=o", "--rank=0"], "--rank: must be at least 1, got 0"),
    (["export", "r", "--out=o", "--max-shard-size=nan"], "--max-shard-size: must be a positive number, got nan"),
])
def test_counts_and_names_out_of_range_are_refused_when_parsed(args, expect, capsys):
    code, err = qtrain(args, capsys)
    assert code == 2 and f"argument {expect}" in err and "Traceback" not in err, err


@pytest.mark.parametrize("key, value", [("hidden_size", "big"), ("num_hidden_layers", True),
                                        ("vocab_size", 0), ("intermediate_size", 2.5), ("tie_word_embeddings", "no")])
def test_a_garbled_model_config_value_is_named(key, value, tiny_model_dir, dates_file, tmp_path, capsys):
    from qtrain.arch import Arch

    garbled = tmp_path / "garbled" / "config.json"
    garbled.parent.mkdir()
    garbled.write_text(json.dumps({**json.loads((tiny_model_dir / "config.json").read_text()), key: value}))
    code, err = qtrain(["plan", write_config(tmp_path, tiny_model_dir, dates_file), f"--model-config={garbled}"],
                       capsys)
    assert code == 2 and f"--model-config {garbled}: {key} is {json.dumps(value)}, not " in err, err
    assert "Traceback" not in err
    with pytest.raises(QTrainError, match=re.escape(f"model config {garbled}: {key} is {json.dumps(value)}, not ")):
        Arch.from_path(garbled.parent)  # what `qtrain run` and export read


def test_merge_adapters_refuses_non_finite_weights(tmp_path, capsys):
    from test_compose import write_lora

    a, b = write_lora(tmp_path / "a", r=4, alpha=8, seed=1), write_lora(tmp_path / "b", r=4, alpha=8, seed=2)
    for weight in ("nan", "inf"):
        code, err = qtrain(["merge-adapters", a, b, "--method=linear", "--weights", weight, "1",
                            f"--out={tmp_path / 'out'}"], capsys)
        assert code == 2 and f"--weights: {float(weight)} 1.0: every weight must be a finite number" in err, err
    assert not (tmp_path / "out").exists()


def test_examples_with_nothing_to_learn_are_counted_and_skipped(tmp_path):
    from qtrain.data import prepare

    long_prompt = {"instruction": "Rewrite the date. " * 40, "input": "x", "output": "2021-01-01"}
    path = jsonl(tmp_path / "mixed.jsonl", [*ROWS, long_prompt])
    dataset, stats = prepare(str(path), DataSection(train="x", max_seq_len=48), make_tokenizer(), "data.train")
    assert (stats.examples, stats.all_masked, stats.truncated) == (4, 1, 0) and len(dataset) == 4  # cut, then skipped
    assert "1 skipped with nothing to learn" in stats.line()


# ------------------------------------------------------------------------------------------------ security


def test_no_pickle_in_qtrain():
    """Weights are safetensors only: no pickle import, torch.load only with weights_only=True, no torch.save."""
    for path in (REPO / "qtrain").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M), path
        assert "torch.save(" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"


def test_a_local_model_trains_without_any_network(tiny_model_dir, dates_file, tmp_path, monkeypatch):
    from qtrain.run import run

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr("huggingface_hub.snapshot_download", no_network)
    summary = run(load_config(write_config(tmp_path, tiny_model_dir, dates_file, training={"max_steps": 1})))
    assert summary["steps"] == 1


def test_only_a_hub_id_reaches_the_hub_and_remote_code_stays_off(monkeypatch, tmp_path):
    from qtrain.modeling import resolve_model_path

    calls = []
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda repo, **kw: calls.append(repo) or str(tmp_path))
    assert resolve_model_path(ModelSection(path="some-owner/some-model")) == tmp_path
    assert calls == ["some-owner/some-model"]
    for local_looking in ("./missing/model/dir", str(tmp_path / "missing")):
        with pytest.raises(QTrainError, match="neither a local folder"):
            resolve_model_path(ModelSection(path=local_looking))
    assert calls == ["some-owner/some-model"]
    assert ModelSection().trust_remote_code is False
