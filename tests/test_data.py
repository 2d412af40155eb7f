"""Data: formats, loss masks (responses and their end-of-turn token only), file formats, named errors."""

import json

import pytest

from qtrain.config import DataSection
from qtrain.data import Batches, collate, prepare
from qtrain.errors import DataError
from qtrain.numerics import IGNORE_INDEX


@pytest.fixture(scope="module")
def tokenizer():
    from conftest import make_tokenizer

    return make_tokenizer()


def trained_text(tokenizer, example):
    return tokenizer.decode([t for t, lab in zip(example["input_ids"], example["labels"]) if lab != IGNORE_INDEX])


def test_instruction_through_chat_template_trains_on_answer_and_end_of_turn(tokenizer, dates_file):
    ds, stats = prepare(str(dates_file), DataSection(train=str(dates_file)), tokenizer, "data.train")
    ex = ds[0]
    assert trained_text(tokenizer, ex) == "2021-03-03<|im_end|>\n"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id  # pad == EOS, and still the EOS label is kept
    assert tokenizer.eos_token_id in [lab for lab in ex["labels"] if lab != IGNORE_INDEX]
    assert tokenizer.decode(ex["input_ids"]).startswith("<|im_start|>user\nRewrite the date")
    assert stats.examples == 8 and stats.truncated == 0


def test_alpaca_and_text_formats_append_eos(tokenizer, dates_file, tmp_path):
    cfg = DataSection(train=str(dates_file), prompt_template="alpaca")
    ex = prepare(str(dates_file), cfg, tokenizer, "data.train")[0][0]
    assert trained_text(tokenizer, ex) == "2021-03-03<|im_end|>"
    assert "### Response:\n" in tokenizer.decode(ex["input_ids"])
    text_file = tmp_path / "t.jsonl"
    text_file.write_text(json.dumps({"text": "March 3"}) + "\n")
    ex = prepare(str(text_file), DataSection(train=str(text_file), format="text"), tokenizer, "data.train")[0][0]
    assert all(lab != IGNORE_INDEX for lab in ex["labels"])
    assert ex["input_ids"][-1] == tokenizer.eos_token_id


def test_chat_format_trains_every_assistant_turn(tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    msgs = [{"role": "user", "content": "March 3"}, {"role": "assistant", "content": "2021-03-03"},
            {"role": "user", "content": "May 1"}, {"role": "assistant", "content": "1999-05-01"}]
    path.write_text(json.dumps({"messages": msgs}) + "\n")
    ex = prepare(str(path), DataSection(train=str(path), format="chat"), tokenizer, "data.train")[0][0]
    assert trained_text(tokenizer, ex) == "2021-03-03<|im_end|>\n1999-05-01<|im_end|>\n"


def test_truncation_is_counted_and_fully_masked_rows_skipped(tokenizer, dates_file):
    # Prompts take 35-41 tokens here: at 40, every row is cut and some lose their whole answer.
    ds, stats = prepare(str(dates_file), DataSection(train=str(dates_file), max_seq_len=40), tokenizer, "x")
    assert 0 < stats.all_masked < 8 and stats.examples == 8 - stats.all_masked
    assert stats.truncated == stats.examples  # every kept example was cut; the skipped ones count as skipped
    assert all(len(x) == 40 for x in ds["input_ids"])
    with pytest.raises(DataError, match="no example .* has a response token"):
        prepare(str(dates_file), DataSection(train=str(dates_file), max_seq_len=5), tokenizer, "data.train")


def test_iso_dates_stay_text(tokenizer, dates_file):
    # pyarrow's JSON reader would turn "2021-03-03" into a timestamp; qtrain must not.
    ds, _ = prepare(str(dates_file), DataSection(train=str(dates_file)), tokenizer, "data.train")
    assert trained_text(tokenizer, ds[0]).startswith("2021-03-03")


@pytest.mark.parametrize("kind", ["csv", "parquet", "disk", "json"])
def test_other_file_formats(tokenizer, tmp_path, kind):
    import datasets

    rows = [{"instruction": "Rewrite.", "input": "March 3, 2021", "output": "2021-03-03"}]
    ds = datasets.Dataset.from_list(rows)
    path = tmp_path / {"csv": "d.csv", "parquet": "d.parquet", "disk": "d", "json": "d.json"}[kind]
    if kind == "csv":
        ds.to_csv(str(path), index=False)
    elif kind == "parquet":
        ds.to_parquet(str(path))
    elif kind == "disk":
        ds.save_to_disk(str(path))
    else:
        path.write_text(json.dumps(rows))
    out, _ = prepare(str(path), DataSection(train=str(path)), tokenizer, "data.train")
    assert trained_text(tokenizer, out[0]) == "2021-03-03<|im_end|>\n"


@pytest.mark.parametrize("name,content,message", [
    ("d.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n',
     r"d\.jsonl:2: not valid JSON"),
    ("d.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', r"d\.jsonl:2: missing field 'output'"),
    ("d.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": 5}\n',
     r"d\.jsonl:3: field 'output' is int"),
    ("d.jsonl", '["not", "an", "object"]\n', r"array of objects"),
    ("d.jsonl", "", r"is empty"),
    ("d.jsonl", "\n\n", r"no examples"),
    # the CSV reader says only "An error occurred while generating the dataset" (or drops a duplicate column)
    ("d.csv", "instruction,input,output\nRewrite.,March 3, 2021,2021-03-03\n",
     r"d\.csv:2: 4 fields where the header has 3; quote cells that hold commas"),
    ("d.csv", "instruction,output,output\nRewrite.,a,b\n", r"d\.csv:1: the header names \['output'\] more than once"),
    ("d.csv", "instruction,input,output\n", r"d\.csv: has a header and no examples"),
])
def test_bad_files_name_file_and_line(tokenizer, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        prepare(str(path), DataSection(train=str(path)), tokenizer, "data.train")


def test_a_field_the_first_row_leaves_out_is_read_from_the_rows_that_have_it(tokenizer, tmp_path):
    """Alpaca-style files often leave out an empty `input`; the table is built from every row's fields."""
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n" + json.dumps(
        {"instruction": "Rewrite the date.", "input": "March 3, 2021", "output": "2021-03-03"}) + "\n")
    ds, _ = prepare(str(path), DataSection(train=str(path)), tokenizer, "data.train")
    assert "Rewrite the date.\n\nMarch 3, 2021<|im_end|>" in tokenizer.decode(ds[1]["input_ids"])
    assert "Say hi.<|im_end|>" in tokenizer.decode(ds[0]["input_ids"])


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv"])
def test_files_saved_with_a_byte_order_mark_read_as_without(tokenizer, tmp_path, kind):
    """Notepad, PowerShell and Excel's "CSV UTF-8" begin UTF-8 files with a byte-order mark."""
    row = {"instruction": "Rewrite.", "input": "March 3, 2021", "output": "2021-03-03"}
    path = tmp_path / f"d.{kind}"
    text = {"jsonl": json.dumps(row) + "\n", "json": json.dumps([row]),
            "csv": "instruction,input,output\r\nRewrite.,\"March 3, 2021\",2021-03-03\r\n"}[kind]
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    ds, _ = prepare(str(path), DataSection(train=str(path)), tokenizer, "data.train")
    assert trained_text(tokenizer, ds[0]) == "2021-03-03<|im_end|>\n"


def test_a_jsonl_line_ends_at_a_newline_only(tokenizer, tmp_path):
    """U+2028, U+2029 and U+0085 are text inside a JSON string (written raw with ensure_ascii=False): they
    neither split a row nor shift the line numbers of the rows after them."""
    path = tmp_path / "d.jsonl"
    rows = [{"instruction": "Rewrite.\u2028Now.\u2029\u0085", "output": "2021-03-03"}, {"instruction": "x"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:1]), encoding="utf-8")
    ds, _ = prepare(str(path), DataSection(train=str(path)), tokenizer, "data.train")
    assert "Rewrite.\u2028Now.\u2029\u0085" in tokenizer.decode(ds[0]["input_ids"])
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field 'output'"):
        prepare(str(path), DataSection(train=str(path)), tokenizer, "data.train")


# as SmolLM2's: a default system prompt when the conversation brings none
DEFAULT_SYSTEM = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nBe nice."
                  "<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("template", [None, DEFAULT_SYSTEM], ids=["chatml", "default_system_prompt"])
def test_a_conversation_opened_by_the_assistant_trains_on_its_turns_alone(tokenizer, tmp_path, template):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template or tok.chat_template
    path = tmp_path / "chat.jsonl"
    msgs = [{"role": "assistant", "content": "How can I help?"}, {"role": "user", "content": "Date?"},
            {"role": "assistant", "content": "2021"}]
    path.write_text(json.dumps({"messages": msgs}) + "\n")
    ex = prepare(str(path), DataSection(train=str(path), format="chat"), tok, "data.train")[0][0]
    assert trained_text(tok, ex) == "How can I help?<|im_end|>\n2021<|im_end|>\n"  # no preamble, no role header
    assert tok.decode(ex["input_ids"]).startswith("<|im_start|>" if template is None else "<|im_start|>system\nBe")
    whole = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == whole  # the conversation as the template writes it, nothing added or lost


def test_system_prompt_applies_to_every_format_with_a_prompt(tokenizer, dates_file, tmp_path):
    """Conversations without a system message of their own get it; the Alpaca template opens with it."""
    path = tmp_path / "chat.jsonl"
    msgs = [{"role": "user", "content": "March 3"}, {"role": "assistant", "content": "2021-03-03"}]
    path.write_text(json.dumps({"messages": msgs}) + "\n" + json.dumps(
        {"messages": [{"role": "system", "content": "Mine."}, *msgs]}) + "\n")
    ds, _ = prepare(str(path), DataSection(train=str(path), format="chat", system_prompt="Be brief."), tokenizer, "x")
    assert tokenizer.decode(ds[0]["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")
    assert tokenizer.decode(ds[1]["input_ids"]).startswith("<|im_start|>system\nMine.<|im_end|>\n<|im_start|>user")
    alpaca = DataSection(train=str(dates_file), prompt_template="alpaca", system_prompt="Be brief.")
    ds, _ = prepare(str(dates_file), alpaca, tokenizer, "x")
    assert tokenizer.decode(ds[0]["input_ids"]).startswith("Be brief.\n\n### Instruction:\n")
    with pytest.raises(ValueError, match=r"data\.system_prompt: a text row is trained on as it stands"):
        DataSection(train="x", format="text", system_prompt="Be brief.")


def test_missing_file_and_bad_extension(tokenizer, tmp_path):
    with pytest.raises(DataError, match="data.train: .* does not exist"):
        prepare(str(tmp_path / "nope.jsonl"), DataSection(train="x"), tokenizer, "data.train")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported extension"):
        prepare(str(tmp_path / "d.txt"), DataSection(train="x"), tokenizer, "data.train")


def test_collate_masks_padding_by_length_not_id():
    batch = collate([{"input_ids": [5, 2], "labels": [-100, 2]}, {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}],
                    pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 2, 2], [5, 6, 7]]
    assert batch["labels"].tolist() == [[-100, 2, -100], [-100, 6, 7]]  # the real EOS (2) keeps its label
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_batches_are_seeded_and_resumable():
    ds = [{"input_ids": [i, i], "labels": [i, i]} for i in range(10)]
    a = Batches(ds, 3, seed=1, pad_id=0)
    seq = [next(a)["input_ids"][:, 0].tolist() for _ in range(6)]  # two epochs of 4 micro-batches, minus 2
    assert sorted(sum(seq[:4], [])) == list(range(10))  # one epoch covers every example once
    b = Batches(ds, 3, seed=1, pad_id=0, epoch=1, position=0)
    assert [next(b)["input_ids"][:, 0].tolist() for _ in range(2)] == seq[4:6]
    assert Batches(ds, 3, seed=2, pad_id=0).__next__()["input_ids"][:, 0].tolist() != seq[0]


def test_processes_shard_one_global_stream():
    ds = [{"input_ids": [i, i], "labels": [i, i]} for i in range(7)]
    one = Batches(ds, 2, seed=3, pad_id=0)  # 4 micro-batches per epoch (the last holds one example)
    stream = [next(one)["input_ids"][:, 0].tolist() for _ in range(10)]  # crosses two epoch boundaries
    ranks = [Batches(ds, 2, seed=3, pad_id=0, rank=r, world=2) for r in (0, 1)]
    sharded = [next(ranks[k % 2])["input_ids"][:, 0].tolist() for k in range(10)]
    assert sharded == stream
    assert ranks[0].state() == ranks[1].state() == one.state() == {"epoch": 2, "position": 2}


COUNTING_TEMPLATE = ("{{ messages | length }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                     "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("template", [None, COUNTING_TEMPLATE], ids=["no_template", "not_prefix_stable"])
def test_an_unusable_chat_template_names_the_fix_that_fits_the_format(tokenizer, dates_file, tmp_path, template):
    """data.format: chat always renders through the chat template, so the fix once advised for it
    (data.prompt_template: alpaca) changed nothing; instruction rows can take it, and then prepare."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template  # none at all, or one whose rendering of a prefix is not a prefix
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "March 3"},
                                             {"role": "assistant", "content": "2021-03-03"}]}) + "\n")
    with pytest.raises(DataError, match=r"data\.format: 'chat' renders every conversation with the chat "
                                        r"template.*give the rows as data\.format: instruction"):
        prepare(str(chat), DataSection(train=str(chat), format="chat"), tok, "data.train")
    with pytest.raises(ValueError, match=r"data\.prompt_template: 'alpaca' chooses how instruction rows are "
                                         r"written, and data\.format is 'chat' .*; remove prompt_template"):
        DataSection(train=str(chat), format="chat", prompt_template="alpaca")  # it would change nothing
    instruction = "chat_template" if template is None else "auto"  # what uses the template for instruction rows
    with pytest.raises(DataError, match=rf"data\.prompt_template: '{instruction}' renders instruction rows with the "
                                        r"chat template.*; set data\.prompt_template: alpaca$"):
        prepare(str(dates_file), DataSection(train=str(dates_file), prompt_template=instruction), tok, "data.train")
    ds = prepare(str(dates_file), DataSection(train=str(dates_file), prompt_template="alpaca"), tok, "data.train")[0]
    assert trained_text(tok, ds[0]) == "2021-03-03<|im_end|>"  # the advice works
