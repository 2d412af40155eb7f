"""Sparse fine-tuning: a trainable sparse delta on a fixed mask over chosen weight matrices, on any base storage.

`SparseDeltaLinear(base)` holds a layer and k trainable float32 values at fixed flat positions of its (out, in)
weight (`sparse_indices`, sorted, row-major); it returns `base(x) + x · Δᵀ` where Δ is the delta scattered into
a dense matrix. The frozen (possibly quantized) base is never touched and the values start at zero, so step 0 is
the base. The mask is drawn at random (`select: random`) or, before training, from the largest summed squared
gradients of the full weight over a few training batches (`select: gradient`, in `calibrate`).

Materialising Δ each forward beat gathering the touched inputs with `index_add` (and `torch.sparse.mm`),
forward + backward, on this project's 2-core CPU for SmolLM2-135M's shapes and 512 tokens (benchmarks/
sparse_delta.py): about 2× faster at density 1 % and 5–20× at 5 %; `index_add` only won at 0.1 %, where both
are cheap next to the base layer. So there is one code path, the dense one; it needs one transient (out, in)
float32 matrix per layer, in forward and again in backward: `_SparseDelta` keeps only the layer's input, the
values and the indices for backward (autograd's own product kept Δ itself, a whole float32 weight per layer, and
a float32 copy of a 16-bit input).

The adapter stores values (trainable) and indices (a saved buffer) under the layer's path. Merging adds Δ.
"""

from __future__ import annotations

from itertools import islice
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from qtrain.adapter_io import PEFT_PREFIX
from qtrain.errors import QTrainError
from qtrain.methods.blocks import SparseBlock, sparse_size
from qtrain.methods.wrapping import LinearWrapper, WrappingMethod


def _scatter(values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The dense (out, in) delta holding `values` at the flat `indices`."""
    return values.new_zeros(shape[0] * shape[1]).scatter_(0, indices, values).view(shape)  # in place: one matrix


class _SparseDelta(torch.autograd.Function):
    """x · Δᵀ in float32 for Δ = `_scatter(values, indices, shape)`; the same products as
    `F.linear(x.float(), Δ)` under autograd, but Δ is rebuilt in backward instead of kept."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                shape: tuple[int, int]) -> torch.Tensor:
        ctx.save_for_backward(x, values, indices)
        ctx.shape = shape
        return F.linear(x.to(values.dtype), _scatter(values, indices, shape))  # (..., out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, values, indices = ctx.saved_tensors
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.matmul(_scatter(values, indices, ctx.shape)).to(x.dtype)  # (..., in)
        if ctx.needs_input_grad[1]:
            g, inputs = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1]).to(values.dtype)
            grad_values = g.t().mm(inputs).view(-1).gather(0, indices)  # dL/dΔ (out, in) at the mask: (k,)
        return grad_x, grad_values, None, None


class SparseDeltaLinear(LinearWrapper):
    def __init__(self, base_layer: nn.Module, indices: torch.Tensor):
        super().__init__(base_layer)
        device = self.base_device
        self.register_buffer("sparse_indices", indices.to(device, torch.int64))  # (k,) flat, into (out, in)
        self.sparse_values = nn.Parameter(torch.zeros(indices.numel(), device=device))  # (k,) float32
        self.probe: torch.Tensor | None = None  # a dense zero "delta" whose gradient is dL/dW, while calibrating

    def delta(self) -> torch.Tensor:
        """The dense (out, in) float32 delta; differentiable in the values."""
        return _scatter(self.sparse_values, self.sparse_indices, (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (..., out)
        if self.probe is not None:  # calibrating: the gradient of a dense delta is dL/dW
            return out + F.linear(x.to(self.probe.dtype), self.probe).to(out.dtype)
        shape = (self.out_features, self.in_features)
        return out + _SparseDelta.apply(x, self.sparse_values, self.sparse_indices, shape).to(out.dtype)

    def merged(self, kind: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor + self.delta().detach().to(tensor.device) if kind == "weight" else tensor


class Sparse(WrappingMethod):
    name = "sparse"
    wrapper = SparseDeltaLinear

    def attach(self, model: nn.Module) -> dict[str, nn.Parameter]:
        b: SparseBlock = self.block
        self.select(model)

        def build(_: str, m: nn.Module) -> SparseDeltaLinear:
            numel = m.in_features * m.out_features
            k = sparse_size(numel, b.density)
            # `gradient` replaces this placeholder in `calibrate`; `random` keeps it (seeded by the run).
            chosen = torch.randperm(numel)[:k].sort().values if b.select == "random" else torch.arange(k)
            return SparseDeltaLinear(m, chosen)

        wrappers = self.wrap(model, build)
        return {f"{name}.sparse_values": w.sparse_values for name, w in wrappers.items()}

    def to_file(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The mask travels with the values: `<layer>.sparse_indices` (int64) next to `<layer>.sparse_values`.
        return {**tensors, **{f"{PEFT_PREFIX}{name}.sparse_indices": w.sparse_indices.detach().cpu().contiguous()
                              for name, w in self._wrappers.items()}}

    def from_file(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensors = dict(tensors)
        for name, w in self._wrappers.items():
            key = f"{PEFT_PREFIX}{name}.sparse_indices"
            if key not in tensors:
                raise QTrainError(f"adapter: {key} is missing; the sparse adapter's mask was not saved with it")
            indices = tensors.pop(key)
            if indices.shape != w.sparse_indices.shape:
                raise QTrainError(f"adapter: {key} holds {indices.numel()} indices, this model's block expects "
                                  f"{w.sparse_indices.numel()}; load it on the base it was trained on")
            device = w.sparse_values.device if not w.sparse_values.is_meta else indices.device
            w.sparse_indices = indices.to(device, torch.int64)  # replaces the placeholder (also a meta one)
        return tensors

    def calibrate(self, model: nn.Module, batches: Iterator[dict[str, torch.Tensor]],
                  loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]) -> None:
        b: SparseBlock = self.block
        if b.select != "gradient":
            return
        # Only the probes need gradients: every other trainable tensor is frozen for the duration.
        trainable = [p for p in model.parameters() if p.requires_grad]
        for p in trainable:
            p.requires_grad_(False)
        scores = {}
        for w in self._wrappers.values():
            # An expanded scalar zero: a full-shape leaf that costs no memory; its .grad is dL/dW, (out, in).
            w.probe = torch.zeros((), device=w.sparse_values.device).expand(w.out_features, w.in_features)
            w.probe.requires_grad_(True)
            scores[w] = torch.zeros(w.out_features, w.in_features, device=w.sparse_values.device)
        was_training = model.training
        model.train()
        seen = 0
        try:
            with torch.enable_grad():
                for batch in islice(batches, b.calibration_batches):
                    loss_fn(model, batch).backward()
                    seen += 1
                    for w, score in scores.items():
                        score.add_(w.probe.grad.square())  # the empirical Fisher of each weight entry
                        w.probe.grad = None
        finally:
            for w in self._wrappers.values():
                w.probe = None
            for p in trainable:
                p.requires_grad_(True)
            model.train(was_training)
        if seen == 0:
            raise QTrainError("peft.sparse.select: 'gradient' needs training batches to calibrate on, but the data "
                              "gave none; check data.train, or use select: random")
        with torch.no_grad():
            for w, score in scores.items():
                top = torch.topk(score.flatten(), w.sparse_indices.numel()).indices.sort().values
                w.sparse_indices.copy_(top)
                w.sparse_values.zero_()
