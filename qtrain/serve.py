"""Inference on one quantized base with several adapters: hot-swapping per request, `qtrain generate`, `qtrain chat`.

The base is loaded (and quantized) once. Adapters are registered by name; a request names the adapter it wants
(or None for the bare base) and the server switches to it before running: the methods of the active adapter are
detached (every wrapped base module is put back, unchanged), and the requested adapter's methods are attached
and filled from its folder. A switch therefore costs reading and attaching one adapter (milliseconds for a
LoRA), not reloading and requantizing the base (seconds to minutes); `benchmarks/swap_time.py` measures both.
Only one adapter is attached at a time, so the logits under an adapter are exactly those of a fresh base with
that adapter loaded, and the bare base's are exactly the base's.

    server = Server.from_model("runs/dates/config.yaml")      # or Server(load_model(...))
    server.add_adapter("dates", "runs/dates/adapter").add_adapter("poems", "runs/poems/adapter")
    server.generate("the 3rd of March, 2021", adapter="dates")
    server.generate("Write a haiku about rain.", adapter=None)   # the bare base
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterable, TextIO

import torch

from qtrain.errors import QTrainError

BASE = "base"  # the name that selects the bare base on the command line


class Server:
    """A quantized base plus named adapters, switched per request."""

    def __init__(self, loaded):
        self.loaded = loaded
        self.model = loaded.model.eval()
        self.tokenizer = loaded.tokenizer
        self.adapters: dict[str, Path] = {}
        self.active: str | None = None
        self._methods: list = []

    @classmethod
    def from_model(cls, source: str | Path, bits: int | str | None = None, device: str | None = None) -> "Server":
        """Load the base from a run config (YAML), a run folder (its config.yaml) or a model path/alias;
        `bits` overrides the config's quantization (4, 8 or 'none')."""
        from qtrain.config import ModelSection, QuantizationSection, load_config
        from qtrain.modeling import load_model

        source = Path(source)
        config_file = source / "config.yaml" if source.is_dir() and (source / "config.yaml").is_file() else source
        if config_file.suffix in (".yaml", ".yml") and config_file.is_file():
            cfg = load_config(config_file)
            model, quant = cfg.model, cfg.quantization
        else:
            model, quant = ModelSection(path=str(source)), QuantizationSection()
        if bits is not None:
            quant = quant.model_copy(update={"bits": bits if bits == "none" else int(bits)})
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(load_model(model, quant, dev))

    def add_adapter(self, name: str, directory: str | Path) -> "Server":
        """Register an adapter folder (or a run folder holding adapter/) under `name`; it is loaded once now
        to check that it fits this base."""
        directory = Path(directory)
        if (directory / "adapter").is_dir() and not (directory / "qtrain.json").is_file():
            directory = directory / "adapter"
        if name == BASE or not name:
            raise QTrainError(f"--adapter: {name!r} is reserved for the bare base; choose another name")
        previous = self.active
        self.adapters[name] = directory
        try:
            self.use(name)
        except QTrainError:
            del self.adapters[name]
            raise
        finally:
            if self.active != previous:
                self.use(previous)
        return self

    def use(self, name: str | None) -> None:
        """Make `name` the attached adapter (None: the bare base)."""
        from qtrain.adapter_io import load_adapter

        if name == self.active:
            return
        if name is not None and name not in self.adapters:
            raise QTrainError(f"adapter {name!r} is not loaded; known: {', '.join(self.adapters) or 'none'} "
                              f"(or {BASE!r} for the bare base)")
        for method in reversed(self._methods):
            method.detach(self.model)
        self._methods, self.active = [], None
        if name is not None:
            with torch.random.fork_rng(devices=[]):  # attaching initialises weights; keep the caller's RNG
                self._methods, _ = load_adapter(self.model, self.adapters[name])
            for p in self.model.parameters():
                p.requires_grad_(False)
            self.model.eval()
            self.active = name

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, adapter: str | None = None) -> torch.Tensor:
        """Logits (B, T, V) of `input_ids` (B, T) under `adapter` (None: the bare base)."""
        from qtrain.methods import prepare_inputs

        self.use(adapter)
        ids = input_ids.to(self._device)
        inputs = prepare_inputs(self.model, {"input_ids": ids})
        return self.model(**inputs).logits[:, -ids.shape[1]:]  # the real positions (virtual tokens come first)

    @torch.no_grad()
    def generate(self, prompt: str | list[dict[str, str]], adapter: str | None = None, max_new_tokens: int = 64,
                 chat: bool = True, **generate_kwargs: Any) -> str:
        """Greedy (or `do_sample=True, ...`) continuation of `prompt` under `adapter`. A string prompt is sent
        as one user message through the chat template when the tokenizer has one and `chat` is true; a list
        of {role, content} messages always is."""
        from qtrain.data import _adds_bos
        from qtrain.methods import prepare_inputs

        self.use(adapter)
        text = self._render(prompt, chat)
        tok = self.tokenizer
        bos = [tok.bos_token_id] if _adds_bos(tok) and not text.startswith(str(tok.bos_token)) else []
        ids = torch.tensor([bos + tok(text, add_special_tokens=False)["input_ids"]], device=self._device)
        kwargs = {"do_sample": False, **generate_kwargs}
        # through the adapter's input hooks (prompt tuning's virtual tokens, prefix tuning's key/value prefix)
        inputs = prepare_inputs(self.model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id, **kwargs)
        return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    def _render(self, prompt: str | list[dict[str, str]], chat: bool) -> str:
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if isinstance(prompt, list):
            if not has_template:
                raise QTrainError("this tokenizer has no chat template; send a plain text prompt")
            return self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        if chat and has_template:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        return prompt

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device


def parse_adapter_args(items: Iterable[str]) -> dict[str, Path]:
    """`NAME=DIR` or `DIR` (named after the folder, or its parent for a run's `adapter/`) → {name: folder}."""
    adapters: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            p = Path(item.rstrip("/"))
            name, path = (p.parent.name if p.name == "adapter" else p.name), item
        if name in adapters:
            raise QTrainError(f"--adapter: the name {name!r} is given twice; name them NAME=DIR")
        adapters[name] = Path(path)
    return adapters


def open_server(source: "str | Server", bits: str | None, adapters: Iterable[str]) -> Server:
    """A server for the command line: loaded from `source` (or `source` itself), with `adapters` added."""
    server = source if isinstance(source, Server) else Server.from_model(source, bits=bits)
    for name, path in parse_adapter_args(adapters).items():
        server.add_adapter(name, path)
    return server


def generate_command(source: "str | Server", bits: str | None, adapters: list[str], prompts: list[str], use: list[str],
                     max_new_tokens: int, raw: bool, out: TextIO = sys.stdout) -> None:
    """`qtrain generate`: every prompt under every chosen adapter (default: all loaded, else the bare base)."""
    server = open_server(source, bits, adapters)
    names = use or list(server.adapters) or [BASE]
    for prompt in prompts:
        for name in names:
            text = server.generate(prompt, None if name == BASE else name, max_new_tokens, chat=not raw)
            out.write(f"[{name}] {text}\n")
            out.flush()


def chat_command(source: "str | Server", bits: str | None, adapters: list[str], max_new_tokens: int,
                 inp: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    """`qtrain chat`: one conversation on stdin; `/adapter NAME`, `/base`, `/adapters`, `/reset`, `/quit`."""
    server = open_server(source, bits, adapters)
    current = next(iter(server.adapters), None)
    history: list[dict[str, str]] = []
    has_template = bool(getattr(server.tokenizer, "chat_template", None))
    interactive = inp.isatty()
    out.write(f"qtrain chat: adapters {', '.join(server.adapters) or 'none'}; /adapter NAME, /base, /adapters, "
              "/reset, /quit\n")
    while True:
        if interactive:
            out.write(f"{current or BASE}> ")
            out.flush()
        line = inp.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            if cmd == "/quit":
                break
            if cmd == "/base":
                current = None
            elif cmd == "/adapter" and arg.strip() in server.adapters:
                current = arg.strip()
            elif cmd == "/adapters":
                out.write(f"adapters: {', '.join(server.adapters) or 'none'} (active: {current or BASE})\n")
                continue
            elif cmd == "/reset":
                history = []
            else:
                out.write(f"unknown command or adapter: {line!r}; known adapters: "
                          f"{', '.join(server.adapters) or 'none'}\n")
                continue
            out.write(f"[{current or BASE}]\n")
            continue
        history.append({"role": "user", "content": line})
        reply = server.generate(history if has_template else line, current, max_new_tokens)
        history.append({"role": "assistant", "content": reply})
        out.write(f"[{current or BASE}] {reply}\n")
        out.flush()
