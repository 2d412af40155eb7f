"""The method seam: every PEFT method is a `Method`, and a run applies a list of them to one frozen base.

A method knows how to attach itself to a model (wrapping modules by composition or inserting new ones), which
parameters it trains (declared, never found by matching parameter names), how they are grouped for the
optimizer, what PEFT's adapter_config.json says about it (where peft has the method), and how to detach. Mixing
methods is applying several in order. `build_methods` maps config blocks to implementations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from qtrain.methods.blocks import METHOD_BLOCKS, Block

if TYPE_CHECKING:  # config validation imports this package and must not pay for torch
    import torch
    from torch import nn


class Method:
    """Base of the PEFT methods. Subclasses set `name`, implement `attach`, and override what differs."""

    name: ClassVar[str]
    peft_type: ClassVar[str | None] = None  # PEFT's name for the method, when peft can load its files
    mergeable: ClassVar[bool] = False
    not_mergeable_reason: ClassVar[str] = ""  # shown by export: why, and what to do instead

    def __init__(self, block: Block):
        self.block = block

    def attach(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Modify `model` in place; return the new trainable parameters by their full names in `model`."""
        raise AssertionError(f"{type(self).__name__} must implement attach")

    def param_groups(self, params: dict[str, nn.Parameter], lr: float) -> list[dict[str, Any]]:
        """Optimizer groups for this method's parameters (one group by default)."""
        return [{"params": list(params.values()), "lr": lr}]

    def adapter_config(self, base_model: str) -> dict[str, Any] | None:
        """The PEFT adapter_config.json for this method, or None if peft has no equivalent."""
        return None

    def merged_tensor(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """Merge into one dense base tensor (checkpoint name `key`, e.g. `model.layers.0.mlp.up_proj.weight`).

        Export streams the base checkpoint tensor by tensor through this (after dequantizing it exactly as
        training saw it); a method returns the tensor unchanged where it has nothing to add. Merging needs
        only the method's own trained state, so export never builds the whole dense model.
        """
        return tensor

    def added_tensors(self) -> dict[str, torch.Tensor]:
        """Dense tensors the merged model gains that the base checkpoint lacks (e.g. new biases)."""
        return {}

    def detach(self, model: nn.Module) -> None:
        """Undo `attach`: the base modules are put back unchanged."""
        raise AssertionError(f"{type(self).__name__} must implement detach")


def build_methods(blocks: list[Block]) -> list[Method]:
    from qtrain.methods.lora import LoRA

    registry: dict[str, type[Method]] = {"lora": LoRA}
    assert set(registry) == set(METHOD_BLOCKS), "every config block needs an implementation"
    return [registry[block.method](block) for block in blocks]
