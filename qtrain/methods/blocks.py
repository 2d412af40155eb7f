"""The config blocks of the PEFT methods, one class per `method:` name.

They live apart from the implementations so that validating a config (and planning memory) never imports
torch. Each implementation module imports its block from here; `METHOD_BLOCKS` is what the config schema's
discriminated union is built from, so adding a method is: a block here, an implementation, a registry entry.
`Section`, the base of every config class, lives here too, as `qtrain.config` imports this module.
"""

from __future__ import annotations

import math
import re
import types
import typing
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from qtrain.arch import Arch, matches, pattern_key
from qtrain.errors import QTrainError

Fraction = Annotated[float, Field(ge=0, lt=1)]


class Section(BaseModel):
    """Base of every config section (`qtrain.config`) and peft block: unknown keys are errors, values are checked
    on assignment too, and a boolean is refused where the field's type does not take one (pydantic alone would
    read `max_steps: yes` as 1)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_stray_booleans(cls, v: Any, info: ValidationInfo) -> Any:
        stray = _stray_bool(cls.model_fields[info.field_name].annotation, v)
        if stray:
            expected, found = stray
            raise ValueError(f"expected {expected}, got the boolean {str(found).lower()} (YAML reads yes/no and "
                             "on/off as booleans too)")
        return v


def _bare(ann: Any) -> Any:
    while typing.get_origin(ann) is Annotated:
        ann = typing.get_args(ann)[0]
    return ann


def union_members(ann: Any) -> tuple[Any, ...]:
    """The types a field annotation admits besides None, without their `Annotated` constraints."""
    ann = _bare(ann)
    if typing.get_origin(ann) not in (typing.Union, types.UnionType):
        return (ann,)
    return tuple(_bare(m) for m in typing.get_args(ann) if m is not type(None))


def _stray_bool(ann: Any, v: Any) -> tuple[str, bool] | None:
    """A boolean in `v` (itself, or an item of a list or mapping) where type `ann` takes none: (what the type
    takes there, that boolean); None when there is none."""
    members = union_members(ann)
    if isinstance(v, bool):
        takes = [m for m in members if m in (bool, Any) or
                 typing.get_origin(m) is Literal and any(isinstance(a, bool) for a in typing.get_args(m))]
        return None if takes else (_kind(members), v)
    for m in members:
        origin, args = typing.get_origin(m), typing.get_args(m)
        if isinstance(v, (list, tuple)) and origin in (list, tuple):
            items = zip(args if origin is tuple and ... not in args else [args[0]] * len(v), v)
        elif isinstance(v, dict) and origin is dict:
            items = ((args[1], x) for x in v.values())
        else:
            continue
        return next(filter(None, (_stray_bool(t, x) for t, x in items)), None)
    return None


def _kind(members: tuple[Any, ...]) -> str:
    """What a value of one of these types is, in words: `an integer or 'auto'`."""
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", tuple: "a list", dict: "a mapping"}
    kinds = []
    for m in members:
        if typing.get_origin(m) is Literal:
            kinds += map(repr, typing.get_args(m))
        else:
            kinds.append(names.get(typing.get_origin(m) or m, "a mapping"))  # else: a section
    *rest, last = dict.fromkeys(kinds)
    return f"{', '.join(rest)} or {last}" if rest else last


def check_regex(text: str, what: str, fix: str) -> None:
    """Raise a ValueError naming `what` when `text` is not a valid regex, with `fix` as the way out."""
    try:
        re.compile(text)
    except re.error as e:
        raise ValueError(f"{what} {text!r} is not a valid regex ({e}); {fix}") from None


def _check_targets(v: list[str] | str) -> list[str] | str:
    if isinstance(v, list) and not v:
        raise ValueError("is an empty list; name modules (e.g. [q_proj, v_proj]) or use 'all-linear'")
    if isinstance(v, str) and not v.strip():
        raise ValueError("is empty; name modules (e.g. [q_proj, v_proj]), a regex, or 'all-linear'")
    if isinstance(v, str) and v != "all-linear":  # a list holds plain names, matched as such (peft's rule)
        check_regex(v, "the string", "a string is a regex matched against full module names: fix it, or list "
                    "module names (e.g. [q_proj, v_proj])")
    return v


Targets = Annotated[list[str] | str, AfterValidator(_check_targets)]


def _check_feedforward(v: list[str] | str) -> list[str] | str:
    """IA3's feedforward modules: as targets, but [] (none of the targets) is a choice of its own."""
    return v if v == [] else _check_targets(v)
"""Module names (matched against the last name components, e.g. `q_proj`), a regex over the full module name
(a string that is not a plain name), or `all-linear` (every linear layer but the output head)."""


def targeted(arch: Arch, targets: list[str] | str) -> dict[str, tuple[int, int]]:
    """The linears of `arch` that `targets` selects (same rule as `qtrain.surgery.select_linears`)."""
    return {n: s for n, s in arch.linears().items() if targets == "all-linear" or matches(n, targets)}


class Block(Section):
    rewrites_inputs: ClassVar[bool] = False
    """Whether the method changes every input row (virtual tokens, a key/value prefix): no `data.packing`."""
    keeps_linear_inputs: ClassVar[bool] = True
    """For memory planning: whether training it keeps the inputs of the base's linear layers for backward (a frozen
    quantized linear keeps none of its own, nor does prefix tuning: measured against autograd's saved tensors)."""

    def trainable_parameters(self, arch: Arch) -> int:
        """The closed-form count of parameters this method trains on a model of shape `arch`."""
        raise AssertionError(f"{type(self).__name__} must implement trainable_parameters")

    def full_precision_linears(self, arch: Arch) -> set[str]:
        """Linear layers (full names) this method needs loaded unquantized (e.g. blocks it trains fully)."""
        return set()

    def extra_tokens(self) -> int:
        """Positions this method adds to every sequence (virtual tokens), for memory planning."""
        return 0

    def extra_keys(self) -> int:
        """Key/value positions this method adds to every layer's attention but not to the sequence (prefix
        tuning's prefix), for memory planning."""
        return 0


class LoRABlock(Block):
    """`method: lora`: a trainable low-rank update beside each targeted linear (plain, 4-bit or 8-bit).

    Options: `r`, `alpha` (scale alpha/r), `dropout` (on the LoRA input), `target_modules`; and the variants
    - `rslora: true`: scale alpha/sqrt(r) (rank-stabilised LoRA).
    - `dora: true`: DoRA; a trainable magnitude per output row rescales the direction W + s·B·A, whose row
      norm is treated as a constant in backward (the DoRA paper, section 4.3, and peft). Each forward
      dequantizes the base weight to take that norm, so on 4/8-bit bases it costs more than plain LoRA.
    - `rank_pattern` / `alpha_pattern`: per-module r / alpha, as peft reads them: a key K applies to the
      modules whose full name matches the regex `(.*\\.)?K$` (so a suffix like `v_proj` or a regex like
      `layers\\.1\\..*_proj`); the first matching key wins.
    - `lr_ratio_b`: LoRA+; B's learning rate is `training.learning_rate` × this (the paper suggests ~16). As in
      peft's LoRA+ optimizer, DoRA magnitudes (1-D) are grouped with B.
    """

    method: Literal["lora"]
    r: Annotated[int, Field(gt=0)] = 16
    alpha: Annotated[float, Field(gt=0)] = 32.0
    dropout: Fraction = 0.05
    target_modules: Targets = "all-linear"
    rslora: bool = False
    """Scale the update by alpha/sqrt(r) instead of alpha/r (rank-stabilised LoRA)."""
    dora: bool = False
    rank_pattern: dict[str, Annotated[int, Field(gt=0)]] = Field(default_factory=dict)
    alpha_pattern: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    lr_ratio_b: Annotated[float, Field(gt=0)] | None = None

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _keys_are_regexes(cls, v: dict[str, float]) -> dict[str, float]:
        for key in v:
            check_regex(key, "key", "use a module name suffix like 'v_proj' or a regex over the module name")
        return v

    def rank_for(self, module: str) -> int:
        key = pattern_key(self.rank_pattern, module)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, module: str) -> float:
        key = pattern_key(self.alpha_pattern, module)
        return self.alpha if key is None else self.alpha_pattern[key]

    def trainable_parameters(self, arch: Arch) -> int:
        # A: (r, in), B: (out, r), DoRA's magnitude: (out,)
        return sum(self.rank_for(name) * (i + o) + (o if self.dora else 0)
                   for name, (i, o) in targeted(arch, self.target_modules).items())


class IA3Block(Block):
    """`method: ia3`: learned scaling vectors, initialised to ones (peft's IA3, same file layout).

    Options: `target_modules` (default k_proj, v_proj, down_proj); `feedforward_modules`, a subset of the
    targets whose *input* is scaled (the MLP's intermediate activation, one value per input feature; default,
    null: down_proj where it is targeted; [] for none); the other targets have their *output* scaled (keys and
    values, one value per output feature).
    """

    method: Literal["ia3"]
    target_modules: Targets = Field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    # None, not DEFAULT_FEEDFORWARD: the default's rule (only where targeted) must survive a saved adapter's reload
    feedforward_modules: Annotated[list[str] | str, AfterValidator(_check_feedforward)] | None = None
    DEFAULT_FEEDFORWARD: ClassVar[list[str]] = ["down_proj"]

    def is_feedforward(self, name: str) -> bool:
        """Whether targeted linear `name` has its input scaled (else its output)."""
        return matches(name, self.DEFAULT_FEEDFORWARD if self.feedforward_modules is None else self.feedforward_modules)

    def trainable_parameters(self, arch: Arch) -> int:
        return sum(i if self.is_feedforward(name) else o
                   for name, (i, o) in targeted(arch, self.target_modules).items())


class BitFitBlock(Block):
    """`method: bitfit`: train bias terms only, one full-precision (fp32) vector per targeted linear.

    Option: `target_modules` (default `all-linear`). A linear without a bias (the Llama family) gains one,
    initialised to zero; a linear with a bias (e.g. Qwen2's q/k/v) keeps its frozen bias and the trained vector
    is added to it, so the effective bias is trained in full precision while the (possibly 16-bit) original
    stays untouched. Weight decay therefore pulls towards the pretrained bias, not towards zero.
    """

    method: Literal["bitfit"]
    target_modules: Targets = "all-linear"

    def trainable_parameters(self, arch: Arch) -> int:
        return sum(o for _, o in targeted(arch, self.target_modules).values())


def sparse_size(numel: int, density: float) -> int:
    """Entries a sparse delta of `density` keeps in a matrix of `numel` entries (at least one)."""
    return max(1, min(numel, math.ceil(density * numel)))


class SparseBlock(Block):
    """`method: sparse`: a trainable sparse delta over each targeted weight matrix, on a fixed mask.

    Options: `target_modules` (default `all-linear`); `density` (fraction of each matrix's entries trained,
    default 0.01); `select`: `gradient` (default) keeps the entries with the largest summed squared gradient
    over `calibration_batches` training batches before training (the empirical Fisher, as in FISH masks),
    `random` draws them uniformly (seeded by `training.seed`). The mask is stored as flat indices next to the
    trained values, and the delta is added on top of the frozen (quantized) weight's output. Gradient
    selection briefly holds two float32 copies of every targeted matrix.
    """

    method: Literal["sparse"]
    target_modules: Targets = "all-linear"
    density: Annotated[float, Field(gt=0, le=1)] = 0.01
    select: Literal["gradient", "random"] = "gradient"
    calibration_batches: Annotated[int, Field(gt=0)] = 8

    def trainable_parameters(self, arch: Arch) -> int:
        return sum(sparse_size(i * o, self.density) for i, o in targeted(arch, self.target_modules).values())


class AdapterBlock(Block):
    """`method: adapter`: bottleneck adapters h + up(act(down(h))) inserted around each decoder layer's blocks.

    Options: `placement`: `houlsby` (serial, after the attention block and after the MLP), `pfeiffer` (serial,
    after the MLP only) or `parallel` (beside the block named by `parallel_to`, reading its input, scaled by
    `scaling`); the bottleneck width is `bottleneck_size`, or hidden_size // `reduction_factor` (default 16);
    `activation`. The up-projection starts at zero, so the model equals the base at step 0. Adapters cannot be
    merged into the weights (they are nonlinear): serve with the adapter attached.
    """

    method: Literal["adapter"]
    placement: Literal["houlsby", "pfeiffer", "parallel"] = "houlsby"
    reduction_factor: Annotated[int, Field(gt=0)] | None = None
    bottleneck_size: Annotated[int, Field(gt=0)] | None = None
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    parallel_to: Literal["mlp", "attention"] | None = None
    """For `placement: parallel`: the block the adapter sits beside (default `mlp`)."""
    scaling: Annotated[float, Field(gt=0)] | None = None
    """For `placement: parallel`: the factor on the adapter's output (default 1)."""

    @model_validator(mode="after")
    def _one_size(self) -> "AdapterBlock":
        if self.reduction_factor is not None and self.bottleneck_size is not None:
            raise ValueError("give either reduction_factor or bottleneck_size, not both")
        if self.placement != "parallel" and (self.parallel_to is not None or self.scaling is not None):
            raise ValueError(f"parallel_to and scaling apply to placement: parallel, not {self.placement!r}; "
                             "remove them or set placement: parallel")
        return self

    def width(self, hidden: int) -> int:
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return max(1, hidden // (self.reduction_factor or 16))

    def sites(self) -> list[str]:
        """The decoder-layer blocks (`self_attn`, `mlp`) an adapter is inserted at."""
        if self.placement == "houlsby":
            return ["self_attn", "mlp"]
        if self.placement == "pfeiffer":
            return ["mlp"]
        return ["self_attn" if self.parallel_to == "attention" else "mlp"]

    def parallel_scaling(self) -> float:
        return 1.0 if self.scaling is None else self.scaling

    def trainable_parameters(self, arch: Arch) -> int:
        h, b = arch.hidden, self.width(arch.hidden)
        return arch.layers * len(self.sites()) * (h * b + b + b * h + h)  # down (b, h) + bias, up (h, b) + bias


class PromptTuningBlock(Block):
    """`method: prompt_tuning`: `num_virtual_tokens` trainable embeddings prepended to every input.

    Initialised from the embeddings of `init_text` (tokenized, repeated or cut to fit) or, without it, of
    randomly drawn vocabulary tokens. Saved in peft's PROMPT_TUNING layout. Not mergeable.
    """

    method: Literal["prompt_tuning"]
    rewrites_inputs: ClassVar[bool] = True
    num_virtual_tokens: Annotated[int, Field(gt=0)] = 20
    init_text: str | None = None

    @field_validator("init_text")
    @classmethod
    def _text_not_empty(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("is empty; give a text describing the task, or remove it for random vocabulary init")
        return v

    def trainable_parameters(self, arch: Arch) -> int:
        return self.num_virtual_tokens * arch.hidden

    def extra_tokens(self) -> int:
        return self.num_virtual_tokens


class PrefixTuningBlock(Block):
    """`method: prefix_tuning`: trainable keys and values for `num_virtual_tokens` positions in every layer.

    The prefixes start as the keys and values the base computes for `init_text` (tokenized, repeated or cut to
    N) or, without it, for N random vocabulary tokens, so step 0 reads like a real context. With `projection:
    true` they are instead produced by a randomly initialised MLP (embedding → `projection_hidden_size` → tanh →
    every layer's keys and values), as in peft; only its output is needed to serve. Saved in peft's
    PREFIX_TUNING layout. Not mergeable.
    """

    method: Literal["prefix_tuning"]
    rewrites_inputs: ClassVar[bool] = True
    keeps_linear_inputs: ClassVar[bool] = False
    num_virtual_tokens: Annotated[int, Field(gt=0)] = 20
    init_text: str | None = None
    projection: bool = False
    projection_hidden_size: Annotated[int, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _hidden_needs_projection(self) -> "PrefixTuningBlock":
        if self.projection_hidden_size is not None and not self.projection:
            raise ValueError("projection_hidden_size needs projection: true")
        if self.init_text is not None and (self.projection or not self.init_text.strip()):
            raise ValueError("init_text must be a non-empty text, and applies without projection only")
        return self

    def extra_keys(self) -> int:
        return self.num_virtual_tokens

    def trainable_parameters(self, arch: Arch) -> int:
        n, d = self.num_virtual_tokens, arch.kv_heads * arch.head_dim  # d: one layer's key (or value) width
        out = arch.layers * 2 * d
        if not self.projection:
            return n * out
        e = self.projection_hidden_size or d
        return n * d + (d * e + e) + (e * out + out)  # embedding, Linear(d, e), Linear(e, out)


class UnfreezeBlock(Block):
    """`method: unfreeze`: chosen decoder layers are loaded unquantized and trained fully (fp32 master weights).

    Choose them by `layers` (indices, negative counts from the end), `last_n`, or `pattern`, a regex matched
    in full against module names inside the decoder layers (e.g. `model\\.layers\\.3` for a whole layer,
    `model\\.layers\\.\\d+\\.mlp` for every MLP). Every other weight stays quantized and frozen. Mergeable: the
    trained tensors replace the base's.
    """

    method: Literal["unfreeze"]
    layers: list[int] | None = None
    last_n: Annotated[int, Field(gt=0)] | None = None
    pattern: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "UnfreezeBlock":
        given = [k for k in ("layers", "last_n", "pattern") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of layers, last_n or pattern (got {given or 'none'})")
        if self.layers is not None and not self.layers:
            raise ValueError("layers is empty; list decoder layer indices, e.g. [-1]")
        if self.pattern is not None:
            check_regex(self.pattern, "pattern", r"fix it (it is matched in full against module names, e.g. "
                        r"model\.layers\.3)")
        return self

    def parameters_of(self, arch: Arch) -> dict[str, int]:
        """Full parameter name → size of every parameter this block trains on a model of shape `arch`."""
        n = arch.layers
        if self.pattern is not None:
            chosen = {name: size for name, size in arch.block_parameters().items()
                      if any(re.fullmatch(self.pattern, prefix) for prefix in _module_prefixes(name))}
            if not chosen:
                raise QTrainError(f"peft.unfreeze.pattern: {self.pattern!r} matches no module inside the decoder "
                                  f"layers (named like model.layers.0.mlp.up_proj); fix the regex")
            return chosen
        if self.last_n is not None:
            if self.last_n > n:
                raise QTrainError(f"peft.unfreeze.last_n: {self.last_n} exceeds the model's {n} layers")
            indices = set(range(n - self.last_n, n))
        else:
            bad = [i for i in self.layers if not -n <= i < n]
            if bad:
                raise QTrainError(f"peft.unfreeze.layers: {bad} out of range for a model with {n} layers "
                                  f"(use 0..{n - 1}, or negative indices from the end)")
            indices = {i % n for i in self.layers}
        return {name: size for name, size in arch.block_parameters().items()
                if int(name.split(".")[2]) in indices}

    def trainable_parameters(self, arch: Arch) -> int:
        return sum(self.parameters_of(arch).values())

    def full_precision_linears(self, arch: Arch) -> set[str]:
        return {name.rpartition(".")[0] for name in self.parameters_of(arch)} & set(arch.linears())


def check_unfreeze_overlap(blocks: list[Block] | tuple[Block, ...], arch: Arch) -> None:
    """Two unfreeze blocks that choose one parameter: the second would train nothing there (the first owns it)
    and the planner would count it twice; refused, as two blocks of another method on one module are."""
    owner: dict[str, int] = {}
    for i, b in enumerate(blocks):
        if isinstance(b, UnfreezeBlock):
            for name in b.parameters_of(arch):
                if name in owner:
                    raise QTrainError(f"peft.{i}: unfreeze chooses {name}, which the unfreeze block peft.{owner[name]} "
                                      "chooses too; choose each layer in one block (e.g. layers: [1, -1])")
                owner[name] = i


def _module_prefixes(param_name: str) -> list[str]:
    """`model.layers.0.mlp.up_proj.weight` → its owning modules, innermost last, from `model.layers.0` down."""
    parts = param_name.split(".")[:-1]
    return [".".join(parts[:k]) for k in range(3, len(parts) + 1)]


METHOD_BLOCKS: dict[str, type[Block]] = {
    "lora": LoRABlock,
    "ia3": IA3Block,
    "bitfit": BitFitBlock,
    "sparse": SparseBlock,
    "adapter": AdapterBlock,
    "prompt_tuning": PromptTuningBlock,
    "prefix_tuning": PrefixTuningBlock,
    "unfreeze": UnfreezeBlock,
}
