"""The method seam: every PEFT method is a `Method`, and a run applies a list of them to one frozen base.

A method knows how to attach itself to a model (wrapping modules by composition or inserting new ones), which
parameters it trains (declared, never found by matching parameter names), how they are grouped for the
optimizer, what PEFT's adapter_config.json says about it (where peft has the method), and how to detach. Mixing
methods is applying several in order. `build_methods` maps config blocks to implementations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator

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

    def calibrate(self, model: nn.Module, batches: Iterator[dict[str, torch.Tensor]],
                  loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]) -> None:
        """After every method is attached and before training: look at a few training batches (`loss_fn(model,
        batch)` is the mean token loss) to initialise data-dependent state, e.g. a sparse mask. No-op here."""

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

    def to_file(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename/derive the tensors written to adapter_model.safetensors (default: `base_model.model.` + each
        parameter's name), where peft's file layout differs; `from_file` is the inverse."""
        return tensors

    def from_file(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return tensors

    def describe(self) -> str:
        """A line for the run log about what `attach` did beyond adding parameters (empty: nothing to say)."""
        return ""


def prepare_inputs(model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """The keyword inputs of one decoder forward or `generate` call (`input_ids`, `attention_mask`, and `labels`
    when training), as the methods attached to `model` need them; unchanged when none changes the inputs.

    Methods that add positions (prompt tuning's virtual tokens) or state (prefix tuning's key/value prefix)
    insert a module into the model that defines `rewrite_inputs(inputs) -> inputs`. Finding those in the model,
    rather than in a list of methods, means whoever holds the model (training, evaluation, generation, a
    loaded adapter) sees the same sequence, and the model itself stays a plain transformers model. The search
    runs every step, so it does not enter module lists (the decoder layers: ~97 % of a model's modules, and no
    method puts a rewriting module there); otherwise it visits modules in `model.modules()`'s order.
    """
    for rewrite in _input_rewriters(model, set()):
        inputs = rewrite(inputs)
    return inputs


def _input_rewriters(module: nn.Module, seen: set[int]) -> Iterator[Callable[[dict[str, Any]], dict[str, Any]]]:
    from torch.nn import ModuleList

    if id(module) in seen:
        return
    seen.add(id(module))
    rewrite = getattr(module, "rewrite_inputs", None)
    if rewrite is not None:
        yield rewrite
    for child in module._modules.values():
        if child is not None and not isinstance(child, ModuleList):
            yield from _input_rewriters(child, seen)


def build_methods(blocks: list[Block]) -> list[Method]:
    from qtrain.methods.bitfit import BitFit
    from qtrain.methods.ia3 import IA3
    from qtrain.methods.lora import LoRA
    from qtrain.methods.sparse import Sparse
    from qtrain.methods.adapters import Adapter
    from qtrain.methods.prompt import PrefixTuning, PromptTuning
    from qtrain.methods.unfreeze import Unfreeze

    registry: dict[str, type[Method]] = {"lora": LoRA, "ia3": IA3, "bitfit": BitFit, "sparse": Sparse,
                                         "adapter": Adapter, "prompt_tuning": PromptTuning,
                                         "prefix_tuning": PrefixTuning, "unfreeze": Unfreeze}
    assert set(registry) == set(METHOD_BLOCKS), "every config block needs an implementation"
    return [registry[block.method](block) for block in blocks]
