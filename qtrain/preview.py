"""`qtrain data CONFIG --show N`: see exactly what the model will be trained on, before training.

Each example is printed as the tokenizer renders it, with the parts that carry a loss marked: green on a
terminal, `[[...]]` brackets otherwise (so the marks survive a pipe or a log file). Token-length statistics are
taken before truncation, so they show how many examples `data.max_seq_len` cuts.
"""

from __future__ import annotations

import math
import statistics
import sys
from typing import Any

from qtrain.config import RunConfig
from qtrain.numerics import IGNORE_INDEX

_GREEN, _RESET = "\033[32m", "\033[0m"


def mark_trained(tokenizer, input_ids: list[int], labels: list[int], color: bool) -> str:
    """The decoded example with loss-carrying spans marked. The first token never carries a loss, whatever its
    label: nothing before it predicts it (the loss compares each position's logits with the next label)."""
    open_, close = (_GREEN, _RESET) if color else ("[[", "]]")
    out, span, trained = [], [], False
    for i, (tok, lab) in enumerate(zip(input_ids, labels)):
        is_target = lab != IGNORE_INDEX and i > 0
        if is_target != trained and span:
            text = tokenizer.decode(span)
            out.append(f"{open_}{text}{close}" if trained else text)
            span = []
        trained = is_target
        span.append(tok)
    if span:
        text = tokenizer.decode(span)
        out.append(f"{open_}{text}{close}" if trained else text)
    return "".join(out)


def length_stats(lengths: list[int], max_len: int) -> dict[str, Any]:
    ordered = sorted(lengths)
    pick = lambda q: ordered[max(0, math.ceil(q * len(ordered)) - 1)]  # noqa: E731  (nearest rank)
    return {"examples": len(lengths), "min": ordered[0], "mean": round(statistics.fmean(ordered), 1),
            "p50": pick(0.5), "p90": pick(0.9), "max": ordered[-1],
            "over_max_seq_len": sum(n > max_len for n in lengths), "max_seq_len": max_len}


def preview(cfg: RunConfig, show: int, color: bool | None = None) -> str:
    from qtrain.data import prepare
    from qtrain.modeling import load_tokenizer, resolve_model_path

    color = sys.stdout.isatty() if color is None else color
    tokenizer = load_tokenizer(resolve_model_path(cfg.model), cfg.model)
    full = cfg.data.model_copy(update={"max_seq_len": 1 << 30})  # untruncated, for the length statistics
    untruncated, _ = prepare(cfg.data.train, full, tokenizer, "data.train")
    dataset, stats = prepare(cfg.data.train, cfg.data, tokenizer, "data.train")
    key = "green" if color else "[[brackets]]"
    lines = [f"{cfg.data.train}: format {cfg.data.format}; the loss is taken on the {key} parts", ""]
    for i in range(min(show, len(dataset))):
        ex = dataset[i]
        lines += [f"--- example {i} ({len(ex['input_ids'])} tokens) ---",
                  mark_trained(tokenizer, ex["input_ids"], ex["labels"], color), ""]
    s = length_stats([len(x) for x in untruncated["input_ids"]], cfg.data.max_seq_len)
    lines.append(f"token lengths: min {s['min']}, mean {s['mean']}, p50 {s['p50']}, p90 {s['p90']}, max {s['max']}; "
                 f"{s['over_max_seq_len']} of {s['examples']} exceed data.max_seq_len={s['max_seq_len']}")
    lines.append(f"after masking and truncation: {stats.line()}")
    return "\n".join(lines)
