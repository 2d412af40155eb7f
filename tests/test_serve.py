"""Hot-swapping adapters on one quantized base: each request gets exactly its adapter's (or the bare base's)
logits, the base is never reloaded, and the CLI front ends (generate, chat, inspect) work end to end."""

from __future__ import annotations

import io
import json

import pytest
import torch

from qtrain.adapter_io import load_adapter, save_adapter
from qtrain.config import ModelSection, QuantizationSection
from qtrain.errors import QTrainError
from qtrain.methods import build_methods
from qtrain.methods.blocks import LoRABlock, PrefixTuningBlock, PromptTuningBlock
from qtrain.modeling import load_model
from qtrain.serve import Server, chat_command, generate_command, parse_adapter_args

CPU = torch.device("cpu")
IDS = torch.tensor([[1, 17, 40, 99, 250, 3, 7, 120]])


def base(model_dir, bits):
    return load_model(ModelSection(path=str(model_dir)), QuantizationSection(bits=bits), CPU)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Two LoRA adapters with different targets and ranks, as if trained (A and B non-zero)."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for i, (name, targets) in enumerate([("dates", ["q_proj", "v_proj"]), ("poems", "all-linear")]):
        model = base(tiny_model_dir, 4).model
        torch.manual_seed(10 + i)
        methods = build_methods([LoRABlock(method="lora", r=2 + 2 * i, alpha=8, target_modules=targets)])
        params = methods[0].attach(model)
        with torch.no_grad():
            for p in params.values():
                p.normal_(std=0.1)
        out[name] = save_adapter(root / name / "adapter", methods, params, base_model=str(tiny_model_dir))
    return out


@pytest.mark.parametrize("bits", [4, 8])
def test_switching_gives_each_adapters_own_logits_exactly(tiny_model_dir, adapters, bits):
    def reference(name):
        model = base(tiny_model_dir, bits).model
        if name:
            load_adapter(model, adapters[name])
        with torch.no_grad():
            return model.eval()(IDS).logits

    want = {name: reference(name) for name in (None, "dates", "poems")}
    assert (want["dates"] - want[None]).abs().max() > 1e-2 and (want["poems"] - want["dates"]).abs().max() > 1e-2

    loaded = base(tiny_model_dir, bits)
    server = Server(loaded).add_adapter("dates", adapters["dates"]).add_adapter("poems", adapters["poems"])
    base_modules = {n: m for n, m in loaded.model.named_modules()}
    for name in [None, "dates", "poems", None, "poems", "dates", "dates", None]:
        assert torch.equal(server.logits(IDS, name), want[name]), name
    server.use(None)
    assert {n: m for n, m in loaded.model.named_modules()} == base_modules  # the very same base modules
    assert all(not p.requires_grad for p in loaded.model.parameters())


def test_generate_per_request_and_errors(tiny_model_dir, adapters):
    server = Server(base(tiny_model_dir, 4)).add_adapter("poems", adapters["poems"])
    a = server.generate("March 3, 2021", adapter="poems", max_new_tokens=6, chat=False)
    b = server.generate("March 3, 2021", adapter=None, max_new_tokens=6, chat=False)
    assert a == server.generate("March 3, 2021", adapter="poems", max_new_tokens=6, chat=False)  # greedy: repeatable
    assert server.active == "poems" and a != b  # seeded tiny model: the adapter changes the greedy tokens
    server.generate("x", adapter=None, max_new_tokens=1)
    assert server.active is None
    with pytest.raises(QTrainError, match="not loaded; known: poems"):
        server.generate("x", adapter="nope")
    with pytest.raises(QTrainError, match="reserved"):
        server.add_adapter("base", adapters["dates"])
    with pytest.raises(QTrainError, match="not a qtrain adapter folder"):
        server.add_adapter("empty", tiny_model_dir)
    assert list(server.adapters) == ["poems"] and server.active is None


def test_an_adapter_of_another_base_is_refused_and_the_base_left_as_it_was(tiny_model_dir, adapters, tmp_path):
    """Same module names, other widths (a 32-wide base): a clear error naming a tensor and both shapes, not a
    broadcasting traceback, and the server goes on serving what it had."""
    from conftest import make_llama_folder

    other = make_llama_folder(tmp_path / "narrow", hidden=32)
    model = base(other, 4).model
    methods = build_methods([LoRABlock(method="lora", r=2, alpha=8, target_modules="all-linear")])
    narrow = save_adapter(tmp_path / "narrow-adapter", methods, methods[0].attach(model), base_model=str(other))
    server = Server(base(tiny_model_dir, 4)).add_adapter("poems", adapters["poems"])
    want = server.logits(IDS, "poems")
    server.use(None)
    modules = {n: m for n, m in server.model.named_modules()}
    with pytest.raises(QTrainError, match=r"do not match this model \(.*lora_A.* is \(2, 32\) in the adapter and "
                                          r"\(2, 64\) here, and \d+ more differ\); it was trained on another base "
                                          r"\('narrow'\)"):
        server.add_adapter("narrow", narrow)  # loaded once to check it fits
    assert {n: m for n, m in server.model.named_modules()} == modules and server.active is None
    assert list(server.adapters) == ["poems"] and torch.equal(server.logits(IDS, "poems"), want)


@pytest.mark.filterwarnings("error:.*past_key_values.* is deprecated:FutureWarning")
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_serving_virtual_tokens_reads_them(tiny_model_dir, tmp_path, kind):
    """A prompt or prefix tuning adapter served (`qtrain generate` / `chat`) goes through its input hooks: from
    `init_text`, its logits are the bare base's reading that text in front of the input (to 1e-5), and it
    samples (seeded) what `generate` samples through `prepare_inputs` on the model it was saved from, which is
    not what the bare base samples; the bare base is served unchanged."""
    from qtrain.data import _adds_bos
    from qtrain.methods import prepare_inputs

    loaded = base(tiny_model_dir, 4)
    model, tok = loaded.model, loaded.tokenizer
    text, prompt = "Rewrite the date", "Rewrite the date in ISO 8601 format.\nMarch 3, 2021"
    tokens = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        bare_logits = model.eval()(IDS).logits
        reading = model(torch.cat([torch.tensor([tokens]), IDS], 1)).logits[:, len(tokens):]
    assert (reading - bare_logits).abs().max() > 1e-2
    block = (PromptTuningBlock if kind == "prompt" else PrefixTuningBlock)(
        method=f"{kind}_tuning", num_virtual_tokens=len(tokens), init_text=text)
    methods = build_methods([block])
    save_adapter(tmp_path / "adapter", methods, methods[0].attach(model), base_model=str(tiny_model_dir))

    ids = torch.tensor([[tok.bos_token_id] * _adds_bos(tok) + tok(prompt, add_special_tokens=False)["input_ids"]])
    inputs = prepare_inputs(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=True, pad_token_id=tok.pad_token_id)
    expected = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    server = Server(base(tiny_model_dir, 4)).add_adapter(kind, tmp_path / "adapter")
    torch.testing.assert_close(server.logits(IDS, kind), reading, rtol=0, atol=1e-5)
    sampled = {}
    for name in (kind, None):
        torch.manual_seed(0)
        sampled[name] = server.generate(prompt, name, max_new_tokens=8, chat=False, do_sample=True)
    assert sampled[kind] == expected and sampled[None] != expected, sampled
    assert torch.equal(server.logits(IDS, None), bare_logits)


def test_adapter_arguments():
    got = parse_adapter_args(["x=runs/a/adapter", "runs/dates/adapter", "some/poems"])
    assert {k: str(v) for k, v in got.items()} == {"x": "runs/a/adapter", "dates": "runs/dates/adapter",
                                                   "poems": "some/poems"}
    with pytest.raises(QTrainError, match="twice"):
        parse_adapter_args(["a=x", "a=y"])


def test_generate_and_chat_commands(tiny_model_dir, adapters):
    server = Server(base(tiny_model_dir, 4))
    out = io.StringIO()
    generate_command(server, None, [f"dates={adapters['dates']}", f"poems={adapters['poems']}"],
                     ["hello", "March 3"], ["dates", "base"], 4, raw=False, out=out)
    lines = out.getvalue().splitlines()
    assert [line.split("]")[0] + "]" for line in lines] == ["[dates]", "[base]", "[dates]", "[base]"]
    assert lines[0] == f"[dates] {server.generate('hello', 'dates', 4)}"
    assert lines[1] == f"[base] {server.generate('hello', None, 4)}"

    out = io.StringIO()
    script = "/adapters\nhello\n/base\nhello\n/adapter poems\n/adapter nope\n/reset\n/quit\nnever read\n"
    server.use(None)
    chat_command(server, None, [], 4, inp=io.StringIO(script), out=out)
    text = out.getvalue().splitlines()
    assert text[1] == "adapters: dates, poems (active: dates)"
    assert text[2] == f"[dates] {server.generate([{'role': 'user', 'content': 'hello'}], 'dates', 4)}"
    assert text[3] == "[base]" and text[4].startswith("[base] ")
    assert text[5] == "[poems]" and text[6].startswith("unknown command or adapter")
    assert len(text) == 8  # /quit stops before "never read"


def test_inspect_reports_consumers(adapters, tiny_model_dir, tmp_path):
    from qtrain.inspect_adapter import describe, inspect_adapter

    info = inspect_adapter(adapters["poems"].parent)  # a run folder works too
    assert info["ranks"] == [4] and info["methods"] == ["lora"]
    assert info["consumers"]["vLLM"] == (True, "") and info["consumers"]["peft"] == (True, "")
    ok, why = info["consumers"]["llama.cpp"]
    assert ok and "--base" in why  # a local base folder is not a hub id
    assert info["base_model"] == tiny_model_dir.name  # the folder's name, not its absolute path
    # qtrain.json too: what `inspect` shows for the methods peft has no file for (bitfit, sparse, mixes...)
    assert json.loads((adapters["poems"] / "qtrain.json").read_text())["base_model"] == tiny_model_dir.name
    text = describe(info)
    assert "vLLM: yes" in text and "targets: ['down_proj', 'gate_proj'" in text

    config_file = adapters["dates"] / "adapter_config.json"
    config = json.loads(config_file.read_text())
    assert "/" not in config["base_model_name_or_path"]
    for field in ("peft_type", "r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "bias",
                  "modules_to_save", "task_type", "base_model_name_or_path"):
        assert field in config  # what peft, vLLM and llama.cpp's converter read
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_model.safetensors").write_bytes((adapters["dates"] / "adapter_model.safetensors").read_bytes())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True, "use_rslora": True}))
    info = inspect_adapter(dora)
    assert info["consumers"]["vLLM"] == (False, "vLLM does not support DoRA (use_dora)")
    assert info["consumers"]["llama.cpp"][0] is False and "rsLoRA" in info["consumers"]["llama.cpp"][1]
    assert info["consumers"]["qtrain"][0] is False
