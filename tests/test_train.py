"""The training loop on a tiny 4-bit Llama: token-normalised accumulation, checkpointing that still trains,
every optimizer, frozen base, seeded determinism, schedule shape."""

import json

import pytest
import torch
from accelerate import Accelerator

from qtrain.config import DataSection, ModelSection, QuantizationSection, TrainingSection, load_config
from qtrain.data import Batches, collate, prepare
from qtrain.methods import build_methods
from qtrain.methods.blocks import LoRABlock
from qtrain.modeling import enable_checkpointing, load_model
from qtrain.train import accumulate_gradients, lr_factor, train
from conftest import write_config

CPU = torch.device("cpu")


def lora_model(model_dir, bits=4, r=4):
    loaded = load_model(ModelSection(path=str(model_dir)), QuantizationSection(bits=bits), CPU)
    torch.manual_seed(0)
    (method,) = build_methods([LoRABlock(method="lora", r=r, alpha=2 * r, dropout=0.0)])
    params = method.attach(loaded.model)
    for p in params.values():  # non-zero B so gradients reach A too
        if p.shape[1] == r:
            torch.nn.init.normal_(p, std=0.02)
    return loaded, params


@pytest.fixture
def uneven_examples(tiny_model_dir, tmp_path):
    """Examples whose answers differ in length, so per-micro-batch averaging would weigh tokens unequally."""
    path = tmp_path / "uneven.jsonl"
    answers = ["1", "2021-03-03 and more words here", "12", "March 3 2021 is 2021-03-03 in ISO"]
    path.write_text("".join(json.dumps({"instruction": "Rewrite.", "input": f"x{i}", "output": a}) + "\n"
                            for i, a in enumerate(answers)))
    return path


def grads(params):
    return {n: p.grad.clone() for n, p in params.items()}


def test_accumulation_normalises_by_target_tokens(tiny_model_dir, uneven_examples):
    loaded, params = lora_model(tiny_model_dir)
    ds, _ = prepare(str(uneven_examples), DataSection(train="x"), loaded.tokenizer, "data.train")
    rows = [ds[i] for i in range(4)]
    pad = loaded.tokenizer.pad_token_id
    acc = Accelerator(cpu=True)
    loaded.model.train()

    loss_one, n_one = accumulate_gradients(loaded.model, [collate(rows, pad)], acc, 1024)
    one = grads(params)
    for p in params.values():
        p.grad = None
    loss_two, n_two = accumulate_gradients(loaded.model, [collate(rows[:1], pad), collate(rows[1:], pad)], acc, 7)
    two = grads(params)
    assert n_one == n_two
    assert loss_one == pytest.approx(loss_two, rel=1e-5)
    for n in one:
        torch.testing.assert_close(two[n], one[n], rtol=1e-4, atol=1e-7)
    # The fixture makes micro-batches with unequal token counts, where a mean of per-batch means would differ.
    assert len({sum(t != -100 for t in r["labels"][1:]) for r in rows}) > 1


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, dates_file):
    loaded, params = lora_model(tiny_model_dir)
    ds, _ = prepare(str(dates_file), DataSection(train="x"), loaded.tokenizer, "data.train")
    batch = collate([ds[i] for i in range(4)], loaded.tokenizer.pad_token_id)
    acc = Accelerator(cpu=True)
    loaded.model.train()
    accumulate_gradients(loaded.model, [batch], acc, 1024)
    plain = grads(params)
    for p in params.values():
        p.grad = None
    enable_checkpointing(loaded.model)
    accumulate_gradients(loaded.model, [batch], acc, 1024)
    ckpt = grads(params)
    assert all(g.abs().sum() > 0 for g in ckpt.values())  # every adapter still receives gradient
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
@pytest.mark.parametrize("bits", [4, 8])
def test_each_optimizer_lowers_the_loss_and_leaves_the_base_untouched(tiny_model_dir, dates_file, optimizer, bits):
    loaded, params = lora_model(tiny_model_dir, bits=bits)
    frozen = {n: p.detach().clone() for n, p in loaded.model.named_parameters() if not p.requires_grad}
    ds, _ = prepare(str(dates_file), DataSection(train="x"), loaded.tokenizer, "data.train")
    cfg = TrainingSection(micro_batch_size=8, max_steps=12, learning_rate=1e-2, optimizer=optimizer,
                          lr_scheduler="constant")
    batches = Batches(ds, 8, seed=0, pad_id=loaded.tokenizer.pad_token_id)
    groups = [{"params": list(params.values()), "lr": cfg.learning_rate}]
    result = train(loaded.model, groups, batches, cfg, cfg.max_steps, Accelerator(cpu=True), log=lambda r: None)
    # The same 8 examples every step; a random model starts near ln(400) = 5.99 and a working optimizer
    # takes ~0.5 nats off in 12 steps (a no-op one would stay flat).
    assert result.losses[-1] < result.losses[0] - 0.3
    after = dict(loaded.model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())


def test_tokens_per_second_leave_out_the_time_logging_takes(tiny_model_dir, dates_file, monkeypatch):
    """`log` runs evaluations during training: its time is not training time. A clock that moves 1 s per reading
    and 1000 s per `log` call: every record's rate is its tokens over 1 s (it was over 1001 s after the first)."""
    import types

    import qtrain.train

    clock = [0.0]

    def perf_counter():
        clock[0] += 1.0
        return clock[0]

    def log(record):
        records.append(record)
        clock[0] += 1000.0  # an evaluation

    records = []
    monkeypatch.setattr(qtrain.train, "time", types.SimpleNamespace(perf_counter=perf_counter))
    loaded, params = lora_model(tiny_model_dir)
    ds, _ = prepare(str(dates_file), DataSection(train="x"), loaded.tokenizer, "data.train")
    cfg = TrainingSection(micro_batch_size=4, max_steps=3, log_every=1, lr_scheduler="constant")
    batches = Batches(ds, 4, seed=0, pad_id=loaded.tokenizer.pad_token_id)
    groups = [{"params": list(params.values()), "lr": cfg.learning_rate}]
    train(loaded.model, groups, batches, cfg, cfg.max_steps, Accelerator(cpu=True), log=log)
    assert len(records) == 3
    rates = [r["tokens_per_s"] for r in records]
    assert min(rates) > 20 and max(rates) < 200  # 4 rows of a date question: tens of tokens, over 1 s each
    assert records[-1]["elapsed_s"] > 2000  # the wall clock still counts everything


def test_run_is_deterministic_and_writes_its_files(tiny_model_dir, dates_file, tmp_path):
    from qtrain.run import run

    losses = []
    for name in ("a", "b"):  # same seed, separate folders: identical losses
        (tmp_path / name).mkdir()
        cfg = load_config(write_config(tmp_path / name, tiny_model_dir, dates_file, training={"max_steps": 3}))
        run(cfg)
        out = tmp_path / name / "run"
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines] == [1, 2, 3]
        assert {"loss", "lr", "tokens_per_s", "elapsed_s"} <= set(lines[0])
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
        assert (out / "config.yaml").is_file() and (out / "summary.json").is_file()
        losses.append([r["loss"] for r in lines])
    assert losses[0] == losses[1]


def test_schedule_warms_up_then_decays():
    f = [lr_factor(s, 2, 10, "cosine") for s in range(10)]
    assert f[0] == pytest.approx(1 / 3) and f[1] == pytest.approx(2 / 3) and f[2] == 1.0
    assert all(a >= b for a, b in zip(f[2:], f[3:])) and f[-1] < 0.05
    assert lr_factor(6, 2, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(9, 0, 10, "constant") == 1.0


@pytest.mark.parametrize("examples,micro,accum,epochs,expected", [
    (8, 4, 4, 1, (1, 2)),  # the accumulation is more than an epoch: one step of the epoch's 2 micro-batches
    (8, 3, 2, 1, (2, 1)),  # 3 micro-batches an epoch (the last of 2 examples): the second step takes one
    (8, 3, 2, 2, (3, 2)),  # two epochs are 6 micro-batches: three full steps
    (8, 2, 3, 0.5, (1, 2)),
])
def test_an_epochs_run_takes_each_example_once_an_epoch(examples, micro, accum, epochs, expected):
    from qtrain.config import validate_config
    from qtrain.run import schedule

    cfg = validate_config({"peft": [{"method": "lora"}], "data": {"train": "x"}, "training": {
        "micro_batch_size": micro, "gradient_accumulation_steps": accum, "epochs": epochs}})
    assert schedule(cfg, examples) == expected
    full = cfg.model_copy(update={"training": cfg.training.model_copy(update={"max_steps": 5, "epochs": None})})
    assert schedule(full, examples) == (5, accum)


def test_one_epoch_trains_on_every_target_token_once(tiny_model_dir, dates_file, tmp_path):
    """8 examples in micro-batches of 3, two per step: one epoch is 3 micro-batches, so the second step takes
    the last one alone (it took a fourth, of the next epoch, before)."""
    from qtrain.run import run

    cfg = load_config(write_config(tmp_path, tiny_model_dir, dates_file, eval={"before_training": False},
                                   training={"max_steps": None, "epochs": 1, "micro_batch_size": 3,
                                             "gradient_accumulation_steps": 2}))
    run(cfg)
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    from qtrain.modeling import load_tokenizer, resolve_model_path

    _, stats = prepare(str(dates_file), cfg.data, load_tokenizer(resolve_model_path(cfg.model), cfg.model), "x")
    assert [r["step"] for r in steps] == [1, 2]
    assert sum(r["target_tokens"] for r in steps) == stats.target_tokens
