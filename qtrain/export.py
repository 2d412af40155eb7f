"""`qtrain export`: a run's adapter merged into a plain Hugging Face model folder, streamed and then verified.

Streaming. The base checkpoint is read one tensor at a time and written in output shards of bounded size, so
peak memory is about one tensor (in float32) plus the adapter, never a shard or the dense model. The trained
methods are attached to a *meta-device* skeleton of the model (no memory) and only their own tensors are
loaded; each base tensor then passes through every method's `merged_tensor` in the order they were attached.

Which base. `--base dequantized` (the default) first sends each linear weight that training saw quantized
through the very same quantization (`quantize_linear` with the run's `QuantSpec`) and back
(`dequantized_weight`): the merged model then computes what the trained model computed. `--base original`
merges into the checkpoint's own tensors; the adapter was never trained against those, so the check below
reports the drift instead of judging it.

In float32, whatever the run's compute dtype. What training stores is the same in any compute dtype (the 4/8-bit
codes with their constants, the trained tensors); the compute dtype is the precision its arithmetic ran in,
dequantizing included. Export dequantizes and merges in float32 and rounds once, to the export dtype, when
writing; so a float32 export keeps everything and a bf16 run exports as a GPU run with `compute_dtype: auto`
always did (export runs on the CPU, where `auto` is float32).

Verification. After writing, the folder is loaded with plain `transformers.AutoModelForCausalLM`, and held-out
prompts (data.eval rows, else a few fixed ones) run through it and through the trained quantized model (qtrain's
loader + `load_adapter`). Like is compared with like: both compute in float32, the trained model loaded with
`compute_dtype: float32` whatever it trained in. What is left is the export's own doing, the merge and the rounding
of the merged weights to the export dtype, so the tolerance is the export dtype's. (Judging a float32 export
against the trained model's own bf16 arithmetic would measure bf16, not the export, and refuse every good
float32 export of a bf16 run.) Max |Δlogit|, mean KL and greedy-token agreement go into `export_report.json`;
beyond the tolerance the folder is kept but marked with `EXPORT_FAILED_CHECK.txt` and the command fails.
Everything is written into a temporary sibling first and renamed into place at the end.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from qtrain.errors import QTrainError
from qtrain.shards import ShardWriter

REPORT = "export_report.json"
FAILED_MARK = "EXPORT_FAILED_CHECK.txt"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FIXED_PROMPTS = ["Write one sentence about the sea.", "What is 12 + 30?", "List three colours.",
                 "Translate 'good morning' into French."]


@dataclass(frozen=True)
class Tolerance:
    """What the exported model may differ from the trained one by, both computed in float32 (module docstring).

    float32 weights differ only by the order of float32 additions (merged W·x vs W·x + B·A·x); 16-bit weights
    add one rounding of every weight (relative 2^-9 for bf16, 2^-12 for fp16), which moves logits by up to a few
    tenths on real models but barely changes the distribution. The run's compute dtype does not enter: it is
    the precision of the run's arithmetic, which the check (and the export) do in float32.
    """

    max_abs_logit: float
    mean_kl: float
    min_agreement: float


# bfloat16 measured on the quickstart run (SmolLM2-135M, NF4, LoRA r=16): max |Δlogit| 0.56, KL 4.4e-4, 99.8 %.
TOLERANCES = {"float32": Tolerance(1e-3, 1e-6, 0.99), "float16": Tolerance(1.0, 1e-3, 0.97),
              "bfloat16": Tolerance(2.0, 5e-3, 0.95)}


def export(run_dir: str | Path, out: str | Path, dtype: str | None = None, base: str = "dequantized",
           overwrite: bool = False, check: bool = True, max_shard_bytes: int = 2 * 2**30,
           say: Callable[[str], None] = print) -> dict[str, Any]:
    """Merge the run's adapter into its base and write a Hugging Face folder at `out`; returns the report."""
    from qtrain.adapter_io import check_out, publish_dir
    from qtrain.config import load_config
    from qtrain.modeling import resolve_model_path

    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "adapter").is_dir():
        raise QTrainError(f"{run_dir}: not a finished run folder (needs config.yaml and adapter/); pass the "
                          "output.dir of a `qtrain run`")
    if base not in ("dequantized", "original"):
        raise QTrainError(f"--base: {base!r} is not allowed; choose dequantized or original")
    check_out(out, overwrite, [run_dir / "config.yaml", run_dir / "adapter", run_dir / "checkpoints"], REPORT)
    cfg = load_config(run_dir / "config.yaml")
    _refuse_unmergeable(run_dir / "adapter")
    model_path = resolve_model_path(cfg.model)
    dtype = dtype or _checkpoint_dtype(model_path)
    if dtype not in DTYPES:
        raise QTrainError(f"--dtype: {dtype!r} is not allowed; choose one of {', '.join(DTYPES)}")

    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        n_shards = write_merged(cfg, model_path, run_dir / "adapter", tmp, DTYPES[dtype], base, max_shard_bytes)
        report: dict[str, Any] = {"base": base, "dtype": dtype, "shards": n_shards,
                                  "write_seconds": round(time.perf_counter() - t0, 1)}
        say(f"qtrain: merged {run_dir / 'adapter'} into {model_path.name} ({base} base, {dtype}, "
            f"{n_shards} shard(s)) in {report['write_seconds']}s")
        if check:
            report.update(_verify(cfg, model_path, run_dir / "adapter", tmp, dtype, base))
            say(_describe(report))
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        if report.get("passed") is False:
            (tmp / FAILED_MARK).write_text(_describe(report) + "\nThis folder does not reproduce the trained "
                                           "model within the stated tolerance; see export_report.json.\n")
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"qtrain: exported to {out}")
    if report.get("passed") is False:
        raise QTrainError(f"{out}: the export does not reproduce the trained model within tolerance "
                          f"({_describe(report)}); the folder is kept and marked with {FAILED_MARK}. "
                          f"{_advice(dtype, run_dir)}")
    return report


def _advice(dtype: str, run_dir: Path) -> str:
    """What would help after a failed check: only a 16-bit export can gain from another dtype."""
    generate = f"serve the adapter on the quantized base instead: {_generate_command(run_dir / 'adapter')}"
    if dtype != "float32":
        return (f"A float32 export rounds nothing: try --dtype float32 (if it passes, rounding to {dtype} was the "
                f"cause and the float32 folder is the one to use; if it fails too, the merge itself is wrong), or "
                f"{generate}")
    return (f"A float32 export rounds nothing, so the merge itself does not reproduce the trained weights (a bug "
            f"in qtrain's merge for one of the run's methods; please report it with {REPORT}); meanwhile {generate}")


def _refuse_unmergeable(adapter_dir: Path) -> None:
    from qtrain.methods import build_methods

    for m in build_methods(adapter_blocks(adapter_dir)):
        if not m.mergeable:
            raise QTrainError(f"{adapter_dir}: method {m.name!r} cannot be merged into the base weights: "
                              f"{m.not_mergeable_reason or 'it changes the computation, not the weights'}. "
                              f"Run it on the quantized base instead: {_generate_command(adapter_dir)}")


def _generate_command(adapter_dir: Path) -> str:
    return f"qtrain generate --config {adapter_dir.parent / 'config.yaml'} --adapter {adapter_dir} --prompt ..."


def adapter_blocks(adapter_dir: Path) -> list:
    """The method blocks recorded in an adapter folder's qtrain.json."""
    from qtrain.methods.blocks import METHOD_BLOCKS

    meta_file = adapter_dir / "qtrain.json"
    if not meta_file.is_file():
        raise QTrainError(f"{adapter_dir}: no qtrain.json; export needs an adapter written by qtrain")
    return [METHOD_BLOCKS[b["method"]].model_validate(b) for b in json.loads(meta_file.read_text())["methods"]]


def _checkpoint_dtype(model_path: Path) -> str:
    cfg = json.loads((model_path / "config.json").read_text())
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    return name if name in DTYPES else "float32"


# ------------------------------------------------------------------------------------------------ writing


def write_merged(cfg, model_path: Path, adapter_dir: Path, folder: Path, dtype: torch.dtype, base: str,
                 max_shard_bytes: int) -> int:
    """Write config, generation config, tokenizer and the merged weights of one run into `folder`."""
    from transformers import AutoTokenizer, GenerationConfig

    from qtrain.adapter_io import load_adapter
    from qtrain.arch import Arch
    from qtrain.modeling import build_skeleton, quant_spec, quantized_linear_names

    compute_dtype = torch.float32  # whatever the run computed in (module docstring)
    spec = quant_spec(cfg.quantization, compute_dtype)
    skeleton = build_skeleton(cfg.model, model_path, compute_dtype)
    hf_config = skeleton.config
    keep_dense = set().union(*(b.full_precision_linears(Arch.from_path(model_path)) for b in cfg.peft))
    quantized = quantized_linear_names(skeleton, cfg.quantization, keep_dense) if spec.bits else set()
    for p in skeleton.parameters():  # frozen like the loader's base, so methods tell theirs from the base's
        p.requires_grad_(False)
    methods, _ = load_adapter(skeleton, adapter_dir)  # only the adapter's own tensors leave the meta device

    def as_trained(key: str, t: torch.Tensor) -> torch.Tensor:
        if base == "original":  # merge in float32 whatever the checkpoint stores; cast once when writing
            return t.to(torch.float32) if t.is_floating_point() else t
        module, _, kind = key.rpartition(".")
        if module in quantized and kind == "weight":  # bnb dequantizes to the stored dtype, then casts
            return _quantized_roundtrip(t, spec).to(compute_dtype)
        return t.to(compute_dtype)

    def merged(key: str, t: torch.Tensor) -> torch.Tensor:
        for m in methods:
            t = m.merged_tensor(key, t)
        return t

    embed_key = _param_key(skeleton, skeleton.get_input_embeddings())
    head_key = _param_key(skeleton, skeleton.get_output_embeddings())
    tied = bool(getattr(hf_config, "tie_word_embeddings", False)) and head_key not in _checkpoint_keys(model_path)
    shards = ShardWriter(folder, dtype, max_shard_bytes)
    for key, tensor in _checkpoint_tensors(model_path):
        t = as_trained(key, tensor)
        del tensor  # one tensor in flight at a time: drop each copy as soon as the next exists
        out = merged(key, t)
        if tied and key == embed_key:
            # A tied head multiplies by the embedding; if a method changed the head differently, untie it.
            head = merged(head_key, t)
            if not torch.equal(head, out):
                shards.add(head_key, head)
                hf_config.tie_word_embeddings = False
            del head
        del t
        shards.add(key, out)
        del out
    added: dict[str, torch.Tensor] = {}
    for i, m in enumerate(methods):  # a tensor a method adds still passes through the methods listed after it
        for key, t in m.added_tensors().items():
            for later in methods[i + 1:]:
                t = later.merged_tensor(key, t)
            added[key] = t
    _declare_added(hf_config, added)
    for key, t in added.items():
        shards.add(key, t)
        shards.added_keys.add(key)
    _fill_missing_biases(cfg, model_path, hf_config, shards)
    n = shards.finish()

    hf_config.__dict__.pop("quantization_config", None)  # the loader refuses quantized bases; be sure anyway
    hf_config.dtype = dtype
    hf_config.use_cache = True
    hf_config.save_pretrained(folder)
    if (model_path / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(model_path).save_pretrained(folder)
    else:
        GenerationConfig.from_model_config(hf_config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code).save_pretrained(folder)
    return n


def _quantized_roundtrip(weight: torch.Tensor, spec) -> torch.Tensor:
    """The dense weight a layer quantized from `weight` multiplies by: the loader's path, then back."""
    from qtrain.quantization import dequantized_weight, quantize_linear

    out_features, in_features = weight.shape
    dense = nn.Linear(in_features, out_features, bias=False, device="meta")
    dense.weight = nn.Parameter(weight, requires_grad=False)
    return dequantized_weight(quantize_linear(dense, spec))


def _param_key(model: nn.Module, module: nn.Module) -> str:
    return next(f"{name}.weight" for name, m in model.named_modules() if m is module)


def _checkpoint_keys(model_path: Path) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for shard in sorted(model_path.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            keys.update(f.keys())
    return keys


def _checkpoint_tensors(model_path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the base checkpoint, one at a time, in file order."""
    from safetensors import safe_open

    for shard in sorted(model_path.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def _declare_added(hf_config, added: dict[str, torch.Tensor]) -> None:
    """New biases must be declared in config.json or transformers would build the layers without them."""
    for key in added:
        if not key.endswith(".bias"):
            continue
        if ".self_attn." in key and hasattr(hf_config, "attention_bias"):
            hf_config.attention_bias = True
        elif ".mlp." in key and hasattr(hf_config, "mlp_bias"):
            hf_config.mlp_bias = True


def _fill_missing_biases(cfg, model_path: Path, hf_config, shards: "ShardWriter") -> None:
    """Check the written keys against the architecture config.json now declares; a bias it declares that
    neither the base nor a method provides (a sibling of a new one) is written as zeros."""
    from transformers import AutoModelForCausalLM
    import accelerate

    with accelerate.init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=cfg.model.trust_remote_code)
    expected = dict(model.named_parameters())
    if getattr(hf_config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    unknown = sorted(set(shards.keys) - set(expected) - {"lm_head.weight"})
    added_unknown = [k for k in unknown if k in shards.added_keys]
    added_unknown += [f"{k} {shards.shapes[k]} vs {tuple(expected[k].shape)}" for k in sorted(shards.keys)
                      if k in expected and shards.shapes[k] != tuple(expected[k].shape)]
    if added_unknown:
        raise QTrainError(f"{model_path.name}: the merged model has tensors its architecture cannot hold "
                          f"({added_unknown[:3]}); config.json has no switch for them. Serve the adapter on the "
                          "base instead (qtrain generate)")
    for name, p in expected.items():
        if name in shards.keys:
            continue
        if name.endswith(".bias"):
            shards.add(name, torch.zeros(p.shape))
        else:
            raise QTrainError(f"{model_path}: the checkpoint has no {name!r}; it does not match its config.json")


# ------------------------------------------------------------------------------------------------ checking


def _verify(cfg, model_path: Path, adapter_dir: Path, folder: Path, dtype: str, base: str) -> dict[str, Any]:
    """Compare the exported folder with the trained quantized model on held-out prompts."""
    from transformers import AutoModelForCausalLM

    from qtrain.adapter_io import load_adapter
    from qtrain.arch import Arch
    from qtrain.modeling import load_model

    cpu = torch.device("cpu")
    keep_dense = set().union(*(b.full_precision_linears(Arch.from_path(model_path)) for b in cfg.peft))
    in_float32 = cfg.quantization.model_copy(update={"compute_dtype": "float32"})  # like the export (docstring)
    loaded = load_model(cfg.model, in_float32, cpu, path=model_path, skip_quantize=keep_dense)
    load_adapter(loaded.model, adapter_dir)
    prompts = check_prompts(cfg, loaded.tokenizer)
    trained = [_logits(loaded.model, ids) for ids in prompts]
    del loaded  # the two models are never in memory together

    exported = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                    attn_implementation=cfg.model.attn_implementation)
    exported.eval()
    with torch.no_grad():
        merged = [exported(ids[None]).logits[0].float() for ids in prompts]
    metrics = compare_logits(trained, merged)
    result: dict[str, Any] = {"check": metrics, "prompts": len(prompts), "compared_in": "float32",
                              "run_compute_dtype": cfg.quantization.compute_dtype}
    if base == "dequantized":
        tol = TOLERANCES[dtype]
        result["tolerance"] = asdict(tol)
        result["passed"] = bool(metrics["max_abs_logit_diff"] <= tol.max_abs_logit and metrics["mean_kl"] <=
                                tol.mean_kl and metrics["greedy_agreement"] >= tol.min_agreement)
    return result


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the trained quantized model in eval mode (no dropout): `dequantized weight @ x` in every
    quantized linear, the numbers training computed with (`quantization.FrozenMatmul`)."""
    model.eval()
    return model(ids[None]).logits[0].float()


def check_prompts(cfg, tokenizer, limit: int = 8) -> list[torch.Tensor]:
    """Token ids of the held-out texts the check runs: data.eval rows (prompt + answer), else fixed prompts."""
    from qtrain.data import _adds_bos
    from qtrain.datafiles import load_rows
    from qtrain.evaluate import reference_pairs

    texts: list[str] = []
    if cfg.data.eval and cfg.data.format != "text":
        texts = [p + a for p, a in reference_pairs(cfg.data.eval, cfg.data, tokenizer, limit)]
    elif cfg.data.eval:
        rows, _ = load_rows(cfg.data.eval, "data.eval")
        texts = [str(rows[i][cfg.data.fields.text]) for i in range(min(limit, len(rows)))]
    if not texts:
        has_template = getattr(tokenizer, "chat_template", None)
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) if has_template else p
                 for p in FIXED_PROMPTS]
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    return [torch.tensor((bos + tokenizer(t, add_special_tokens=False)["input_ids"])[:cfg.data.max_seq_len])
            for t in texts]


def compare_logits(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict[str, float]:
    """Max |Δlogit|, mean KL(reference ‖ other) per position, and the share of positions whose argmax agrees."""
    ref, oth = torch.cat(reference).double(), torch.cat(other).double()  # (positions, vocab)
    log_p, log_q = torch.log_softmax(ref, -1), torch.log_softmax(oth, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (positions,)
    return {"max_abs_logit_diff": float((ref - oth).abs().max()), "mean_kl": float(kl.mean()),
            "greedy_agreement": float((ref.argmax(-1) == oth.argmax(-1)).double().mean()),
            "positions": int(ref.shape[0])}


def _describe(report: dict[str, Any]) -> str:
    c = report.get("check")
    if not c:
        return "qtrain: equivalence check skipped"
    numbers = (f"max |Δlogit| {c['max_abs_logit_diff']:.3g}, mean KL {c['mean_kl']:.3g}, greedy-token agreement "
               f"{c['greedy_agreement']:.1%} over {c['positions']} positions")
    if report["base"] == "original":
        return f"qtrain: drift of the original-base merge from the trained model: {numbers}"
    t = report["tolerance"]
    verdict = "PASSED" if report["passed"] else "FAILED"
    run = report.get("run_compute_dtype")
    both = "both computed in float32" + ("" if run in (None, "float32") else f", not in the run's compute_dtype "
                                         f"{run}: its rounding belongs to training, not to the export")
    return (f"qtrain: equivalence check {verdict}: {numbers} ({both}; tolerance for a {report['dtype']} export: "
            f"|Δlogit| ≤ {t['max_abs_logit']}, KL ≤ {t['mean_kl']}, agreement ≥ {t['min_agreement']:.0%})")
