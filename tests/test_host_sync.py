"""A training step waits for the device once. On a GPU the host queues kernels ahead of the device; every read
of a device value (`.item()`, `int()`, `bool()`, a boolean mask, `nonzero`) drains that queue and leaves the GPU
idle while the host catches up. These tests find such reads on the CPU, where the same operators run: a
dispatch mode records each operator that hands a tensor's value to the host, with the code that called it."""

import json
import traceback
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch.utils._python_dispatch import TorchDispatchMode

import qtrain.train
from qtrain.config import DataSection, ModelSection, QuantizationSection, TrainingSection
from qtrain.data import Batches, prepare
from qtrain.methods import build_methods
from qtrain.methods.blocks import LoRABlock
from qtrain.modeling import enable_checkpointing, load_model
from qtrain.numerics import IGNORE_INDEX, target_rows

# operators whose result the host must wait for (on CUDA each is a device synchronisation)
READS_BACK = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "unique", "_unique2",
              "masked_scatter", "bincount", "repeat_interleave"}
# Where a read is expected and costs the device nothing: the loop's bookkeeping on host batches (run before
# they move); and transformers' own check while it builds the attention mask (once per forward: whether a given
# mask may be dropped, or, given none, whether the positions restart, i.e. rows are packed).
ON_HOST = {("numerics.py", "count_targets"), ("train.py", "real_tokens"), ("train.py", "without_right_padding_mask")}
TRANSFORMERS_MASK = "masking_utils.py"


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.places: list[tuple[str, str]] = []  # (file, function) of the innermost caller outside torch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
        if name in READS_BACK or bool_index:
            frames = [f for f in traceback.extract_stack() if "/torch/" not in f.filename
                      and not f.filename.endswith("test_host_sync.py")]
            self.places.append((Path(frames[-1].filename).name, frames[-1].name) if frames else ("?", "?"))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def padded_dates(tmp_path) -> Path:
    path = tmp_path / "dates.jsonl"  # answers of different lengths: every batch has padding
    path.write_text("".join(json.dumps({"instruction": "Rewrite.", "input": f"March {i}, 2021",
                                        "output": f"2021-03-{i:02d}" + " ok" * (i % 3)}) + "\n" for i in range(1, 17)))
    return path


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_training_step_reads_the_device_once(tiny_model_dir, padded_dates, monkeypatch, checkpointing):
    loaded = load_model(ModelSection(path=str(tiny_model_dir)), QuantizationSection(bits=4), torch.device("cpu"))
    torch.manual_seed(0)
    (lora,) = build_methods([LoRABlock(method="lora", r=4, alpha=8, dropout=0.0)])
    params = lora.attach(loaded.model)
    if checkpointing:
        enable_checkpointing(loaded.model)
    ds, _ = prepare(str(padded_dates), DataSection(train="x"), loaded.tokenizer, "data.train")
    cfg = TrainingSection(micro_batch_size=4, gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-3,
                          optimizer="adamw", max_grad_norm=1.0)
    reads = []
    real = qtrain.train.read_on_host
    monkeypatch.setattr(qtrain.train, "read_on_host", lambda *v: reads.append(len(v)) or real(*v))
    mode, records = HostReads(), []
    with mode:
        result = qtrain.train.train(loaded.model, [{"params": list(params.values()), "lr": 1e-3}],
                                    Batches(ds, 4, seed=0, pad_id=loaded.tokenizer.pad_token_id), cfg, 3,
                                    Accelerator(cpu=True), log=records.append)
    assert result.steps == 3 and len(records) == 3
    assert reads == [3, 3, 3]  # one transfer per step: loss sum, target count, gradient norm
    unexpected = [p for p in mode.places if p not in ON_HOST and p[0] != TRANSFORMERS_MASK]
    assert unexpected == []
    # the host bookkeeping is what the test exempts, so it must be what it says: one count per micro-batch
    assert mode.places.count(("numerics.py", "count_targets")) == 3 * 2
    assert sum(p[0] == TRANSFORMERS_MASK for p in mode.places) <= 2 * 3 * 2  # transformers': per forward


@pytest.mark.parametrize("method", ["lora", "prefix_tuning"])
def test_right_padded_rows_without_their_mask_give_the_masked_loss_and_gradients(tiny_model_dir, method):
    """Causal attention alone gives a right-padded row's real positions what the padding mask gives them, so
    the loss and the gradients are the masked forward's (to rounding: another attention kernel); unpadded rows
    bit for bit (transformers drops an all-ones mask itself). Left padding keeps its mask."""
    from qtrain.methods.blocks import PrefixTuningBlock
    from qtrain.numerics import count_targets
    from qtrain.train import batch_loss_sum, without_right_padding_mask

    loaded = load_model(ModelSection(path=str(tiny_model_dir)), QuantizationSection(bits=4), torch.device("cpu"))
    torch.manual_seed(0)
    block = LoRABlock(method="lora", r=4, alpha=8, dropout=0.0) if method == "lora" else \
        PrefixTuningBlock(method="prefix_tuning", num_virtual_tokens=3)
    (m,) = build_methods([block])
    params = list(m.attach(loaded.model).values())
    if method == "lora":  # B away from zero: every LoRA matrix gets a gradient
        with torch.no_grad():
            for p in params:
                p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(3, 200, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    mask[2, 8:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    padded = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    full = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    assert "attention_mask" not in without_right_padding_mask(padded)
    left = {**padded, "attention_mask": mask.flip(1)}
    assert without_right_padding_mask(left) is left

    def loss_and_grads(batch):
        for p in params:
            p.grad = None
        loss = batch_loss_sum(loaded.model, batch, 128, n_targets=count_targets(batch["labels"]))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    for batch, exact in ((padded, False), (full, True)):
        loss0, g0 = loss_and_grads(batch)
        loss1, g1 = loss_and_grads(without_right_padding_mask(batch))
        assert all(g.abs().sum() > 0 for g in g0)
        if exact:
            assert torch.equal(loss0, loss1) and all(torch.equal(a, b) for a, b in zip(g0, g1))
        else:
            assert torch.allclose(loss0, loss1, rtol=1e-5)
            assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(a.abs().max())) for a, b in zip(g0, g1))


def test_known_target_count_picks_the_same_rows_bit_for_bit():
    torch.manual_seed(0)
    labels = torch.randint(0, 50, (3, 9))
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[1, 6:] = IGNORE_INDEX  # padding
    labels[2, ::2] = IGNORE_INDEX
    n = int((labels[:, 1:] != IGNORE_INDEX).sum())
    grads = []
    for count in (None, n):
        hidden = torch.randn(3, 9, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        h, targets = target_rows(hidden, labels, count)
        weight = torch.randn(8, generator=torch.Generator().manual_seed(2))
        (h @ weight * targets).sum().backward()
        grads.append((h.detach(), targets, hidden.grad))
    (h0, t0, g0), (h1, t1, g1) = grads
    assert h1.shape == (n, 8) and torch.equal(h1, h0) and torch.equal(t1, t0)
    assert torch.equal(g1, g0) and g1.abs().sum() > 0


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_bnb_optimizers_step_like_bnb_bit_for_bit(name, monkeypatch):
    """qtrain's bitsandbytes optimizers drop bnb's wait for the GPU after every parameter and call its update
    operator directly; nothing else: parameters and states equal bnb's bit for bit, with the learning rate
    changing between steps (a scheduler), a non-contiguous gradient (bnb's own path), two groups."""
    import bitsandbytes as bnb

    from qtrain.optimizers import make_optimizer_class

    ours_cls = make_optimizer_class(name)
    theirs_cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
                  "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[name]
    assert ours_cls is not theirs_cls and issubclass(ours_cls, theirs_cls)
    runs, slow_path = [], []
    original = theirs_cls.update_step
    monkeypatch.setattr(theirs_cls, "update_step", lambda *a: slow_path.append(a[0]) or original(*a))
    for cls in (ours_cls, theirs_cls):
        g = torch.Generator().manual_seed(0)
        # below and above bnb's 4096 elements for 8-bit states; a parameter without a gradient is skipped
        params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((64, 16), (300, 200), (8,), (40, 40))]
        opt = cls([{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 3e-3, "weight_decay": 0.1}])
        for step in range(4):
            for i, p in enumerate(params):
                p.grad = None if (i == 3 and step == 1) else torch.randn(p.shape, generator=g)
            params[3].grad = params[3].grad.t() if step == 2 else params[3].grad  # (40, 40), not contiguous
            for group in opt.param_groups:
                group["lr"] *= 0.5
            opt.step()
        state = [t.clone() for p in params for t in opt.state[p].values() if isinstance(t, torch.Tensor)]
        runs.append(([p.detach().clone() for p in params], state))
    (p_ours, s_ours), (p_bnb, s_bnb) = runs
    assert sum(isinstance(o, ours_cls) for o in slow_path) == 1  # only the non-contiguous gradient
    assert all(torch.equal(a, b) for a, b in zip(p_ours, p_bnb))
    assert len(s_ours) == len(s_bnb) > 0 and all(torch.equal(a, b) for a, b in zip(s_ours, s_bnb))
