"""Held-out evaluation: mean token loss / perplexity, exact match of greedy generations, and forgetting.

Exact match is the task metric of the quickstart: for each eval row, the prompt is rendered exactly as in
training, the model generates greedily until its end-of-turn token, and the stripped text is compared with the
reference answer. Generation runs batched with left padding.

Forgetting: a fine-tune that wins its task can cost general ability. `reference_perplexity` scores a general
English text shipped with qtrain (qtrain/resources/reference.txt, written for this purpose, unrelated to any
task) so the report can show base vs trained perplexity on it beside the task metrics.

The task rows are data.eval, or else the rows `data.eval_fraction` holds out of data.train: `split_held_out`
makes that split for `qtrain run` and `qtrain eval` alike, seeded, so both score the same rows.
"""

from __future__ import annotations

import math
from importlib import resources
from typing import Any

import torch
from torch import nn

from qtrain.config import DataSection, RunConfig
from qtrain.data import Formatter, _adds_bos, collate
from qtrain.datafiles import load_rows
from qtrain.errors import DataError
from qtrain.methods import prepare_inputs
from qtrain.train import batch_loss_sum, host_inputs, to_device, without_right_padding_mask
from qtrain.numerics import count_targets


@torch.no_grad()
def eval_loss(model: nn.Module, dataset, micro_batch_size: int, pad_id: int, chunk_size: int,
              device: torch.device) -> dict[str, float]:
    was_training = model.training
    model.eval()
    total = count = 0.0
    on_host = host_inputs(model)
    for start in range(0, len(dataset), micro_batch_size):
        batch = collate([dataset[i] for i in range(start, min(len(dataset), start + micro_batch_size))], pad_id)
        count += count_targets(batch["labels"])
        batch = to_device(without_right_padding_mask(batch), device, on_host)
        total += float(batch_loss_sum(model, batch, chunk_size))
    model.train(was_training)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def split_held_out(train_set, fraction: float, seed: int) -> tuple[Any, Any]:
    """(train rows, held-out rows) of a prepared data.train, as `data.eval_fraction` splits it. Seeded by
    training.seed, so `qtrain eval` recomputes exactly the rows the run held out."""
    n = len(train_set)
    held = math.ceil(fraction * n)  # as `train_test_split` rounds a fraction
    if held < 1 or held >= n:
        raise DataError(f"data.eval_fraction: {fraction} of the {n} usable training examples leaves "
                        f"{n - held} for training and {held} for evaluation, and each needs at least one; give more "
                        "examples, a smaller eval_fraction, or a separate data.eval file")
    split = train_set.train_test_split(test_size=fraction, seed=seed)
    return split["train"], split["test"]


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
            pairs.append((fmt.before_turn(msgs, last, where), msgs[last]["content"]))
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
        inputs = prepare_inputs(model, {"input_ids": ids, "attention_mask": mask})  # e.g. virtual tokens
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                             eos_token_id=eos)
        for (prompt, ref), gen in zip(chunk, out[:, inputs["input_ids"].shape[1]:]):
            text = tokenizer.decode(gen, skip_special_tokens=True).strip()
            ok = text == ref.strip()
            hits += ok
            if len(samples) < 5:
                samples.append({"prompt": prompt[-120:], "reference": ref, "generated": text, "match": ok})
    model.train(was_training)
    return {"exact_match": hits / max(len(pairs), 1), "n": len(pairs), "samples": samples}


def reference_text() -> str:
    return resources.files("qtrain.resources").joinpath("reference.txt").read_text(encoding="utf-8")


@torch.no_grad()
def reference_perplexity(model: nn.Module, tokenizer, device: torch.device, text: str | None = None,
                         window: int = 256, micro_batch_size: int = 4, chunk_size: int = 1024) -> float:
    """Perplexity of `text` (default: the shipped general reference text), scored in windows of `window` tokens,
    `micro_batch_size` windows per forward."""
    ids = tokenizer(text or reference_text(), add_special_tokens=False)["input_ids"]
    rows = [ids[i:i + window] for i in range(0, len(ids), window) if len(ids[i:i + window]) > 1]
    dataset = [{"input_ids": r, "labels": r} for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return eval_loss(model, dataset, micro_batch_size, pad, chunk_size, device)["eval_perplexity"]


def forgetting_lines(base: dict[str, float], trained: dict[str, float]) -> list[str]:
    """Human lines comparing base and trained metrics (same keys in both). A perplexity's change is relative
    (+8.4%: a ratio is what perplexities compare by); an accuracy's is in percentage points (4.0% → 95.0% is
    +91.0 pp, where a relative change would read +2275% and be undefined from a base of 0)."""
    names = {"reference_perplexity": "general-text perplexity (lower is better)",
             "eval_perplexity": "task perplexity on data.eval (lower is better)",
             "exact_match": "task exact match on data.eval (higher is better)"}
    lines = []
    for key, label in names.items():
        if key in base and key in trained:
            b, t = base[key], trained[key]
            if key == "exact_match":
                lines.append(f"{label}: base {b:.1%} → trained {t:.1%} ({100 * t - 100 * b:+.1f} pp)")
            else:
                lines.append(f"{label}: base {b:.3f} → trained {t:.3f} ({100 * (t - b) / b:+.1f}%)")
    return lines


def score_model(model: nn.Module, tokenizer, cfg: RunConfig, device: torch.device, eval_set=None,
                pairs: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Task and general-text metrics of `model`, computed the same way for the base and the trained model."""
    # the training micro-batch and loss chunk: scoring must not need more memory than the training it brackets
    # (`qtrain eval` reads the config as written, where either may still be `auto`)
    from qtrain.memory import loss_chunk_tokens

    t = cfg.training
    micro = t.micro_batch_size if isinstance(t.micro_batch_size, int) else 1
    chunk = loss_chunk_tokens(t.loss_chunk_size, device.type, model.config.vocab_size)
    out: dict[str, Any] = {"reference_perplexity": reference_perplexity(
        model, tokenizer, device, micro_batch_size=micro, chunk_size=chunk)}
    if eval_set is not None:
        out.update(eval_loss(model, eval_set, micro, tokenizer.pad_token_id, chunk, device))
    if pairs:
        em = exact_match(model, tokenizer, pairs, cfg.eval.max_new_tokens, device)
        out.update(exact_match=em["exact_match"], exact_match_n=em["n"], samples=em["samples"])
    return out


def evaluate_run(run_dir: str) -> dict[str, Any]:
    """`qtrain eval RUN_DIR`: base vs trained on the run's task rows (data.eval, or the rows data.eval_fraction
    held out) and on the reference text; writes eval.json."""
    import json
    from pathlib import Path

    from qtrain.adapter_io import load_adapter
    from qtrain.config import load_config
    from qtrain.data import prepare
    from qtrain.errors import QTrainError
    from qtrain.modeling import load_model

    run = Path(run_dir)
    if not (run / "config.yaml").is_file() or not (run / "adapter").is_dir():
        raise QTrainError(f"{run_dir}: not a finished qtrain run (needs config.yaml and adapter/); "
                          "give the output.dir of a `qtrain run`")
    cfg = load_config(run / "config.yaml")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model(cfg.model, cfg.quantization, device)
    tok = loaded.tokenizer
    eval_set = None
    if cfg.data.eval:
        eval_set = prepare(cfg.data.eval, cfg.data, tok, "data.eval")[0]
    elif cfg.data.eval_fraction > 0:  # as `qtrain run` split it
        train_set = prepare(cfg.data.train, cfg.data, tok, "data.train")[0]
        eval_set = split_held_out(train_set, cfg.data.eval_fraction, cfg.training.seed)[1]
    pairs = reference_pairs(cfg.data.eval, cfg.data, tok, cfg.eval.max_examples) \
        if cfg.data.eval and cfg.eval.exact_match and cfg.data.format != "text" else []
    scores = {"base": score_model(loaded.model, tok, cfg, device, eval_set, pairs)}
    load_adapter(loaded.model, run / "adapter")
    scores["trained"] = score_model(loaded.model, tok, cfg, device, eval_set, pairs)
    report = {k: {m: v for m, v in s.items() if m != "samples"} for k, s in scores.items()}
    report["lines"] = forgetting_lines(report["base"], report["trained"])
    (run / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
