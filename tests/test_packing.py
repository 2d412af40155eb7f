"""`data.packing`: packed rows give every example the loss and gradient it has alone (sdpa, eager, a 4-bit base
with LoRA), every example is packed once within max_seq_len, a packed run trains and says so, and methods
that rewrite the inputs are refused."""

import json
import random

import pytest
import torch
from accelerate import Accelerator

from qtrain.config import DataSection, ModelSection, QuantizationSection, validate_config
from qtrain.data import collate, pack, pack_rows, prepare
from qtrain.methods import build_methods
from qtrain.methods.blocks import LoRABlock
from qtrain.modeling import load_model
from qtrain.numerics import IGNORE_INDEX, count_targets
from qtrain.train import accumulate_gradients, batch_loss_sum
from conftest import DATES, write_config

CPU = torch.device("cpu")


@pytest.fixture
def dates_text_file(tmp_path):
    """Plain-text rows: every token is a target, the first one included, so the boundary label matters."""
    path = tmp_path / "dates-text.jsonl"
    path.write_text("".join(json.dumps({"text": f"{a} is {b}"}) + "\n" for a, b in DATES))
    return path


def lora_model(model_dir, attn: str, bits):
    loaded = load_model(ModelSection(path=str(model_dir), attn_implementation=attn), QuantizationSection(bits=bits),
                        CPU)
    torch.manual_seed(0)
    (method,) = build_methods([LoRABlock(method="lora", r=4, alpha=8, dropout=0.0)])
    params = method.attach(loaded.model)
    for p in params.values():  # non-zero B, so the adapter changes the output and A gets gradient too
        if p.shape[1] == 4:
            torch.nn.init.normal_(p, std=0.05)
    loaded.model.train()
    return loaded, params


def examples_and_rows(path, tokenizer, fmt: str, max_len: int):
    ds, _ = prepare(str(path), DataSection(train="x", format=fmt, max_seq_len=max_len), tokenizer, "data.train")
    packed, stats = pack(ds, max_len)
    assert stats.rows < stats.examples  # some row holds several examples, or the test proves nothing
    return [ds[i] for i in range(len(ds))], [packed[i] for i in range(len(packed))]


def split_rows(rows):
    """Each packed example as (row index, start, end), read back from the position restarts."""
    spans = []
    for r, row in enumerate(rows):
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
        spans += [(r, a, b) for a, b in zip(starts, starts[1:])]
    return spans


def only(batch, row: int, start: int, end: int):
    """`batch` with the labels outside row `row`, positions start..end-1, set to IGNORE_INDEX."""
    labels = torch.full_like(batch["labels"], IGNORE_INDEX)
    labels[row, start:end] = batch["labels"][row, start:end]
    return {**batch, "labels": labels}


def per_example_losses(model, rows, pad_id, spans):
    batch = collate(rows, pad_id)
    with torch.no_grad():
        return [float(batch_loss_sum(model, only(batch, r, a, b), 64)) for r, a, b in spans]


@pytest.mark.parametrize("fmt", ["instruction", "text"])
@pytest.mark.parametrize("attn,bits", [("sdpa", "none"), ("eager", "none"), ("sdpa", 4)])
def test_packed_rows_give_each_example_its_own_loss_and_gradient(tiny_model_dir, dates_file, dates_text_file, fmt,
                                                                 attn, bits):
    loaded, params = lora_model(tiny_model_dir, attn, bits)
    pad = loaded.tokenizer.pad_token_id
    examples, rows = examples_and_rows(dates_file if fmt == "instruction" else dates_text_file, loaded.tokenizer,
                                       fmt, max_len=96)
    spans = split_rows(rows)
    by_ids = {tuple(e["input_ids"]): i for i, e in enumerate(examples)}
    order = [by_ids[tuple(rows[r]["input_ids"][a:b])] for r, a, b in spans]
    assert sorted(order) == list(range(len(examples)))

    packed = per_example_losses(loaded.model, rows, pad, spans)
    padded = collate(examples, pad)
    with torch.no_grad():
        alone = [float(batch_loss_sum(loaded.model, only(padded, i, 0, padded["labels"].shape[1]), 64))
                 for i in order]
    torch.testing.assert_close(torch.tensor(packed), torch.tensor(alone), rtol=1e-5, atol=1e-5)

    # Gradients through the training path: one packed micro-batch vs one padded micro-batch.
    acc = Accelerator(cpu=True)
    loss_p, n_p = accumulate_gradients(loaded.model, [collate(rows, pad)], acc, 64)
    grads_p = {n: p.grad.clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    loss_u, n_u = accumulate_gradients(loaded.model, [padded], acc, 64)
    assert n_p == n_u and loss_p == pytest.approx(loss_u, rel=1e-5)
    assert all(p.grad.abs().sum() > 0 for p in params.values())
    for n, p in params.items():
        torch.testing.assert_close(grads_p[n], p.grad, rtol=1e-4, atol=1e-6)


def test_without_the_position_restarts_examples_would_see_each_other(tiny_model_dir, dates_text_file):
    """The controls: the same packed rows with plain positions, or with a 2D attention mask, change the losses."""
    loaded, _ = lora_model(tiny_model_dir, "sdpa", "none")
    pad = loaded.tokenizer.pad_token_id
    _, rows = examples_and_rows(dates_text_file, loaded.tokenizer, "text", max_len=96)
    spans = split_rows(rows)
    right = per_example_losses(loaded.model, rows, pad, spans)
    plain = [{**row, "position_ids": list(range(len(row["input_ids"])))} for row in rows]
    leaky = per_example_losses(loaded.model, plain, pad, spans)
    later = [i for i, (r, a, b) in enumerate(spans) if a > 0]  # examples that have a neighbour before them
    assert later and all(abs(right[i] - leaky[i]) > 1e-3 for i in later)

    batch = collate(rows, pad)
    with torch.no_grad():
        out = loaded.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                           attention_mask=batch["attention_mask"], use_cache=False).logits
        ok = loaded.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    r, a, b = spans[later[0]]
    assert (out[r, a:b] - ok[r, a:b]).abs().max() > 1e-3  # why `model_inputs` leaves the 2D mask out


def test_packing_places_every_example_once_within_max_len():
    rng = random.Random(0)
    for max_len in (16, 64, 512):
        lengths = [rng.randint(1, max_len) for _ in range(rng.randint(1, 400))]
        rows = pack_rows(lengths, max_len)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= max_len for row in rows)
        # Best fit decreasing: at most one row is at most half full, so rows < 2·ideal + 1.
        assert sum(sum(lengths[i] for i in row) <= max_len // 2 for row in rows) <= 1
    assert pack_rows([8] * 3, 8) == [[0], [1], [2]] and pack_rows([3, 5, 4, 4], 8) == [[1, 0], [2, 3]]


def test_packed_rows_restart_positions_and_drop_the_boundary_label(tiny_model_dir, dates_text_file):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ds, _ = prepare(str(dates_text_file), DataSection(train="x", format="text", max_seq_len=96), tok, "data.train")
    packed, stats = pack(ds, 40)
    assert stats.examples == len(ds) and stats.rows == len(packed) and stats.tokens == sum(map(len, ds["input_ids"]))
    assert f"packed {len(ds)} examples into {len(packed)} rows of ≤40 tokens" in stats.line()
    for row in packed:
        n = len(row["input_ids"])
        assert n <= 40 and len(row["labels"]) == len(row["position_ids"]) == n
        for i, p in enumerate(row["position_ids"]):
            assert p == (0 if i == 0 or p == 0 else row["position_ids"][i - 1] + 1)
            if p == 0:
                assert row["labels"][i] == IGNORE_INDEX  # never predicted from the previous example
    # Targets: exactly those of the unpacked examples (whose first label is never predicted either).
    assert sum(count_targets(torch.tensor([r["labels"]])) for r in packed) == \
        sum(count_targets(torch.tensor([e])) for e in ds["labels"])
    batch = collate([packed[0], {"input_ids": [5, 6], "labels": [5, 6], "position_ids": [0, 1]}], pad_id=0)
    width = batch["input_ids"].shape[1]
    assert batch["position_ids"][1].tolist() == [0, 1] + list(range(width - 2))  # padding: a run of its own
    assert batch["attention_mask"][1].tolist() == [1, 1] + [0] * (width - 2)


def cli(capsys, *args):
    from qtrain.cli import main

    code = main(["run", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_packed_run_trains_and_logs_the_packing(tiny_model_dir, dates_file, tmp_path, capsys):
    config = write_config(tmp_path, tiny_model_dir, dates_file, data={"packing": True, "max_seq_len": 128},
                          training={"max_steps": 12, "micro_batch_size": 8, "lr_scheduler": "constant"})
    code, out, err = cli(capsys, config)
    assert code == 0, err
    assert f"packed {len(DATES)} examples into " in out and "rows of ≤128 tokens" in out
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.3


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_methods_that_rewrite_inputs_refuse_packing(tiny_model_dir, dates_file, tmp_path, capsys, method):
    config = write_config(tmp_path, tiny_model_dir, dates_file, data={"packing": True},
                          peft=[{"method": method, "num_virtual_tokens": 4}])
    code, out, err = cli(capsys, config)
    assert code == 2
    assert f"data.packing: true cannot be combined with peft method {method}" in err
    assert "set data.packing: false" in err and "Traceback" not in err
    lora = {"peft": [{"method": "lora"}], "data": {"train": "x.jsonl", "packing": True}}
    assert validate_config(lora).data.packing
