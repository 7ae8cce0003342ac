"""The `raylm` command: prepare, train, tune, eval, generate, export, demo, plan.

    raylm prepare --input_dir ./raw_text_data --output_dir ./processed_data --tokenizer_type bpe
    raylm train --data_dir ./processed_data --save_dir ./checkpoints --model_size tiny --max_steps 200
    raylm demo

Each subcommand's flags are the fields of that stage's config dataclass; `--config FILE.yaml`
sets any of them, and flags override the file.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from raylm import __version__
from raylm.config import ConfigError, add_dataclass_args, build_config, overrides_from_args


_python_format_warning = warnings.formatwarning


def _add_config_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", dest="config_file", default=None, metavar="FILE.yaml",
                   help="YAML file with any of this command's settings; flags override it")


def _cmd_prepare(args) -> int:
    from raylm.config import PrepareConfig
    from raylm.prepare import prepare

    cfg = build_config(PrepareConfig, args.config_file, overrides_from_args(args, PrepareConfig))
    prepare(cfg)
    return 0


def _cmd_train(args) -> int:
    from raylm.config import TrainConfig
    from raylm.train import train

    cfg = build_config(TrainConfig, args.config_file, overrides_from_args(args, TrainConfig))
    train(cfg)
    return 0


def _cmd_tune(args) -> int:
    from raylm.config import TrainConfig, TuneConfig
    from raylm.tune import build_tune_configs, tune

    overrides = overrides_from_args(args, TuneConfig) | overrides_from_args(args, TrainConfig)
    result = tune(*build_tune_configs(args.config_file, overrides))
    return 0 if result.finished else 130  # interrupted: the same command with --resume continues it


def _cmd_eval(args) -> int:
    from raylm.config import EvalConfig
    from raylm.evaluate import evaluate_checkpoint

    evaluate_checkpoint(build_config(EvalConfig, args.config_file, overrides_from_args(args, EvalConfig)))
    return 0


def _cmd_generate(args) -> int:
    from raylm.config import GenerateConfig
    from raylm.generate import run

    run(build_config(GenerateConfig, args.config_file, overrides_from_args(args, GenerateConfig)))
    return 0


def export_checkpoint(cfg) -> Path:
    """`raylm export`: checkpoint -> Hugging Face Llama folder (with its tokenizer when HF-kind)."""
    import torch

    from raylm.evaluate import load_checkpoint
    from raylm.export import export_hf

    loaded = load_checkpoint(cfg.checkpoint)
    data = loaded.state.get("data") or {}
    out = export_hf(loaded.model, cfg.output_dir, tokenizer_dir=loaded.path, eos_token_id=data.get("eos_token_id"),
                    pad_token_id=data.get("pad_token_id"), dtype=getattr(torch, cfg.dtype), overwrite=cfg.overwrite)
    print(f"Exported {loaded.path} to {out} (load it with transformers.AutoModelForCausalLM.from_pretrained)")
    return out


def _cmd_export(args) -> int:
    from raylm.config import ExportConfig

    export_checkpoint(build_config(ExportConfig, args.config_file, overrides_from_args(args, ExportConfig)))
    return 0


def _cmd_plan(args) -> int:
    from raylm.config import PlanConfig
    from raylm.plan import plan

    plan(build_config(PlanConfig, args.config_file, overrides_from_args(args, PlanConfig)))
    return 0


def _cmd_demo(args) -> int:
    from raylm.config import DemoConfig
    from raylm.demo import run_demo

    run_demo(build_config(DemoConfig, args.config_file, overrides_from_args(args, DemoConfig)))
    return 0


COMMANDS: dict[str, tuple[str, str | tuple[str, ...], str]] = {
    # name: (module, config class or classes (their flags together), help)
    "prepare": ("raylm.config", "PrepareConfig", "raw text files -> tokenizer + Parquet shards"),
    "train": ("raylm.config", "TrainConfig", "train a model on prepared data with Ray Train"),
    "tune": ("raylm.config", ("TuneConfig", "TrainConfig"),
             "sweep learning rate and warmup of `train` with Ray Tune; ASHA stops lagging trials"),
    "eval": ("raylm.config", "EvalConfig", "loss, perplexity and bits per byte of a checkpoint"),
    "generate": ("raylm.config", "GenerateConfig", "sample text from a checkpoint"),
    "export": ("raylm.config", "ExportConfig", "write a checkpoint as a Hugging Face Llama folder"),
    "demo": ("raylm.config", "DemoConfig", "the whole pipeline on a built-in corpus, in minutes on a CPU"),
    "plan": ("raylm.config", "PlanConfig", "GPU memory per worker of a training setup, and the largest micro batch "
             "that fits"),
}


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="raylm", description="Train Llama-style language models from raw text on Ray.", allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"raylm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, cls_names, help_text) in COMMANDS.items():
        # allow_abbrev=False: --max_step is a typo to report, not --max_steps (nor, one day, another flag)
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        _add_config_flag(p)
        for cls_name in (cls_names,) if isinstance(cls_names, str) else cls_names:
            add_dataclass_args(p, getattr(importlib.import_module(module), cls_name))
    return parser


HANDLERS = {"prepare": _cmd_prepare, "train": _cmd_train, "tune": _cmd_tune, "eval": _cmd_eval,
            "generate": _cmd_generate, "export": _cmd_export, "demo": _cmd_demo, "plan": _cmd_plan}


def explain_error(e: BaseException, command: str = "train") -> str | None:
    """The errors a newcomer meets in `command`, answered in a line or two (None: not one of them)."""
    from raylm.train import SimulatedFailure, TrainingError, is_out_of_memory

    text = str(e)
    if isinstance(e, (TrainingError, FloatingPointError, SimulatedFailure)):
        return text
    if isinstance(e, ConnectionError) or "Could not find any running Ray instance" in text \
            or "Failed to connect to GCS" in text:
        return (f"cannot reach Ray ({text.splitlines()[0] if text else type(e).__name__}). Check RAY_ADDRESS "
                "(unset it to start a local Ray) or start the cluster with `ray start --head`; if a cluster "
                "started on this machine has died, `ray stop` clears its stale address.")
    if is_out_of_memory(text):
        if command not in ("train", "tune"):  # the training advice would not apply
            return f"out of memory: {text.splitlines()[0] if text else type(e).__name__}"
        return ("out of memory: lower --micro_batch_size (the global --batch_size stays the same through "
                "gradient accumulation), add --activation_checkpointing, or use a smaller model / --max_length; "
                "`raylm plan` estimates what fits.")
    if "Address already in use" in text:
        return ("a port raylm/Ray needs is already in use (another Ray or training run?): stop it, or reuse it with "
                "RAY_ADDRESS=auto.")
    return None


def _subcommand_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """raylm's own warnings as one plain line (they are addressed to the user, who has no use for the line of
    raylm's source that raised them); everyone else's as Python shows them."""
    if Path(str(filename)).resolve().is_relative_to(Path(__file__).resolve().parent):
        return f"raylm: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


def main(argv: list[str] | None = None) -> int:
    import difflib

    warnings.formatwarning = _format_warning
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not args.command:
        parser.error("unrecognized arguments: " + " ".join(unknown))
    if not args.command:
        parser.print_help()
        return 2
    if unknown:  # said by the command's own parser (its usage), with the flag that was probably meant
        command = _subcommand_parser(parser, args.command)
        flags = [s for a in command._actions for s in a.option_strings]
        hints = [f"{u} (did you mean {close[0]}?)" if u.startswith("-") and (close := difflib.get_close_matches(
            u.split("=")[0].replace("-", "_").replace("__", "--", 1), flags, n=1)) else u for u in unknown]
        command.error("unrecognized arguments: " + " ".join(hints))
    try:
        return HANDLERS[args.command](args)
    except ConfigError as e:  # raylm.storage.UnsafeName too
        print(f"raylm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, FloatingPointError, ConnectionError, OSError) as e:
        message = explain_error(e, args.command)
        if message is None and isinstance(e, OSError):  # a missing file, a full disk, no permission: its own words
            message = str(e) if isinstance(e, FileExistsError) else f"{type(e).__name__}: {e}"
        if message is None:
            raise
        print(f"raylm {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"raylm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
