"""Data: render raw rows (`qtrain.datafiles` reads them) to text segments, tokenize with a loss mask, pack, batch.

Every format becomes a list of segments `(text, trainable)`; tokens of trainable segments carry labels, the
others get IGNORE_INDEX (unless `train_on_prompt`). The end-of-turn / end-of-sequence token belongs to the
response segment, so the model learns to stop; padding is masked by length, never by token id, so a pad token
equal to EOS cannot hide a real EOS label.

- `instruction`: rendered through the tokenizer's chat template when it has one (user = instruction + input,
  assistant = output), else the Alpaca template.
- `chat`: a list of `{role, content}` messages through the chat template; every assistant turn is trained.
  The template must render a conversation's prefix as a prefix of the whole (true of common templates).
- `text`: the whole text is trained on, EOS appended.

The batch order is a seeded permutation per epoch, addressed by (epoch, position): resuming restores the
position instead of replaying batches.

Packing (`data.packing`) concatenates short examples into rows of at most `max_seq_len` tokens, once, before
batching (best-fit decreasing, so the packing depends only on the data and is the same on resume and on every
process). Each row carries `position_ids` that restart at 0 with every example, and the model gets no 2D
attention mask: transformers then finds the restarts and builds a block-diagonal causal mask, so no example
sees another. Each example's first label is dropped, because in a row it would be predicted from the previous
example's last token; unpacked it is never predicted either, so the loss of every example is unchanged.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from qtrain.config import DataSection
from qtrain.datafiles import load_rows, where
from qtrain.errors import DataError
from qtrain.numerics import IGNORE_INDEX

_ALPACA_HEAD = ("Below is an instruction that describes a task{extra}. "
                "Write a response that appropriately completes the request.\n\n")


# ------------------------------------------------------------------------------------------------ rendering


class Formatter:
    """Turns one raw row into (text, trainable) segments for the configured format."""

    def __init__(self, cfg: DataSection, tokenizer, source: str):
        self.cfg, self.tok, self.source = cfg, tokenizer, source
        use_chat = cfg.prompt_template == "chat_template" or (
            cfg.prompt_template == "auto" and getattr(tokenizer, "chat_template", None))
        if (cfg.format == "chat" or use_chat) and not getattr(tokenizer, "chat_template", None):
            raise DataError(self._no_chat_template("this model's tokenizer has no chat template"))
        self.use_chat = bool(use_chat)

    def _no_chat_template(self, why: str) -> str:
        """The error when the chat template cannot be used, with the way out that fits the format: instruction
        rows can take the alpaca template instead, but data.format: chat always renders through the template
        (data.prompt_template does not apply to it)."""
        if self.cfg.format == "chat":
            return (f"data.format: 'chat' renders every conversation with the chat template, and {why}; use a "
                    "model whose tokenizer has a working one, or give the rows as data.format: instruction "
                    "(with data.prompt_template: alpaca) or data.format: text (which trains on the whole text)")
        return (f"data.prompt_template: {self.cfg.prompt_template!r} renders instruction rows with the chat "
                f"template, and {why}; set data.prompt_template: alpaca")

    @property
    def template_ends_turns(self) -> bool:
        """Whether the chat template writes the end-of-turn token; otherwise EOS is appended."""
        return self.cfg.format == "chat" or (self.cfg.format == "instruction" and self.use_chat)

    def where(self, index: int, lines: list[int] | None) -> str:
        return where(self.source, index, lines)

    def field(self, row: dict[str, Any], name: str, where: str, required: bool = True) -> str:
        value = row.get(name)
        if value is None:
            if required:
                given = sorted(k for k, v in row.items() if v is not None)  # a table gives every row every column
                raise DataError(f"{where}: missing field {name!r} (data.fields maps your column names; "
                                f"this row has {given})")
            return ""
        if not isinstance(value, str):
            raise DataError(f"{where}: field {name!r} must be text, got {type(value).__name__}")
        return value

    def segments(self, row: dict[str, Any], where: str) -> list[tuple[str, bool]]:
        f = self.cfg.fields
        if self.cfg.format == "text":
            return [(self.field(row, f.text, where), True)]
        if self.cfg.format == "chat":
            return self._chat_segments(self._messages(row, where), where)
        prompt, answer = self.instruction_prompt(row, where), self.field(row, f.output, where)
        if self.use_chat:
            return self._chat_segments(self._instruction_messages(row, where) + [
                {"role": "assistant", "content": answer}], where)
        return [(prompt, False), (answer, True)]

    def instruction_prompt(self, row: dict[str, Any], where: str) -> str:
        """The prompt text of an instruction row (for generation), without the answer."""
        if self.use_chat:
            return self.render(self._instruction_messages(row, where), where, add_generation_prompt=True)
        f = self.cfg.fields
        instruction, extra = self.field(row, f.instruction, where), self.field(row, f.input, where, required=False)
        head = f"{self.cfg.system_prompt}\n\n" if self.cfg.system_prompt else \
            _ALPACA_HEAD.format(extra=", paired with an input that provides further context" if extra else "")
        body = f"### Instruction:\n{instruction}\n\n" + (f"### Input:\n{extra}\n\n" if extra else "")
        return head + body + "### Response:\n"

    def _instruction_messages(self, row: dict[str, Any], where: str) -> list[dict[str, str]]:
        f = self.cfg.fields
        instruction, extra = self.field(row, f.instruction, where), self.field(row, f.input, where, required=False)
        msgs = [{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else []
        return msgs + [{"role": "user", "content": instruction + (f"\n\n{extra}" if extra else "")}]

    def _messages(self, row: dict[str, Any], where: str) -> list[dict[str, str]]:
        msgs = row.get(self.cfg.fields.messages)
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: field {self.cfg.fields.messages!r} must be a non-empty list of "
                            "{role, content} messages")
        for m in msgs:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: every message needs text 'role' and 'content', got {m!r}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: the conversation has no assistant message to learn from")
        if self.cfg.system_prompt and msgs[0]["role"] != "system":  # the default for rows that bring none
            return [{"role": "system", "content": self.cfg.system_prompt}] + msgs
        return msgs

    def render(self, msgs: list[dict[str, str]], where: str, add_generation_prompt: bool = False) -> str:
        """`msgs` through the chat template, as text. Templates refuse what their model was not trained on
        (Mistral's and Llama-2's: a system message, roles that do not alternate); that is the row's error."""
        try:
            return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:
            system = (" (data.system_prompt adds a system message to every row: leave it unset for this model)"
                      if self.cfg.system_prompt and self.cfg.format == "instruction" else "")
            raise DataError(f"{where}: this model's chat template refused the conversation ({type(e).__name__}: "
                            f"{e}); give conversations in the form it accepts, such as user and assistant turns "
                            f"that alternate{system}") from None

    def _chat_segments(self, msgs: list[dict[str, str]], where: str) -> list[tuple[str, bool]]:
        segs, done = [], ""
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = self.before_turn(msgs, i, where)
            upto = self.render(msgs[:i + 1], where)
            if not (before.startswith(done) and upto.startswith(before)):
                raise DataError(f"{where}: " + self._no_chat_template(
                    "this tokenizer's chat template does not render a conversation's start as a prefix of the "
                    "whole, so responses cannot be masked"))
            segs += [(before[len(done):], False), (upto[len(before):], True)]
            done = upto
        rest = self.render(msgs, where)[len(done):]
        return segs + ([(rest, False)] if rest else [])

    def before_turn(self, msgs: list[dict[str, str]], i: int, where: str) -> str:
        """The text before assistant message `i`'s own: what the model answers from, in training and when
        prompted. For a first message, what the template writes ahead of its text (a default system prompt, the
        BOS token, the role header), found by rendering it with a marker for its text: an empty conversation
        would not show what the template adds to a first turn."""
        if i:
            return self.render(msgs[:i], where, add_generation_prompt=True)
        marker = "\u2063qtrain\u2063"  # invisible separators: in no real message
        shown = self.render([{**msgs[0], "content": marker}], where)
        if marker not in shown:
            raise DataError(f"{where}: " + self._no_chat_template(
                "this tokenizer's chat template does not write a conversation's first message as given, so "
                "responses cannot be masked"))
        return shown[:shown.index(marker)]


# ------------------------------------------------------------------------------------------------ tokenizing


@dataclass
class DataStats:
    examples: int = 0
    truncated: int = 0
    all_masked: int = 0
    tokens: int = 0
    target_tokens: int = 0

    def line(self) -> str:
        return (f"{self.examples} examples, {self.tokens} tokens ({self.target_tokens} trained on); "
                f"{self.truncated} truncated to max_seq_len, {self.all_masked} skipped with nothing to learn")


def tokenize_segments(segments: list[tuple[str, bool]], tokenizer, max_len: int, train_on_prompt: bool,
                      add_eos: bool) -> tuple[list[int], list[int], bool]:
    ids: list[int] = []
    labels: list[int] = []
    if _adds_bos(tokenizer) and not any(tokenizer.bos_token in s for s, _ in segments[:1]):
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for text, trainable in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if (trainable or train_on_prompt) else [IGNORE_INDEX] * len(piece)
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    truncated = len(ids) > max_len
    return ids[:max_len], labels[:max_len], truncated


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def prepare(path: str, cfg: DataSection, tokenizer, key: str) -> tuple[Any, DataStats]:
    """Read, render and tokenize a data file; returns a Dataset with input_ids/labels and the counts."""
    rows, lines = load_rows(path, key)
    fmt = Formatter(cfg, tokenizer, str(path))
    add_eos = not fmt.template_ends_turns

    def encode(row: dict[str, Any], index: int) -> dict[str, Any]:
        segs = fmt.segments(row, fmt.where(index, lines))
        ids, labels, truncated = tokenize_segments(segs, tokenizer, cfg.max_seq_len, cfg.train_on_prompt, add_eos)
        return {"input_ids": ids, "labels": labels, "truncated": truncated}

    encoded = rows.map(encode, with_indices=True, remove_columns=rows.column_names, keep_in_memory=True,
                       load_from_cache_file=False, desc=None)
    keep = [i for i, lab in enumerate(encoded["labels"]) if any(t != IGNORE_INDEX for t in lab[1:])]
    truncated = encoded["truncated"]
    stats = DataStats(truncated=sum(truncated[i] for i in keep))  # of the examples kept: the others are skipped
    stats.all_masked = len(encoded) - len(keep)
    if not keep:
        raise DataError(f"{key}: no example in {path!r} has a response token left to learn from after "
                        f"truncation to data.max_seq_len={cfg.max_seq_len}; raise max_seq_len or check the fields")
    encoded = encoded.select(keep).remove_columns("truncated")
    stats.examples = len(encoded)
    stats.tokens = sum(len(x) for x in encoded["input_ids"])
    stats.target_tokens = sum(sum(t != IGNORE_INDEX for t in lab[1:]) for lab in encoded["labels"])
    return encoded, stats


# ------------------------------------------------------------------------------------------------ packing


@dataclass
class PackStats:
    examples: int
    rows: int
    max_len: int
    tokens: int

    def line(self) -> str:
        filled = self.tokens / (self.rows * self.max_len)
        return (f"packed {self.examples} examples into {self.rows} rows of ≤{self.max_len} tokens, "
                f"{filled:.0%} filled")


def pack_rows(lengths: list[int], max_len: int) -> list[list[int]]:
    """Group example indices into rows of at most `max_len` tokens, by best-fit decreasing.

    Longest first, each example goes into the row with the least room that still fits it (a new row when none
    does): never more than about 11/9 of the fewest possible rows, and deterministic. Rows with room left are
    kept in a list sorted by room, so each placement is a binary search.
    """
    assert all(0 < n <= max_len for n in lengths), "examples are truncated to max_len before packing"
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens still free, row index), ascending
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        at = bisect.bisect_left(room, (n, -1))
        if at < len(room):
            free, r = room.pop(at)
        else:
            free, r = max_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if free > n:
            bisect.insort(room, (free - n, r))
    return rows


def pack(dataset, max_len: int) -> tuple[Any, PackStats]:
    """The examples of `dataset` packed into rows of ≤ `max_len` tokens with `position_ids` restarting at 0 per
    example, and each example's first label dropped (it would be predicted across the boundary)."""
    import datasets

    ids, labels = list(dataset["input_ids"]), list(dataset["labels"])  # lists: indexing a Column is slow
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    for row in pack_rows([len(x) for x in ids], max_len):
        out["input_ids"].append([t for i in row for t in ids[i]])
        out["labels"].append([t for i in row for t in [IGNORE_INDEX] + labels[i][1:]])
        out["position_ids"].append([p for i in row for p in range(len(ids[i]))])
    stats = PackStats(examples=len(ids), rows=len(out["input_ids"]), max_len=max_len,
                      tokens=sum(map(len, ids)))
    return datasets.Dataset.from_dict(out), stats


# ------------------------------------------------------------------------------------------------ batching


def collate(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding gets attention 0 and label IGNORE_INDEX.

    Packed rows also carry `position_ids`; their padding gets a position run of its own (0, 1, ...), so it is
    one more sequence that attends only to itself. `attention_mask` still marks the real tokens (for counting),
    but is not given to the model with packed rows (see `qtrain.train.model_inputs`).
    """
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    packed = "position_ids" in examples[0]
    positions = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
        if packed:
            positions[i, :n] = torch.tensor(e["position_ids"])
            positions[i, n:] = torch.arange(width - n)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    return {**batch, "position_ids": positions} if packed else batch


@dataclass
class Batches:
    """An endless, seeded stream of micro-batches over epochs, resumable by (epoch, position).

    With several processes, all of them walk one global stream: process `rank` of `world` takes micro-batches
    rank, rank + world, ... so N processes with micro-batch b see exactly the micro-batches that one process
    with N-fold gradient accumulation would. `position` counts global micro-batches taken in the epoch.
    """

    dataset: Any
    micro_batch_size: int
    seed: int
    pad_id: int
    epoch: int = 0
    position: int = 0  # global micro-batches already taken in this epoch
    rank: int = 0
    world: int = 1
    _orders: dict[int, list[int]] = field(default_factory=dict, repr=False)

    @property
    def per_epoch(self) -> int:
        return math.ceil(len(self.dataset) / self.micro_batch_size)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._orders = {e: o for e, o in self._orders.items() if e >= self.epoch}  # keep at most two epochs
            self._orders[epoch] = torch.randperm(len(self.dataset), generator=g).tolist()
        return self._orders[epoch]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        epoch, pos = divmod(self.epoch * self.per_epoch + self.position + self.rank, self.per_epoch)
        start = pos * self.micro_batch_size
        idx = self._order(epoch)[start:start + self.micro_batch_size]
        self.epoch, self.position = divmod(self.epoch * self.per_epoch + self.position + self.world, self.per_epoch)
        return collate([self.dataset[i] for i in idx], self.pad_id)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        """Continue at a saved (epoch, position): the epoch's order is recomputed, no batch is replayed."""
        self.epoch, self.position, self._orders = int(state["epoch"]), int(state["position"]), {}
