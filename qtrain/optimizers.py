"""bitsandbytes' 8-bit and paged optimizers as `training.optimizer` names them, stepping without bnb's waits
for the GPU and without its per-parameter Python (`_StepWithoutWaits`), and updating many parameters with one
call of bnb's operator (`_Segment`); torch's AdamW for `adamw`."""

from __future__ import annotations

import math

import torch

import bitsandbytes as bnb

from qtrain.memory import BNB_PAGED_MIN, BNB_STATE_BLOCK as BLOCK, OPTIMIZER_SEGMENT_ELEMENTS


class _Segment:
    """Parameters of one group laid end to end in one buffer, updated by one call of bnb's update operator.

    bnb updates one parameter per call: with LoRA on every linear that is ~450 calls a step, each a Python
    function, ctypes and (paged) two prefetches, ~20-40 µs of host time apiece, between the step's one read of
    the device and the next forward, where the GPU waits. Here each parameter becomes a view into one buffer
    (`p.data`), and its optimizer states views into buffers laid out the same way, so the gradients gathered
    into one tensor (`torch.cat`) and one operator call update them all.

    Every parameter starts at a multiple of 256 elements, bnb's state block, so each block holds one
    parameter's elements only: the same blocks, absmax and quantized values as bnb's call per parameter. The
    padding between parameters gets zero gradients: it evolves like an element whose gradient is always zero
    (32-bit: zeros; 8-bit: bnb's code for zero, a few 1e-5 of its block's absmax), so it never sets an absmax.
    Bit-identical to bnb's per-parameter update on the CPU (tested); on a GPU bnb's kernel reads past a
    parameter's end as the signed map's byte 128 (5.5e-7 of the old absmax), which could only matter where a
    block's new moments all fall below that.

    The state dict is bnb's (per-parameter tensors, views here; checkpoints clone them). A segment checks each
    step that its parameters still live in its buffer and their states in its views; a loaded state dict (a
    resume) is copied in, and anything else (a missing gradient, steps that differ, a state layout it does not
    know) leaves those parameters to bnb's per-parameter path.
    """

    def __init__(self, gindex: int, params: list[torch.Tensor], eight_bit: bool, paged: bool):
        self.gindex, self.params, self.eight_bit, self.paged = gindex, params, eight_bit, paged
        sizes = [p.numel() for p in self.params]
        padded = [math.ceil(n / BLOCK) * BLOCK for n in sizes]
        self.offsets = [sum(padded[:i]) for i in range(len(padded))]
        self.total = sum(padded)
        first = self.params[0]
        self.flat = torch.zeros(self.total, dtype=first.dtype, device=first.device)
        with torch.no_grad():
            for p, off, n in zip(self.params, self.offsets, sizes):
                view = self.flat[off:off + n]
                view.copy_(p.detach().reshape(-1))
                p.data = view.view(p.shape)
        self.ptrs = [p.data_ptr() for p in self.params]
        zeros = torch.zeros(BLOCK, dtype=first.dtype, device=first.device)
        # each parameter's gradient followed by its padding: one torch.cat makes the segment's gradient
        self.pads = [zeros[:m - n] if m > n else None for n, m in zip(sizes, padded)]
        self.buffers: dict[str, torch.Tensor] = {}  # the flat states, made at the first step
        self.views: list[dict[str, torch.Tensor]] = []  # per parameter, the states handed to optimizer.state[p]
        self.calls = 0  # update calls made (tests read it)

    def step(self, opt: torch.optim.Optimizer, group: dict) -> bool:
        """Update every parameter with one operator call; False (nothing done) where bnb's path must do it."""
        pieces, states = [], opt.state
        step = states[self.params[0]].get("step")
        current = bool(self.views)  # every state still this segment's views, all at one step
        for p, ptr, pad, views in zip(self.params, self.ptrs, self.pads, self.views or self.params):
            g = p.grad
            if g is None or p.data_ptr() != ptr or g.dtype != p.dtype or not g.is_contiguous():
                return False
            pieces.append(g.view(-1))
            if pad is not None:
                pieces.append(pad)
            if current:
                state = states[p]
                current = (state.get("state1") is views["state1"] and state.get("state2") is views["state2"]
                           and state["step"] == step)
        if not (current or self._gather(opt)):
            return False
        step = states[self.params[0]]["step"] + 1
        for p in self.params:
            states[p]["step"] = step
        if self.paged:  # bnb's prefetch_state, for the whole buffers
            bnb.functional.prefetch_tensor(self.buffers["state1"])
            bnb.functional.prefetch_tensor(self.buffers["state2"])
        _bnb_update(opt, group, step, torch.cat(pieces), self.flat, self.buffers)
        self.calls += 1
        return True

    def _gather(self, opt) -> bool:
        """Make the states views of this segment's buffers: fresh (bnb's `init_state`, zeros) or copied from
        the per-parameter ones a loaded state dict holds. False where they cannot be (leaving them as they are)."""
        states = [opt.state[p] for p in self.params]
        kind = torch.uint8 if self.eight_bit else torch.float32
        keys = ("state1", "state2", "absmax1", "absmax2") if self.eight_bit else ("state1", "state2")
        if len({s.get("step", 0) for s in states}) != 1 or any(
                s and (set(s) != {"step", *keys, *(("qmap1", "qmap2") if self.eight_bit else ())}
                       or s["state1"].dtype != kind) for s in states):
            return False
        device = self.flat.device
        if self.eight_bit:
            if "dynamic" not in opt.name2qmap:
                opt.fill_qmap()
            for name in ("dynamic", "udynamic"):
                opt.name2qmap[name] = opt.name2qmap[name].to(device)
            qmap1, qmap2 = opt.name2qmap["dynamic"], opt.name2qmap["udynamic"]
            if any(s and not (torch.equal(s["qmap1"].to(device), qmap1) and torch.equal(s["qmap2"].to(device),
                                                                                       qmap2)) for s in states):
                return False
        if not self.buffers:
            # bnb pages the buffer of a paged optimizer's big tensors: every member is one, so is the segment
            make = opt.get_state_buffer if self.paged else (lambda t, dtype: torch.zeros_like(t, dtype=dtype))
            self.buffers = {"state1": make(self.flat, dtype=kind), "state2": make(self.flat, dtype=kind)}
            if self.eight_bit:
                blocks = self.total // BLOCK
                self.buffers.update(absmax1=torch.zeros(blocks, device=device), qmap1=qmap1, qmap2=qmap2,
                                    absmax2=torch.zeros(blocks, device=device))
                # the padding decodes to 0 (byte 0 is the signed map's -0.99: a loaded absmax would scale it)
                self.buffers["state1"].fill_(int((qmap1 == 0).nonzero()[0]))
                self.buffers["state2"].fill_(int((qmap2 == 0).nonzero()[0]))
        self.views = []
        with torch.no_grad():
            for p, state, off in zip(self.params, states, self.offsets):
                n, blocks = p.numel(), math.ceil(p.numel() / BLOCK)
                views = {k: self.buffers[k][off:off + n].view(p.shape) for k in ("state1", "state2")}
                if self.eight_bit:
                    start = off // BLOCK
                    views.update(absmax1=self.buffers["absmax1"][start:start + blocks],
                                 absmax2=self.buffers["absmax2"][start:start + blocks])
                for k, v in views.items():  # fresh: bnb's zeros (the 8-bit states' byte 0, absmax 0)
                    v.copy_(state[k].reshape(v.shape)) if state else v.zero_()
                step = state.get("step", 0)
                state.clear()  # bnb's order of keys
                state["step"] = step
                if self.eight_bit:
                    state.update(state1=views["state1"], qmap1=self.buffers["qmap1"], state2=views["state2"],
                                 qmap2=self.buffers["qmap2"], absmax1=views["absmax1"], absmax2=views["absmax2"])
                else:
                    state.update(views)
                self.views.append(views)
        return True


class _StepWithoutWaits:
    """bitsandbytes' optimizer step without its `torch.cuda.synchronize()` after every parameter.

    bnb's step waits for the GPU after each parameter's update kernel: with LoRA on every linear of a 32-layer
    model that is ~450 waits per step, the GPU idle through each launch that follows. Kernels on one stream run
    in order and nothing on the host reads the states between steps, so the waits buy training nothing; a paged
    optimizer keeps bnb's one wait at the end of the step (its states live in memory the driver may page to the
    host). The same kernels with the same arguments in the same order: bit-identical to bnb's step (tested).

    Each parameter's update calls bnb's operator directly (`_update`) instead of through `update_step`, whose
    per-parameter Python (a config dict, device checks, contiguity copies, the functional wrapper) costs ~18 µs
    a parameter on the host, ~8 ms a step for LoRA on every linear of a 32-layer model: time a GPU waits
    through where the arithmetic is small. bnb's own `update_step` still serves what `_update` does not
    cover (per-parameter overrides, update-norm clipping, non-contiguous tensors).
    """

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.segments = _segments(self)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        direct = not (self.mng.index2config or self.mng.pid2config or self.args.max_unorm > 0.0)
        done = {id(p) for s in self.segments if direct and s.step(self, self.param_groups[s.gindex])
                for p in s.params}
        last = next((s.params[-1] for s in self.segments if id(s.params[-1]) in done), None)
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is None or id(p) in done:
                    continue
                if len(self.state[p]) == 0:
                    self.init_state(group, p, gindex, pindex)
                self.prefetch_state(p)
                if not (direct and p.is_contiguous() and p.grad.is_contiguous() and self._update(group, p)):
                    self.update_step(group, p, gindex, pindex)
                last = p
        if self.is_paged and last is not None and last.device.type == "cuda":
            torch.cuda.synchronize(last.device)
        return loss

    def _update(self, group: dict, p: torch.Tensor) -> bool:
        """`update_step`'s operator call, for one parameter; False (nothing done) for a state layout it does not
        know."""
        state = self.state[p]
        if state["state1"].dtype not in (torch.uint8, torch.float32):
            return False
        state["step"] += 1
        _bnb_update(self, group, state["step"], p.grad, p, state)
        return True


def _bnb_update(opt, group: dict, step: int, grad: torch.Tensor, p: torch.Tensor, s: dict) -> None:
    """bnb's update operator for a two-state optimizer, as `update_step` calls it: `p` and its states `s`
    (state1, state2; 8-bit ones with qmap1/2 and absmax1/2) after `step` steps, in place."""
    b = group["betas"]
    beta3, alpha = (b[2] if len(b) >= 3 else 0.0), group.get("alpha", 0.0)
    if s["state1"].dtype == torch.uint8:
        torch.ops.bitsandbytes.optimizer_update_8bit_blockwise(
            opt.optimizer_name, grad, p, s["state1"], s["state2"], b[0], b[1], beta3, alpha, group["eps"], step,
            group["lr"], s["qmap1"], s["qmap2"], s["absmax1"], s["absmax2"], group["weight_decay"], 1.0,
            opt.args.skip_zeros)
    else:
        torch.ops.bitsandbytes.optimizer_update_32bit(
            opt.optimizer_name, grad, p, s["state1"], s["state2"], None, 0.0, 0.0, b[0], b[1], beta3, alpha,
            group["eps"], group["weight_decay"], step, group["lr"], 1.0, opt.args.skip_zeros)


def _segments(opt) -> list[_Segment]:
    """`_Segment`s of `opt`'s parameters: per group, device, dtype and state layout (8-bit or 32-bit, paged or
    not, as bnb's init_state would choose per parameter), up to OPTIMIZER_SEGMENT_ELEMENTS each (the planner
    counts their temporaries). Left out: parameters that do not own their whole storage (views, tensor
    subclasses such as FSDP's shards), and runs of one."""
    segments = []
    for gindex, group in enumerate(opt.param_groups):
        kinds: dict[tuple, list[torch.Tensor]] = {}
        for p in group["params"]:
            if not (type(p.data) is torch.Tensor and p.device.type in OPTIMIZER_SEGMENT_ELEMENTS
                    and p.is_contiguous()
                    and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                    and p.untyped_storage().nbytes() == p.numel() * p.element_size()):
                continue
            eight_bit = opt.args.optim_bits == 8 and p.numel() >= opt.args.min_8bit_size
            paged = opt.is_paged and p.device.type == "cuda" and p.numel() >= BNB_PAGED_MIN
            kinds.setdefault((p.device, p.dtype, eight_bit, paged), []).append(p)
        for (device, _, eight_bit, paged), params in kinds.items():
            run, size = [], 0
            for p in params + [None]:
                n = math.ceil(p.numel() / BLOCK) * BLOCK if p is not None else 0
                if p is None or (run and size + n > OPTIMIZER_SEGMENT_ELEMENTS[device.type]):
                    if len(run) > 1:
                        segments.append(_Segment(gindex, run, eight_bit, paged))
                    run, size = [], 0
                if p is not None:
                    run.append(p)
                    size += n
    return segments


def _without_waits(cls: type) -> type:
    return type(cls.__name__, (_StepWithoutWaits, cls), {"__doc__": cls.__doc__, "__module__": __name__})


_BNB_OPTIMIZERS = {name: _without_waits(cls) for name, cls in (
    ("adamw_8bit", bnb.optim.AdamW8bit), ("paged_adamw_8bit", bnb.optim.PagedAdamW8bit),
    ("paged_adamw_32bit", bnb.optim.PagedAdamW32bit))}


def make_optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class for `training.optimizer`: torch's AdamW, or bitsandbytes' 8-bit and paged ones
    (with `_StepWithoutWaits`)."""
    return torch.optim.AdamW if name == "adamw" else _BNB_OPTIMIZERS[name]
