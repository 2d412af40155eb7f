"""`qtrain merge-adapters`: the maths of each composition method, pinned on small random LoRA factors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qtrain.compose import merge_deltas, merge_adapters, read_lora
from qtrain.errors import QTrainError

MODULES = {"model.layers.0.self_attn.q_proj": (24, 16), "model.layers.0.mlp.down_proj": (16, 20)}  # (in, out)


def write_lora(folder: Path, r: int, alpha: float, seed: int, modules=MODULES, rslora=False) -> Path:
    """A peft-layout LoRA adapter with random (non-zero) A and B."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (i, o) in modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, i, generator=g)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(o, r, generator=g)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    short = sorted({n.rsplit(".", 1)[-1] for n in modules})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny", "r": r,
        "lora_alpha": alpha, "use_rslora": rslora, "use_dora": False, "target_modules": short}))
    return folder


def deltas(folder: Path) -> dict[str, torch.Tensor]:
    ad = read_lora(folder)
    return {m: ad.delta(m) for m in ad.a}


@pytest.fixture
def two(tmp_path):
    return write_lora(tmp_path / "a", r=4, alpha=8, seed=1), write_lora(tmp_path / "b", r=2, alpha=6, seed=2,
                                                                        rslora=True)


@pytest.mark.parametrize("method", ["linear", "cat", "svd", "ties", "dare_linear", "dare_ties"])
def test_one_adapter_at_weight_one_is_reproduced(two, tmp_path, method):
    a, _ = two
    merge_adapters([a], tmp_path / "out", [1.0], method, density=1.0, rank=4 if method not in ("cat", "linear")
                   else None)
    got, want = deltas(tmp_path / "out"), deltas(a)
    for m in want:
        torch.testing.assert_close(got[m], want[m], rtol=0, atol=1e-5)


def test_cat_is_the_weighted_sum_of_deltas(two, tmp_path):
    a, b = two
    summary = merge_adapters([a, b], tmp_path / "out", [0.7, -1.3], "cat")
    got, da, db = deltas(tmp_path / "out"), deltas(a), deltas(b)
    assert summary["rank"] == 6 and read_lora(tmp_path / "out").config["r"] == 6
    for m in da:
        torch.testing.assert_close(got[m], 0.7 * da[m] - 1.3 * db[m], rtol=0, atol=1e-5)


def test_linear_is_pefts_with_cross_terms_and_the_sign_on_a(tmp_path):
    """peft's `linear`: A = Σ sign(w_i s_i)·√|w_i s_i|·A_i, B = Σ √|w_i s_i|·B_i, so B·A holds the cross terms
    B_i·A_j, each with A_j's sign (a negative weight on B instead would flip the other adapter's cross term)."""
    a, b = write_lora(tmp_path / "a", r=4, alpha=8, seed=1), write_lora(tmp_path / "b", r=4, alpha=4, seed=2)
    merge_adapters([a, b], tmp_path / "out", [0.7, -0.5], "linear")
    got, la, lb = read_lora(tmp_path / "out"), read_lora(a), read_lora(b)
    wa, wb = 0.7 * la.scaling, -0.5 * lb.scaling
    for m in la.a:
        big_a = math.sqrt(wa) * la.a[m].double() - math.sqrt(-wb) * lb.a[m].double()
        big_b = math.sqrt(wa) * la.b[m].double() + math.sqrt(-wb) * lb.b[m].double()
        torch.testing.assert_close(got.delta(m), got.scaling * big_b @ big_a, rtol=0, atol=1e-5)
        wrong = (math.sqrt(wa) * la.b[m].double() - math.sqrt(-wb) * lb.b[m].double()) @ \
            (math.sqrt(wa) * la.a[m].double() + math.sqrt(-wb) * lb.a[m].double())
        assert (got.delta(m) - got.scaling * wrong).abs().max() > 0.5  # the cross terms' sign is tested


def test_svd_truncation_error_is_the_discarded_singular_values(two, tmp_path):
    a, b = two
    summary = merge_adapters([a, b], tmp_path / "out", [1.0, 0.5], "svd", rank=3)
    got, da, db = deltas(tmp_path / "out"), deltas(a), deltas(b)
    total_sq = 0.0
    for m in da:
        full = da[m] + 0.5 * db[m]
        s = torch.linalg.svdvals(full)
        expected = s[3:].pow(2).sum().sqrt()
        err = torch.linalg.matrix_norm(full - got[m])
        assert float(err) == pytest.approx(float(expected), rel=1e-4)
        assert float(expected) > 1.0  # rank 6 cut to 3: a real truncation
        total_sq += float(expected) ** 2
    assert summary["truncation_error_fro"] == pytest.approx(math.sqrt(total_sq), rel=1e-4)
    assert read_lora(tmp_path / "out").a[next(iter(da))].shape[0] == 3


def test_ties_keeps_density_and_elects_signs():
    d1 = torch.tensor([[4.0, -1.0, 0.5, 3.0], [-2.0, 0.1, -5.0, 1.0]], dtype=torch.float64)
    d2 = torch.tensor([[-1.0, -3.0, 2.0, 0.2], [3.0, 0.3, -0.1, -4.0]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    merged = merge_deltas([d1, d2], [1.0, 1.0], "ties", density=0.5, gen=gen)
    # Top half by magnitude: d1 keeps 4, 3, -2, -5; d2 keeps -3, 2, 3, -4.
    # Elected signs (sum of trimmed): [+, -, +, +], [+, 0→+, -, -]; disjoint mean of agreeing entries.
    expected = torch.tensor([[4.0, -3.0, 2.0, 3.0], [3.0, 0.0, -5.0, -4.0]], dtype=torch.float64)
    torch.testing.assert_close(merged, expected)


def test_dare_drops_a_seeded_share_and_rescales():
    torch.manual_seed(0)
    d = torch.randn(200, 100, dtype=torch.float64)
    out = merge_deltas([d], [1.0], "dare_linear", density=0.3, gen=torch.Generator().manual_seed(7))
    kept = out != 0
    assert abs(kept.double().mean().item() - 0.3) < 0.02  # 20 000 entries: 0.3 ± 3σ (σ = 0.0032)
    torch.testing.assert_close(out[kept], d[kept] / 0.3)  # survivors rescaled by 1/density
    again = merge_deltas([d], [1.0], "dare_linear", density=0.3, gen=torch.Generator().manual_seed(7))
    assert torch.equal(out, again)  # seeded


def test_dare_ties_only_keeps_entries_agreeing_with_the_elected_sign():
    torch.manual_seed(1)
    d1, d2 = torch.randn(30, 30, dtype=torch.float64), torch.randn(30, 30, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    out = merge_deltas([d1, d2], [1.0, 1.0], "dare_ties", density=0.5, gen=gen)
    gen = torch.Generator().manual_seed(3)
    keep = torch.rand((2, 30, 30), generator=gen, dtype=torch.float64) < 0.5
    pruned = torch.stack([d1, d2]) * keep / 0.5
    sign = torch.where(pruned.sum(0) >= 0, 1.0, -1.0)
    nonzero = out != 0
    assert torch.all(out[nonzero].sign() == sign[nonzero])
    both_agree = (pruned.sign() == sign).all(0) & (pruned != 0).all(0)
    torch.testing.assert_close(out[both_agree], pruned.mean(0)[both_agree])  # disjoint mean


def test_merged_adapter_loads_in_peft_layout_and_refusals(two, tmp_path):
    a, b = two
    merge_adapters([a, b], tmp_path / "out", [1, 1], "ties", density=0.5, rank=4)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 4 and config["target_modules"] == ["down_proj", "q_proj"]
    meta = json.loads((tmp_path / "out" / "qtrain.json").read_text())
    assert meta["methods"][0]["method"] == "lora" and meta["methods"][0]["r"] == 4
    with pytest.raises(QTrainError, match="already exists"):
        merge_adapters([a], tmp_path / "out", [1], "cat")
    merge_adapters([a], tmp_path / "out", [1], "cat", overwrite=True)  # an adapter folder: replaced
    assert read_lora(tmp_path / "out").config["r"] == 4
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(QTrainError, match=r"did not write \(e\.g\. notes\.txt\)"):  # a folder of the user's: not
        merge_adapters([a], tmp_path / "mine", [1], "cat", overwrite=True)
    for out in (a, tmp_path):  # an input, or a folder holding one: replacing it would delete what is merged
        with pytest.raises(QTrainError, match="which this command reads"):
            merge_adapters([a, b], out, [1, 1], "cat", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").is_file() and (a / "adapter_model.safetensors").is_file()
    with pytest.raises(QTrainError, match="different ranks"):
        merge_adapters([a, b], tmp_path / "o2", [1, 1], "linear")
    with pytest.raises(QTrainError, match="2 weights for 1"):
        merge_adapters([a], tmp_path / "o3", [1, 1], "cat")
    other = write_lora(tmp_path / "c", r=2, alpha=2, seed=3, modules={"model.layers.0.self_attn.q_proj": (24, 8)})
    with pytest.raises(QTrainError, match="different shapes"):
        merge_adapters([a, other], tmp_path / "o4", [1, 1], "cat")


def test_merged_adapter_runs_in_qtrain_and_peft(tiny_model_dir, tmp_path):
    """Two LoRAs (overlapping targets) on the tiny model, merged with cat: qtrain and peft both compute the base
    with W + Δ_0 + Δ_1."""
    peft = pytest.importorskip("peft")
    from qtrain.adapter_io import load_adapter, save_adapter
    from qtrain.config import ModelSection, QuantizationSection
    from qtrain.methods import build_methods
    from qtrain.methods.blocks import LoRABlock
    from qtrain.modeling import load_model

    def base():
        return load_model(ModelSection(path=str(tiny_model_dir)), QuantizationSection(bits="none"),
                          torch.device("cpu")).model.eval()

    folders = []
    for i, targets in enumerate([["q_proj", "v_proj"], ["v_proj", "down_proj"]]):
        model = base()
        torch.manual_seed(i)
        (method,) = build_methods([LoRABlock(method="lora", r=2 + i, alpha=4, target_modules=targets)])
        params = method.attach(model)
        with torch.no_grad():
            for p in params.values():
                p.normal_(std=0.05)
        folders.append(save_adapter(tmp_path / f"ad{i}", [method], params, base_model=str(tiny_model_dir)))
    merge_adapters(folders, tmp_path / "merged", [1.0, 1.0], "cat")
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        dense = base()  # reference: W + Δ_0 + Δ_1 written into the plain weights
        for folder in folders:
            for module, delta in deltas(folder).items():
                dense.get_submodule(module).weight += delta.float()
        want = dense(ids).logits
        assert (want - base()(ids).logits).abs().max() > 1e-2  # the deltas matter
        ours = base()
        load_adapter(ours, tmp_path / "merged")
        theirs = peft.PeftModel.from_pretrained(base(), str(tmp_path / "merged")).eval()
        torch.testing.assert_close(ours(ids).logits, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(theirs(ids).logits, want, rtol=0, atol=1e-5)
