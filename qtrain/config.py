"""The run configuration: a typed, strict, nested schema, validated before anything is loaded.

One pydantic model per YAML section; every default lives here and nowhere else. Unknown keys are errors with
a "did you mean" suggestion, and every problem is reported at once with its dotted path. CLI overrides
(`--set training.learning_rate=1e-4`) are applied to the raw mapping and go through the same validator, so
an override can never bypass a check (and a problem it caused names it). PEFT methods are a list of blocks
told apart by their `method:` key (a pydantic discriminated union); each method's block is declared next to
its implementation in `qtrain.methods` and collected here.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from qtrain.errors import ConfigError, QTrainError
from qtrain.methods.blocks import METHOD_BLOCKS, Section, union_members

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]


class ModelSection(Section):
    path: str = "smollm2-135m-instruct"
    """A local Hugging Face folder, a hub id, or an alias (`smollm2-135m-instruct`, shipped offline)."""
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    embeddings_on_host: bool | Literal["auto"] = "auto"
    """Keep the frozen input embedding table in host memory; only the looked-up rows go to the GPU.
    `auto`: on for `qtrain run` on a GPU when the table is large or the run would not fit otherwise, untied
    models only; off on CPU (the table is in host memory already) and in `qtrain generate`/`eval`/`export`."""


class QuantizationSection(Section):
    bits: Literal[4, 8, "none"] = 4
    type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """`auto`: bfloat16 on a GPU that supports it, else float16 on GPU, float32 on CPU (bf16 is slower there)."""
    blocksize: Literal[32, 64, 128, 256] = 64
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"
    """The dtype packed 4-bit values are stored in. FSDP needs one float dtype for all parameters it shards
    (FSDP-QLoRA): set it to the compute dtype there. The bytes and the numerics are the same either way."""
    skip_modules: list[str] = Field(default_factory=lambda: ["lm_head"])
    """Linear layers (by name suffix) that stay in full precision."""

    @model_validator(mode="before")
    @classmethod
    def _none_means_unquantized(cls, data: Any) -> Any:
        # YAML `bits: none` parses as the string; `bits: null` / `~` as None: accept both.
        if isinstance(data, dict) and "bits" in data and data["bits"] is None:
            data = {**data, "bits": "none"}
        return data


class InstructionFields(Section):
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    messages: str = "messages"
    text: str = "text"


class DataSection(Section):
    train: str
    """A JSONL/JSON/CSV/Parquet file or a `datasets.save_to_disk` folder."""
    eval: str | None = None
    format: Literal["instruction", "chat", "text"] = "instruction"
    fields: InstructionFields = Field(default_factory=InstructionFields)
    prompt_template: Literal["auto", "chat_template", "alpaca"] = "auto"
    """How `instruction` rows become text: the tokenizer's chat template when it has one (`auto`), or Alpaca."""
    system_prompt: str | None = None
    """A system message for every instruction row and every conversation that has none of its own (None keeps
    the chat template's default); with the Alpaca template it replaces Alpaca's opening sentence."""
    max_seq_len: PositiveInt = 512
    train_on_prompt: bool = False
    """Compute the loss on the prompt too (default: responses only, end-of-turn token included)."""
    eval_fraction: Annotated[float, Field(ge=0, lt=0.5)] = 0.0
    """Without `data.eval`: hold out this fraction of `data.train` (seeded) for eval loss and perplexity."""
    packing: bool = False
    """Pack short training examples into rows of up to `max_seq_len` tokens (no example attends to another;
    positions restart per example), so less compute goes to padding; `micro_batch_size` then counts rows."""

    @model_validator(mode="after")
    def _templates_that_apply(self) -> "DataSection":
        if self.format == "text" and self.system_prompt is not None:
            raise ValueError("data.system_prompt: a text row is trained on as it stands, with no prompt to put a "
                             "system message in; remove system_prompt, or give the rows as format: instruction or "
                             "chat")
        if self.format != "instruction" and self.prompt_template != "auto":
            raise ValueError(f"data.prompt_template: {self.prompt_template!r} chooses how instruction rows are "
                             f"written, and data.format is {self.format!r} "
                             + ("(a conversation always goes through the chat template)" if self.format == "chat"
                                else "(a text row is trained on as it stands)") + "; remove prompt_template")
        return self


class EvalSection(Section):
    exact_match: bool = True
    """Generate greedily for each `data.eval` prompt and compare with the reference answer."""
    max_examples: PositiveInt = 100
    max_new_tokens: PositiveInt = 32
    before_training: bool = True
    """Also score the base model, so the report shows what training changed."""
    during_training: NonNegInt = 8
    """At each `training.eval_every`: exact match on this many eval prompts, with sample generations logged."""


class TrainingSection(Section):
    micro_batch_size: PositiveInt | Literal["auto"] = 4
    """Examples per forward pass; `auto`: the largest that the planner predicts fits `memory_budget` (or the
    device's memory), decided by `qtrain run` before the model is loaded."""
    gradient_accumulation_steps: PositiveInt = 1
    effective_batch_size: PositiveInt | None = None
    """Examples per optimizer step, over all processes. With `micro_batch_size: auto` the micro-batch is the
    largest that fits and divides each process's share, and the accumulation makes up the rest; otherwise it must
    equal micro-batch × accumulation × processes (`qtrain run` checks it, knowing the processes)."""
    memory_budget: int | str | None = None
    """Memory the run may use, e.g. "24GB", "11.5GiB" or bytes: `qtrain run` warns when the planner predicts more."""
    max_steps: PositiveInt | None = None
    epochs: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    learning_rate: Annotated[float, Field(gt=0, lt=1)] = 2e-4
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: NonNegInt = 0
    weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    max_grad_norm: Annotated[float, Field(gt=0)] | None = 1.0
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = "adamw"
    adam_betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    adam_eps: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1e-8
    gradient_checkpointing: bool | Literal["auto"] = True
    """Recompute each layer's activations in backward instead of keeping them (less memory, ~20-30 % slower);
    `auto`: off when the planner predicts the run fits `memory_budget` (or the device's memory) without it with
    10 % to spare, decided by `qtrain run` before the model is loaded, after `micro_batch_size: auto` (sized with
    it on)."""
    activation_offload: bool | Literal["auto"] = "auto"
    """With gradient checkpointing: each decoder block's saved input waits in pinned host memory, prefetched one
    block ahead in backward (bit-identical gradients). `auto`: on when, on a GPU, the planner predicts the run
    does not fit `memory_budget` (or the device's memory) without it; off on CPU."""
    mlp_chunk_tokens: PositiveInt | Literal["auto"] | None = "auto"
    """Run each block's MLP (forward, recompute, backward) over this many tokens at a time, so its working set
    is a chunk, not the sequence (the same gradients up to float reassociation). null: never; `auto`: 4096 when
    the planner predicts the run does not fit without it, else off."""
    fused_ops: bool | Literal["auto"] = "auto"
    """RMSNorm and the MLP's silu(gate)·up through qtrain's fused functions (`qtrain.fused`): they keep only
    their 16-bit inputs for backward (the norms' fp32 copies and silu's output are rebuilt), with one Triton
    kernel each way on a CUDA GPU when Triton is installed. Same gradients: bit for bit without Triton in
    16-bit compute, to float rounding otherwise. `auto`: on on a CUDA GPU; on CPU, on only when the planner
    predicts the run does not fit without it."""
    compile: bool | Literal["auto"] = "auto"
    """Each decoder block's training forward and backward through torch.compile (`qtrain.compiled`): fused
    kernels and one call per block instead of hundreds of small operators, which is what a short step waits on.
    The first step compiles (seconds to a minute). Same gradients to float rounding (tested); dropout masks come
    from the compiler's generator. Not with the tiled MLP or `fused_ops: true` (the compiler fuses the norm and
    silu·up itself). `auto`: on on a CUDA GPU unless the tiled MLP is needed or the model is sharded (FSDP); off
    on CPU. A tiny function is compiled first: where that fails, `auto` stays off and says why, `true` is
    refused."""
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 42  # what numpy's generator takes
    log_every: PositiveInt = 1
    eval_every: PositiveInt | None = None
    """Every N optimizer steps: eval loss/perplexity on the eval data (and exact match, see eval.during_training)."""
    loss_chunk_size: PositiveInt | Literal["auto"] = "auto"
    """Target tokens per chunk of the output projection + cross-entropy (never the full logits at once). `auto`:
    128 on CPU (half the logits memory of 256 at the same speed on SmolLM2's vocabulary; 64 was 10-20 % slower);
    on a GPU the largest power of two up to 2048 whose fp32 logits take at most 256 MiB (512 tokens for a
    128k vocabulary, 1024 for SmolLM2's 49k): fewer, larger GEMMs and ~12 kernels fewer per chunk saved. Back
    to 128 when the run would not fit otherwise (`qtrain.savers`)."""
    save_every: PositiveInt | None = 100
    """Write a checkpoint every this many optimizer steps (null: only at the end and on SIGINT/SIGTERM)."""
    keep_last: PositiveInt | None = 2
    """How many checkpoints to keep under output.dir/checkpoints (null: all)."""
    max_bad_steps: PositiveInt = 10
    """Stop after this many optimizer steps in a row with a non-finite loss or gradient (each one is skipped)."""

    @model_validator(mode="after")
    def _eval_on_logged_steps(self) -> "TrainingSection":
        if self.eval_every is not None and self.eval_every % self.log_every:
            raise ValueError(f"training.eval_every ({self.eval_every}) must be a multiple of training.log_every "
                             f"({self.log_every}); evaluation runs on logged steps")
        return self

    @field_validator("memory_budget")
    @classmethod
    def _memory_size(cls, v: str | int | None) -> str | int | None:
        from qtrain.gpus import parse_bytes

        try:
            v is None or parse_bytes(v, "training.memory_budget")
        except QTrainError as e:
            raise ValueError(str(e).removeprefix("training.memory_budget: ")) from None
        return v

    @model_validator(mode="after")
    def _batch_sizes(self) -> "TrainingSection":
        e, m = self.effective_batch_size, self.micro_batch_size
        if e is not None and m != "auto" and e % (m * self.gradient_accumulation_steps):  # × processes: at run
            raise ValueError(f"training.effective_batch_size ({e}) must equal micro_batch_size ({m}) × "
                             f"gradient_accumulation_steps ({self.gradient_accumulation_steps}) × processes; or "
                             "set micro_batch_size: auto to have the accumulation derived")
        return self

    @model_validator(mode="after")
    def _offload_needs_checkpoints(self) -> "TrainingSection":
        if self.activation_offload is True and self.gradient_checkpointing is False:
            raise ValueError("training.activation_offload: true offloads the inputs gradient checkpointing keeps; "
                             "set training.gradient_checkpointing: true (or auto), or activation_offload: auto")
        return self

    @model_validator(mode="after")
    def _compile_alone(self) -> "TrainingSection":
        if self.compile is not True:
            return self
        if self.fused_ops is True:
            raise ValueError("training.compile: true and training.fused_ops: true both fuse RMSNorm and silu·up, "
                             "and a block holding the fused functions cannot be compiled; set fused_ops: auto "
                             "(off under compile) or false, or compile: false")
        if isinstance(self.mlp_chunk_tokens, int):
            raise ValueError(f"training.compile: true cannot compile a block whose MLP is tiled "
                             f"(mlp_chunk_tokens: {self.mlp_chunk_tokens}); set mlp_chunk_tokens: auto or null, "
                             "or compile: false for long sequences that need the tiled MLP")
        return self

    @model_validator(mode="after")
    def _one_length(self) -> "TrainingSection":
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError(
                "set either training.max_steps or training.epochs, not both (max_steps counts optimizer steps)"
            )
        return self


class LoggingSection(Section):
    progress: bool = True
    """A progress bar on stderr (step, loss, lr, tokens/s, ETA, memory) when stderr is a terminal; else log lines."""
    tensorboard: bool = False
    """Also write TensorBoard event files to `<output.dir>/tensorboard` (needs `pip install tensorboard`)."""


class OutputSection(Section):
    dir: Annotated[str, Field(min_length=1)] = "runs/qtrain"


def _method_of(block: Any) -> Any:
    """A peft block's `method:`, which picks its class. A function, not `discriminator="method"`: pydantic
    refuses that on a field that a before-validator sees, and `Section` checks every field for booleans."""
    return block.get("method") if isinstance(block, dict) else getattr(block, "method", None)


PeftBlock = Annotated[Union[tuple(Annotated[b, Tag(m)] for m, b in METHOD_BLOCKS.items())],  # type: ignore[valid-type]
                      Discriminator(_method_of)]


class RunConfig(Section):
    model: ModelSection = Field(default_factory=ModelSection)
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    peft: list[PeftBlock] = Field(min_length=1)  # type: ignore[valid-type]
    data: DataSection
    eval: EvalSection = Field(default_factory=EvalSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    output: OutputSection = Field(default_factory=OutputSection)

    @model_validator(mode="after")
    def _packing_needs_plain_inputs(self) -> "RunConfig":
        rewriting = [b.method for b in self.peft if b.rewrites_inputs]
        if self.data.packing and rewriting:
            raise ValueError(
                f"data.packing: true cannot be combined with peft method {rewriting[0]}: it prepends virtual "
                "tokens or a key/value prefix to each input row, and a packed row holds several examples that "
                "would not each get them; set data.packing: false, or use a method that leaves the inputs alone "
                "(e.g. lora)")
        return self

    @model_validator(mode="after")
    def _eval_data_for_eval_every(self) -> "RunConfig":
        if self.training.eval_every is not None and not self.data.eval and not self.data.eval_fraction:
            raise ValueError(f"training.eval_every: {self.training.eval_every} evaluates on data.eval or on the "
                             "examples data.eval_fraction holds out, and neither is set; set one of them, or remove "
                             "eval_every")
        return self

    @model_validator(mode="after")
    def _one_block_of_virtual_tokens(self) -> "RunConfig":
        for method in ("prompt_tuning", "prefix_tuning"):  # one input embedding / one key/value prefix per model
            where = [i for i, b in enumerate(self.peft) if b.method == method]
            if len(where) > 1:
                total = sum(self.peft[i].num_virtual_tokens for i in where)
                raise ValueError(
                    f"peft.{where[1]}.method: a second {method} block (the first is peft.{where[0]}); a model takes "
                    f"one set of virtual positions, so use one {method} block with num_virtual_tokens: {total} "
                    "(their total)")
        kinds = [i for i, b in enumerate(self.peft) if b.method in ("prompt_tuning", "prefix_tuning")]
        if len(kinds) > 1:  # each is peft's one "prompt_embeddings" tensor, and peft loads one of them
            raise ValueError(
                f"peft.{kinds[1]}.method: {self.peft[kinds[1]].method} beside {self.peft[kinds[0]].method} "
                f"(peft.{kinds[0]}); both prepend learned virtual positions, and an adapter holds one set; keep "
                "one of them (prefix_tuning reaches every layer, prompt_tuning only the input)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        """A short hash of the resolved config, stable across key order."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML file, apply `key=value` overrides, validate. Raises ConfigError listing every problem."""
    path = Path(path)
    if path.is_dir():
        inside = path / "config.yaml"  # a run folder holds its resolved config there
        hint = f", e.g. {str(inside)!r}" if inside.is_file() else ""
        raise ConfigError([f"is a directory; pass the YAML file inside it{hint}"], str(path))
    if not path.is_file():
        raise ConfigError(["no such file; pass the path of a YAML config file"], str(path))
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError([f"not valid YAML{where}: {problem}; fix the syntax there"], str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError(["the file is not UTF-8 text; save the config as UTF-8 YAML"], str(path)) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            [f"the top level must be a mapping of sections (model:, peft:, data:, ...), got {type(raw).__name__}"],
            str(path),
        )
    return validate_config(apply_overrides(raw, overrides), source=str(path), overrides=overrides)


def validate_config(raw: dict[str, Any], source: str = "config",
                    overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Validate a raw mapping. `overrides`: the `--set` items already applied to it, so that a problem one of
    them caused says so (and, when all did, is headed `--set` rather than `source`)."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        errors = e.errors()
    by_key: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for err in errors:  # a value that fits no member of a union fails once per member: one problem
        by_key.setdefault(_walk(tuple(err["loc"]))[0], []).append(err)
    problems = [_describe(key, errs) for key, errs in by_key.items()]
    set_by = [_set_by(key, problem, overrides) for key, problem in zip(by_key, problems)]
    problems = [p + (f" (set by --set {item})" if item else "") for p, item in zip(problems, set_by)]
    raise ConfigError(problems, "--set" if all(set_by) else source)


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply `dotted.key=value` strings (values parsed as YAML; list items by index: `peft.0.r=8`)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError([f"override {item!r} is not of the form dotted.key=value (e.g. training.max_steps=50)"],
                              "--set")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        _set_path(raw, key.strip().split("."), value, item)
    return raw


def _set_path(node: Any, parts: list[str], value: Any, item: str) -> None:
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError([f"override {item!r}: {'.'.join(parts[:i]) or 'the list'} has no item {part!r} "
                                   f"(it has {len(node)} items, numbered from 0)"], "--set")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError([f"override {item!r}: {'.'.join(parts[:i])} is a value, not a section"], "--set")


def _dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _walk(loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], Any]:
    """`loc` as the user writes the key, without the tags pydantic adds for the member of a union that failed
    (`peft.0.lora.r` → `peft.0.r`, `training.micro_batch_size.constrained-int` → `training.micro_batch_size`),
    and the type found there (a config class for a section or peft block; None when not known)."""
    shown, ann = [], RunConfig
    for part in loc:
        members = union_members(ann)
        if len(members) > 1:  # peft blocks are told apart by `method:`; the tag of any other union ends the walk
            ann = METHOD_BLOCKS.get(part) if isinstance(part, str) else None
            continue
        shown.append(part)
        origin, args = typing.get_origin(members[0]), typing.get_args(members[0])
        if isinstance(members[0], type) and issubclass(members[0], BaseModel):
            field = members[0].model_fields.get(part)
            ann = field.annotation if field else None
        elif origin in (list, tuple) and isinstance(part, int):
            ann = args[0] if origin is list or ... in args else args[part] if part < len(args) else None
        else:
            ann = args[1] if origin is dict else None
    return tuple(shown), ann


def _set_by(key: tuple[Any, ...], problem: str, overrides: list[str] | tuple[str, ...]) -> str | None:
    """The last `--set` item that set `key` or a section holding it, or a key inside it that `problem` names (a
    check across keys reports at their section)."""
    parts = [str(p) for p in key]
    for item in reversed(overrides):
        target = item.partition("=")[0].strip().split(".")
        if parts[:len(target)] == target or (target[:len(parts)] == parts
                                             and re.search(rf"\b{re.escape(target[-1])}\b", problem)):
            return item
    return None


def _describe(shown: tuple[Any, ...], errs: list[dict[str, Any]]) -> str:
    """One problem at the key `shown` in words; `errs` holds several when the value fits no member of a union."""
    key, err = _dotted(shown), errs[0]
    kind, value, loc = err["type"], err.get("input"), tuple(err["loc"])
    if len(errs) > 1:
        wanted = [e.get("ctx", {}).get("expected") if e["type"] == "literal_error" else
                  str(e["msg"]).removeprefix("Input should be ").split(", ")[0] for e in errs]
        return f"{key}: should be {' or '.join(dict.fromkeys(wanted))}, got {value!r}"
    if kind == "extra_forbidden":
        owner = _walk(loc[:-1])[1]
        known = sorted(owner.model_fields) if isinstance(owner, type) and issubclass(owner, BaseModel) else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        hint = f"; did you mean {'.'.join(map(str, shown[:-1] + (close[0],)))!r}?" if close else ""
        return f"{key}: unknown key{hint} (known keys here: {', '.join(known)})"
    if kind == "missing":
        return f"{key}: required but missing; add it to the config"
    if kind == "union_tag_invalid":
        return (f"{key}: unknown method {err.get('ctx', {}).get('tag')!r}; choose one of: "
                f"{', '.join(sorted(METHOD_BLOCKS))}")
    if kind == "union_tag_not_found":
        return f"{key}: each peft block needs a `method:` key (one of: {', '.join(sorted(METHOD_BLOCKS))})"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{key}: {value!r} is not allowed; expected {expected}"
    if kind == "value_error":  # a check across sections (empty `loc`) names its keys itself
        msg = str(err['msg']).removeprefix('Value error, ')
        return f"{key}: {msg}" if loc else msg
    return f"{key}: {err['msg'].lower()}, got {value!r}"
