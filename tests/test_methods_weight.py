"""The weight-side PEFT methods (DoRA, LoRA rank/alpha patterns + LoRA+, IA3, BitFit, sparse) on 4-bit, 8-bit and
unquantized tiny Llamas: identity at step 0, only their own parameters train, the loss falls, save → load is
exact, the closed-form count is the real one, merged weights compute what the wrappers compute, and peft loads
the methods it has with the same logits."""

import functools
import json

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from qtrain.adapter_io import PEFT_PREFIX, load_adapter, save_adapter
from qtrain.arch import Arch
from qtrain.config import DataSection, ModelSection, QuantizationSection, TrainingSection, load_config
from qtrain.data import Batches, prepare
from qtrain.errors import QTrainError
from qtrain.methods import build_methods
from qtrain.methods.blocks import BitFitBlock, IA3Block, LoRABlock, SparseBlock
from qtrain.quantization import dequantized_weight
from qtrain.surgery import innermost, linear_names
from qtrain.train import mean_batch_loss, train
from conftest import DATES, write_config

CPU = torch.device("cpu")
BITS = [4, 8, "none"]
BLOCKS = {
    "dora": LoRABlock(method="lora", r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                      dora=True),
    "lora_patterns": LoRABlock(method="lora", r=4, alpha=8, dropout=0.0, lr_ratio_b=4.0,
                               rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.up_proj": 6},
                               alpha_pattern={"q_proj": 16}),
    "ia3": IA3Block(method="ia3"),
    "bitfit": BitFitBlock(method="bitfit"),
    "sparse_random": SparseBlock(method="sparse", density=0.05, select="random"),
    "sparse_gradient": SparseBlock(method="sparse", density=0.05, select="gradient", calibration_batches=2),
}
# Every method on every storage; random selection differs from gradient selection only before training, so one
# storage suffices for it.
CASES = [(name, bits) for name in BLOCKS for bits in BITS if name != "sparse_random" or bits == 4]
# Scaling vectors and biases move the loss more slowly than low-rank or sparse matrices: a larger step for them.
LR = {"ia3": 2e-1, "bitfit": 5e-2, "lora_patterns": 5e-3}  # lora_patterns: B learns 4x faster (LoRA+)
STEPS = 3
BATCH = 4
IDS = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))


def load(model_dir, bits):
    from qtrain.modeling import load_model

    return load_model(ModelSection(path=str(model_dir)), QuantizationSection(bits=bits), CPU)


def logits(model):
    with torch.no_grad():  # train mode: bnb's 8-bit layers use their training numerics (dequantized weight)
        return model.train()(IDS).logits


@functools.cache
def bare_logits(model_dir, bits):
    return logits(load(model_dir, bits).model)


def frozen_state(model, params):
    mine = {id(p) for p in params.values()}
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]
            if id(t) not in mine and not n.endswith("sparse_indices")}


@pytest.fixture(scope="module")
def dates(tmp_path_factory):
    path = tmp_path_factory.mktemp("dates") / "dates.jsonl"
    path.write_text("".join(json.dumps({"instruction": "Rewrite the date in ISO 8601 format.", "input": t,
                                        "output": iso}) + "\n" for t, iso in DATES))
    return path


@pytest.fixture(scope="module")
def trained(tiny_model_dir, dates, tmp_path_factory):
    """(method name, bits) → a record of one short training run, computed once and shared by the tests below."""
    cache = {}

    def get(name, bits):
        if (name, bits) not in cache:
            cache[name, bits] = run_method(tiny_model_dir, dates, tmp_path_factory.mktemp(f"{name}-{bits}"),
                                           [BLOCKS[name]], bits, LR.get(name, 1e-2))
        return cache[name, bits]
    return get


def run_method(model_dir, dates, folder, blocks, bits, lr):
    loaded = load(model_dir, bits)
    model, acc = loaded.model, Accelerator(cpu=True)
    ds, _ = prepare(str(dates), DataSection(train="x"), loaded.tokenizer, "data.train")
    batches = Batches(ds, BATCH, seed=0, pad_id=loaded.tokenizer.pad_token_id)
    torch.manual_seed(0)
    methods = build_methods(blocks)
    params, groups = {}, []
    for m in methods:
        mine = m.attach(model)
        params.update(mine)
        groups += m.param_groups(mine, lr)
    for m in methods:
        m.calibrate(model, batches, lambda mod, b: mean_batch_loss(mod, b, 512, acc))
    rec = {"model": model, "methods": methods, "params": params, "groups": groups,
           "step0": logits(model), "bare": bare_logits(model_dir, bits)}
    before = frozen_state(model, params)
    initial = {n: p.detach().clone() for n, p in params.items()}
    mean_batch_loss(model, next(Batches(ds, BATCH, seed=1, pad_id=loaded.tokenizer.pad_token_id)), 512, acc).backward()
    rec["with_grad"] = {n for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    cfg = TrainingSection(micro_batch_size=BATCH, max_steps=STEPS, learning_rate=lr, lr_scheduler="constant")
    full = next(Batches(ds, len(ds), seed=0, pad_id=loaded.tokenizer.pad_token_id))  # all 8 examples

    def full_loss():
        with torch.no_grad():
            return float(mean_batch_loss(model.train(), full, 512, acc))
    loss_before = full_loss()
    train(model, groups, batches, cfg, STEPS, acc, log=lambda r: None)
    rec["losses"] = (loss_before, full_loss())
    after = frozen_state(model, params)
    rec["base_unchanged"] = before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    rec["unchanged_params"] = [n for n, p in params.items() if torch.equal(p.detach(), initial[n])]
    rec["logits"] = logits(model)
    save_adapter(folder / "adapter", methods, params, base_model=str(model_dir))
    rec["adapter"] = folder / "adapter"
    return rec


def merged_dense_model(model_dir, model, methods):
    """A plain float32 transformers model whose weights are the base's, dequantized as training saw them, passed
    through every method's `merged_tensor` in attach order, plus their `added_tensors` (new biases)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    state = {}
    for name in linear_names(model):  # every linear but the head, wrapped or not
        inner = innermost(model.get_submodule(name))
        state[f"{name}.weight"] = dequantized_weight(inner, torch.float32)
        if inner.bias is not None:
            state[f"{name}.bias"] = inner.bias.detach().float()
    for key, t in model.state_dict().items():
        if "base_layer" not in key and key.rsplit(".", 1)[-1] in ("weight", "bias") and key not in state \
                and t.is_floating_point():
            state.setdefault(key, t.detach().float())
    merged = {}
    for key, t in state.items():
        for m in methods:
            t = m.merged_tensor(key, t)
        merged[key] = t
    added = {k: v for m in methods for k, v in m.added_tensors().items()}
    config = AutoConfig.from_pretrained(model_dir)
    if added:
        config.attention_bias = config.mlp_bias = True
    dense = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    full = {**merged, **added}
    own = dense.state_dict()
    missing = [k for k in own if k not in full and not k.endswith("rotary_emb.inv_freq")]
    assert all(k.endswith(".bias") for k in missing if k != "lm_head.weight"), missing
    for k in missing:
        full[k] = torch.zeros_like(own[k]) if k.endswith(".bias") else full["model.embed_tokens.weight"]
    dense.load_state_dict({k: v for k, v in full.items() if k in own}, strict=False)
    return dense


# ---------------------------------------------------------------------------------------------- the properties


@pytest.mark.parametrize("name,bits", CASES)
def test_step0_output_is_the_base(trained, name, bits):
    rec = trained(name, bits)
    assert torch.equal(rec["step0"], rec["bare"])


@pytest.mark.parametrize("name,bits", CASES)
def test_only_the_method_trains_and_the_loss_falls(trained, name, bits):
    rec = trained(name, bits)
    assert rec["with_grad"] == {n for n, p in rec["model"].named_parameters()
                                if id(p) in {id(q) for q in rec["params"].values()}}
    assert rec["base_unchanged"]  # every base tensor (packed 4/8-bit data included) bit-identical
    assert rec["unchanged_params"] == []  # and every trainable tensor moved
    before, after = rec["losses"]
    # The mean loss over the 8 training examples, before and after 3 steps on them, on a random model (≈ ln 400
    # ≈ 6): every method takes at least 0.05 nats off (measured: 0.09–0.33); a method whose updates never reached
    # the output would leave it where it was.
    assert after < before - 0.05, rec["losses"]


@pytest.mark.parametrize("name,bits", CASES)
def test_save_load_round_trip_is_exact(trained, tiny_model_dir, name, bits):
    rec = trained(name, bits)
    fresh = load(tiny_model_dir, bits).model
    load_adapter(fresh, rec["adapter"])
    assert not torch.equal(rec["logits"], rec["bare"])
    assert torch.equal(logits(fresh), rec["logits"])


@pytest.mark.parametrize("name", list(BLOCKS))
def test_closed_form_count_is_the_real_count(trained, tiny_model_dir, name):
    rec = trained(name, 4)
    real = sum(p.numel() for p in rec["params"].values())
    assert BLOCKS[name].trainable_parameters(Arch.from_path(tiny_model_dir)) == real


@pytest.mark.parametrize("name,bits", CASES)
def test_merged_weights_compute_what_the_wrappers_compute(trained, tiny_model_dir, name, bits):
    rec = trained(name, bits)
    dense = merged_dense_model(tiny_model_dir, rec["model"], rec["methods"])
    # Stated tolerance: float32 logits of a 2-layer model, |logits| < 1; merging only reorders float32 sums.
    torch.testing.assert_close(logits(dense), rec["logits"], rtol=0, atol=2e-5)


# ---------------------------------------------------------------------------------------------- peft equality


PEFT_BLOCKS = {
    "dora": BLOCKS["dora"],
    "dora_rslora_patterns": LoRABlock(method="lora", r=4, alpha=8, dropout=0.0, rslora=True, dora=True,
                                      target_modules=["q_proj", "k_proj", "v_proj", "up_proj"],
                                      rank_pattern={"k_proj": 2, r"layers\.1\.mlp\.up_proj": 6},
                                      alpha_pattern={"v_proj": 3}),
    "lora_patterns": BLOCKS["lora_patterns"],
    "ia3": BLOCKS["ia3"],
    "ia3_attention_only": IA3Block(method="ia3", target_modules=["q_proj", "v_proj"]),
}


@pytest.mark.parametrize("name,bits", [(n, b) for n in PEFT_BLOCKS for b in BITS
                                       if n in ("dora", "lora_patterns", "ia3") or b == 4])
def test_peft_loads_the_adapter_with_the_same_logits(tiny_model_dir, tmp_path, name, bits):
    peft = pytest.importorskip("peft")
    model = load(tiny_model_dir, bits).model
    torch.manual_seed(0)
    methods = build_methods([PEFT_BLOCKS[name]])
    params = methods[0].attach(model)
    with torch.no_grad():  # as if trained: every tensor away from its identity init
        for p in params.values():
            p.add_(torch.randn_like(p) * 0.05)
    save_adapter(tmp_path / "adapter", methods, params, base_model=str(tiny_model_dir))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    block = PEFT_BLOCKS[name]
    if isinstance(block, LoRABlock):
        assert (config["use_dora"], config["rank_pattern"], config["alpha_pattern"]) == \
            (block.dora, block.rank_pattern, block.alpha_pattern)
    theirs = peft.PeftModel.from_pretrained(load(tiny_model_dir, bits).model, str(tmp_path / "adapter"))
    ours = logits(model)
    assert (ours - bare_logits(tiny_model_dir, bits)).abs().max() > 1e-3
    torch.testing.assert_close(logits(theirs), ours, rtol=0, atol=1e-5)
    # peft built the same shapes (the rank pattern reached it) and holds our values
    theirs_sd = peft.get_peft_model_state_dict(theirs)
    assert set(theirs_sd) == {PEFT_PREFIX + n for n in params}


# ---------------------------------------------------------------------------------------------- specifics


def test_rank_alpha_patterns_and_lora_plus_groups(tiny_model_dir):
    model = load(tiny_model_dir, 4).model
    (method,) = build_methods([BLOCKS["lora_patterns"]])
    params = method.attach(model)
    layer = "model.layers.{}.{}"
    assert params[layer.format(0, "self_attn.v_proj.lora_A.weight")].shape[0] == 2
    assert params[layer.format(1, "mlp.up_proj.lora_A.weight")].shape[0] == 6
    assert params[layer.format(0, "mlp.up_proj.lora_A.weight")].shape[0] == 4  # the regex names layer 1 only
    assert model.get_submodule(layer.format(0, "self_attn.q_proj")).scaling == 16 / 4
    assert model.get_submodule(layer.format(0, "self_attn.v_proj")).scaling == 8 / 2
    slow, fast = method.param_groups(params, 1e-3)
    assert (slow["lr"], fast["lr"]) == (1e-3, 4e-3)
    assert {id(p) for p in slow["params"]} == {id(p) for n, p in params.items() if "lora_A" in n}
    assert {id(p) for p in fast["params"]} == {id(p) for n, p in params.items() if "lora_B" in n}


def test_dora_rescales_rows_to_the_magnitude(tiny_model_dir):
    """m·(W+ΔW)/‖W+ΔW‖: after the update each row of the effective weight has length m, on a 4-bit base."""
    model = load(tiny_model_dir, 4).model
    (method,) = build_methods([LoRABlock(method="lora", r=4, target_modules=["o_proj"], dropout=0.0, dora=True)])
    params = method.attach(model)
    with torch.no_grad():
        for p in params.values():  # magnitudes stay positive (a row's length), A and B get random updates
            p.mul_(1 + torch.rand_like(p)) if p.ndim == 1 else p.add_(torch.randn_like(p) * 0.1)
    wrapper = model.get_submodule("model.layers.0.self_attn.o_proj")
    x = torch.eye(64)  # the layer applied to the basis vectors is its effective weight, transposed
    effective = wrapper.train()(x).T  # (out, in); o_proj has no bias
    torch.testing.assert_close(effective.norm(dim=1), wrapper.lora_magnitude_vector.detach(), rtol=1e-5, atol=1e-6)


def test_sparse_gradient_selection_picks_the_largest_squared_gradients():
    from qtrain.methods.sparse import Sparse

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6, bias=False).requires_grad_(False))
    method = Sparse(SparseBlock(method="sparse", density=0.25, calibration_batches=3))
    (values,) = method.attach(model).values()
    batches = [{"x": torch.randn(5, 8), "t": torch.randn(5, 6)} for _ in range(4)]
    method.calibrate(model, iter(batches), lambda m, b: (m(b["x"]) * b["t"]).sum())
    fisher = sum((b["t"].T @ b["x"]).square() for b in batches[:3])  # dL/dW = tᵀx for this loss, (6, 8)
    expected = torch.topk(fisher.flatten(), 12).indices.sort().values
    assert torch.equal(model[0].sparse_indices, expected)
    assert values.requires_grad and torch.equal(values, torch.zeros(12))  # values untouched, still trainable


def test_a_mixed_run_lora_on_attention_plus_bitfit_plus_sparse(tiny_model_dir, dates, tmp_path):
    """LoRA on attention + BitFit on every linear + a gradient-selected sparse delta on down_proj in one `qtrain
    run`: BitFit stacks on the LoRA-wrapped layers, run.py calibrates the sparse mask, the adapter reloads
    exactly, and merging all three reproduces the trained model."""
    from qtrain.run import run

    blocks = [{"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0,
               "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
              {"method": "bitfit"},
              {"method": "sparse", "density": 0.05, "calibration_batches": 2, "target_modules": ["down_proj"]}]
    cfg = load_config(write_config(tmp_path, tiny_model_dir, dates, peft=blocks,
                                   training={"max_steps": 3, "learning_rate": 3e-2}))
    summary = run(cfg)
    arch = Arch.from_path(tiny_model_dir)
    assert summary["trainable_parameters"] == sum(b.trainable_parameters(arch) for b in cfg.peft)
    model = load(tiny_model_dir, 4).model
    methods, params = load_adapter(model, tmp_path / "run" / "adapter")
    assert sum(n.endswith("bitfit_bias") for n in params) == 2 * 7  # all linears, the LoRA-wrapped ones too
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert type(q).__name__ == "BiasLinear" and type(q.base_layer).__name__ == "LoRALinear"
    assert all(p.abs().sum() > 0 for n, p in params.items() if "lora_A" not in n)  # trained (B, biases moved)
    indices = model.get_submodule("model.layers.0.mlp.down_proj").sparse_indices
    k = cfg.peft[2].trainable_parameters(arch) // 2  # per down_proj
    assert indices.numel() == k and not torch.equal(indices, torch.arange(k))  # calibration replaced the placeholder
    assert torch.equal(indices, indices.unique())  # sorted, no repeats
    torch.testing.assert_close(logits(merged_dense_model(tiny_model_dir, model, methods)), logits(model),
                               rtol=0, atol=2e-5)


def test_user_mistakes_are_clear_errors(tiny_model_dir):
    model = load(tiny_model_dir, 4).model
    with pytest.raises(QTrainError, match=r"rank_pattern: 'w_proj' matches none"):
        build_methods([LoRABlock(method="lora", rank_pattern={"w_proj": 2})])[0].attach(model)
    with pytest.raises(QTrainError, match="feedforward_modules: .*down_proj is not among target_modules"):
        build_methods([IA3Block(method="ia3", target_modules=["k_proj"], feedforward_modules=["down_proj"])
                       ])[0].attach(model)
    build_methods([BitFitBlock(method="bitfit", target_modules=["q_proj"])])[0].attach(model)
    with pytest.raises(QTrainError, match="dora: .*q_proj is already wrapped"):
        build_methods([LoRABlock(method="lora", target_modules=["q_proj"], dora=True)])[0].attach(model)
    with pytest.raises(QTrainError, match="targeted by two blocks"):
        build_methods([BitFitBlock(method="bitfit", target_modules=["q_proj"])])[0].attach(model)
    with pytest.raises(ValueError, match="not a valid regex"):
        LoRABlock(method="lora", alpha_pattern={"(q_proj": 2})


@pytest.mark.parametrize("feedforward", [None, []], ids=["default", "none"])
def test_ia3_without_a_feedforward_module_reloads_from_its_files(tiny_model_dir, tmp_path, feedforward):
    """Targets that leave out down_proj: the default feedforward module applies only where targeted, and the
    saved adapter must keep that rule (it was written as an explicit [down_proj], which its reload refused)."""
    model = load(tiny_model_dir, 4).model
    block = IA3Block(method="ia3", target_modules=["q_proj", "v_proj"], feedforward_modules=feedforward)
    methods = build_methods([block])
    params = methods[0].attach(model)
    with torch.no_grad():
        for p in params.values():
            p.uniform_(0.5, 1.5)
    save_adapter(tmp_path / "ia3", methods, params, base_model=str(tiny_model_dir))
    assert json.loads((tmp_path / "ia3" / "adapter_config.json").read_text())["feedforward_modules"] == []
    fresh = load(tiny_model_dir, 4).model
    load_adapter(fresh, tmp_path / "ia3")
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)
    assert block.trainable_parameters(Arch.from_path(tiny_model_dir)) == sum(p.numel() for p in params.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_delta_keeps_no_dense_delta_for_backward_and_gives_autograds_gradients(dtype):
    """The sparse layer's product keeps the input, the values and the indices for backward, not the (out, in)
    float32 delta (a whole weight's size per layer) autograd's F.linear kept; the gradients are the same."""
    from qtrain.methods.sparse import SparseDeltaLinear

    torch.manual_seed(0)
    base = nn.Linear(48, 40, bias=False).to(dtype).requires_grad_(False)
    layer = SparseDeltaLinear(base, torch.randperm(48 * 40)[:96].sort().values)
    with torch.no_grad():
        layer.sparse_values.normal_()
    x = torch.randn(3, 5, 48, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 5, 40, dtype=dtype)

    def grads(forward):
        saved = []
        def keep(t):  # what backward holds on to, but the frozen base weight (held by the model anyway)
            if t.untyped_storage().data_ptr() != base.weight.untyped_storage().data_ptr():
                saved.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            y = forward(x)
        xg, vg = torch.autograd.grad(y, (x, layer.sparse_values), g)
        return y, xg, vg, saved

    y, xg, vg, saved = grads(layer)
    ref_y, ref_xg, ref_vg, ref_saved = grads(
        lambda t: base(t) + F.linear(t.to(torch.float32), layer.delta()).to(dtype))
    dense = {(40, 48), (48, 40)}
    assert dense & set(ref_saved) and not dense & set(saved), (ref_saved, saved)  # no dense delta kept here
    torch.testing.assert_close(y, ref_y, rtol=0, atol=0)
    torch.testing.assert_close(xg, ref_xg, rtol=0, atol=0)
    torch.testing.assert_close(vg, ref_vg, rtol=1e-6, atol=1e-6)


def test_inspect_counts_a_sparse_adapters_values_not_its_mask_positions(tiny_model_dir, tmp_path):
    from qtrain.inspect_adapter import inspect_adapter

    model = load(tiny_model_dir, 4).model
    methods = build_methods([SparseBlock(method="sparse", density=0.01, target_modules=["down_proj"])])
    params = methods[0].attach(model)
    save_adapter(tmp_path / "sparse", methods, params, base_model=str(tiny_model_dir))
    assert inspect_adapter(tmp_path / "sparse")["parameters"] == sum(p.numel() for p in params.values())
