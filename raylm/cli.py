"""The `raylm` command: prepare, train, tune, eval, generate, export, demo.

    raylm prepare --input_dir ./raw_text_data --output_dir ./processed_data --tokenizer_type bpe
    raylm train --data_dir ./processed_data --save_dir ./checkpoints --model_size tiny --max_steps 200
    raylm demo

Each subcommand's flags are the fields of that stage's config dataclass; `--config FILE.yaml`
sets any of them, and flags override the file.
"""
from __future__ import annotations

import argparse
import sys

from raylm import __version__
from raylm.config import ConfigError, add_dataclass_args, build_config, overrides_from_args


def _add_config_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", dest="config_file", default=None, metavar="FILE.yaml",
                   help="YAML file with any of this command's settings; flags override it")


def _cmd_prepare(args) -> int:
    from raylm.config import PrepareConfig
    from raylm.prepare import prepare

    cfg = build_config(PrepareConfig, args.config_file, overrides_from_args(args, PrepareConfig))
    prepare(cfg)
    return 0


COMMANDS: dict[str, tuple[str, str, str]] = {
    # name: (module, config class, help)
    "prepare": ("raylm.config", "PrepareConfig", "raw text files -> tokenizer + Parquet shards"),
}


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="raylm", description="Train Llama-style language models from raw text on Ray.")
    parser.add_argument("--version", action="version", version=f"raylm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, cls_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_config_flag(p)
        cls = getattr(importlib.import_module(module), cls_name)
        add_dataclass_args(p, cls)
    return parser


HANDLERS = {"prepare": _cmd_prepare}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return HANDLERS[args.command](args)
    except ConfigError as e:
        print(f"raylm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"raylm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
