"""The command line: parse, load the config, call one function. No logic lives here.

Every `QTrainError` becomes one paragraph on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys

from qtrain.errors import QTrainError

EXIT_USAGE = 2


def _at_least(low: int):
    """An argparse type: a whole number >= `low` (else argparse names the option and exits with code 2)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {n}")
        return n
    return parse


def _positive_number(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(x) and x > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return x


def _named(text: str) -> str:
    """An argparse type: a non-empty value (an empty one would silently read as the option not given)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty; give a value or leave the option out")
    return text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qtrain",
        description="Quantized low-memory fine-tuning: a frozen 4/8-bit base with trainable PEFT modules.",
        epilog="Start with: qtrain run configs/quickstart.yaml",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = sub.add_parser("run", help="train PEFT modules on a quantized base from a YAML config",
                       description="Train from a YAML config. Writes config.yaml, metrics.jsonl, adapter/ and "
                                   "summary.json into output.dir.")
    r.add_argument("config", help="YAML config file (see configs/)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set training.max_steps=50 --set peft.0.r=8 (repeatable)")
    r.add_argument("--output-dir", help="write the run here (same as --set output.dir=DIR)")
    r.add_argument("--overwrite", action="store_true", help="replace the files of a run already in output.dir")
    r.add_argument("--resume", nargs="?", const="latest", metavar="PATH",
                   help="continue from the newest valid checkpoint in output.dir, or from PATH (a "
                        "checkpoints/step-N folder or a run folder); the result equals an uninterrupted run")
    r.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: accept a config whose training maths differs from the checkpoint's")
    r.add_argument("--dry-run", action="store_true",
                   help="validate the config and print it resolved; load nothing")
    r.add_argument("--nproc", type=_at_least(1), default=1, metavar="N",
                   help="data-parallel over N processes through `accelerate launch` (GPUs, or CPU with gloo)")
    r.add_argument("--fsdp", action="store_true",
                   help="with --nproc: shard the base, adapters and optimizer states over them (FSDP2)")

    d = sub.add_parser("data", help="show formatted training examples with their loss masks, and length stats")
    d.add_argument("config", help="YAML config file")
    d.add_argument("--show", type=_at_least(0), default=3, metavar="N", help="how many examples to print (default 3)")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    e = sub.add_parser("eval", help="base vs trained: task metrics and general-text perplexity (forgetting)")
    e.add_argument("run_dir", help="the output.dir of a finished run")

    rep = sub.add_parser("report", help="write report.png (loss and lr curves) and report.md for a run")
    rep.add_argument("run_dir", help="the output.dir of a run")
    _add_serving_commands(sub)
    _add_plan_command(sub)
    return p


def _add_plan_command(sub) -> None:
    pl = sub.add_parser("plan", help="predict peak memory from the model's config.json; say what fits a GPU",
                        description="Memory breakdown, verdict and what fits, from the config and the model's "
                                    "config.json only (no weights, no torch).")
    pl.add_argument("config", help="YAML config file")
    where = pl.add_mutually_exclusive_group()
    where.add_argument("--gpu", type=_named, metavar="NAME", help="a GPU profile, e.g. rtx4090, t4, a100-80gb")
    where.add_argument("--budget", type=_named, metavar="SIZE", help="memory to fit in, e.g. 24GB, 11.5GiB")
    pl.add_argument("--model-config", metavar="FILE", help="the model's config.json (instead of model.path)")
    pl.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="where it will train (decides compute_dtype auto and runtime overhead; default cuda)")
    pl.add_argument("--nproc", type=_at_least(1), metavar="N", help="processes (devices) the run will use")
    pl.add_argument("--fsdp", action="store_true", help="they shard the model (FSDP2): plan per device")
    pl.add_argument("--accelerate-config", metavar="FILE",
                    help="an accelerate config (num_processes; distributed_type FSDP shards), e.g. "
                         "configs/accelerate/fsdp-qlora.yaml")
    pl.add_argument("--json", action="store_true", help="print a JSON object (peak_bytes, components, ...)")
    pl.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _add_serving_commands(sub) -> None:
    """export, merge-adapters, generate, chat, inspect: what happens to an adapter after training."""
    x = sub.add_parser("export", help="merge a run's adapter into a plain Hugging Face model folder, verified",
                       description="Write RUN_DIR's base with the adapter merged as a standard HF folder (sharded "
                                   "safetensors, config, tokenizer), streaming one tensor at a time, then check "
                                   "it against the trained quantized model on held-out prompts.")
    x.add_argument("run_dir", help="the output.dir of a finished run (config.yaml + adapter/)")
    x.add_argument("--out", required=True, help="folder to write (must not exist unless --overwrite)")
    x.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the written weights (default: the base checkpoint's)")
    x.add_argument("--base", choices=["dequantized", "original"], default="dequantized",
                   help="merge into the dequantized 4/8-bit weights training saw (default, reproduces the trained "
                        "model) or into the original full-precision weights (reports the drift)")
    x.add_argument("--max-shard-size", type=_positive_number, default=2.0, metavar="GB",
                   help="shard size in GiB (default 2)")
    x.add_argument("--no-check", action="store_true", help="skip the equivalence check")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")

    m = sub.add_parser("merge-adapters", help="compose LoRA adapters trained on one base into one adapter")
    m.add_argument("adapters", nargs="+", help="LoRA adapter folders (or run folders)")
    m.add_argument("--weights", type=float, nargs="+", help="one weight per adapter (default 1 each)")
    m.add_argument("--method", default="linear", choices=["linear", "cat", "svd", "ties", "dare_linear", "dare_ties"])
    m.add_argument("--density", type=float, default=1.0, help="ties/dare: share of each delta kept (default 1)")
    m.add_argument("--rank", type=_at_least(1), help="svd/ties/dare: rank of the result (default: sum of the ranks)")
    m.add_argument("--seed", type=int, default=0, help="dare: seed of the random drop")
    m.add_argument("--out", required=True, help="folder to write")
    m.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")

    for name, help_text in (("generate", "generate with one or several adapters on one quantized base"),
                            ("chat", "chat on stdin; switch adapters with /adapter NAME and /base")):
        g = sub.add_parser(name, help=help_text)
        src = g.add_mutually_exclusive_group(required=True)
        src.add_argument("--config", help="a run config (YAML) or run folder: its model and quantization")
        src.add_argument("--model", help="a model folder, hub id or alias (quantized per --bits)")
        g.add_argument("--bits", choices=["4", "8", "none"], help="override the quantization (default: config's, or 4)")
        g.add_argument("--adapter", dest="adapters", action="append", default=[], metavar="NAME=DIR",
                       help="an adapter to load (repeatable); NAME defaults to the folder name")
        g.add_argument("--max-new-tokens", type=_at_least(1), default=64, metavar="N")
        if name == "generate":
            g.add_argument("--prompt", dest="prompts", action="append", required=True, help="a prompt (repeatable)")
            g.add_argument("--use", action="append", default=[], metavar="NAME",
                           help="adapters to run each prompt under, 'base' for the bare base (default: every "
                                "loaded adapter, else the base)")
            g.add_argument("--raw", action="store_true", help="send prompts as plain text, not via the chat template")

    i = sub.add_parser("inspect", help="what an adapter is and which tools (peft, vLLM, llama.cpp) can load it")
    i.add_argument("adapter", help="an adapter folder (or a run folder)")


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _run(args: argparse.Namespace) -> int:
    from qtrain.config import load_config

    overrides = list(args.overrides) + ([f"output.dir={args.output_dir}"] if args.output_dir else [])
    cfg = load_config(args.config, overrides)
    if args.dry_run:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        print(f"qtrain: {args.config} is valid", file=sys.stderr)
        return 0
    if args.allow_config_change and args.resume is None:
        raise QTrainError("--allow-config-change lets --resume continue under a changed config; without --resume "
                          "there is no checkpoint to compare with: add --resume, or leave it out")
    if args.fsdp and args.nproc < 2 and "LOCAL_RANK" not in os.environ:
        raise QTrainError(f"--fsdp shards over several processes; add --nproc N (N >= 2), got --nproc {args.nproc}")
    if args.fsdp and "LOCAL_RANK" in os.environ and os.environ.get("ACCELERATE_USE_FSDP") != "true":
        raise QTrainError("--fsdp: this process was launched without FSDP; launch with --nproc N --fsdp, or "
                          "`accelerate launch --config_file configs/accelerate/fsdp-qlora.yaml`")
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _launch(args)
    _quiet_libraries()
    from qtrain.run import run

    summary = run(cfg, overwrite=args.overwrite, resume=args.resume, allow_config_change=args.allow_config_change)
    if summary.get("stopped"):
        again = ["qtrain", "run", args.config, *(f"--set={o}" for o in overrides), "--resume"]
        print(f"qtrain: to continue, run: {shlex.join(again)}")
    return 0


def _launch(args: argparse.Namespace) -> int:
    """Re-run this same command under accelerate's launcher with N processes (torchrun underneath)."""
    import socket
    import subprocess

    argv, skip = [], False
    for a in args.argv:
        if not skip and a != "--nproc" and not a.startswith("--nproc="):
            argv.append(a)
        skip = a == "--nproc"
    with socket.socket() as s:  # a free port: a second run on this machine would collide at torchrun's 29500
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    how = ["--use_fsdp", "--fsdp_version", "2"] if args.fsdp else ["--multi_gpu"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", str(args.nproc),
           "--main_process_port", str(port), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "qtrain", *argv]
    return subprocess.call(cmd)


def _data(args: argparse.Namespace) -> int:
    from qtrain.config import load_config
    from qtrain.preview import preview

    _quiet_libraries()
    print(preview(load_config(args.config, args.overrides), args.show))
    return 0


def _eval(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from qtrain.evaluate import evaluate_run

    report = evaluate_run(args.run_dir)
    print("\n".join(report["lines"]))
    return 0


def _report(args: argparse.Namespace) -> int:
    from qtrain.report import write_report

    png, md = write_report(args.run_dir)
    print(f"qtrain: wrote {png} and {md}")
    return 0


def _export(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from qtrain.export import export

    export(args.run_dir, args.out, dtype=args.dtype, base=args.base, overwrite=args.overwrite,
           check=not args.no_check, max_shard_bytes=int(args.max_shard_size * 2**30))
    return 0


def _merge_adapters(args: argparse.Namespace) -> int:
    from qtrain.compose import merge_adapters

    summary = merge_adapters(args.adapters, args.out, args.weights, args.method, args.density, args.rank,
                             args.seed, args.overwrite)
    print(f"qtrain: wrote {args.out}: {summary}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from qtrain.serve import generate_command

    generate_command(args.config or args.model, args.bits, args.adapters, args.prompts, args.use,
                     args.max_new_tokens, args.raw)
    return 0


def _chat(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from qtrain.serve import chat_command

    chat_command(args.config or args.model, args.bits, args.adapters, args.max_new_tokens)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from qtrain.inspect_adapter import describe, inspect_adapter

    print(describe(inspect_adapter(args.adapter)))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from qtrain.config import load_config
    from qtrain.planner import parallelism, report

    shards, data_parallel = parallelism(args.nproc, args.fsdp, args.accelerate_config)
    print(report(load_config(args.config, args.overrides), args.gpu, args.budget, args.model_config, args.json,
                 args.device, shards, data_parallel))
    return 0


COMMANDS = {"run": _run, "plan": _plan, "data": _data, "eval": _eval, "report": _report, "export": _export,
            "merge-adapters": _merge_adapters, "generate": _generate, "chat": _chat, "inspect": _inspect}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    args.argv = argv
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a reader gone away shows here, not in the interpreter's exit
        return code
    except QTrainError as e:
        print(f"qtrain: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("qtrain: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of the output went away (`qtrain data … | head`): stop as `cat` would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush finds no pipe
        return 141  # 128 + SIGPIPE, what a shell reports for a tool stopped by a closed pipe


if __name__ == "__main__":
    sys.exit(main())
