"""Shared fixtures: a tiny random Llama saved as a real Hugging Face folder (safetensors + a small BPE tokenizer
trained here with a ChatML template), so unit tests go through the same loading path as real models, offline,
in seconds."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CORPUS = [
    "Rewrite the date in ISO 8601 format (YYYY-MM-DD). Answer with the date only.",
    "January February March April May June July August September October November December",
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday the of st nd rd th",
    "0123456789 - , . : ; ( ) user assistant system Below is an instruction that describes a task",
    "### Instruction: ### Input: ### Response: Write a response that appropriately completes the request.",
]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   bos_token="<|im_start|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def make_llama_folder(path: Path, tie: bool = True, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_llama_folder(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_untied_dir(tmp_path_factory) -> Path:
    return make_llama_folder(tmp_path_factory.mktemp("tiny-llama-untied"), tie=False)


DATES = [
    ("March 3, 2021", "2021-03-03"), ("9-Jan-2038", "2038-01-09"), ("December 29, 1912", "1912-12-29"),
    ("the 1st of May, 1999", "1999-05-01"), ("Jul 4 1976", "1976-07-04"), ("30 June 2005", "2005-06-30"),
    ("Feb 14 2010", "2010-02-14"), ("11 November 1918", "1918-11-11"),
]


@pytest.fixture
def dates_file(tmp_path) -> Path:
    path = tmp_path / "dates.jsonl"
    with open(path, "w") as f:
        for text, iso in DATES:
            f.write(json.dumps({"instruction": "Rewrite the date in ISO 8601 format.", "input": text,
                                "output": iso}) + "\n")
    return path


def write_config(tmp_path: Path, model_dir: Path, train: Path, **sections) -> Path:
    """A YAML config for the tiny model; `sections` are merged over the defaults, one dict per section."""
    import yaml

    cfg = {
        "model": {"path": str(model_dir)},
        "quantization": {"bits": 4},
        "peft": [{"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}],
        "data": {"train": str(train), "format": "instruction", "max_seq_len": 64},
        "eval": {"exact_match": False},
        "training": {"micro_batch_size": 2, "max_steps": 4, "learning_rate": 1e-2, "optimizer": "adamw",
                     "gradient_checkpointing": False, "seed": 0},
        "logging": {"progress": False},
        "output": {"dir": str(tmp_path / "run")},
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(cfg.get(name), dict):
            cfg[name].update(values)
        else:
            cfg[name] = values
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
