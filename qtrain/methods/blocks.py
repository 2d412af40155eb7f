"""The config blocks of the PEFT methods, one class per `method:` name.

They live apart from the implementations so that validating a config (and planning memory) never imports
torch. Each implementation module imports its block from here; `METHOD_BLOCKS` is what the config schema's
discriminated union is built from, so adding a method is: a block here, an implementation, a registry entry.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from qtrain.arch import Arch, matches

Fraction = Annotated[float, Field(ge=0, lt=1)]


class Block(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def trainable_parameters(self, arch: Arch) -> int:
        """The closed-form count of parameters this method trains on a model of shape `arch`."""
        raise AssertionError(f"{type(self).__name__} must implement trainable_parameters")

    def full_precision_linears(self, arch: Arch) -> set[str]:
        """Linear layers (full names) this method needs loaded unquantized (e.g. blocks it trains fully)."""
        return set()

    def extra_tokens(self) -> int:
        """Positions this method adds to every sequence (virtual tokens), for memory planning."""
        return 0


class LoRABlock(Block):
    method: Literal["lora"]
    r: Annotated[int, Field(gt=0)] = 16
    alpha: Annotated[float, Field(gt=0)] = 32.0
    dropout: Fraction = 0.05
    target_modules: list[str] | str = "all-linear"
    """Module names (matched against the last name component, e.g. `q_proj`), a regex over the full module
    name (a string that is not a plain name), or `all-linear` (every linear layer but the output head)."""
    rslora: bool = False
    """Scale the update by alpha/sqrt(r) instead of alpha/r (rank-stabilised LoRA)."""

    @field_validator("target_modules")
    @classmethod
    def _not_empty(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, list) and not v:
            raise ValueError("is an empty list; name modules (e.g. [q_proj, v_proj]) or use 'all-linear'")
        if isinstance(v, str) and not v.strip():
            raise ValueError("is empty; name modules (e.g. [q_proj, v_proj]), a regex, or 'all-linear'")
        return v

    def trainable_parameters(self, arch: Arch) -> int:
        return sum(self.r * (i + o) for name, (i, o) in arch.linears().items()
                   if self.target_modules == "all-linear" or matches(name, self.target_modules))


METHOD_BLOCKS: dict[str, type[Block]] = {
    "lora": LoRABlock,
}
