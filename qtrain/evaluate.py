"""Held-out evaluation: mean token loss / perplexity, and exact match of greedy generations.

Exact match is the task metric of the quickstart: for each eval row, the prompt is rendered exactly as in
training, the model generates greedily until its end-of-turn token, and the stripped text is compared with the
reference answer. Generation runs batched with left padding.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from qtrain.config import DataSection
from qtrain.data import Formatter, _adds_bos, collate, load_rows
from qtrain.train import batch_loss_sum
from qtrain.numerics import count_targets


@torch.no_grad()
def eval_loss(model: nn.Module, dataset, micro_batch_size: int, pad_id: int, chunk_size: int,
              device: torch.device) -> dict[str, float]:
    was_training = model.training
    model.eval()
    total = count = 0.0
    for start in range(0, len(dataset), micro_batch_size):
        batch = collate([dataset[i] for i in range(start, min(len(dataset), start + micro_batch_size))], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        total += float(batch_loss_sum(model, batch, chunk_size))
        count += count_targets(batch["labels"])
    model.train(was_training)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def reference_pairs(path: str, cfg: DataSection, tokenizer, limit: int) -> list[tuple[str, str]]:
    """(prompt text, reference answer) for up to `limit` rows of an instruction or chat file."""
    rows, lines = load_rows(path, "data.eval")
    fmt = Formatter(cfg, tokenizer, path)
    pairs = []
    for i in range(min(limit, len(rows))):
        row, where = rows[i], fmt.where(i, lines)
        if cfg.format == "instruction":
            pairs.append((fmt.instruction_prompt(row, where), fmt.field(row, cfg.fields.output, where)))
        elif cfg.format == "chat":
            msgs = fmt._messages(row, where)
            last = max(j for j, m in enumerate(msgs) if m["role"] == "assistant")
            prompt = tokenizer.apply_chat_template(msgs[:last], tokenize=False, add_generation_prompt=True)
            pairs.append((prompt, msgs[last]["content"]))
    return pairs


@torch.no_grad()
def exact_match(model: nn.Module, tokenizer, pairs: list[tuple[str, str]], max_new_tokens: int,
                device: torch.device, batch_size: int = 16) -> dict[str, Any]:
    was_training = model.training
    model.eval()
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    hits, samples = 0, []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        prompts = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p, _ in chunk]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=eos)
        for (prompt, ref), gen in zip(chunk, out[:, width:]):
            text = tokenizer.decode(gen, skip_special_tokens=True).strip()
            ok = text == ref.strip()
            hits += ok
            if len(samples) < 5:
                samples.append({"prompt": prompt[-120:], "reference": ref, "generated": text, "match": ok})
    model.train(was_training)
    return {"exact_match": hits / max(len(pairs), 1), "n": len(pairs), "samples": samples}
