"""bitsandbytes' 8-bit and paged optimizers as `training.optimizer` names them, stepping without bnb's waits
for the GPU and without its per-parameter Python (`_StepWithoutWaits`); torch's AdamW for `adamw`."""

from __future__ import annotations

import torch

import bitsandbytes as bnb


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
        last = None
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
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
        """`update_step`'s operator call for a two-state optimizer, with its arguments; False (nothing done) for
        a state layout it does not know."""
        state = self.state[p]
        betas = group["betas"]
        beta3, alpha = (betas[2] if len(betas) >= 3 else 0.0), group.get("alpha", 0.0)
        if state["state1"].dtype == torch.uint8:
            state["step"] += 1
            torch.ops.bitsandbytes.optimizer_update_8bit_blockwise(
                self.optimizer_name, p.grad, p, state["state1"], state["state2"], betas[0], betas[1], beta3, alpha,
                group["eps"], state["step"], group["lr"], state["qmap1"], state["qmap2"], state["absmax1"],
                state["absmax2"], group["weight_decay"], 1.0, self.args.skip_zeros)
        elif state["state1"].dtype == torch.float32:
            state["step"] += 1
            torch.ops.bitsandbytes.optimizer_update_32bit(
                self.optimizer_name, p.grad, p, state["state1"], state["state2"], None, 0.0, 0.0, betas[0], betas[1],
                beta3, alpha, group["eps"], group["weight_decay"], state["step"], group["lr"], 1.0,
                self.args.skip_zeros)
        else:
            return False
        return True


def _without_waits(cls: type) -> type:
    return type(cls.__name__, (_StepWithoutWaits, cls), {"__doc__": cls.__doc__, "__module__": __name__})


_BNB_OPTIMIZERS = {name: _without_waits(cls) for name, cls in (
    ("adamw_8bit", bnb.optim.AdamW8bit), ("paged_adamw_8bit", bnb.optim.PagedAdamW8bit),
    ("paged_adamw_32bit", bnb.optim.PagedAdamW32bit))}


def make_optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class for `training.optimizer`: torch's AdamW, or bitsandbytes' 8-bit and paged ones
    (with `_StepWithoutWaits`)."""
    return torch.optim.AdamW if name == "adamw" else _BNB_OPTIMIZERS[name]
