"""One configuration system for every raylm command.

Each stage owns a dataclass of its settings (``PrepareConfig`` in prepare.py, ``TrainConfig`` in
train.py, ...). Every field is declared with :func:`opt`, which carries a one-line help text; the
same text becomes ``--help``. Precedence: dataclass defaults < YAML file (``--config``) < flags.
Unknown keys are errors that name the closest valid key.

    cfg = build_config(TrainConfig, yaml_path="jobs/configs/tiny_cpu.yaml", overrides={"max_steps": 10})
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml


def opt(default: Any, help: str, *, choices: tuple | None = None, flag_const: Any = None,
        bool_values: tuple[str, str] | None = None, **kw):
    """A dataclass field with its help text (and optional choices / bare-flag value). bool_values: the
    settings that true and false (yes/no, on/off, 1/0; YAML booleans) stand for, for a switch with more
    than two positions (--mixed_precision true means auto)."""
    meta = {"help": help, "choices": choices, "flag_const": flag_const, "bool_values": bool_values}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


class ConfigError(ValueError):
    """A configuration a user must change; the message says what to change."""


def _base_type(tp):
    """Unwrap Optional[X] / X | None to X."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _base_type(args[0])
    return tp


def _parse_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on", "y"):
        return True
    if low in ("0", "false", "no", "off", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _coerce(name: str, tp, value):
    """Convert a YAML/CLI value to the field's type, with a message naming the field."""
    tp = _base_type(tp)
    if value is None:
        return None
    try:
        if tp is bool:
            return value if isinstance(value, bool) else _parse_bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, str):
                value = float(value) if any(c in value for c in ".eE") else int(value)
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
        origin = typing.get_origin(tp)
        if origin in (list, tuple):
            (inner,) = typing.get_args(tp)[:1] or (str,)
            items = value.split(",") if isinstance(value, str) else list(value)
            items = [_coerce(name, inner, x.strip() if isinstance(x, str) else x) for x in items]
            return [x for x in items if x != ""]
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise ConfigError(f"{name}: cannot read {value!r} as {getattr(tp, '__name__', tp)}") from None
    return value


def _switch_value(bool_values: tuple[str, str], value):
    """A boolean spelling of a many-valued switch (True, 1, "true", "no": what a bool flag takes) as the setting
    it stands for; anything else as it is."""
    if isinstance(value, (bool, int, str)):
        try:
            return bool_values[0] if _parse_bool(value) else bool_values[1]
        except argparse.ArgumentTypeError:
            pass
    return value


def field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check_keys(cls, data: dict, source: str) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown setting {key!r} in {source}.{hint} Valid settings: {', '.join(names)}")


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:  # the parser's own words carry the line and column
            raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of setting: value")
    return data


def build_config(cls, yaml_path=None, overrides: dict | None = None, yaml_data: dict | None = None):
    """Defaults < YAML file < overrides (flags). Unknown keys are errors."""
    types_ = field_types(cls)
    fields_ = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    layers = []
    if yaml_path:
        layers.append((load_yaml(yaml_path), f"config file {yaml_path}"))
    if yaml_data:
        layers.append((yaml_data, "config"))
    if overrides:
        layers.append((overrides, "flags"))
    for data, source in layers:
        data = {k.replace("-", "_"): v for k, v in data.items()}
        _check_keys(cls, data, source)
        for key, value in data.items():
            if bool_values := fields_[key].metadata.get("bool_values"):
                value = _switch_value(bool_values, value)
            values[key] = _coerce(key, types_[key], value)
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg_or_dict, path: str | os.PathLike) -> None:
    """Write a config as YAML atomically (temporary name, then rename)."""
    data = cfg_or_dict if isinstance(cfg_or_dict, dict) else to_dict(cfg_or_dict)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(yaml.safe_dump(json.loads(json.dumps(data)), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


def add_dataclass_args(parser: argparse.ArgumentParser, cls, *, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--field`` flag per dataclass field. Flags default to SUPPRESS, so only the flags a
    user typed appear in the parsed namespace (and override the YAML file)."""
    types_ = field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = _base_type(types_[f.name])
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = meta.get("help", "")
        if default not in (None, "", []):
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = dict(default=argparse.SUPPRESS, help=help_text, dest=f.name)
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("bool_values"):  # before argparse checks the choices
            kwargs["type"] = functools.partial(_switch_value, meta["bool_values"])
        if tp is bool:
            # `--mixed_precision` alone means true; `--flag false` also works.
            kwargs.update(nargs="?", const=True, type=_parse_bool, metavar="BOOL")
        elif meta.get("flag_const") is not None:
            kwargs.update(nargs="?", const=meta["flag_const"])
        elif typing.get_origin(tp) in (list, tuple):
            kwargs.update(nargs="+", metavar="X")
        else:
            kwargs["type"] = str  # coerced (with a clear message) by build_config
        parser.add_argument(f"--{f.name}", **kwargs)


def overrides_from_args(args: argparse.Namespace, cls) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


# --------------------------------------------------------------------------------------------
# The stages' settings. Kept here (not in the stage modules) so `raylm --help` stays fast and
# a reader finds every setting of every command in one file.
# --------------------------------------------------------------------------------------------

TOKENIZER_TYPES = ("bpe", "wordpiece", "tiktoken")
DEFAULT_EXTENSIONS = [".txt", ".md", ".json", ".jsonl"]


@dataclasses.dataclass
class PrepareConfig:
    """`raylm prepare`: raw text files -> tokenizer + packed Parquet rows."""

    input_dir: str = opt("", "required: folder (or s3:// / gs:// / file:// URI) of raw text files, searched "
                             "recursively")
    output_dir: str = opt("./processed_data", "where tokenizer, dataset/ and metadata.json are written")
    tokenizer_type: str = opt("bpe", "tokenizer to train: byte-level BPE, WordPiece, or tiktoken",
                              choices=TOKENIZER_TYPES)
    vocab_size: int = opt(32000, "tokenizer vocabulary size, special tokens included")
    max_length: int = opt(2048, "tokens per training row (the model's context length)")
    num_workers: int = opt(4, "CPU workers that read and tokenize files in parallel")
    val_fraction: float = opt(0.05, "fraction of documents held out for validation (split by document)")
    overlap: int = opt(0, "tokens repeated from the end of one row at the start of the next")
    seed: int = opt(1234, "seed of the train/validation split and of the tokenizer sample")
    text_field: str = opt("text", "key holding the text in .json / .jsonl records")
    extensions: list[str] = opt(DEFAULT_EXTENSIONS, "file endings to read, e.g. --extensions .txt .py .c")
    max_file_mb: float = opt(512.0, "files larger than this (MB) are skipped and reported")
    encoding_errors: str = opt("strict", "invalid UTF-8: 'strict' skips the file, 'replace' decodes with U+FFFD",
                               choices=("strict", "replace"))
    tokenizer_sample_mb: float = opt(64.0, "MB of accepted text sampled to train the tokenizer")
    tiktoken_encoding: str = opt("", "tiktoken only: a named encoding (gpt2, cl100k_base, o200k_base) or a "
                                 ".tiktoken file to use instead of training one")
    tokenizer_file: str = opt("", "use this tokenizer (a tokenizer.json / .tiktoken file, or a checkpoint or dataset "
                              "folder holding one) instead of training one: to fine-tune a model on new text")
    min_frequency: int = opt(2, "bpe/wordpiece: a merge must occur this often in the sample")
    rows_per_shard: int = opt(8192, "rows per Parquet file")

    def __post_init__(self):
        if self.vocab_size < 260 and self.tokenizer_type != "tiktoken" and not self.tokenizer_file:
            raise ConfigError(f"vocab_size ({self.vocab_size}) must be at least 260 "
                              "(256 byte symbols plus special tokens); 32000 is a good default")
        if self.max_length < 2:
            raise ConfigError(f"max_length ({self.max_length}) must be at least 2 tokens")
        if not 0 <= self.overlap < self.max_length:
            raise ConfigError(f"overlap ({self.overlap}) must be >= 0 and smaller than max_length "
                              f"({self.max_length})")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction ({self.val_fraction}) must be between 0 and 1, e.g. 0.05")
        if self.num_workers < 1:
            raise ConfigError(f"num_workers ({self.num_workers}) must be at least 1")
        if self.max_file_mb <= 0 or self.tokenizer_sample_mb <= 0:
            raise ConfigError("max_file_mb and tokenizer_sample_mb must be positive")
        self.extensions = [e if e.startswith(".") else f".{e}" for e in (x.lower() for x in self.extensions)]


PRECISIONS = ("off", "auto", "bf16", "fp16")
STRATEGIES = ("ddp", "fsdp")
LOSS_CHUNKING = ("auto", "on", "off")
ATTENTION_BACKENDS = ("auto", "flash", "cudnn")
COMPILE_MODES = ("default", "tune-kernels", "max-autotune")
RESIDUAL_DTYPES = ("fp32", "bf16")
RESIDUAL_HELP = ("dtype of the residual stream between the transformer blocks under --mixed_precision bf16: fp32 "
                 "(autocast's, the default) or bf16, which halves the bytes of every residual add, norm input and "
                 "their gradients (faster on GPUs, where that traffic bounds the step; the norms still compute in "
                 "fp32, the weights and AdamW stay fp32). FSDP with 2+ workers always has a 16-bit stream")


def check_residual_dtype(residual_dtype: str, mixed_precision: str) -> None:
    if residual_dtype not in RESIDUAL_DTYPES:
        raise ConfigError(f"residual_dtype ({residual_dtype!r}) must be one of {', '.join(RESIDUAL_DTYPES)}")
    if residual_dtype == "bf16" and mixed_precision not in ("bf16", "auto"):
        raise ConfigError(f"residual_dtype bf16 needs --mixed_precision bf16 (or auto), not {mixed_precision!r}: "
                          "the blocks must compute in bf16 to keep a bf16 residual stream (fp16's range is "
                          "too narrow for it)")


@dataclasses.dataclass
class TrainConfig:
    """`raylm train`: the model, the optimisation, and where it runs. Model fields left unset come
    from `model_size`; `max_seq_len` unset comes from the prepared data's max_length."""

    # --- data and output
    data_dir: str = opt("", "required: output_dir of `raylm prepare` (local path or s3:// / gs:// URI)")
    save_dir: str = opt("./checkpoints", "checkpoints, logs, metrics and plots are written here")
    # --- model
    model_size: str | None = opt(None, "named size (default tiny): tiny (~20M), small (~125M), medium (~350M), large (~800M), xl (~1.5B)")
    hidden_size: int | None = opt(None, "width of the network (overrides model_size)")
    num_layers: int | None = opt(None, "number of transformer blocks")
    num_heads: int | None = opt(None, "attention heads; must divide hidden_size")
    num_kv_heads: int | None = opt(None, "key/value heads for grouped-query attention, each shared by "
                                         "num_heads / num_kv_heads query heads (default: --num_heads, standard "
                                         "attention, when --num_heads is given; else the model size's)")
    intermediate_size: int | None = opt(None, "SwiGLU hidden width (default: Llama's rule from hidden_size)")
    max_seq_len: int | None = opt(None, "longest context the model supports (default: the data's max_length)")
    rope_theta: float | None = opt(None, "rotary embedding base")
    dropout: float | None = opt(None, "dropout probability (0 for pre-training)")
    tie_embeddings: bool | None = opt(None, "share the input embedding with the output layer")
    # --- optimisation
    batch_size: int = opt(8, "rows per optimizer step, summed over all workers (global batch)")
    micro_batch_size: int | None = opt(None, "rows per forward/backward on one worker; "
                                       "accumulation steps = batch_size / (micro_batch_size x num_workers)")
    max_steps: int = opt(10000, "optimizer steps to train for")
    learning_rate: float = opt(3e-4, "peak learning rate after warmup")
    min_lr: float | None = opt(None, "learning rate at the end of the cosine decay (default: learning_rate / 10)")
    warmup_steps: int = opt(500, "steps of linear warmup from 0 to learning_rate")
    weight_decay: float = opt(0.1, "AdamW weight decay (not applied to norms and biases)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)")
    seed: int = opt(1234, "seed of the initial weights, data order and dropout")
    # --- system
    num_workers: int = opt(1, "training workers (one per GPU with --use_gpu)")
    use_gpu: bool | None = opt(None, "train on GPUs, one per worker: the bare flag or true; false keeps to CPU; "
                               "unset: GPUs when there are any (this machine's with --launcher local, the Ray "
                               "cluster's otherwise)")
    cpus_per_worker: int | None = opt(None, "CPU cores reserved per worker, also its PyTorch threads (default: "
                                      "on CPU, the Ray cluster's cores shared among the workers; with GPUs, a GPU "
                                      "node's cores per GPU, at most 8; 1 per worker in raylm tune's trials)")
    mixed_precision: str = opt("off", "off | auto | bf16 | fp16; the bare flag (or true) means auto (bf16 where "
                               "supported, else fp16 with loss scaling), false means off", choices=PRECISIONS,
                               flag_const="auto", bool_values=("auto", "off"))
    compile_model: bool = opt(False, "torch.compile the model (warmed up before timing starts)")
    compile_mode: str = opt("default", "with --compile_model: default (inductor's own kernel settings); "
                            "tune-kernels (inductor's coordinate-descent search for each fused kernel's block sizes "
                            "on GPUs, a longer compile); max-autotune (also benchmarks matmul kernels, without "
                            "CUDA graphs: the longest compile)", choices=COMPILE_MODES)
    strategy: str = opt("ddp", "ddp: every worker holds the whole model; fsdp: weights, gradients and optimizer state "
                        "sharded across workers (PyTorch FSDP2), for models that do not fit one GPU with ddp",
                        choices=STRATEGIES)
    activation_checkpointing: bool = opt(False, "recompute each transformer block's activations in the backward "
                                         "pass: far less activation memory for about a third more compute")
    residual_dtype: str = opt("fp32", RESIDUAL_HELP, choices=RESIDUAL_DTYPES)
    loss_chunking: str = opt("auto", "compute the loss in chunks (512 tokens on CPU, ~512 MB of logits on GPUs) "
                             "without ever holding the (tokens x vocabulary) logits: same loss and gradients, less "
                             "memory; faster or slower by a few percent depending on device and mode (the README's "
                             "Performance section). auto = on; off: from full logits",
                             choices=LOSS_CHUNKING)
    attention_backend: str = opt("auto", "the attention kernel to prefer on GPUs (PyTorch's SDPA falls back to "
                                 "another where it cannot serve the shapes): flash (FlashAttention-2), cudnn "
                                 "(cuDNN's fused attention), or auto: PyTorch's own order. No effect on CPU",
                                 choices=ATTENTION_BACKENDS)
    profile_steps: int = opt(0, "profile the last this many steps (never warm-up steps; an evaluation or "
                             "checkpoint inside them is included) with torch.profiler: time by kind and the "
                             "slowest kernels are printed, the whole table and a trace written to save_dir/profile")
    wait_for_workers: bool = opt(False, "the cluster adds nodes on demand (ray up): wait for the GPUs/CPUs this "
                                 "run needs instead of failing when they are not up yet")
    launcher: str = opt("ray", "ray: Ray Train workers; local: the same loop in this process (1 worker, no Ray)",
                        choices=("ray", "local"))
    # --- logging, evaluation, checkpoints
    log_interval: int = opt(10, "print a Step line every this many steps")
    eval_interval: int = opt(500, "compute validation loss every this many steps (0 = only at the end)")
    eval_steps: int = opt(20, "validation batches per evaluation (0 = the whole validation split)")
    save_interval: int = opt(1000, "write a checkpoint every this many steps (0 = only at the end)")
    keep_checkpoints: int = opt(3, "keep only the newest this many checkpoint_step_N folders")
    checkpoint: str = opt("", "resume exactly from this checkpoint_step_N folder (or the newest complete one "
                          "in this folder)")
    init_from: str = opt("", "start from these weights (a checkpoint or a Hugging Face Llama folder) with a "
                         "fresh optimizer and schedule: fine-tuning")
    max_failures: int = opt(0, "restart from the newest checkpoint this many times if a worker dies")
    max_nonfinite_steps: int = opt(20, "stop after this many non-finite losses in a row (each one is skipped)")
    simulate_failure_at_step: int = opt(0, "testing: kill the last worker at this step, once per save_dir (to see "
                                        "--max_failures restart from the newest checkpoint)")

    def __post_init__(self):
        positive = ("batch_size", "max_steps", "num_workers", "cpus_per_worker", "log_interval", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be at least 1")
        for name in ("warmup_steps", "eval_interval", "eval_steps", "save_interval", "max_failures"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be >= 0")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate ({self.learning_rate}) must be positive, e.g. 3e-4")
        if self.min_lr is None:
            self.min_lr = self.learning_rate / 10
        if not 0 <= self.min_lr <= self.learning_rate:
            raise ConfigError(f"min_lr ({self.min_lr}) must be between 0 and learning_rate ({self.learning_rate})")
        if self.micro_batch_size is None:
            self.micro_batch_size = max(1, self.batch_size // self.num_workers)
        per_step = self.micro_batch_size * self.num_workers
        if self.batch_size % per_step:
            fits = [m for m in range(1, self.batch_size + 1) if self.batch_size % (m * self.num_workers) == 0]
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be divisible by micro_batch_size ({self.micro_batch_size}) "
                f"x num_workers ({self.num_workers}); micro_batch_size could be one of {fits}"
                if fits else f"batch_size ({self.batch_size}) must be a multiple of num_workers ({self.num_workers})")
        if self.launcher == "local" and self.num_workers != 1:
            raise ConfigError("launcher 'local' runs one worker in this process: set num_workers 1 or launcher ray")
        if self.mixed_precision not in PRECISIONS:
            raise ConfigError(f"mixed_precision must be one of {', '.join(PRECISIONS)}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy ({self.strategy!r}) must be one of {', '.join(STRATEGIES)}")
        if self.loss_chunking not in LOSS_CHUNKING:
            raise ConfigError(f"loss_chunking ({self.loss_chunking!r}) must be one of {', '.join(LOSS_CHUNKING)}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"attention_backend ({self.attention_backend!r}) must be one of "
                              f"{', '.join(ATTENTION_BACKENDS)}")
        if self.profile_steps < 0:
            raise ConfigError(f"profile_steps ({self.profile_steps}) must be 0 (off) or a number of steps")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"compile_mode ({self.compile_mode!r}) must be one of {', '.join(COMPILE_MODES)}")
        check_residual_dtype(self.residual_dtype, self.mixed_precision)
        if self.compile_mode != "default" and not self.compile_model:
            raise ConfigError(f"compile_mode {self.compile_mode} applies to a compiled model: add --compile_model")

    @property
    def accumulation_steps(self) -> int:
        return self.batch_size // (self.micro_batch_size * self.num_workers)


@dataclasses.dataclass
class EvalConfig:
    """`raylm eval`: loss, perplexity and bits per byte of a checkpoint."""

    checkpoint: str = opt("", "required: a checkpoint_step_N folder, save_dir/final, or a save_dir (its newest "
                              "checkpoint)")
    data_dir: str = opt("", "a prepared dataset: evaluate its validation split (default: the training data's)")
    input_dir: str = opt("", "raw text files to evaluate instead, tokenized with the checkpoint's tokenizer")
    split: str = opt("val", "which split of --data_dir", choices=("val", "train"))
    extensions: list[str] = opt(DEFAULT_EXTENSIONS, "with --input_dir: file endings to read")
    text_field: str = opt("text", "with --input_dir: key holding the text in .json / .jsonl records")
    max_rows: int = opt(0, "evaluate at most this many rows (0 = all)")
    micro_batch_size: int = opt(8, "rows per forward pass")
    num_workers: int = opt(1, "Ray workers that evaluate shards of the rows in parallel (1 = in this process)")
    use_gpu: bool | None = opt(None, "evaluate on GPUs (one per worker): the bare flag or true; false: on CPU; "
                               "unset: on GPUs when there are any (this machine's with --num_workers 1, the Ray "
                               "cluster's otherwise)")
    json: bool = opt(False, "print the result as one JSON object (for scripts)")

    def __post_init__(self):
        if not self.checkpoint:
            raise ConfigError("--checkpoint is required (e.g. ./checkpoints/final)")
        if self.data_dir and self.input_dir:
            raise ConfigError("give --data_dir or --input_dir, not both")
        if self.num_workers < 1 or self.micro_batch_size < 1 or self.max_rows < 0:
            raise ConfigError("num_workers and micro_batch_size must be >= 1, max_rows >= 0")
        self.extensions = [e if e.startswith(".") else f".{e}" for e in (x.lower() for x in self.extensions)]


@dataclasses.dataclass
class GenerateConfig:
    """`raylm generate`: text from a checkpoint, streamed as it is sampled."""

    checkpoint: str = opt("", "required: a checkpoint_step_N folder, save_dir/final, or a save_dir")
    prompt: str | None = opt(None, "text to continue; omit for an interactive prompt")
    max_new_tokens: int = opt(200, "tokens to generate per sample")
    temperature: float = opt(0.8, "sampling temperature (0 = greedy)")
    top_k: int | None = opt(50, "sample only from the k most likely tokens (0 = off)")
    top_p: float | None = opt(0.95, "sample from the smallest set of tokens whose probability reaches p (1 = off)")
    seed: int = opt(1234, "random seed: the same seed gives the same text")
    num_samples: int = opt(1, "how many samples per prompt")
    device: str = opt("auto", "cpu, cuda, or auto (cuda when available)")

    def __post_init__(self):
        if not self.checkpoint:
            raise ConfigError("--checkpoint is required (e.g. ./checkpoints/final)")
        if self.max_new_tokens < 1 or self.num_samples < 1:
            raise ConfigError("max_new_tokens and num_samples must be >= 1")
        if self.temperature < 0:
            raise ConfigError(f"temperature ({self.temperature}) must be >= 0")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p ({self.top_p}) must be in (0, 1]")
        self.top_k = self.top_k or None
        self.top_p = None if self.top_p in (None, 1, 1.0) else self.top_p


@dataclasses.dataclass
class ExportConfig:
    """`raylm export`: a checkpoint as a Hugging Face Llama folder."""

    checkpoint: str = opt("", "required: a checkpoint_step_N folder, save_dir/final, or a save_dir")
    output_dir: str = opt("", "required: folder to write (config.json, model.safetensors, tokenizer files)")
    dtype: str = opt("float32", "weight dtype of the export", choices=("float32", "bfloat16", "float16"))
    overwrite: bool = opt(False, "replace output_dir if it exists")

    def __post_init__(self):
        if not self.checkpoint or not self.output_dir:
            raise ConfigError("--checkpoint and --output_dir are required")


@dataclasses.dataclass
class DemoConfig:
    """`raylm demo`: the whole pipeline on the built-in corpus (Python's own standard library)."""

    output_dir: str = opt("./raylm_demo", "every artifact of the demo lands here")
    corpus_mb: float = opt(4.0, "MB of standard-library source to train on")
    vocab_size: int = opt(4096, "tokenizer vocabulary")
    max_length: int = opt(128, "tokens per row")
    max_steps: int = opt(600, "training steps (about 2 minutes on 2 CPU cores)")
    num_workers: int = opt(1, "training workers")
    prompt: str = opt("def ", "prompt of the sample printed at the end")
    fresh: bool = opt(False, "delete output_dir first instead of reusing its prepared data")


SCHEDULERS = ("asha", "fifo")
TUNE_METRICS = ("val_loss", "val_perplexity")


@dataclasses.dataclass
class TuneConfig:
    """`raylm tune`: the search over learning rate and warmup. Every other setting (model, data,
    save_dir, steps) is a TrainConfig field, shared by all trials."""

    num_samples: int = opt(8, "trials to run, each with its own sampled learning_rate and warmup_steps")
    lr_min: float = opt(1e-4, "smallest learning_rate to sample (log-uniform between lr_min and lr_max)")
    lr_max: float = opt(1e-2, "largest learning_rate to sample")
    warmup_choices: list[int] = opt([], "warmup_steps values to sample from, e.g. --warmup_choices 0 100 500 "
                                    "(default: --warmup_steps, or the range warmup_min..warmup_max)")
    warmup_min: int | None = opt(None, "smallest warmup_steps of a uniform range (with warmup_max)")
    warmup_max: int | None = opt(None, "largest warmup_steps of a uniform range (with warmup_min)")
    scheduler: str = opt("asha", "asha: stop trials whose validation loss lags (successive halving); "
                         "fifo: run every trial to max_steps", choices=SCHEDULERS)
    metric: str = opt("val_loss", "what ASHA compares at each rung (the trials table ranks by val_loss either way)",
                      choices=TUNE_METRICS)
    grace_period: int = opt(1000, "asha: steps every trial runs before it can be stopped")
    reduction_factor: float = opt(3.0, "asha: rungs at grace_period x reduction_factor**k steps; a trial goes on "
                                  "while it is in the best 1/reduction_factor of the trials at its highest rung")
    max_concurrent_trials: int = opt(0, "trials running at once (0 = as many as the Ray cluster can place)")
    search_seed: int = opt(0, "seed of the sampled learning rates and warmups")
    resume: bool = opt(False, "continue the interrupted sweep in --save_dir; finished trials are not run again")

    def __post_init__(self):
        if self.num_samples < 1:
            raise ConfigError(f"num_samples ({self.num_samples}) must be at least 1")
        if self.lr_min <= 0 or self.lr_max <= 0:
            raise ConfigError(f"lr_min ({self.lr_min:g}) and lr_max ({self.lr_max:g}) must be positive, "
                              "e.g. --lr_min 1e-4 --lr_max 1e-2")
        if self.lr_min >= self.lr_max:
            raise ConfigError(f"lr_min ({self.lr_min:g}) must be smaller than lr_max ({self.lr_max:g}); "
                              "to train one learning rate use `raylm train --learning_rate`")
        ranged = (self.warmup_min, self.warmup_max)
        if self.warmup_choices and any(v is not None for v in ranged):
            raise ConfigError("give either --warmup_choices or --warmup_min/--warmup_max, not both")
        if (self.warmup_min is None) != (self.warmup_max is None):
            raise ConfigError("--warmup_min and --warmup_max go together: give both, or --warmup_choices")
        if self.warmup_min is not None and not 0 <= self.warmup_min < self.warmup_max:
            raise ConfigError(f"warmup_min ({self.warmup_min}) must be >= 0 and smaller than warmup_max "
                              f"({self.warmup_max})")
        if any(w < 0 for w in self.warmup_choices):
            raise ConfigError(f"warmup_choices ({self.warmup_choices}) must all be >= 0")
        if self.grace_period < 1:
            raise ConfigError(f"grace_period ({self.grace_period}) must be at least 1 step")
        if self.reduction_factor <= 1:
            raise ConfigError(f"reduction_factor ({self.reduction_factor:g}) must be greater than 1, e.g. 2 or 3")
        if self.max_concurrent_trials < 0:
            raise ConfigError(f"max_concurrent_trials ({self.max_concurrent_trials}) must be >= 0 "
                              "(0 = as many as the cluster can place)")


@dataclasses.dataclass
class PlanConfig:
    """`raylm plan`: GPU memory per worker of a training configuration (weights, gradients, optimizer
    state, activations) and the largest micro batch that fits. Model fields left unset come from
    `model_size`."""

    model_size: str | None = opt(None, "named size (default tiny): tiny, small, medium, large, xl")
    hidden_size: int | None = opt(None, "width of the network (overrides model_size)")
    num_layers: int | None = opt(None, "number of transformer blocks")
    num_heads: int | None = opt(None, "attention heads; must divide hidden_size")
    num_kv_heads: int | None = opt(None, "key/value heads for grouped-query attention (default: --num_heads "
                                         "when --num_heads is given; else the model size's)")
    intermediate_size: int | None = opt(None, "SwiGLU hidden width (default: Llama's rule from hidden_size)")
    tie_embeddings: bool | None = opt(None, "share the input embedding with the output layer")
    vocab_size: int = opt(32000, "tokenizer vocabulary size")
    max_length: int = opt(2048, "tokens per training row (the context length)")
    micro_batch_size: int = opt(1, "rows per forward/backward on one worker")
    batch_size: int | None = opt(None, "global batch; when it needs gradient accumulation, fsdp keeps unsharded "
                                 "gradients between micro-steps (default: micro_batch_size x num_workers)")
    num_workers: int = opt(1, "training workers, one GPU each")
    strategy: str = opt("ddp", "ddp or fsdp (as `raylm train --strategy`)", choices=STRATEGIES)
    mixed_precision: str = opt("bf16", "off | auto | bf16 | fp16 (as `raylm train`; auto counts as bf16)",
                               choices=PRECISIONS, flag_const="auto", bool_values=("auto", "off"))
    activation_checkpointing: bool = opt(False, "recompute each block's activations in the backward pass")
    residual_dtype: str = opt("fp32", "fp32 or bf16 (as `raylm train --residual_dtype`)", choices=RESIDUAL_DTYPES)
    gpu_memory_gb: float = opt(80.0, "memory of one GPU in GiB (H100: 80, A100: 40 or 80, L4: 24)")

    def __post_init__(self):
        for name in ("vocab_size", "max_length", "micro_batch_size", "num_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be at least 1")
        if self.gpu_memory_gb <= 0:
            raise ConfigError(f"gpu_memory_gb ({self.gpu_memory_gb}) must be positive, e.g. 80")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy ({self.strategy!r}) must be one of {', '.join(STRATEGIES)}")
        if self.mixed_precision not in PRECISIONS:
            raise ConfigError(f"mixed_precision must be one of {', '.join(PRECISIONS)}")
        check_residual_dtype(self.residual_dtype, self.mixed_precision)
        if self.batch_size is not None and self.batch_size % (self.micro_batch_size * self.num_workers):
            raise ConfigError(f"batch_size ({self.batch_size}) must be divisible by micro_batch_size "
                              f"({self.micro_batch_size}) x num_workers ({self.num_workers})")

    @property
    def accumulation_steps(self) -> int:
        per_step = self.micro_batch_size * self.num_workers
        return (self.batch_size or per_step) // per_step
