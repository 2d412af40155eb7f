"""qtrain's bitsandbytes optimizers update a group's parameters with one call of bnb's operator (segments,
`qtrain.optimizers._Segment`): the same parameters, states and state dict as bnb's own class, bit for bit,
through steps, a scheduler, a resume, and parameters that leave a segment."""

import warnings

import bitsandbytes as bnb
import pytest
import torch

from qtrain.memory import OPTIMIZER_SEGMENT_ELEMENTS
from qtrain.optimizers import BLOCK, make_optimizer_class

BNB = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
       "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}
# below bnb's 4096 elements (32-bit states) and above (8-bit), none a multiple of 256 but one, LoRA-like shapes
SHAPES = [(16, 64), (64, 16), (8,), (40, 40), (16, 300), (300, 16), (77, 100), (4100,), (48, 128)]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Paged optimizers are not supported on CPU")
        yield


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES], g


def groups(params):
    return [{"params": params[:5], "lr": 1e-2}, {"params": params[5:], "lr": 3e-3, "weight_decay": 0.1}]


def train(opt, params, g, steps):
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        for group in opt.param_groups:
            group["lr"] *= 0.7  # a scheduler
        opt.step()


def states(opt, params):
    return [(k, t.clone()) for p in params for k, t in opt.state[p].items() if torch.is_tensor(t)]


def assert_same(ours, theirs, params_ours, params_theirs):
    assert all(torch.equal(a, b) for a, b in zip(params_ours, params_theirs))
    s_ours, s_theirs = states(ours, params_ours), states(theirs, params_theirs)
    assert [k for k, _ in s_ours] == [k for k, _ in s_theirs] and len(s_ours) > 0
    assert all(a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
               for (_, a), (_, b) in zip(s_ours, s_theirs))
    steps = [(ours.state[p]["step"], theirs.state[q]["step"]) for p, q in zip(params_ours, params_theirs)]
    assert all(a == b for a, b in steps)


@pytest.mark.parametrize("name", list(BNB))
def test_segments_update_like_bnb_bit_for_bit(name):
    params, g = make_params()
    ours = make_optimizer_class(name)(groups(params))
    kinds = {(s.gindex, s.eight_bit) for s in ours.segments}
    # both groups; 8-bit and 32-bit states where the optimizer has both
    assert {k for k, _ in kinds} == {0, 1} and ({e for _, e in kinds} == ({True, False} if "8bit" in name
                                                                           else {False}))
    for s in ours.segments:  # the parameters are views of the segment's buffer, each on a block of its own
        assert all(p.untyped_storage().data_ptr() == s.flat.untyped_storage().data_ptr() for p in s.params)
        assert all(off % BLOCK == 0 for off in s.offsets)
    train(ours, params, g, 5)

    theirs_params, g = make_params()
    theirs = BNB[name](groups(theirs_params))
    train(theirs, theirs_params, g, 5)
    assert [s.calls for s in ours.segments] == [5] * len(ours.segments)  # every step took the one call
    assert_same(ours, theirs, params, theirs_params)
    # the state dict has bnb's layout: one tensor per parameter, the shapes bnb gives them
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert sd_ours["param_groups"] == sd_theirs["param_groups"]
    assert {i: sorted(s) for i, s in sd_ours["state"].items()} == {i: sorted(s) for i, s in sd_theirs["state"].items()}


@pytest.mark.parametrize("name", list(BNB))
def test_a_loaded_state_dict_goes_into_the_segments(name):
    """A resume: bnb's per-parameter state loaded into a fresh optimizer is copied into its segments, and the
    next steps equal bnb's uninterrupted run."""
    theirs_params, g = make_params()
    theirs = BNB[name](groups(theirs_params))
    train(theirs, theirs_params, g, 3)
    params = [torch.nn.Parameter(p.detach().clone()) for p in theirs_params]
    ours = make_optimizer_class(name)(groups(params))
    ours.load_state_dict(theirs.state_dict())
    rng = g.get_state()
    train(theirs, theirs_params, g, 2)
    g.set_state(rng)
    train(ours, params, g, 2)
    assert [s.calls for s in ours.segments] == [2] * len(ours.segments)
    assert_same(ours, theirs, params, theirs_params)
    for s in ours.segments:  # the padding between parameters never sets a block's absmax
        pad = torch.ones(s.total, dtype=torch.bool)
        for p, off in zip(s.params, s.offsets):
            pad[off:off + p.numel()] = False
        assert pad.any()
        for k, qmap, absmax in (("state1", "qmap1", "absmax1"), ("state2", "qmap2", "absmax2")):
            if s.eight_bit:  # a zero gradient's state: bnb's code for 0 (a few 1e-5 of the block's absmax)
                assert (s.buffers[qmap][s.buffers[k][pad].long()].abs() < 1e-4).all()
            else:
                assert (s.buffers[k][pad] == 0).all() and (s.flat[pad] == 0).all()

def test_a_parameter_that_leaves_its_segment_is_still_updated_like_bnb():
    """Code that gives a parameter new storage (`p.data = ...`) takes it out of its segment's buffer: that
    segment goes back to bnb's per-parameter path, the others keep their one call, and the result is bnb's."""
    name = "paged_adamw_8bit"
    params, g = make_params()
    ours = make_optimizer_class(name)(groups(params))
    theirs_params, g2 = make_params()
    theirs = BNB[name](groups(theirs_params))
    train(ours, params, g, 2)
    train(theirs, theirs_params, g2, 2)
    moved = ours.segments[0].params[0]
    moved.data = moved.data.clone()
    train(ours, params, g, 2)
    train(theirs, theirs_params, g2, 2)
    assert ours.segments[0].calls == 2 and all(s.calls == 4 for s in ours.segments[1:])
    assert_same(ours, theirs, params, theirs_params)


def test_segments_are_bounded_and_leave_out_what_they_cannot_hold():
    """No segment holds more than OPTIMIZER_SEGMENT_ELEMENTS; a parameter that does not own its storage (a
    view) and a parameter alone of its kind stay as they are."""
    big = OPTIMIZER_SEGMENT_ELEMENTS["cpu"] // 3 + 1
    base = torch.zeros(2 * 4096)
    view = torch.nn.Parameter(base[:4096])  # not the whole of its storage
    params = [torch.nn.Parameter(torch.randn(big)) for _ in range(4)] + [view, torch.nn.Parameter(torch.randn(8))]
    opt = make_optimizer_class("adamw_8bit")(params, lr=1e-3)
    assert [len(s.params) for s in opt.segments] == [2, 2]
    assert all(s.total <= OPTIMIZER_SEGMENT_ELEMENTS["cpu"] for s in opt.segments)
    assert view.data_ptr() == base.data_ptr()
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(s.calls == 1 for s in opt.segments) and (view != 0).all() and len(opt.state[params[-1]]) > 0


def test_a_checkpoint_of_segment_parameters_round_trips(tmp_path):
    """Segment parameters share one buffer; checkpoints and adapter files copy them out (safetensors refuses
    tensors that share memory)."""
    from qtrain import checkpoint as ck

    params, g = make_params()
    opt = make_optimizer_class("adamw_8bit")(groups(params))
    train(opt, params, g, 1)
    named = {f"p{i}": p for i, p in enumerate(params)}
    path = ck.write_checkpoint(tmp_path, ck.Progress(step=1), named, opt.state_dict(), {}, {})
    from safetensors.torch import load_file

    loaded = load_file(str(path / "trainable.safetensors"))
    assert all(torch.equal(loaded[n], p) for n, p in named.items())
