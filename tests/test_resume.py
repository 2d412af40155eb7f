"""Resume equals the uninterrupted run, bit for bit: losses and final adapter weights, for each optimizer, with
gradient accumulation, LoRA dropout (so the RNG state matters) and interruptions mid-epoch. Also: a config that
changes the maths is refused by key, SIGINT stops with a checkpoint and exit 0, non-finite steps are skipped."""

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from qtrain import checkpoint as ck
from qtrain.checkpoint import Checkpoint, Checkpointer, latest_valid
from qtrain.config import DataSection, ModelSection, QuantizationSection, TrainingSection, load_config
from qtrain.data import Batches, prepare
from qtrain.methods.blocks import LoRABlock
from qtrain.methods.lora import LoRA
from qtrain.modeling import load_model
from qtrain.train import TrainingDiverged, train
from conftest import write_config

CPU = torch.device("cpu")
TOTAL = 5


def session(model_dir, dates, optimizer, root, resume_from=None, dropout=0.1):
    """A fresh model + LoRA + data stream, as a new process would build them. The base is unquantized here
    (faster; resume does not touch the base; the CLI tests below run on 4-bit)."""
    loaded = load_model(ModelSection(path=str(model_dir)), QuantizationSection(bits="none"), CPU)
    r = 64 if "8bit" in optimizer else 4  # r=64: LoRA matrices over bnb's 4096-element threshold for 8-bit state
    torch.manual_seed(0)
    method = LoRA(LoRABlock(method="lora", r=r, alpha=r, dropout=dropout))
    params = method.attach(loaded.model)
    ds, _ = prepare(str(dates), DataSection(train="x", max_seq_len=64), loaded.tokenizer, "data.train")
    # 8 examples in micro-batches of 3 with 2 per step: epochs end in the middle of optimizer steps.
    batches = Batches(ds, 3, seed=0, pad_id=loaded.tokenizer.pad_token_id)
    cfg = TrainingSection(micro_batch_size=3, gradient_accumulation_steps=2, max_steps=TOTAL, learning_rate=5e-3,
                          optimizer=optimizer, lr_scheduler="cosine", warmup_steps=2, save_every=1, keep_last=None,
                          gradient_checkpointing=False)
    saver = Checkpointer(root, params, {"training": {"optimizer": optimizer}}, "fp", cfg.save_every, None,
                         resume_from=resume_from)
    groups = [{"params": list(params.values()), "lr": cfg.learning_rate}]
    return loaded.model, groups, batches, cfg, saver, params


def fit(model_dir, dates, optimizer, root, resume_from=None, checkpoints=True, stop=lambda: False):
    model, groups, batches, cfg, saver, params = session(model_dir, dates, optimizer, root, resume_from)
    if resume_from is not None:  # a new process: whatever RNG state it has must not matter
        torch.manual_seed(1234), random.seed(1234), np.random.seed(1234)
    result = train(model, groups, batches, cfg, TOTAL, Accelerator(cpu=True), log=lambda r: None,
                   checkpoints=saver if checkpoints else None, stop=stop)
    return result, {n: p.detach().clone() for n, p in params.items()}


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tmp_path_factory):
    """An uninterrupted run per optimizer, checkpointing every step (computed once per module)."""
    from conftest import DATES

    folder = tmp_path_factory.mktemp("full")
    dates = folder / "dates.jsonl"
    dates.write_text("".join(json.dumps({"instruction": "Rewrite the date in ISO 8601 format.", "input": text,
                                         "output": iso}) + "\n" for text, iso in DATES))
    runs = {}

    def get(optimizer):
        if optimizer not in runs:
            runs[optimizer] = (folder / optimizer, *fit(tiny_model_dir, dates, optimizer, folder / optimizer))
        return (dates, *runs[optimizer])
    return get


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_resumed_run_is_bit_identical(tiny_model_dir, full_run, tmp_path, optimizer):
    dates, root, full, full_w = full_run(optimizer)
    assert len(set(full.losses)) == TOTAL  # the loss moves: a frozen run would pass trivially
    if "8bit" in optimizer:
        from safetensors import safe_open

        with safe_open(str(root / "step-1" / "optimizer.safetensors"), "pt") as f:
            assert any(f.get_tensor(k).dtype == torch.uint8 for k in f.keys())
    # step 2: just after an epoch ended inside that optimizer step; 4: mid-epoch, while the lr decays.
    for k in (2, 4) if optimizer == "adamw" else (2,):
        resumed, resumed_w = fit(tiny_model_dir, dates, optimizer, tmp_path / f"from-{k}",
                                 resume_from=Checkpoint.open(root / f"step-{k}"))
        assert resumed.losses == full.losses, f"resume from step {k}"
        assert all(torch.equal(resumed_w[n], full_w[n]) for n in full_w), f"resume from step {k}"


def test_checkpointing_does_not_perturb_the_run(tiny_model_dir, full_run, tmp_path):
    dates, _, full, full_w = full_run("adamw")
    plain, plain_w = fit(tiny_model_dir, dates, "adamw", tmp_path, checkpoints=False)
    assert plain.losses == full.losses and all(torch.equal(full_w[n], plain_w[n]) for n in plain_w)


def test_rng_restore_is_what_makes_dropout_resume_exact(tiny_model_dir, full_run, tmp_path, monkeypatch):
    """Negative control: without restoring the RNG, dropout masks differ and so do the losses."""
    dates, root, full, _ = full_run("adamw")
    monkeypatch.setattr(ck, "_set_rng_state", lambda saved, tensors: None)
    resumed, _ = fit(tiny_model_dir, dates, "adamw", tmp_path, resume_from=Checkpoint.open(root / "step-2"))
    assert resumed.losses[:2] == full.losses[:2] and resumed.losses[2] != full.losses[2]


def test_stop_request_finishes_the_step_and_checkpoints(tiny_model_dir, full_run, tmp_path):
    dates, _, full, full_w = full_run("adamw")
    calls = []
    stopped, _ = fit(tiny_model_dir, dates, "adamw", tmp_path / "run",
                     stop=lambda: calls.append(1) or len(calls) >= 3)
    assert stopped.stopped and stopped.steps == 3 and stopped.checkpoint.name == "step-3"
    resumed, resumed_w = fit(tiny_model_dir, dates, "adamw", tmp_path / "run2",
                             resume_from=latest_valid(tmp_path / "run"))
    assert resumed.losses == full.losses and all(torch.equal(resumed_w[n], full_w[n]) for n in full_w)


def poison(model, steps):
    """Make the loss NaN on the given optimizer steps (1-based; two micro-batches each)."""
    calls = []

    def hook(module, args, output):
        calls.append(1)
        return output * float("nan") if (len(calls) - 1) // 2 + 1 in steps else output

    model.model.norm.register_forward_hook(hook)


def test_non_finite_steps_are_skipped_then_the_run_stops(tiny_model_dir, dates_file, tmp_path):
    model, groups, batches, cfg, saver, params = session(tiny_model_dir, dates_file, "adamw", tmp_path / "c")
    poison(model, {3, 4})
    cfg.max_bad_steps = 3
    records, weights = [], []

    def stop():  # called after every step: keep the weights it left
        weights.append({n: p.detach().clone() for n, p in params.items()})
        return False

    result = train(model, groups, batches, cfg, TOTAL, Accelerator(cpu=True), log=records.append,
                   checkpoints=saver, stop=stop)
    assert result.skipped == 2 and result.steps == TOTAL
    assert [r.get("skipped") for r in records] == [None, None, "non-finite loss", "non-finite loss", None]
    assert records[2]["loss"] is None and records[4]["loss"] is not None
    # A skipped step leaves the weights as they were and writes no checkpoint; training then goes on.
    assert all(torch.equal(weights[1][n], weights[3][n]) for n in params)
    assert not all(torch.equal(weights[3][n], weights[4][n]) for n in params)
    assert [p.name for p in ck.step_dirs(tmp_path / "c")] == ["step-5", "step-2", "step-1"]

    model, groups, batches, cfg, saver, params = session(tiny_model_dir, dates_file, "adamw", tmp_path / "d")
    poison(model, {2, 3, 4, 5})
    cfg.max_bad_steps = 2
    with pytest.raises(TrainingDiverged, match=r"2 optimizer steps in a row \(up to step 3\).*step-1"):
        train(model, groups, batches, cfg, TOTAL, Accelerator(cpu=True), log=lambda r: None, checkpoints=saver)
    assert [p.name for p in ck.step_dirs(tmp_path / "d")] == ["step-1"]


def strict_json(path):
    """A file's JSON as strict parsers (jq, JavaScript) read it: NaN and Infinity are not JSON."""
    def refuse(name):
        raise ValueError(f"{path} holds {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_skipped_last_step_still_checkpoints_and_its_loss_is_no_number(tiny_model_dir, dates_file, tmp_path):
    model, groups, batches, cfg, saver, params = session(tiny_model_dir, dates_file, "adamw", tmp_path / "c")
    poison(model, {TOTAL})
    result = train(model, groups, batches, cfg, TOTAL, Accelerator(cpu=True), log=lambda r: None,
                   checkpoints=saver)
    assert result.skipped == 1 and result.steps == TOTAL
    # the finished run resumes to nothing: a checkpoint of its last step, holding the weights of step 4
    assert ck.step_dirs(tmp_path / "c")[0].name == f"step-{TOTAL}"
    losses = strict_json(tmp_path / "c" / f"step-{TOTAL}" / "state.json")["losses"]
    assert losses[-1] is None and all(isinstance(x, float) for x in losses[:-1])
    ckpt = latest_valid(tmp_path / "c")
    _, groups2, batches2, _, saver2, _ = session(tiny_model_dir, dates_file, "adamw", tmp_path / "c", ckpt)
    from qtrain.train import make_optimizer
    assert math.isnan(saver2.restore(make_optimizer(groups2, cfg), batches2).losses[-1])


def test_a_resumed_optimizer_takes_the_configs_settings(tiny_model_dir, dates_file, tmp_path):
    """--allow-config-change may change weight_decay, adam_betas and adam_eps; the restored optimizer's groups
    would otherwise keep the checkpoint's, and the run's config.yaml would misstate what was trained."""
    fit(tiny_model_dir, dates_file, "adamw", tmp_path / "c", stop=lambda: True)  # stops after step 1
    model, groups, batches, cfg, saver, _ = session(tiny_model_dir, dates_file, "adamw", tmp_path / "c",
                                                     latest_valid(tmp_path / "c"))
    cfg.weight_decay, cfg.adam_betas, cfg.adam_eps = 0.5, (0.5, 0.6), 0.1
    train(model, groups, batches, cfg, TOTAL, Accelerator(cpu=True), log=lambda r: None, checkpoints=saver)
    from safetensors.torch import load_file

    folder = tmp_path / "c" / f"step-{TOTAL}"
    state = ck._decode(json.loads((folder / "optimizer.json").read_text()), load_file(folder / "optimizer.safetensors"))
    saved = state["param_groups"][0]
    assert (saved["weight_decay"], saved["betas"], saved["eps"]) == (0.5, (0.5, 0.6), 0.1)


def test_summary_json_reports_the_losses_of_steps_applied(tiny_model_dir, dates_file, tmp_path, monkeypatch):
    """Skipped steps (non-finite) have no loss: summary.json stays strict JSON, its first and final losses are
    those of the first and last steps applied."""
    import qtrain.train
    from qtrain.run import run

    real = qtrain.train.train

    def with_bad_ends(*args, **kwargs):
        result = real(*args, **kwargs)
        result.losses[0] = result.losses[-1] = math.nan
        return result

    monkeypatch.setattr(qtrain.train, "train", with_bad_ends)
    cfg = load_config(write_config(tmp_path, tiny_model_dir, dates_file, training={"max_steps": 4},
                                   eval={"before_training": False, "exact_match": False}))
    run(cfg)
    summary = strict_json(tmp_path / "run" / "summary.json")
    logged = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert (summary["first_loss"], summary["final_loss"]) == (pytest.approx(logged[1], abs=1e-6),
                                                              pytest.approx(logged[2], abs=1e-6))


# ------------------------------------------------------------------------------------------------ the CLI


def cli(capsys, *args):
    """`qtrain run ARGS` in this process: (exit code, stdout, stderr)."""
    from qtrain.cli import main

    code = main(["run", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_sigint_checkpoints_exits_0_and_resume_matches(tiny_model_dir, dates_file, tmp_path, capsys):
    training = {"max_steps": 10_000, "lr_scheduler": "constant", "save_every": 1000, "log_every": 1}
    config = write_config(tmp_path, tiny_model_dir, dates_file, training=training,
                          peft=[{"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"}])
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "qtrain", "run", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and
                                          len((out / "metrics.jsonl").read_text().splitlines()) >= 2):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "SIGINT received" in stdout and f"qtrain run {config}" in stdout and "--resume" in stdout
    assert "Traceback" not in stderr
    (ckpt,) = ck.step_dirs(out / "checkpoints")
    k = int(ckpt.name.split("-")[1])
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert 2 <= k < 10_000 and steps == list(range(1, k + 1))  # the step in progress was finished and saved

    # Resume to k + 2 steps (a constant schedule may be lengthened or shortened) and compare with a straight run.
    end = f"--set=training.max_steps={k + 2}"
    assert cli(capsys, config, end, "--resume")[0] == 0
    assert cli(capsys, config, end, f"--set=output.dir={tmp_path / 'straight'}")[0] == 0
    a = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "straight" / "adapter" / "adapter_model.safetensors").read_bytes()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    straight_lines = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, k + 3))
    assert [r["loss"] for r in lines] == [r["loss"] for r in straight_lines]


def test_resume_refuses_a_config_that_changes_the_maths(tiny_model_dir, dates_file, tmp_path, capsys):
    config = write_config(tmp_path, tiny_model_dir, dates_file, training={"max_steps": 2})
    assert cli(capsys, config)[0] == 0
    code, _, err = cli(capsys, config, "--set=training.learning_rate=0.5", "--set=peft.0.r=8",
                       "--set=training.max_steps=3", "--resume")
    assert code == 2
    for text in ("training.learning_rate: 0.01 → 0.5", "peft.0.r: 4 → 8", "training.max_steps: 2 → 3",
                 "--allow-config-change"):
        assert text in err
    # Keys that do not touch the maths are fine; the run is already complete, so nothing is trained again.
    code, stdout, err = cli(capsys, config, "--set=training.log_every=5", "--set=training.keep_last=4", "--resume")
    assert code == 0, err
    assert "resuming from" in stdout and "step 2 of 2" in stdout
    # --allow-config-change lets a changed run length through, with a warning.
    code, stdout, _ = cli(capsys, config, "--set=training.max_steps=3", "--resume", "--allow-config-change")
    assert code == 0 and "will differ from an uninterrupted run" in stdout
    assert [p.name for p in ck.step_dirs(tmp_path / "run" / "checkpoints")] == ["step-3", "step-2"]


def snapshot(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_resume_refuses_what_no_flag_can_apply_and_touches_nothing(tiny_model_dir, dates_file, tmp_path, capsys):
    """Another optimizer cannot take the checkpoint's state, another rank its tensors: refused even under
    --allow-config-change, before the run folder is touched (its metrics, its config.yaml)."""
    config = write_config(tmp_path, tiny_model_dir, dates_file, training={"max_steps": 2})
    assert cli(capsys, config)[0] == 0
    before = snapshot(tmp_path / "run")
    code, _, err = cli(capsys, config, "--set=training.optimizer=paged_adamw_8bit", "--resume",
                       "--allow-config-change", "--set=training.max_steps=3")
    assert code == 2 and "holds the state of training.optimizer: 'adamw', which 'paged_adamw_8bit' cannot take" \
        in err, err
    code, _, err = cli(capsys, config, "--set=peft.0.r=8", "--resume", "--allow-config-change",
                       "--set=training.max_steps=3")
    assert code == 2 and re.search(r"trainable tensors have other shapes than this run's \(.*lora_A.*: \(4, 64\) "
                                   r"there, \(8, 64\) here", err), err
    assert snapshot(tmp_path / "run") == before


def test_resume_from_another_runs_checkpoint_never_mixes_two_runs(tiny_model_dir, dates_file, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    other = write_config(tmp_path / "a", tiny_model_dir, dates_file, training={"max_steps": 2})
    assert cli(capsys, other)[0] == 0
    config = write_config(tmp_path, tiny_model_dir, dates_file, training={"max_steps": 2})
    assert cli(capsys, config)[0] == 0
    before = snapshot(tmp_path / "run")
    step = tmp_path / "a" / "run" / "checkpoints" / "step-2"
    code, _, err = cli(capsys, config, f"--resume={step}", "--set=training.max_steps=3", "--allow-config-change")
    assert code == 2 and "holds another run than the one" in err and "--resume would mix the two" in err, err
    assert snapshot(tmp_path / "run") == before
    code, _, err = cli(capsys, config, f"--resume={step}", "--set=training.max_steps=3", "--allow-config-change",
                       f"--output-dir={tmp_path / 'continued'}")  # into a new folder: what the error advises
    assert code == 0, err
    assert [p.name for p in ck.step_dirs(tmp_path / "continued" / "checkpoints")] == ["step-3"]


def test_a_users_own_config_in_the_output_folder_is_left_alone(tiny_model_dir, dates_file, tmp_path, capsys):
    exp = tmp_path / "exp"
    exp.mkdir()
    config = write_config(exp, tiny_model_dir, dates_file, training={"max_steps": 1}, output={"dir": str(exp)})
    text = "# my notes\n" + config.read_text()
    config.write_text(text)
    for extra in ((), ("--overwrite",), ("--resume",)):
        code, _, err = cli(capsys, config, *extra)
        assert code == 2 and "holds a config.yaml that no run wrote (yours?)" in err, (extra, err)
        assert config.read_text() == text and {p.name for p in exp.iterdir()} == {"config.yaml"}
    code, _, err = cli(capsys, config, f"--output-dir={exp / 'run'}")
    assert code == 0, err
    from qtrain.run import written_by_qtrain
    assert written_by_qtrain(exp / "run" / "config.yaml") and not written_by_qtrain(config)


def test_resume_past_the_runs_end_is_refused(tiny_model_dir, dates_file, tmp_path, capsys):
    """Under a constant schedule the length may change on resume, but not to before the checkpoint: it
    printed "resuming … (step 2 of 1)" and wrote the adapter again."""
    config = write_config(tmp_path, tiny_model_dir, dates_file, training={"max_steps": 2, "lr_scheduler": "constant",
                                                                        "warmup_steps": 5})
    code, out, _ = cli(capsys, config)
    assert code == 0 and "warmup_steps (5) is not shorter than the run (2 steps)" in out
    code, _, err = cli(capsys, config, "--set=training.max_steps=1", "--resume")
    assert code == 2 and "is at step 2, past the 1 steps this run is long" in err, err


def test_resume_keeps_the_checkpointing_that_auto_decided(tiny_model_dir, dates_file, tmp_path, capsys):
    """`gradient_checkpointing: auto` decided off at the start (a 64GB budget); resumed under a budget where it
    would decide on, the run takes the checkpoint's decision instead of refusing a changed config."""
    config = write_config(tmp_path, tiny_model_dir, dates_file, training={
        "max_steps": 2, "gradient_checkpointing": "auto", "memory_budget": "64GB"})
    code, stdout, _ = cli(capsys, config)
    assert code == 0 and "gradient_checkpointing auto → off" in stdout
    code, stdout, err = cli(capsys, config, "--set=training.memory_budget=1MB", "--resume")
    assert code == 0, err  # without the checkpoint's decision: "training.gradient_checkpointing: False → True"
    assert "gradient_checkpointing auto → off, as in the checkpoint resumed" in stdout and "resuming from" in stdout


def test_resume_keeps_the_micro_batch_that_auto_decided(tiny_model_dir, dates_file, tmp_path, capsys):
    """`micro_batch_size: auto` re-decided against another budget on resume was refused as "a different config"
    (micro_batch_size 4 → 1, accumulation 1 → 4) with the advice to resume with the original values, which
    the user's config (auto) already had. The run takes the checkpoint's micro-batch, as for checkpointing."""
    config = write_config(tmp_path, tiny_model_dir, dates_file, training={
        "max_steps": 2, "micro_batch_size": "auto", "effective_batch_size": 4, "memory_budget": "64GB"})
    code, stdout, _ = cli(capsys, config)
    assert code == 0 and "micro_batch_size auto → 4 (gradient accumulation 1" in stdout
    code, stdout, err = cli(capsys, config, "--set=training.memory_budget=1MB", "--resume")
    assert code == 0, err  # without the checkpoint's split: "training.micro_batch_size: 4 → 1"
    assert "micro_batch_size auto → 4 (gradient accumulation 1), as in the checkpoint resumed" in stdout
    assert "resuming from" in stdout and "step 2 of 2" in stdout


def test_resume_without_a_checkpoint_advises_what_is_accepted(tiny_model_dir, dates_file, tmp_path):
    """A run folder whose checkpoints are all unreadable: the advice once was "pass --overwrite", which beside
    --resume is refused; it now says to drop --resume, and that command then runs."""
    from qtrain.run import run

    cfg = load_config(write_config(tmp_path, tiny_model_dir, dates_file, training={"max_steps": 1}))
    out = tmp_path / "run"
    (out / "checkpoints" / "step-1").mkdir(parents=True)  # a checkpoint that cannot be read
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(ck.CheckpointError, match="no valid checkpoint.*run without --resume and with --overwrite"):
        run(cfg, resume="latest")
    assert (out / "checkpoints" / "step-1").is_dir()
    with pytest.raises(Exception, match="pass one of them"):  # what the old advice led to
        run(cfg, resume="latest", overwrite=True)
    assert run(cfg, overwrite=True)["steps"] == 1


def test_resume_starts_again_a_run_stopped_before_its_first_checkpoint(tiny_model_dir, dates_file, tmp_path):
    """A job killed before its first save (save_every steps in) leaves config.yaml and metrics.jsonl, nothing to
    resume and nothing to lose: --resume starts it again, so a job script can always pass it. An adapter there
    (a finished run whose checkpoints were deleted) is not started over."""
    from qtrain.run import run

    cfg = load_config(write_config(tmp_path, tiny_model_dir, dates_file, training={"max_steps": 2}))
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("stale: true\n")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n{"step": 3, "lo')
    (out / "checkpoints").mkdir()  # made, never filled
    assert run(cfg, resume="latest")["steps"] == 2
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 2 and 9.0 not in losses
    shutil.rmtree(out / "checkpoints")
    adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ck.CheckpointError, match="no valid checkpoint"):
        run(cfg, resume="latest")
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter


def test_an_output_folder_is_never_destroyed_without_overwrite(tiny_model_dir, dates_file, tmp_path):
    from qtrain.run import run

    cfg = load_config(write_config(tmp_path, tiny_model_dir, dates_file, training={"max_steps": 2}))
    run(cfg)
    out = tmp_path / "run"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(Exception, match="continue it with --resume .*step-2.*--overwrite"):
        run(cfg)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    marker = out / "notes.txt"  # a file of the user's is left alone even by --overwrite
    marker.write_text("mine")
    for name in ("eval.json", "report.md", "report.png"):  # what `qtrain eval`/`report` wrote of the old run
        (out / name).write_text("the old run's")
    run(cfg.model_copy(update={"training": cfg.training.model_copy(update={"max_steps": 1})}), overwrite=True)
    assert [p.name for p in ck.step_dirs(out / "checkpoints")] == ["step-1"] and marker.read_text() == "mine"
    assert not any((out / name).exists() for name in ("eval.json", "report.md", "report.png"))
    assert os.path.exists(out / "adapter" / "adapter_model.safetensors")
