"""The command line: parse, load the config, call one function. No logic lives here.

Every `QTrainError` becomes one paragraph on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from qtrain.errors import QTrainError

EXIT_USAGE = 2


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
    r.add_argument("--dry-run", action="store_true",
                   help="validate the config and print it resolved; load nothing")
    return p


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
    _quiet_libraries()
    from qtrain.run import run

    run(cfg, overwrite=args.overwrite)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"run": _run}[args.command](args)
    except QTrainError as e:
        print(f"qtrain: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("qtrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
