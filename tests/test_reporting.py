"""Everyday-use outputs: data preview with visible loss masks, length statistics, the run report (PNG + Markdown),
and the forgetting report (base vs trained on the task and on a general reference text)."""

import json
import math

import pytest
import torch

from qtrain.config import load_config
from qtrain.evaluate import forgetting_lines, reference_perplexity, reference_text
from qtrain.preview import length_stats, mark_trained, preview
from conftest import make_tokenizer, write_config


def test_mark_trained_brackets_exactly_the_loss_carrying_tokens():
    tok = make_tokenizer()
    prompt = tok("Rewrite: March 3", add_special_tokens=False)["input_ids"]
    answer = tok("2021-03-03", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    text = mark_trained(tok, prompt + answer, [-100] * len(prompt) + answer, color=False)
    assert text == "Rewrite: March 3[[2021-03-03<|im_end|>]]"
    # a text row's labels are its ids, the first one included, but nothing predicts the first token
    assert mark_trained(tok, answer, answer, color=False) == "2[[021-03-03<|im_end|>]]"  # a digit per token


def test_length_stats_count_what_max_seq_len_cuts():
    s = length_stats([10, 20, 30, 40, 100], max_len=35)
    assert (s["min"], s["max"], s["p50"], s["over_max_seq_len"]) == (10, 100, 30, 2)
    assert s["mean"] == 40.0
    s = length_stats(list(range(1, 11)), max_len=5)  # nearest rank: the median is the 5th of 10, p90 the 9th
    assert (s["p50"], s["p90"], s["max"]) == (5, 9, 10)


def test_preview_of_a_config(tiny_model_dir, dates_file, tmp_path):
    cfg = load_config(write_config(tmp_path, tiny_model_dir, dates_file))
    text = preview(cfg, show=2, color=False)
    assert text.count("--- example") == 2
    assert "<|im_start|>assistant\n[[2021-03-03<|im_end|>\n]]" in text  # first row, answer and end of turn marked
    assert "0 of 8 exceed data.max_seq_len=64" in text
    cut = preview(cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_seq_len": 46})}), 0, False)
    # lengths are measured before truncation (45-52 tokens here): the count matches what truncation reports
    assert "7 of 8 exceed data.max_seq_len=46" in cut and "7 truncated to max_seq_len" in cut


def test_reference_perplexity_is_exp_of_the_mean_token_loss(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    text = reference_text()[:300]
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = math.exp(model(ids, labels=ids).loss.item())  # transformers' own mean next-token CE
    assert reference_perplexity(model, tok, torch.device("cpu"), text=text, window=1024) == pytest.approx(expected,
                                                                                                     rel=1e-4)


def test_scoring_runs_with_the_training_micro_batch_and_loss_chunk(tiny_model_dir, dates_file, tmp_path,
                                                                    monkeypatch):
    """The general-text score after training must not need more memory than the training steps: it runs the
    training micro-batch and loss chunk (at 7B it ran 4 windows per forward and became the run's peak)."""
    import qtrain.evaluate as evaluate
    from transformers import AutoModelForCausalLM

    cfg = load_config(write_config(tmp_path, tiny_model_dir, dates_file))
    t = cfg.training.model_copy(update={"micro_batch_size": 1, "loss_chunk_size": 32})
    cfg = cfg.model_copy(update={"training": t})
    calls = []
    real = evaluate.eval_loss
    monkeypatch.setattr(evaluate, "eval_loss", lambda m, d, mb, pad, chunk, dev: calls.append((mb, chunk)) or
                        real(m, d, mb, pad, chunk, dev))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = make_tokenizer()
    scored = evaluate.score_model(model, tok, cfg, torch.device("cpu"))
    assert calls == [(1, 32)]
    four = reference_perplexity(model, tok, torch.device("cpu"))  # the defaults: 4 windows per forward
    assert scored["reference_perplexity"] == pytest.approx(four, rel=1e-5)


def test_forgetting_lines_show_change():
    """Perplexity changes are relative, accuracy changes in percentage points (issue 20: "base 4.0% → trained
    95.0% (+2275.0%)", and "(n/a)" from a base of 0)."""
    lines = forgetting_lines({"reference_perplexity": 10.0, "eval_perplexity": 8.0, "exact_match": 0.04},
                             {"reference_perplexity": 11.0, "eval_perplexity": 2.0, "exact_match": 0.95})
    assert lines == ["general-text perplexity (lower is better): base 10.000 → trained 11.000 (+10.0%)",
                     "task perplexity on data.eval (lower is better): base 8.000 → trained 2.000 (-75.0%)",
                     "task exact match on data.eval (higher is better): base 4.0% → trained 95.0% (+91.0 pp)"]
    assert forgetting_lines({"exact_match": 0.0}, {"exact_match": 0.94}) == [
        "task exact match on data.eval (higher is better): base 0.0% → trained 94.0% (+94.0 pp)"]
    assert forgetting_lines({"exact_match": 0.5}, {"exact_match": 0.375}) == [
        "task exact match on data.eval (higher is better): base 50.0% → trained 37.5% (-12.5 pp)"]


def test_eval_reads_a_config_whose_micro_batch_and_loss_chunk_are_auto(tiny_model_dir, dates_file, tmp_path):
    """config.yaml keeps what the user wrote, so `qtrain eval` may meet `auto` there: it scores one row at a time
    with the device's loss chunk, and gets the run's own numbers (padding changes none)."""
    from qtrain.evaluate import evaluate_run
    from qtrain.run import run

    cfg = load_config(write_config(tmp_path, tiny_model_dir, dates_file, data={"eval": str(dates_file)},
                                   training={"max_steps": 2, "micro_batch_size": "auto"}))
    assert cfg.training.loss_chunk_size == "auto"
    summary = run(cfg)
    report = evaluate_run(cfg.output.dir)
    assert report["trained"]["eval_perplexity"] == pytest.approx(summary["forgetting"]["trained"]["eval_perplexity"],
                                                                 rel=1e-5)


def test_eval_scores_the_rows_an_eval_fraction_run_held_out(tiny_model_dir, dates_file, tmp_path):
    """With data.eval_fraction (no data.eval file), `qtrain eval` holds out the run's own rows of data.train and
    reports the task perplexity on them (eval.json had only the general-text one, and report.md lost the task
    line). Other rows would give other perplexities, so matching the run's numbers means the same rows."""
    from qtrain.evaluate import evaluate_run
    from qtrain.report import write_report
    from qtrain.run import run

    cfg = load_config(write_config(tmp_path, tiny_model_dir, dates_file, data={"eval_fraction": 0.25},
                                   training={"max_steps": 4}))
    forgetting = run(cfg)["forgetting"]
    assert "eval_perplexity" in forgetting["trained"]
    report = evaluate_run(cfg.output.dir)
    for when in ("base", "trained"):
        assert set(report[when]) == {"reference_perplexity", "eval_loss", "eval_perplexity"}
        assert report[when]["eval_perplexity"] == pytest.approx(forgetting[when]["eval_perplexity"], rel=1e-5)
    assert report["lines"][1].startswith("task perplexity")
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["lines"] == report["lines"]
    assert f"- {report['lines'][1]}\n" in write_report(cfg.output.dir)[1].read_text()


def test_the_report_takes_loss_steps_and_time_from_the_summary(tiny_model_dir, dates_file, tmp_path):
    """With `log_every: 3` metrics.jsonl starts at step 3 and its elapsed time counts evaluations and saves;
    the report's first loss and training time are the summary's (every step's loss, training time only)."""
    from qtrain.report import write_report
    from qtrain.run import run

    cfg = load_config(write_config(tmp_path, tiny_model_dir, dates_file, training={"max_steps": 4, "log_every": 3}))
    summary = run(cfg)
    text = write_report(cfg.output.dir)[1].read_text()
    assert f"| loss | {summary['first_loss']:.4f} → {summary['final_loss']:.4f} |" in text
    assert "| steps | 4 |" in text and f"| time | {summary['train_seconds']} s training," in text
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert f"{logged[0]['loss']:.4f} →" not in text  # step 3's, where the old report started


def test_run_eval_and_report(tiny_model_dir, dates_file, tmp_path):
    from qtrain.evaluate import evaluate_run
    from qtrain.report import write_report
    from qtrain.run import run

    cfg = load_config(write_config(tmp_path, tiny_model_dir, dates_file, data={"eval": str(dates_file)},
                                   training={"max_steps": 6}))
    summary = run(cfg)
    forgetting = summary["forgetting"]
    assert set(forgetting) == {"base", "trained"}
    assert forgetting["trained"]["eval_perplexity"] < forgetting["base"]["eval_perplexity"]  # it learned the task
    assert forgetting["base"]["reference_perplexity"] != forgetting["trained"]["reference_perplexity"]

    report = evaluate_run(cfg.output.dir)  # a fresh load of base and adapter reproduces the run's own numbers
    assert report["trained"]["eval_perplexity"] == pytest.approx(forgetting["trained"]["eval_perplexity"], rel=1e-5)
    assert report["base"]["reference_perplexity"] == pytest.approx(forgetting["base"]["reference_perplexity"],
                                                                   rel=1e-5)
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["lines"] == report["lines"]

    png, md = write_report(cfg.output.dir)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = md.read_text()
    assert "| steps | 6 |" in text and "## Forgetting report" in text
    assert all(f"- {line}\n" in text for line in report["lines"])

    # report.md formats eval.json's numbers itself: lines an older qtrain wrote there (relative accuracy
    # changes) do not reach it
    stale = json.loads((tmp_path / "run" / "eval.json").read_text())
    stale["base"]["exact_match"], stale["trained"]["exact_match"] = 0.04, 0.95
    stale["lines"].append("task exact match on data.eval (higher is better): base 4.0% → trained 95.0% (+2275.0%)")
    (tmp_path / "run" / "eval.json").write_text(json.dumps(stale))
    text = write_report(cfg.output.dir)[1].read_text()
    assert "+2275.0%" not in text
    assert "- task exact match on data.eval (higher is better): base 4.0% → trained 95.0% (+91.0 pp)\n" in text


def test_eval_every_logs_eval_records_and_tensorboard(tiny_model_dir, dates_file, tmp_path):
    pytest.importorskip("tensorboard")
    from qtrain.run import run

    cfg = load_config(write_config(tmp_path, tiny_model_dir, dates_file,
                                   data={"eval_fraction": 0.25},
                                   training={"max_steps": 4, "eval_every": 2, "micro_batch_size": 2},
                                   logging={"progress": False, "tensorboard": True}))
    run(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert all(r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"])) for r in evals)
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 100


def test_a_resumed_runs_tensorboard_drops_what_the_killed_run_logged_after_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from qtrain.logs import RunLogger

    killed = RunLogger(tmp_path, 6, enabled=True, console=False, tensorboard=True)
    for step in (1, 2, 3):  # checkpointed at 2, killed after 3
        killed({"step": step, "loss": 1.0 / step})
    killed.close()
    resumed = RunLogger(tmp_path, 6, enabled=True, console=False, tensorboard=True, resumed_at=2)
    for step in (3, 4):
        resumed({"step": step, "loss": 10.0 * step})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 0.5), (3, 30.0), (4, 40.0)]


def test_eval_every_needs_eval_data():
    from qtrain.config import validate_config
    from qtrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"training\.eval_every: 2 evaluates on data\.eval or on the examples "
                                          r"data\.eval_fraction holds out, and neither is set"):
        validate_config({"peft": [{"method": "lora"}], "data": {"train": "x"}, "training": {"eval_every": 2}})
    validate_config({"peft": [{"method": "lora"}], "data": {"train": "x", "eval_fraction": 0.1},
                     "training": {"eval_every": 2}})


def test_eval_every_must_fall_on_logged_steps():
    from qtrain.config import validate_config
    from qtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="eval_every .* multiple of training.log_every"):
        validate_config({"peft": [{"method": "lora"}], "data": {"train": "x"},
                         "training": {"eval_every": 3, "log_every": 2}})
