"""The structure-side PEFT methods on tiny 4-bit, 8-bit and unquantized Llamas: bottleneck adapters, prompt
tuning, prefix tuning and layer unfreezing, alone and mixed with LoRA.

For each: the output at step 0 (equal to the base, or, for virtual tokens, equal to the base reading the same
text as real tokens), only the method's parameters train and the base stays bit-identical, the loss falls,
save → load reproduces the logits, the closed-form parameter count is the real one, and merging (unfreeze) or
its refusal (the others). Prompt and prefix tuning also load in peft with the same logits and generate.
"""

import json

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from qtrain.adapter_io import load_adapter, save_adapter
from qtrain.arch import Arch
from qtrain.config import DataSection, ModelSection, QuantizationSection, TrainingSection, load_config
from qtrain.data import Batches, prepare
from qtrain.errors import QTrainError
from qtrain.evaluate import exact_match
from qtrain.methods import build_methods, prepare_inputs
from qtrain.methods.blocks import AdapterBlock, LoRABlock, PrefixTuningBlock, PromptTuningBlock, UnfreezeBlock
from qtrain.modeling import enable_checkpointing, load_model
from qtrain.quantization import is_quantized
from qtrain.train import train
from conftest import DATES, write_config

CPU = torch.device("cpu")
BITS = [4, 8, "none"]


def load(model_dir, bits, blocks=()):
    keep = set().union(*(b.full_precision_linears(Arch.from_path(model_dir)) for b in blocks))
    return load_model(ModelSection(path=str(model_dir)), QuantizationSection(bits=bits), CPU, skip_quantize=keep)


def attach(model, block, seed=0):
    torch.manual_seed(seed)
    (method,) = build_methods([block])
    return method, method.attach(model)


def ids_and_mask():
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding on the second row
    return ids, mask


def logits(model, ids, mask):
    """The model's logits at the real positions (the last T), through the methods' input hooks."""
    with torch.no_grad():
        out = model.eval()(**prepare_inputs(model, {"input_ids": ids, "attention_mask": mask})).logits
    return out[:, -ids.shape[1]:]


def fit(model, params, tokenizer, dates_file, steps=8, lr=1e-2):
    """A few optimizer steps through the real training loop; returns its per-step losses."""
    ds, _ = prepare(str(dates_file), DataSection(train="x"), tokenizer, "data.train")
    cfg = TrainingSection(micro_batch_size=8, max_steps=steps, learning_rate=lr, optimizer="adamw",
                          lr_scheduler="constant", weight_decay=0.0)
    batches = Batches(ds, 8, seed=0, pad_id=tokenizer.pad_token_id)
    groups = [{"params": list(params.values()), "lr": lr}]
    return train(model, groups, batches, cfg, steps, Accelerator(cpu=True), log=lambda r: None).losses


def check_training(model_dir, dates_file, bits, block, tmp_path, changed_base=frozenset(), lr=1e-2, min_drop=0.3):
    """(b) only the method trains and the base stays bit-identical (but `changed_base`), (c) the loss falls by
    `min_drop` (a method that did nothing would stay flat to 1e-5: every step sees the same 8 examples),
    (d) save → load reproduces the logits, (e) the closed-form count. Returns (model, method, params)."""
    loaded = load(model_dir, bits, [block])
    model = loaded.model
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    method, params = attach(model, block)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in params.values()}  # nothing else can receive a gradient
    assert sum(p.numel() for p in params.values()) == block.trainable_parameters(Arch.from_path(model_dir))
    assert all(p.dtype == torch.float32 for p in params.values())  # fp32 master weights on every base
    start = {n: p.detach().clone() for n, p in params.items()}

    losses = fit(model, params, loaded.tokenizer, dates_file, lr=lr)
    assert losses[-1] < losses[0] - min_drop, losses
    assert all(not torch.equal(p, start[n]) for n, p in params.items())  # every trained tensor moved
    after = dict(model.named_parameters())
    untouched = {n: v for n, v in frozen_before.items() if n in after and n not in changed_base}
    assert untouched and all(torch.equal(after[n], v) for n, v in untouched.items())

    ids, mask = ids_and_mask()
    ours = logits(model, ids, mask)
    save_adapter(tmp_path / "adapter", [method], params, base_model=str(model_dir))
    fresh = load(model_dir, bits, [block]).model
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(logits(fresh, ids, mask), ours)
    return model, method, params


# ------------------------------------------------------------------------------------------------ adapters


@pytest.mark.parametrize("bits,placement,extra", [
    (4, "houlsby", {}),
    ("none", "pfeiffer", {"activation": "gelu", "bottleneck_size": 8}),
    (4, "parallel", {"parallel_to": "attention", "activation": "tanh", "scaling": 2.0}),
    (8, "parallel", {"reduction_factor": 4, "activation": "silu"}),
])
def test_adapter(tiny_model_dir, dates_file, tmp_path, bits, placement, extra):
    block = AdapterBlock(method="adapter", placement=placement, **extra)
    loaded = load(tiny_model_dir, bits)
    ids, mask = ids_and_mask()
    base = logits(loaded.model, ids, mask)
    method, params = attach(loaded.model, block)
    assert torch.equal(logits(loaded.model, ids, mask), base)  # (a) zero up-projection: step 0 is the base
    sites = sorted({n.rsplit(".adapter.", 1)[0].rsplit(".", 1)[-1] for n in params})
    assert sites == sorted(block.sites())
    method.detach(loaded.model)
    assert torch.equal(logits(loaded.model, ids, mask), base)  # detach gives the base back

    model, method, _ = check_training(tiny_model_dir, dates_file, bits, block, tmp_path)
    assert (logits(model, ids, mask) - base).abs().max() > 1e-3  # trained adapters change the output
    assert not method.mergeable and "serve with the adapter attached" in method.not_mergeable_reason


def test_adapter_options_are_checked():
    with pytest.raises(ValueError, match="not both"):
        AdapterBlock(method="adapter", reduction_factor=4, bottleneck_size=8)
    with pytest.raises(ValueError, match="placement: parallel"):
        AdapterBlock(method="adapter", placement="houlsby", parallel_to="attention")
    assert AdapterBlock(method="adapter").width(576) == 36  # hidden // 16 by default


# ------------------------------------------------------------------------------------------------ prompt tuning


def text_ids(model_dir, text):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("bits", BITS)
def test_prompt_tuning_from_text_equals_reading_the_text(tiny_model_dir, bits):
    text = "Rewrite the date"
    n = len(text_ids(tiny_model_dir, text))
    loaded = load(tiny_model_dir, bits)
    ids, mask = ids_and_mask()
    with_text = torch.cat([torch.tensor([text_ids(tiny_model_dir, text)] * 2), ids], dim=1)
    with torch.no_grad():  # (a) the base reading the init text as real tokens before the input
        base = loaded.model.eval()(input_ids=with_text, attention_mask=torch.cat([torch.ones(2, n, dtype=torch.long),
                                                                                  mask], 1)).logits[:, n:]
    method, params = attach(loaded.model, PromptTuningBlock(method="prompt_tuning", num_virtual_tokens=n,
                                                            init_text=text))
    torch.testing.assert_close(logits(loaded.model, ids, mask), base, rtol=0, atol=1e-5)
    assert method.block.extra_tokens() == n


def test_prompt_tuning_repeats_short_text_and_samples_vocabulary(tiny_model_dir):
    loaded = load(tiny_model_dir, "none")
    emb = loaded.model.get_input_embeddings().weight
    toks = text_ids(tiny_model_dir, "date")
    n = 2 * len(toks) + 1  # the text twice and a bit
    _, params = attach(loaded.model, PromptTuningBlock(method="prompt_tuning", num_virtual_tokens=n, init_text="date"))
    assert torch.equal(next(iter(params.values())), emb[(toks * 3)[:n]].float())
    loaded = load(tiny_model_dir, "none")
    emb = loaded.model.get_input_embeddings().weight
    _, params = attach(loaded.model, PromptTuningBlock(method="prompt_tuning", num_virtual_tokens=6))
    rows = next(iter(params.values()))
    assert all((emb == r).all(dim=1).any() for r in rows)  # every row is some vocabulary token's embedding
    assert len({tuple(r.tolist()) for r in rows}) > 1


@pytest.mark.parametrize("bits", [4, "none"])  # 8-bit: see the from-text equivalence test
def test_prompt_tuning_trains_saves_and_refuses_to_merge(tiny_model_dir, dates_file, tmp_path, bits):
    block = PromptTuningBlock(method="prompt_tuning", num_virtual_tokens=4)
    # Prompts move a random tiny model less than weights do: a smaller but real drop at prompt tuning's usual lr.
    _, method, _ = check_training(tiny_model_dir, dates_file, bits, block, tmp_path, lr=0.1, min_drop=0.05)
    assert not method.mergeable and "serve with the adapter attached" in method.not_mergeable_reason
    assert set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))) == {"prompt_embeddings"}


# ------------------------------------------------------------------------------------------------ prefix tuning


# transformers 5.24 renamed the cache keyword (`past_key_values` → `cache`; the old one goes in 5.40): the
# prefix must reach the model under the name it takes
NO_OLD_CACHE_KEYWORD = pytest.mark.filterwarnings("error:.*past_key_values.* is deprecated:FutureWarning")


@NO_OLD_CACHE_KEYWORD
@pytest.mark.parametrize("bits", BITS)
def test_prefix_from_text_equals_reading_the_text(tiny_model_dir, bits):
    text = "Rewrite the date"
    tokens = text_ids(tiny_model_dir, text)
    n = len(tokens)
    loaded = load(tiny_model_dir, bits)
    model = loaded.model
    ids, mask = ids_and_mask()
    with torch.no_grad():  # (a) the base reading the text as real tokens before the input
        base = model.eval()(input_ids=torch.cat([torch.tensor([tokens] * 2), ids], 1),
                            attention_mask=torch.cat([torch.ones(2, n, dtype=torch.long), mask], 1)).logits[:, n:]
    method, _ = attach(model, PrefixTuningBlock(method="prefix_tuning", num_virtual_tokens=n, init_text=text))
    torch.testing.assert_close(logits(model, ids, mask), base, rtol=0, atol=1e-5)
    assert "from the keys/values of 'Rewrite the date'" in method.describe()


@pytest.mark.parametrize("bits,projection", [(8, False), ("none", True)])  # 4-bit: peft and generation tests
def test_prefix_tuning_trains_saves_and_refuses_to_merge(tiny_model_dir, dates_file, tmp_path, bits, projection):
    block = PrefixTuningBlock(method="prefix_tuning", num_virtual_tokens=4, projection=projection,
                              **({"projection_hidden_size": 16} if projection else {}))
    _, method, params = check_training(tiny_model_dir, dates_file, bits, block, tmp_path, lr=0.1, min_drop=0.1)
    assert not method.mergeable and "serve with the adapter attached" in method.not_mergeable_reason
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved["prompt_embeddings"].shape == (4, 2 * 2 * 2 * 16)  # N × layers·(k, v)·kv_heads·head_dim
    assert len(saved) == (1 if not projection else 1 + len(params))  # projection: its weights are kept too


def test_prefix_options_are_checked():
    with pytest.raises(ValueError, match="without projection only"):
        PrefixTuningBlock(method="prefix_tuning", projection=True, init_text="Rewrite the date")
    with pytest.raises(ValueError, match="needs projection: true"):
        PrefixTuningBlock(method="prefix_tuning", projection_hidden_size=8)


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_tuning_under_checkpointing_equals_without(tiny_model_dir, dates_file, projection):
    """Checkpointed layers drop transformers' key/value cache; `PrefixAttention` hands each layer's attention its
    prefix there instead. On a 4-bit base, one training forward/backward gives the same loss (bit-identical)
    and the same prefix gradients (to 1e-6 relative, float32; measured: bit-identical) with checkpointing as
    without, the checkpointed run really went through the wrapper (the prefix rebuilt in the forward and in the
    recompute), and a few steps under checkpointing lower the loss."""
    from unittest import mock

    from qtrain.methods.prompt import PrefixEncoder
    from qtrain.train import batch_loss_sum

    block = PrefixTuningBlock(method="prefix_tuning", num_virtual_tokens=3, projection=projection,
                              **({"projection_hidden_size": 16} if projection else {}))
    layers = Arch.from_path(tiny_model_dir).layers
    runs = {}
    for checkpointing in (False, True):
        loaded = load(tiny_model_dir, 4)
        model = loaded.model
        _, params = attach(model, block)  # same seed: the same initial prefix
        if checkpointing:
            enable_checkpointing(model)
        ds, _ = prepare(str(dates_file), DataSection(train="x"), loaded.tokenizer, "data.train")
        batch = next(iter(Batches(ds, 4, seed=0, pad_id=loaded.tokenizer.pad_token_id)))
        with mock.patch.object(PrefixEncoder, "layer_kv", autospec=True, side_effect=PrefixEncoder.layer_kv) as kv:
            loss = batch_loss_sum(model.train(), batch, chunk_size=128)
            loss.backward()
        # the cache's prefixes, then (checkpointed) each layer's again in its forward and in its recompute
        assert kv.call_count == layers * (3 if checkpointing else 1)
        grads = {n: p.grad.clone() for n, p in params.items()}
        for p in params.values():
            p.grad = None
        runs[checkpointing] = loss.detach(), grads, fit(model, params, loaded.tokenizer, dates_file, steps=8, lr=0.1)
    (off, off_grads, off_losses), (on, on_grads, on_losses) = runs[False], runs[True]
    assert torch.equal(on, off)
    for name, grad in off_grads.items():
        assert grad.abs().max() > 0  # the prefix is read: a prefix that never reached attention gets none
        torch.testing.assert_close(on_grads[name], grad, rtol=1e-6, atol=0)
    assert on_losses[-1] < on_losses[0] - 0.1, on_losses  # training under checkpointing lowers the loss ...
    assert on_losses == pytest.approx(off_losses, rel=1e-6, abs=0)  # ... exactly as training without it does


@pytest.mark.parametrize("prefix_first", [True, False])
def test_prefix_tuning_mixes_with_lora_under_checkpointing(tiny_model_dir, dates_file, prefix_first):
    """LoRA on q/v listed before or after prefix_tuning (then it finds them inside the wrapped attention): every
    parameter of both gets the same gradient with checkpointing as without (4-bit base)."""
    from qtrain.train import batch_loss_sum

    blocks = [PrefixTuningBlock(method="prefix_tuning", num_virtual_tokens=2),
              LoRABlock(method="lora", r=2, target_modules=["q_proj", "v_proj"])]
    grads = {}
    for checkpointing in (False, True):
        loaded = load(tiny_model_dir, 4)
        torch.manual_seed(0)
        params = {}
        for method in build_methods(blocks if prefix_first else blocks[::-1]):
            params.update(method.attach(loaded.model))
        if checkpointing:
            enable_checkpointing(loaded.model)
        for name in (n for n in params if "lora_B" in n):
            torch.nn.init.normal_(params[name], std=0.1)  # as if trained: B = 0 would leave A without a gradient
        ds, _ = prepare(str(dates_file), DataSection(train="x"), loaded.tokenizer, "data.train")
        batch = next(iter(Batches(ds, 4, seed=0, pad_id=loaded.tokenizer.pad_token_id)))
        batch_loss_sum(loaded.model.train(), batch, chunk_size=128).backward()
        grads[checkpointing] = {n: p.grad for n, p in params.items()}
    lora = [n for n in grads[True] if "lora_A" in n]
    assert len(lora) == 2 * 2 and all(("base_block" in n) is prefix_first for n in lora)
    assert all(g.abs().max() > 0 for g in grads[False].values())
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------------ generation, peft


def pairs_for(n=3):
    return [(f"Rewrite the date in ISO 8601 format.\n{text}", iso) for text, iso in DATES[:n]]


@NO_OLD_CACHE_KEYWORD
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_generation_with_virtual_tokens_equals_the_base_reading_the_text(tiny_model_dir, kind):
    """exact_match (left-padded batched greedy generation) on the tuned model generates what the base generates
    with the init text as real tokens in front of each prompt."""
    text = "Rewrite the date"
    tokens = text_ids(tiny_model_dir, text)
    loaded = load(tiny_model_dir, 4)
    model, tok = loaded.model, loaded.tokenizer
    pairs = pairs_for()
    expected = []
    for prompt, _ in pairs:  # the base, one prompt at a time (no padding), text in front
        ids = torch.tensor([tokens + tok(prompt, add_special_tokens=False)["input_ids"]])
        out = model.eval().generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id,
                                    eos_token_id=tok.eos_token_id)
        expected.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    block = PromptTuningBlock if kind == "prompt" else PrefixTuningBlock
    attach(model, block(method=f"{kind}_tuning", num_virtual_tokens=len(tokens), init_text=text))
    result = exact_match(model, tok, pairs, max_new_tokens=4, device=CPU)
    assert result["n"] == len(pairs)
    assert [s["generated"] for s in result["samples"]] == expected
    assert len(set(expected)) > 1  # the prompts really lead to different generations


@pytest.mark.parametrize("block", [
    PromptTuningBlock(method="prompt_tuning", num_virtual_tokens=5, init_text="Rewrite the date"),
    PrefixTuningBlock(method="prefix_tuning", num_virtual_tokens=3),
    PrefixTuningBlock(method="prefix_tuning", num_virtual_tokens=3, projection=True, projection_hidden_size=24),
], ids=["prompt", "prefix", "prefix-projection"])
@pytest.mark.parametrize("bits", [4, "none"])
def test_peft_loads_prompt_and_prefix_tuning_with_the_same_logits(tiny_model_dir, tmp_path, block, bits):
    peft = pytest.importorskip("peft")
    model = load(tiny_model_dir, bits).model
    method, params = attach(model, block)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn_like(p) * 0.5)  # as if trained
    ids, mask = ids_and_mask()
    ours = logits(model, ids, mask)
    save_adapter(tmp_path / "adapter", [method], params, base_model=str(tiny_model_dir))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == method.peft_type
    theirs_model = peft.PeftModel.from_pretrained(load(tiny_model_dir, bits).model, str(tmp_path / "adapter"))
    with torch.no_grad():
        theirs = theirs_model.eval()(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1]:]
    bare = logits(load(tiny_model_dir, bits).model, ids, mask)
    assert (ours - bare).abs().max() > 1e-2  # the virtual tokens really change the output
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ unfreeze


@pytest.mark.parametrize("bits", BITS)
def test_unfreeze_last_block(tiny_model_dir, dates_file, tmp_path, bits):
    block = UnfreezeBlock(method="unfreeze", last_n=1)
    arch = Arch.from_path(tiny_model_dir)
    loaded = load(tiny_model_dir, bits, [block])
    layers = loaded.model.model.layers
    if bits != "none":  # only the chosen block is loaded unquantized
        assert all(is_quantized(m) for m in layers[0].modules() if isinstance(m, torch.nn.Module)
                   and m.__class__.__name__.startswith("Linear"))
        assert not any(is_quantized(m) for m in layers[1].modules())
    ids, mask = ids_and_mask()
    base = logits(loaded.model, ids, mask)
    method, params = attach(loaded.model, block)
    assert torch.equal(logits(loaded.model, ids, mask), base)  # (a) full-precision copies of the same weights
    assert set(params) == set(block.parameters_of(arch))  # every weight, bias and norm of layer 1, nothing else

    model, method, params = check_training(tiny_model_dir, dates_file, bits, block, tmp_path,
                                           changed_base=frozenset(block.parameters_of(arch)))
    assert method.mergeable
    # (f) merging: the base checkpoint's tensors through merged_tensor make a dense model with the same logits
    dense = load(tiny_model_dir, "none").model
    state = load_file(str(tiny_model_dir / "model.safetensors"))
    merged = {k: method.merged_tensor(k, v) for k, v in state.items()}
    assert sum(not torch.equal(merged[k], state[k]) for k in state) == len(params)
    dense.load_state_dict(merged, strict=False)
    method.detach(model)  # the original (quantized where it was) base comes back untouched
    assert torch.equal(logits(model, ids, mask), base)
    for name, p in params.items():
        torch.testing.assert_close(dense.get_parameter(name), p.detach(), rtol=0, atol=0)
    if bits == "none":
        fresh = load(tiny_model_dir, bits).model
        load_adapter(fresh, tmp_path / "adapter")
        torch.testing.assert_close(logits(dense, ids, mask), logits(fresh, ids, mask), rtol=0, atol=1e-6)


def test_unfreeze_by_index_and_pattern(tiny_model_dir):
    arch = Arch.from_path(tiny_model_dir)
    pattern = UnfreezeBlock(method="unfreeze", pattern=r"model\.layers\.\d+\.mlp")
    model = load(tiny_model_dir, 4, [pattern]).model
    _, params = attach(model, pattern)
    assert sorted(params) == sorted(f"model.layers.{i}.mlp.{m}_proj.weight" for i in (0, 1)
                                    for m in ("gate", "up", "down"))
    assert sum(p.numel() for p in params.values()) == pattern.trainable_parameters(arch)
    assert pattern.full_precision_linears(arch) == {n[:-len(".weight")] for n in params}
    first = UnfreezeBlock(method="unfreeze", layers=[-2])
    assert set(first.parameters_of(arch)) == {n for n in arch.block_parameters() if n.startswith("model.layers.0.")}
    with pytest.raises(QTrainError, match="out of range"):
        UnfreezeBlock(method="unfreeze", layers=[5]).trainable_parameters(arch)
    with pytest.raises(QTrainError, match="matches no module"):
        UnfreezeBlock(method="unfreeze", pattern="lm_head").trainable_parameters(arch)
    with pytest.raises(ValueError, match="exactly one"):
        UnfreezeBlock(method="unfreeze", last_n=1, layers=[0])


def test_unfreeze_upcasts_a_bf16_block_and_computes_it_in_fp32(tiny_model_dir, capsys):
    block = UnfreezeBlock(method="unfreeze", layers=[1])
    quant = QuantizationSection(bits=4, compute_dtype="bfloat16")
    model = load_model(ModelSection(path=str(tiny_model_dir)), quant, CPU,
                       skip_quantize=block.full_precision_linears(Arch.from_path(tiny_model_dir))).model
    ids, mask = ids_and_mask()
    with torch.no_grad():
        before = model.eval()(input_ids=ids, attention_mask=mask).logits
    method, params = attach(model, block)
    assert all(p.dtype == torch.float32 for p in params.values())
    assert "upcast from bfloat16 to float32" in method.describe()
    seen = {}

    def record(module, args, out):
        seen["dtype"] = out.dtype

    model.model.layers[1].self_attn.q_proj.register_forward_hook(record)
    with torch.no_grad():
        after = model.eval()(input_ids=ids, attention_mask=mask).logits
    assert seen["dtype"] == torch.float32 and after.dtype == before.dtype == torch.bfloat16
    # fp32 arithmetic on the same (bf16-valued) weights: close to, not bit-equal with, the bf16 forward
    torch.testing.assert_close(after, before, rtol=0, atol=0.1)


def test_unfreeze_must_come_before_methods_wrapping_its_layers(tiny_model_dir):
    model = load(tiny_model_dir, 4).model
    attach(model, LoRABlock(method="lora", r=2, target_modules=["q_proj"]))
    with pytest.raises(QTrainError, match="list the unfreeze block first"):
        attach(model, UnfreezeBlock(method="unfreeze", last_n=1))


# ------------------------------------------------------------------------------------------------ mixed run


def test_mixed_run_lora_on_attention_and_unfrozen_last_block(tiny_model_dir, dates_file, tmp_path, capsys):
    from qtrain.run import run

    peft = [{"method": "unfreeze", "last_n": 1},
            {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            {"method": "adapter", "placement": "pfeiffer", "bottleneck_size": 8}]
    cfg = load_config(write_config(tmp_path, tiny_model_dir, dates_file, peft=peft,
                                   training={"max_steps": 6, "micro_batch_size": 8}))
    summary = run(cfg)
    arch = Arch.from_path(tiny_model_dir)
    assert summary["trainable_parameters"] == sum(b.trainable_parameters(arch) for b in cfg.peft)
    assert summary["final_loss"] < summary["first_loss"] - 0.3
    assert "qtrain: unfreeze: training" in capsys.readouterr().out
    folder = tmp_path / "run" / "adapter"
    assert [m["method"] for m in json.loads((folder / "qtrain.json").read_text())["methods"]] == \
        ["unfreeze", "lora", "adapter"]
    assert not (folder / "adapter_config.json").exists()  # a mix has no single peft equivalent
    saved = load_file(str(folder / "adapter_model.safetensors"))
    blocks = [UnfreezeBlock(**peft[0])]
    fresh = load(tiny_model_dir, 4, blocks).model
    base = logits(fresh, *ids_and_mask())
    _, params = load_adapter(fresh, folder)
    assert all(torch.equal(p, saved["base_model.model." + n]) for n, p in params.items())
    assert (logits(fresh, *ids_and_mask()) - base).abs().max() > 1e-3
