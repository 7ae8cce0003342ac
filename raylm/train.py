"""`raylm train`: the training loop, run by Ray Train's TorchTrainer (or in this process).

    raylm train --data_dir ./processed_data --save_dir ./checkpoints --model_size tiny \
        --batch_size 8 --max_steps 10000 --learning_rate 3e-4 --warmup_steps 500
    ray job submit --working-dir . -- raylm train --config jobs/configs/small_1gpu.yaml

The driver validates everything it can before a worker starts (`plan_run`), then Ray Train starts
`num_workers` copies of `train_loop_per_worker`, which reads top to bottom: set lr -> micro-steps ->
clip -> step -> log -> eval -> checkpoint. Pure helpers (`lr_at`) live at module level.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from raylm import __version__
from raylm import checkpoint as ckpt
from raylm import storage
from raylm.config import ConfigError, TrainConfig, to_dict
from raylm.data import BatchPlan, Cursor, PackedRows, Prefetcher, read_metadata

# Peak dense bf16 tensor throughput (FLOP/s) of common GPUs, for MFU. Unknown devices: no MFU.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                 "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12}


# ----------------------------------------------------------------------------- pure helpers


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warmup to learning_rate over
    warmup_steps, then cosine decay to min_lr at max_steps."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.learning_rate * step / cfg.warmup_steps
    decay_steps = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def weights_checksum(model: torch.nn.Module | dict) -> str:
    """sha256 of all parameters' bytes (of a model or a state dict), in name order."""
    import hashlib

    h = hashlib.sha256()
    state = model if isinstance(model, dict) else model.state_dict()
    for name, p in sorted(state.items()):
        h.update(name.encode())
        h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def p95_wait_fraction(waits: list[float], step_times: list[float]) -> float | None:
    """p95 of the time a step waited for its batch, as a fraction of the median step time
    (the first step, which includes start-up and compilation, is left out)."""
    if len(waits) < 3:
        return None
    return float(np.percentile(waits[1:], 95) / max(np.median(step_times[1:]), 1e-9))


def gpu_peak_flops(name: str) -> float | None:
    for key, peak in GPU_PEAK_BF16.items():
        if key.lower() in name.lower():
            return peak
    return None


# What `--mixed_precision bf16` gained over fp32 on a CPU with AMX (jobs/bench_vs_hf.py --precisions fp32 bf16,
# 2 cores of a Xeon with AMX, tiny and small-ish, eager and compiled, raylm's fused CPU kernels in both
# precisions: 1.87-2.63x over three runs; README's performance table): said in the banner of fp32 runs there.
AMX_BF16_SPEEDUP = "trained 1.9-2.6x faster than fp32 on such a CPU (jobs/bench_vs_hf.py)"


def resolve_precision(requested: str, device: torch.device) -> str:
    """'off' | 'bf16' | 'fp16'. auto: bf16 on CPU and on GPUs that support it, else fp16."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"


def dataset_fingerprint(meta: dict) -> dict:
    """What must match for a resume to continue the same data order."""
    return {
        "tokenizer_sha256": meta.get("tokenizer_sha256"),
        "max_length": meta.get("max_length"),
        "train_rows": meta["splits"]["train"]["rows"],
        "val_rows": meta["splits"]["val"]["rows"],
    }


# ----------------------------------------------------------------------------- planning (driver)


MODEL_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "max_seq_len",
                "rope_theta", "dropout", "tie_embeddings")


def _checkpoint_model_config(path: Path) -> dict:
    return ckpt.load_state(path)["model_config"]


@dataclasses.dataclass
class RunPlan:
    """Everything the workers need, decided and validated on the driver."""

    cfg: TrainConfig
    meta: dict
    model_config: dict
    resume_from: str | None  # a verified checkpoint folder
    init_from: str | None
    init_kind: str | None  # "checkpoint" | "hf"
    run_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)  # marks this run's checkpoints


PATH_FIELDS = ("data_dir", "save_dir", "checkpoint", "init_from")
# model settings that --init_from may change (new training from those weights, which do not depend on them);
# a resumed run keeps its model, dropout aside
FREE_ON_INIT = ("dropout", "max_seq_len")


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """cfg with its local paths made absolute against this (the driver's) working folder: Ray Train runs each
    worker in a folder of its own (under /tmp/ray/session_*/artifacts), where ./processed_data is not the
    user's. URIs (s3://, gs://, file://) and empty settings stay as they are."""
    changes = {f: os.path.abspath(os.path.expanduser(str(v))) for f in PATH_FIELDS
               if (v := getattr(cfg, f)) and "://" not in str(v)}
    return dataclasses.replace(cfg, **changes)


def plan_run(cfg: TrainConfig) -> RunPlan:
    """Validate the configuration against the data and any checkpoint, before any worker starts.
    Every problem is a ConfigError whose message says what to change."""
    from raylm.model import ModelConfig, model_config_from

    if not cfg.data_dir:
        raise ConfigError("--data_dir is required: the output_dir of `raylm prepare`")
    if "://" in str(cfg.save_dir):
        raise ConfigError(f"--save_dir {cfg.save_dir}: checkpoints, metrics and plots go to a folder, on this machine "
                          "or on storage every node of the cluster mounts (NFS, EFS, Filestore, or a bucket mounted "
                          "with s3fs / gcsfuse), not to an object-store URI: raylm verifies and resumes from "
                          "checkpoint files there")
    cfg = absolute_paths(cfg)
    meta = read_metadata(cfg.data_dir)
    vocab, max_length = int(meta["vocab_size"]), int(meta["max_length"])
    train_rows = int(meta["splits"]["train"]["rows"])
    if train_rows < cfg.batch_size:
        raise ConfigError(f"the training split has {train_rows} rows, fewer than batch_size ({cfg.batch_size}): "
                          f"lower --batch_size to at most {train_rows} or prepare more text")
    overrides = {f: getattr(cfg, f) for f in MODEL_FIELDS if getattr(cfg, f) is not None}

    resume_from = None
    if cfg.checkpoint:
        resume_from = ckpt.resolve(cfg.checkpoint)
    elif ckpt.list_checkpoints(cfg.save_dir):
        # Ray Train would resume from its own record of this save_dir; make that explicit.
        found = ckpt.newest_complete(cfg.save_dir, warn=lambda *_: None)
        if found is not None:
            raise ConfigError(
                f"{cfg.save_dir} already holds checkpoints (newest complete: {found.name}). To continue that "
                f"run, add --checkpoint {found}; to start a new run, choose another --save_dir")
    init_from, init_kind = None, None
    if cfg.init_from:
        if resume_from is not None:
            raise ConfigError("use either --checkpoint (resume exactly) or --init_from (new run from these "
                              "weights), not both")
        p = Path(cfg.init_from)
        if (p / "config.json").is_file() and (p / "model.safetensors").is_file() and not (p / "state.json").exists():
            init_kind, init_from = "hf", str(p)
        else:
            init_kind, init_from = "checkpoint", str(ckpt.resolve(p))

    if resume_from is not None or init_kind == "checkpoint":
        source = Path(resume_from or init_from)
        state = ckpt.load_state(source)
        saved = dict(state["model_config"])
        free = FREE_ON_INIT if resume_from is None else ("dropout",)
        clash = {k: (saved.get(k), v) for k, v in overrides.items() if saved.get(k) != v and k not in free}
        if clash or (cfg.model_size and cfg.model_size != state.get("model_size", cfg.model_size)):
            details = ", ".join(f"{k}: checkpoint {a} vs requested {b}" for k, (a, b) in clash.items())
            raise ConfigError(f"the model settings differ from checkpoint {source} ({details or 'model_size'}); "
                              "drop those flags to use the checkpoint's model")
        model_config = saved | {k: v for k, v in overrides.items() if k in free}
        data = state.get("data", {})
        if data.get("tokenizer_sha256") and data["tokenizer_sha256"] != meta.get("tokenizer_sha256"):
            raise ConfigError(
                f"checkpoint {source} was trained with a different tokenizer (sha256 {data['tokenizer_sha256'][:12]}) "
                f"than {cfg.data_dir} (sha256 {str(meta.get('tokenizer_sha256'))[:12]}). Prepare the new text with "
                f"the checkpoint's tokenizer: raylm prepare ... --tokenizer_file {source}/{data.get('tokenizer_file')}")
        if resume_from is not None and state.get("dataset") != dataset_fingerprint(meta):
            raise ConfigError(f"checkpoint {source} was trained on different data ({state.get('dataset')}) than "
                              f"{cfg.data_dir} ({dataset_fingerprint(meta)}); to train these weights on new data "
                              f"use --init_from {source} instead of --checkpoint")
    elif init_kind == "hf":  # checked here, before any worker starts (the worker's import_hf reads it again)
        from raylm.export import config_from_hf

        try:
            hf_config = config_from_hf(storage.read_json(Path(init_from) / "config.json"))
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"--init_from {init_from}: {e}") from None
        clash = {k: (getattr(hf_config, k, None), v) for k, v in overrides.items()
                 if k not in FREE_ON_INIT and getattr(hf_config, k, None) != v}
        if cfg.model_size:  # a named size says nothing about a folder's model: its config.json does
            clash["model_size"] = ("shape (its config.json)", repr(cfg.model_size))
        if clash:
            details = ", ".join(f"{k}: the model's {a} vs requested {b}" for k, (a, b) in clash.items())
            raise ConfigError(f"the model settings differ from --init_from {init_from} ({details}); drop those "
                              "flags to use the model as it is")
        model_config = dataclasses.asdict(hf_config) | {k: v for k, v in overrides.items() if k in FREE_ON_INIT}
    else:
        try:
            base = model_config_from(cfg.model_size or "tiny", vocab_size=vocab, **overrides)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if cfg.max_seq_len is None:
            base = dataclasses.replace(base, max_seq_len=max_length)
        model_config = dataclasses.asdict(base)

    if model_config is not None:
        try:
            mc = ModelConfig(**model_config)
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None
        if mc.vocab_size != vocab:
            how = (f" (raylm prepare ... --tokenizer_file {init_from}/tokenizer.json)" if init_kind == "hf" else
                   f" (raylm prepare ... --tokenizer_file {resume_from or init_from})" if init_kind or resume_from
                   else "")
            raise ConfigError(f"the model's vocabulary ({mc.vocab_size}) differs from the data's ({vocab}); "
                              f"prepare the data with the model's tokenizer{how}")
        if mc.max_seq_len < max_length:
            # (a resumed run never gets here: other data than its own is refused above)
            raise ConfigError(f"the data's rows are {max_length} tokens but the model's max_seq_len is "
                              f"{mc.max_seq_len}: raise --max_seq_len (the weights do not depend on it; training "
                              f"at the longer context teaches the model the new positions) or prepare with "
                              f"--max_length {mc.max_seq_len}")
    if cfg.use_gpu and cfg.launcher == "local" and not torch.cuda.is_available():
        raise ConfigError(_no_cuda_message())
    if cfg.warmup_steps >= cfg.max_steps:
        print(f"Note: warmup_steps ({cfg.warmup_steps}) >= max_steps ({cfg.max_steps}): the learning rate never "
              f"reaches {cfg.learning_rate:g}; --warmup_steps {max(1, cfg.max_steps // 20)} is 5% of the run")
    return RunPlan(cfg, meta, model_config, str(resume_from) if resume_from else None, init_from, init_kind)


def _no_cuda_message() -> str:
    if torch.version.cuda is None:
        return ("--use_gpu was given but this PyTorch is a CPU-only build (torch " + torch.__version__ + "). "
                "Install a CUDA build (pip install torch --index-url https://download.pytorch.org/whl/cu124) "
                "or drop --use_gpu.")
    return "--use_gpu was given but no GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES), or drop --use_gpu."


# ----------------------------------------------------------------------------- the worker's session


class LocalSession:
    """launcher=local: one worker in this process, checkpoints published straight to save_dir."""

    rank, world_size, local_rank = 0, 1, 0

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.last_checkpoint: str | None = None
        self.last_metrics: dict = {}

    def latest_checkpoint(self) -> str | None:
        return None

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        self.last_metrics = metrics
        if checkpoint_dir is not None:
            dest = Path(self.cfg.save_dir) / Path(checkpoint_dir).name
            self.last_checkpoint = str(ckpt.publish_local(checkpoint_dir, dest))
            ckpt.prune(self.cfg.save_dir, self.cfg.keep_checkpoints)


class RaySession:
    """launcher=ray: ranks and reporting through ray.train."""

    def __init__(self, cfg: TrainConfig):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size, self.local_rank = (ctx.get_world_rank(), ctx.get_world_size(),
                                                       ctx.get_local_rank())
        self.cfg = cfg

    def latest_checkpoint(self) -> str | None:
        import ray.train

        found = ray.train.get_checkpoint()
        return found.path if found is not None else None

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        import ray.train

        if checkpoint_dir is None:
            ray.train.report(metrics)
            return
        name = Path(checkpoint_dir).name
        save_dir = self.cfg.save_dir

        def upload(checkpoint, dir_name):  # temporary name, then rename: never a half checkpoint
            dest = ckpt.publish_local(checkpoint.path, Path(save_dir) / dir_name)
            return ray.train.Checkpoint(str(dest))

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                         checkpoint_dir_name=name, checkpoint_upload_fn=upload)


# ----------------------------------------------------------------------------- worker helpers


def _device(session, cfg: TrainConfig) -> torch.device:
    if cfg.use_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError(_no_cuda_message())
        if cfg.launcher == "ray":
            import ray.train.torch

            return ray.train.torch.get_device()
        return torch.device("cuda", 0)
    return torch.device("cpu")


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    # numpy/python states hold tuples of ints: store as tensors/lists so torch.load(weights_only) reads them
    np_state = state["numpy"]
    state["numpy"] = [np_state[0], torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)), *map(int, np_state[2:4]),
                      float(np_state[4])]
    py = state["python"]
    state["python"] = [py[0], list(py[1]), py[2]]
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def shard_model(model, device: torch.device, world: int, precision: str) -> None:
    """--strategy fsdp: PyTorch FSDP2, one shard group per TransformerBlock, then the rest (embedding,
    final norm, lm_head) as the root group. Each fully_shard call moves its parameters to `device`
    and keeps this rank's 1/world slice (dim 0) as a DTensor, so the whole model never sits on one
    GPU. bf16/fp16: blocks compute with 16-bit copies of the fp32 sharded weights (no autocast) and
    gradients are reduced in fp32; the optimizer steps the fp32 shards.

    The blocks' inputs are not cast (cast_forward_inputs=False): the residual stream is already 16-bit
    (the embedding computes with a 16-bit copy), and the rotary tables stay fp32. torch 2.11's FSDP2 does
    not cast inputs again when activation checkpointing recomputes a block, so cast tables made the
    recomputed tensors differ in dtype from the saved ones (CheckpointError) under --strategy fsdp
    --activation_checkpointing and bf16 or fp16."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low else None,
                                  cast_forward_inputs=False)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def gathered_state(model, optimizer, sharded: bool) -> tuple[dict, dict | None]:
    """(model, optimizer) state dicts in the one checkpoint format, whatever the strategy: model keys
    of a plain LLMModel's state_dict(), optimizer state keyed by parameter index as a plain AdamW's
    (optimizer None: only the model). So every checkpoint exports, evaluates and resumes on any
    world size and strategy. FSDP: every rank must call this (it all-gathers the shards); the full
    tensors land on rank 0's CPU, other ranks get empty dicts."""
    if not sharded:
        return model.state_dict(), optimizer.state_dict() if optimizer is not None else None
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
    if not model_state:  # not rank 0
        return {}, {}
    if model.config.tie_embeddings:  # gathered as two copies; one tensor under two names, as in the plain model
        model_state["lm_head.weight"] = model_state["embed_tokens.weight"]
    if optim is not None:  # parameter names -> indices in optimizer order
        index = {name: i for i, name in enumerate(n for g in optim["param_groups"] for n in g["params"])}
        optim = {"state": {index[n]: v for n, v in optim["state"].items()},
                 "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in optim["param_groups"]]}
    return model_state, optim


def load_optimizer_state(model, optimizer, state: dict, sharded: bool) -> None:
    """Load a checkpoint's optimizer state (plain format: parameter indices); under FSDP each rank
    keeps its slice of the full tensors (set_optimizer_state_dict shards them)."""
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {p: n for n, p in model.named_parameters()}
    fqns = [names[p] for g in optimizer.param_groups for p in g["params"]]
    if len(fqns) != sum(len(g["params"]) for g in state["param_groups"]):
        raise ValueError("the checkpoint's optimizer state does not match this model's parameters")
    by_name = {"state": {fqns[i]: v for i, v in state["state"].items()},
               "param_groups": [{**g, "params": [fqns[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


@contextlib.contextmanager
def gradient_sync(runner, model, *, sync: bool, sharded: bool):
    """Around one micro-step: reduce gradients across workers only on the last one (earlier ones
    accumulate locally). DDP: no_sync(); FSDP2: set_requires_gradient_sync (it then keeps unsharded
    fp32 gradients until the last micro-step)."""
    if sharded:
        model.set_requires_gradient_sync(sync)
        yield
    elif sync or not isinstance(runner, torch.nn.parallel.DistributedDataParallel):
        yield
    else:
        with runner.no_sync():
            yield


def _all_reduce_sum(t: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def chunked_loss_head(device: torch.device, setting: str = "auto") -> bool:
    """Whether the model computes its loss in chunks, never holding the logits (LLMModel's
    return_logits=False): --loss_chunking on/off; auto is on, on every device so far (the device
    stays an argument for one where it may not be). It always needs less memory; whether it is faster
    depends on the device, the precision and compilation, by a few percent either way: the README's
    Performance section has the measurements (jobs/bench_loss_head.py, jobs/gpu_check.sh)."""
    return setting in ("on", "auto")


def compile_options(mode: str) -> dict:
    """torch.compile's arguments for --compile_mode. tune-kernels turns on inductor's
    coordinate-descent tuning: each generated Triton kernel's block sizes and warps are searched
    around its heuristic choice, benchmarked on the GPU at compile time (the C++ kernels of a CPU
    run are unchanged). max-autotune also benchmarks matmul kernels (Triton templates against
    cuBLAS), without CUDA graphs: a GPU step of the small model spends 132 of its 134 ms in kernels
    (--profile_steps on an H200), so there is little launch time for them to save, and they would
    hold a memory pool of their own."""
    if mode == "tune-kernels":
        return {"options": {"coordinate_descent_tuning": True}}
    if mode == "max-autotune":
        return {"mode": "max-autotune-no-cudagraphs"}
    return {}


def fused_adamw(device: torch.device, sharded_fp16: bool = False) -> bool:
    """AdamW's fused kernel: on CUDA and on CPU (one pass over each tensor; 3x faster on CPU). Not
    with FSDP in fp16: ShardedGradScaler's found_inf has shape (1,), which the fused step's
    foreach_sub_ on its 0-d step counters rejects ("output with shape [] doesn't match ... [1]")."""
    return device.type in ("cuda", "cpu") and not sharded_fp16


@torch.no_grad()
def loss_sums(model, rows: PackedRows, indices: np.ndarray, *, micro_batch_size: int, device: torch.device,
              autocast=contextlib.nullcontext, loss_chunking: str = "auto") -> tuple[float, int]:
    """(summed loss in nats, target tokens) over these rows. `raylm eval` uses it too."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for i in range(0, len(indices), micro_batch_size):
        part = indices[i:i + micro_batch_size]
        ids, labels = rows.batch(part)
        with autocast():
            _, loss_sum = model(ids.to(device), labels=labels.to(device), loss_reduction="sum",
                                return_logits=not chunked_loss_head(device, loss_chunking))
        total += loss_sum.double()
        count += rows.target_tokens(part)
    model.train(was_training)
    return float(total), count


def evaluate(model, rows: PackedRows, *, micro_batch_size: int, max_batches: int, rank: int, world_size: int,
             device: torch.device, autocast, sharded: bool = False, loss_chunking: str = "auto") -> tuple[float, int]:
    """Mean loss per target token over the first ``max_batches`` x micro x world validation rows
    (all of them if max_batches is 0), split across ranks. Returns (loss, target tokens)."""
    n = len(rows)
    if max_batches:
        n = min(n, max_batches * micro_batch_size * world_size)
    mine = np.arange(rank, n, world_size)
    loss, count = loss_sums(model, rows, mine, micro_batch_size=micro_batch_size, device=device, autocast=autocast,
                            loss_chunking=loss_chunking)
    if sharded:  # FSDP all-gathers weights in every forward: each rank runs as many as the busiest one
        spare = math.ceil(math.ceil(n / world_size) / micro_batch_size) - math.ceil(len(mine) / micro_batch_size)
        loss_sums(model, rows, np.zeros(spare, dtype=np.int64), micro_batch_size=1, device=device, autocast=autocast,
                  loss_chunking=loss_chunking)
    total = _all_reduce_sum(torch.tensor([loss, count], dtype=torch.float64, device=device), world_size)
    loss, count = total.tolist()
    return (loss / count if count else float("nan")), int(count)


CHECKPOINT_DATA_KEYS = ("tokenizer_type", "tokenizer_file", "tokenizer_sha256", "eos_token_id", "pad_token_id",
                        "vocab_size", "max_length")


def _tokenizer_files(meta: dict, data_dir: str) -> dict[str, bytes]:
    """The tokenizer travels inside every checkpoint, so generate/eval/export need nothing else
    (a tiktoken ranks file brings its .json sidecar of pattern and special tokens)."""
    name = meta.get("tokenizer_file")
    if not name:
        return {}
    from raylm.storage import filesystem, plain_name

    plain_name(name, f"{data_dir}/metadata.json")

    fs, root = filesystem(data_dir)
    files = {}
    for fname in (name, name + ".json"):
        try:
            with fs.open_input_stream(f"{root.rstrip('/')}/{fname}") as f:
                files[fname] = f.read()
        except FileNotFoundError:
            if fname == name:
                raise
    return files


def pick_resume_checkpoint(config: dict, session, say) -> str | None:
    """Where this attempt starts: the newest complete checkpoint of this run (after a restart), else
    --checkpoint, else nowhere. A checkpoint is this run's when its state.json holds this run's id: Ray
    also hands a new run the latest checkpoint of an earlier run in the same save_dir, which must not
    overrule the --checkpoint asked for (an older step, to go back before a divergence). Ray's record can
    lag a report that was in flight when a worker died, so save_dir is looked at too; an incomplete
    checkpoint is never used."""
    def usable(path) -> bool:
        reason = ckpt.verify(path)
        if reason is not None:
            say(f"checkpoint {path} is unusable ({reason}); looking for an older complete one")
        return reason is None

    def this_run(path) -> bool:
        return ckpt.load_state(path).get("run_id") == config["run_id"]

    own = []
    latest = session.latest_checkpoint()
    if latest and usable(latest) and this_run(latest):
        own.append(Path(latest))
    for _, path in ckpt.list_checkpoints(config["train"]["save_dir"]):
        if ckpt.verify(path) is None and this_run(path):
            own.append(path)
            break
    if own:
        return str(max(own, key=lambda p: ckpt.load_state(p)["step"]))
    resume_from = config["resume_from"]
    return resume_from if resume_from and usable(resume_from) else None


def _first_simulated_failure(cfg: TrainConfig) -> bool:
    """--simulate_failure_at_step fails once per save_dir (a marker file records it), so the
    restarted attempt runs through, as after a real lost machine."""
    marker = Path(cfg.save_dir) / ".simulated_failure_done"
    if marker.exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return True


def build_model(plan_dict: dict, resume_from: str | None):
    """The model of this run, with its starting weights (resume, init_from, or fresh init)."""
    from raylm.model import LLMModel, ModelConfig

    model = LLMModel(ModelConfig(**plan_dict["model_config"]))
    if resume_from is None and plan_dict["init_kind"] == "hf":
        from raylm.export import import_hf

        # the folder's weights into the planned model (its context and dropout may differ from the folder's)
        model.load_state_dict(import_hf(plan_dict["init_from"]).state_dict(), strict=True)
        return model
    source = resume_from or (plan_dict["init_from"] if plan_dict["init_kind"] == "checkpoint" else None)
    if source is not None:
        model.load_state_dict(ckpt.load_model_state(source), strict=True)
    return model


# ----------------------------------------------------------------------------- the training loop


def train_loop_per_worker(config: dict) -> None:
    """One worker's training loop. ``config`` is a plain dict (Ray Tune changes its keys)."""
    run_worker(config)


def run_worker(config: dict, session: LocalSession | RaySession | None = None) -> None:
    cfg = TrainConfig(**config["train"])
    meta = config["meta"]
    if session is None:
        session = RaySession(cfg) if cfg.launcher == "ray" else LocalSession(cfg)
    rank, world = session.rank, session.world_size
    is_main = rank == 0

    def say(line: str) -> None:
        """Rank 0 writes plain lines (Ray Train's print patch would route them through logging)."""
        if is_main:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    if cfg.launcher == "ray":
        import logging

        try:  # no "Reporting training result ..." line per report (that logger is named by its file)
            from ray.train.v2._internal.execution import context as _train_context

            logging.getLogger(_train_context.__file__).setLevel(logging.WARNING)
        except ImportError:
            pass
    device = _device(session, cfg)
    precision = resolve_precision(cfg.mixed_precision, device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for whatever runs in fp32
    else:  # no page faults re-mapping the activations each step frees (1-2% of a small model's CPU step)
        from raylm.runtime import keep_freed_memory

        keep_freed_memory()

    resume_from = pick_resume_checkpoint(config, session, say)
    state = ckpt.load_state(resume_from) if resume_from else None
    start_step = state["step"] if state else 0

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(config, resume_from)
    model.activation_checkpointing = cfg.activation_checkpointing
    if cfg.residual_dtype == "bf16":
        if precision != "bf16":  # --mixed_precision auto on a GPU without bf16
            raise ConfigError(f"--residual_dtype bf16 needs bf16 compute, but mixed precision resolved to "
                              f"{precision} on {device}: leave --residual_dtype at fp32 here")
        model.residual_dtype = torch.bfloat16
    sharded = cfg.strategy == "fsdp" and world > 1  # one worker: nothing to shard, the plain model
    if sharded:
        shard_model(model, device, world, precision)  # the optimizer below then holds only this rank's slice
    else:
        model.to(device)
    model_cfg = model.config
    from raylm.model import configure_optimizer_groups, flops_per_token

    optimizer = torch.optim.AdamW(configure_optimizer_groups(model, cfg.weight_decay), lr=lr_at(1, cfg),
                                  betas=(cfg.beta1, cfg.beta2),
                                  fused=fused_adamw(device, sharded_fp16=sharded and precision == "fp16"))
    if sharded:  # skip-or-step must agree across ranks: ShardedGradScaler all-reduces found_inf
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        scaler = ShardedGradScaler(device.type, enabled=precision == "fp16")
    else:
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    if state:
        load_optimizer_state(model, optimizer, ckpt.load_optimizer_state(resume_from), sharded)
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    seq_len = int(meta["max_length"])
    train_rows = PackedRows(config["data_dir"], "train", meta)
    val_rows = PackedRows(config["data_dir"], "val", meta)
    cursor = Cursor(**state["cursor"]) if state else Cursor()
    plan = BatchPlan(len(train_rows), cfg.batch_size, cfg.seed, cursor)

    # RNG: restored exactly when the world size matches; otherwise seeded per rank from the step
    rng_states = ckpt.load_rng_states(resume_from) if resume_from else None
    if rng_states is not None and len(rng_states) == world:
        _set_rng_state(rng_states[rank])
    else:
        torch.manual_seed(cfg.seed + 1000 * rank + start_step)
        np.random.seed((cfg.seed + 1000 * rank + start_step) % 2**32)
        random.seed(cfg.seed + 1000 * rank + start_step)

    compiled = torch.compile(model, **compile_options(cfg.compile_mode)) if cfg.compile_model else model
    if world > 1 and not sharded:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # broadcast_buffers=False: the only buffers are the rotary tables, which every rank computes alike;
        # broadcasting them from rank 0 would cost a collective before every forward pass
        runner = DDP(compiled, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    else:
        runner = compiled
    logits_out = not chunked_loss_head(device, cfg.loss_chunking)
    # FSDP's MixedPrecisionPolicy already computes in 16 bits; the loss is fp32 either way (model.py)
    autocast_dtype = None if sharded else {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def autocast():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=autocast_dtype)

    logger = None
    if is_main:
        from raylm.metrics import MetricsLogger

        logger = MetricsLogger(cfg.save_dir, resume_step=start_step)
    n_params = model.num_params()
    flops_tok = flops_per_token(model_cfg, seq_len)
    peak = gpu_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    say("=" * 60)
    say("Training Configuration")
    say("=" * 60)
    say(f"Device: {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}"
        f" | CPU threads: {torch.get_num_threads()}")
    say(f"Distributed: {world > 1} (World size: {world})")
    strategy_note = ""
    if sharded:
        strategy_note = f" (FSDP2{', 16-bit compute by its MixedPrecisionPolicy' if precision != 'off' else ''})"
    elif cfg.strategy == "fsdp":
        strategy_note = " (1 worker: nothing to shard, same as ddp)"
    say(f"Strategy: {cfg.strategy}{strategy_note} | Activation checkpointing: {cfg.activation_checkpointing}")
    from raylm.plan import describe, estimate_memory, largest_micro_batch

    plan_args = (world, cfg.strategy, precision, cfg.activation_checkpointing, cfg.accumulation_steps, device.type)
    fits = ""
    if device.type == "cuda":
        gpu_bytes = torch.cuda.get_device_properties(device).total_memory
        fits = (f"; largest micro batch for this GPU ({gpu_bytes / 2**30:.0f} GiB): "
                f"{largest_micro_batch(model_cfg, seq_len, gpu_bytes, *plan_args, residual=cfg.residual_dtype)}")
    estimate = estimate_memory(model_cfg, seq_len, cfg.micro_batch_size, *plan_args, compile_model=cfg.compile_model,
                               residual=cfg.residual_dtype)
    say(f"Memory estimate per worker: {describe(estimate)}"
        f"{fits}")
    say(f"Model parameters: {n_params:,} ({model.num_params(exclude_embeddings=True):,} without embeddings)")
    say(f"Model: hidden {model_cfg.hidden_size}, layers {model_cfg.num_layers}, heads {model_cfg.num_heads}"
        f" (kv {model_cfg.num_kv_heads or model_cfg.num_heads}), vocab {model_cfg.vocab_size}, context {seq_len}")
    say(f"Batch size: {cfg.batch_size} (micro: {cfg.micro_batch_size})")
    say(f"Gradient accumulation steps: {cfg.accumulation_steps}")
    say(f"Tokens per step: {cfg.batch_size * seq_len:,}")
    residual_note = ""
    if precision != "off":
        residual_note = " | Residual stream: " + ("bf16" if model.residual_dtype is not None else
                                                  precision if sharded else "fp32")
    say(f"Mixed precision: {precision != 'off'}{' (' + precision + ')' if precision != 'off' else ''}{residual_note}"
        f" | Compile: {cfg.compile_model}{' (' + cfg.compile_mode + ')' if cfg.compile_model else ''}"
        + (f" | Attention kernel: {cfg.attention_backend}" if device.type == "cuda" else ""))
    if device.type == "cpu" and precision in ("off", "bf16") and not cfg.compile_model:  # raylm.model's fused ops
        from raylm.cpu_kernels import describe_cpu_kernels

        say(f"Norm, SwiGLU and rotary kernels: {describe_cpu_kernels()}")
    if device.type == "cpu" and precision == "off":
        from raylm.runtime import cpu_has_bf16_matmul_units

        if cpu_has_bf16_matmul_units():
            say(f"Tip: this CPU multiplies bf16 matrices in hardware (Intel AMX): --mixed_precision bf16 "
                f"{AMX_BF16_SPEEDUP}, with bf16 rounding inside the matrix products")
    say(f"Training rows: {len(train_rows):,} | Validation rows: {len(val_rows):,}")
    if state:
        say(f"Resumed from {resume_from} at step {start_step} (epoch {cursor.epoch}, row {cursor.position})")
    elif config["init_from"]:
        say(f"Initialised from {config['init_from']} (fresh optimizer and schedule)")
    say("=" * 60)

    prefetch = Prefetcher(train_rows, plan, rank, world, cfg.micro_batch_size, device)
    from raylm.model import preferred_attention
    from raylm.profiling import StepProfiler, profile_window

    warm_steps = max(2, cfg.log_interval if cfg.compile_model else 1)
    profiler = StepProfiler(profile_window(start_step, cfg.max_steps, cfg.profile_steps, warm_steps) if is_main
                            else None, device, Path(logger.dir) / "profile" if logger else None)
    context = contextlib.ExitStack()  # closed in the finally below
    context.enter_context(preferred_attention(device, cfg.attention_backend))
    context.callback(profiler.close)  # a run that fails inside the profiled steps stops the profiler
    window_profiled = False
    if cfg.profile_steps and is_main and profiler.window is None:
        say(f"--profile_steps {cfg.profile_steps}: no profile, the run ends inside its first {warm_steps} "
            f"(warm-up) steps; raise --max_steps")
    nonfinite_total = state.get("nonfinite_steps", 0) if state else 0
    nonfinite_run = 0
    window_loss = torch.zeros((), dtype=torch.float64, device=device)
    window_tokens, window_targets, window_wait = 0, 0, 0.0
    t_window = time.perf_counter()
    warm_tokens, warm_time = 0, 0.0
    last_val = None
    step = start_step
    data_wait, step_times = [], []
    cursor_now = cursor

    def save(step: int, metrics: dict) -> None:
        """Gather every rank's RNG, write the checkpoint on rank 0, report it through the session."""
        rng_all = [_rng_state()]
        if world > 1:
            import torch.distributed as dist

            rng_all = [None] * world
            dist.all_gather_object(rng_all, _rng_state())
        model_state, optimizer_state = gathered_state(model, optimizer, sharded)  # FSDP: every rank gathers
        tmp = None
        if is_main:
            tmp = Path(tempfile.mkdtemp(prefix="raylm-ckpt-")) / ckpt.checkpoint_name(step)
            ckpt.write_checkpoint_files(
                tmp, model_state=model_state, optimizer_state=optimizer_state, rng_states=rng_all,
                state={
                    "step": step, "cursor": dataclasses.asdict(cursor_now),
                    "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                    "nonfinite_steps": nonfinite_total, "raylm_version": __version__, "run_id": config["run_id"],
                    "model_config": dataclasses.asdict(model_cfg), "model_size": cfg.model_size,
                    "train_config": to_dict(cfg), "dataset": dataset_fingerprint(meta), "world_size": world,
                    "data": {k: meta.get(k) for k in CHECKPOINT_DATA_KEYS}, "metrics": metrics,
                },
                extra_files=_tokenizer_files(meta, config["data_dir"]))
        session.report(metrics, str(tmp) if tmp else None)
        if tmp is not None:
            shutil.rmtree(tmp.parent, ignore_errors=True)

    try:
        while step < cfg.max_steps:
            step += 1
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            profiler.step_begins(step)
            window_profiled = window_profiled or profiler.active
            t_wait = t_step = time.perf_counter()
            micro_batches, n_target, cursor_now = prefetch.next()
            waited = time.perf_counter() - t_wait
            data_wait.append(waited)
            window_wait += waited
            if cfg.simulate_failure_at_step and step == cfg.simulate_failure_at_step and rank == world - 1 \
                    and _first_simulated_failure(cfg):
                sys.stderr.write(f"[rank {rank}] simulating a worker failure at step {step}\n")
                if cfg.launcher == "local":
                    raise SimulatedFailure(f"simulated failure at step {step}")
                os._exit(1)  # the worker process dies, as on a lost machine
            # -- micro-steps: gradients summed over the whole global batch, loss per target token
            scale = world / max(n_target, 1)  # DDP and FSDP average gradients over ranks; undo that
            for i, (ids, labels) in enumerate(micro_batches):
                last = i == len(micro_batches) - 1
                with gradient_sync(runner, model, sync=last, sharded=sharded):
                    with autocast():
                        _, loss_sum = runner(ids, labels=labels, loss_reduction="sum", return_logits=logits_out)
                    scaler.scale(loss_sum * scale).backward()
                window_loss += loss_sum.detach().double()
            # -- clip, step (skipped when the gradient is not finite)
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            if sharded:  # FSDP: a replicated DTensor holding the global norm
                grad_norm = grad_norm.full_tensor()
            finite = bool(torch.isfinite(grad_norm))  # the one host sync per step
            if finite:
                scaler.step(optimizer)
                nonfinite_run = 0
            else:
                nonfinite_total += 1
                nonfinite_run += 1
                say(f"Step {step}: non-finite loss or gradient, step skipped ({nonfinite_run} in a row)")
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if nonfinite_run >= cfg.max_nonfinite_steps:
                raise FloatingPointError(
                    f"{nonfinite_run} non-finite losses in a row at step {step}: training is unstable. Lower "
                    f"--learning_rate (now {cfg.learning_rate:g}) or raise --warmup_steps (now {cfg.warmup_steps}); "
                    "the last good checkpoint is kept in --save_dir")
            window_tokens += cfg.batch_size * seq_len
            window_targets += n_target
            step_times.append(time.perf_counter() - t_step)
            t_profile = time.perf_counter()
            for line in profiler.step_ends(step) or ():
                say(line)
            t_window += time.perf_counter() - t_profile  # writing the profile is not training

            # -- log
            if step % cfg.log_interval == 0 or step == cfg.max_steps:
                _all_reduce_sum(window_loss, world)
                dt = time.perf_counter() - t_window
                train_loss = window_loss.item() / max(1, window_targets)
                tps = window_tokens / dt if dt > 0 else 0.0
                if step - start_step > warm_steps and not window_profiled:  # warm windows, not profiled
                    warm_tokens += window_tokens
                    warm_time += dt
                line = f"Step {step}/{cfg.max_steps} | Loss: {train_loss:.4f} | LR: {lr:.2e} | Tokens/sec: {tps:,.0f}"
                mfu = None
                if peak:
                    mfu = flops_tok * tps / (peak * world)
                    line += f" | MFU: {100 * mfu:.1f}%"
                say(line)
                if logger:
                    logger.log(step, loss=train_loss, lr=lr, tokens_per_sec=tps, grad_norm=float(grad_norm),
                               mfu=mfu, data_wait_frac=window_wait / dt if dt > 0 else None)
                window_loss.zero_()
                window_tokens, window_targets, window_wait = 0, 0, 0.0
                window_profiled = profiler.active
                t_window = time.perf_counter()

            # -- evaluate
            do_eval = (cfg.eval_interval and step % cfg.eval_interval == 0) or step == cfg.max_steps
            do_save = (cfg.save_interval and step % cfg.save_interval == 0) or step == cfg.max_steps
            metrics = {"step": step, "lr": lr}
            if do_eval:
                t_eval = time.perf_counter()
                eval_model = compiled
                last_val, _ = evaluate(eval_model, val_rows, micro_batch_size=cfg.micro_batch_size,
                                       max_batches=cfg.eval_steps, rank=rank, world_size=world, device=device,
                                       autocast=autocast, sharded=sharded, loss_chunking=cfg.loss_chunking)
                say(f"Validation Loss: {last_val:.4f} | Perplexity: {math.exp(min(last_val, 50)):.2f}")
                metrics.update(val_loss=last_val, val_perplexity=math.exp(min(last_val, 50)))
                if logger:
                    logger.log(step, val_loss=last_val, val_perplexity=math.exp(min(last_val, 50)))
                    logger.plot()
                t_window += time.perf_counter() - t_eval  # evaluation time is not training throughput
            if do_save:
                t_save = time.perf_counter()
                save(step, metrics)
                t_window += time.perf_counter() - t_save
            elif do_eval:
                session.report(metrics)
    finally:
        context.close()
        prefetch.close()
        if logger:
            logger.close()
    # Every rank must end with the same weights (DDP keeps them in step); record the evidence.
    # FSDP keeps one copy, in slices: the checksum of the gathered weights.
    checksum = [weights_checksum(gathered_state(model, None, sharded)[0])] if sharded else [weights_checksum(model)]
    if world > 1 and not sharded:
        import torch.distributed as dist

        checksum = [None] * world
        dist.all_gather_object(checksum, weights_checksum(model))
    if is_main:
        waits = np.array(data_wait[1:] or [0.0])
        summary = {"start_step": start_step, "final_step": step, "world_size": world, "strategy": cfg.strategy,
                   "cpu_threads": torch.get_num_threads(),
                   "tokens_per_sec_warm": warm_tokens / warm_time if warm_time else None,
                   "data_wait_p95_s": float(np.percentile(waits, 95)),
                   "data_wait_p95_fraction": p95_wait_fraction(data_wait, step_times),
                   "nonfinite_steps": nonfinite_total, "final_val_loss": last_val,
                   "rank_weight_checksums": checksum, "ranks_identical": len(set(checksum)) == 1}
        if len(set(checksum)) != 1:
            say(f"WARNING: ranks ended with different weights: {checksum}")
        if logger:
            from raylm.storage import atomic_write_json

            atomic_write_json(Path(logger.dir) / "summary.json", summary)


# ----------------------------------------------------------------------------- the driver


@dataclasses.dataclass
class TrainResult:
    final_dir: str | None  # save_dir/final: the last checkpoint, at a stable path
    checkpoint: str | None  # the last checkpoint_step_N
    metrics: dict


def worker_config(plan: RunPlan) -> dict:
    """The dict each worker receives (Ray Tune samples keys of ``train``)."""
    return {"train": to_dict(plan.cfg), "meta": plan.meta, "model_config": plan.model_config,
            "resume_from": plan.resume_from, "init_from": plan.init_from, "init_kind": plan.init_kind,
            "data_dir": plan.cfg.data_dir, "run_id": plan.run_id}


def build_trainer(plan: RunPlan, *, storage_path: str | None = None, name: str | None = None,
                  callbacks: list | None = None):
    """The TorchTrainer of this run. `raylm tune` builds its trials with this same function."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = plan.cfg
    save_dir = os.path.abspath(cfg.save_dir)
    if storage_path is None:
        storage_path, name = save_dir.rstrip("/").rsplit("/", 1)
    resources = {"CPU": cfg.cpus_per_worker or 1}  # train() decides an unset one first (_decide_cpus)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=worker_config(plan),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources | ({"GPU": 1} if cfg.use_gpu else {})),
        run_config=RunConfig(
            name=name, storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            callbacks=callbacks,
        ),
    )


def no_cluster_gpu_message() -> str:
    if torch.version.cuda is None:
        return (f"--use_gpu was given but the Ray cluster has no GPU, and this PyTorch is a CPU-only build (torch "
                f"{torch.__version__}): on a GPU machine, install a CUDA build (pip install torch --index-url "
                "https://download.pytorch.org/whl/cu124) and start Ray there; or drop --use_gpu.")
    return ("--use_gpu was given but the Ray cluster has no GPU: start Ray on the GPU machine (ray start --head "
            "--num-gpus N), or drop --use_gpu.")


def _check_cluster_fits(cfg: TrainConfig) -> None:
    import ray

    total = ray.cluster_resources()
    if cfg.use_gpu and total.get("GPU", 0) < cfg.num_workers:
        have = int(total.get("GPU", 0))
        if have == 0:
            raise ConfigError(no_cluster_gpu_message())
        raise ConfigError(f"--num_workers {cfg.num_workers} on GPUs needs {cfg.num_workers} GPUs; the cluster "
                          f"has {have}: use --num_workers {have}, or --use_gpu false to train on CPU")
    need = cfg.num_workers * cfg.cpus_per_worker
    if total.get("CPU", 0) < need:
        raise ConfigError(f"{cfg.num_workers} workers x {cfg.cpus_per_worker} CPUs needs {need} CPUs; the Ray cluster "
                          f"has {int(total.get('CPU', 0))}: lower --num_workers or --cpus_per_worker")


def train(cfg: TrainConfig) -> TrainResult:
    """Validate, train on Ray (or locally), and publish the last checkpoint as save_dir/final."""
    plan = plan_run(cfg)
    cfg = plan.cfg  # its paths absolute (~ expanded), as the workers get them
    Path(cfg.save_dir).mkdir(parents=True, exist_ok=True)
    from raylm.runtime import ensure_ray, gpu_count

    if cfg.launcher == "local":
        plan = _decide_device(plan, gpu_count(ray_cluster=False))
        try:
            result_ckpt, metrics = _train_local(plan)
        except torch.cuda.OutOfMemoryError as e:  # the same advice as a Ray run's, with the sizes
            raise TrainingError(_explain_failure(e, cfg)) from None
    else:
        ensure_ray()
        plan = _decide_device(plan, gpu_count(ray_cluster=True))
        plan = _decide_cpus(plan)
        if not cfg.wait_for_workers:
            _check_cluster_fits(plan.cfg)
        trainer = build_trainer(plan)
        from ray.train import TrainingFailedError

        try:
            result = trainer.fit()
        except TrainingFailedError as e:
            raise TrainingError(_explain_failure(e, cfg)) from None
        result_ckpt = result.checkpoint.path if result.checkpoint else None
        metrics = dict(result.metrics or {})
    final_dir = None
    if result_ckpt:
        final_dir = str(ckpt.publish_local(result_ckpt, Path(cfg.save_dir) / "final"))
        print(f"Final model: {final_dir}")
    return TrainResult(final_dir, result_ckpt, metrics)


def decide_use_gpu(cfg: TrainConfig, gpus: int) -> TrainConfig:
    """The config with --use_gpu decided: as given, or (unset) GPUs when `gpus` (this machine's for
    --launcher local, the Ray cluster's otherwise) is not zero. Says which it chose when unset."""
    if cfg.use_gpu is not None:
        return cfg
    if gpus:
        print(f"raylm: --use_gpu unset and {gpus} GPU(s) {'here' if cfg.launcher == 'local' else 'in the Ray cluster'}"
              f": training on GPUs (--use_gpu false keeps to CPU)")
    return dataclasses.replace(cfg, use_gpu=gpus > 0)


def _decide_device(plan: RunPlan, gpus: int) -> RunPlan:
    cfg = decide_use_gpu(plan.cfg, gpus)
    if cfg.use_gpu and gpus > cfg.num_workers:
        print(f"raylm: training on {cfg.num_workers} of the {gpus} GPUs "
              f"{'here' if cfg.launcher == 'local' else 'in the Ray cluster'} (one per worker): "
              + ("--launcher ray " if cfg.launcher == "local" else "") + f"--num_workers {gpus} uses them all")
    return dataclasses.replace(plan, cfg=cfg)


def _decide_cpus(plan: RunPlan) -> RunPlan:
    """--cpus_per_worker as given, or (unset) from the cluster (runtime.cpus_per_worker)."""
    if plan.cfg.cpus_per_worker is not None:
        return plan
    from raylm.runtime import cpus_per_worker

    each = cpus_per_worker(plan.cfg.num_workers, bool(plan.cfg.use_gpu))
    return dataclasses.replace(plan, cfg=dataclasses.replace(plan.cfg, cpus_per_worker=each))


def _train_local(plan: RunPlan) -> tuple[str | None, dict]:
    """launcher=local: the same loop in this process; checkpoints go straight to save_dir."""
    session = LocalSession(plan.cfg)
    run_worker(worker_config(plan), session)
    return session.last_checkpoint, session.last_metrics


class SimulatedFailure(RuntimeError):
    """Raised by --simulate_failure_at_step under launcher=local (Ray workers exit instead)."""


def is_out_of_memory(text: str) -> bool:
    """Whether an error's text is PyTorch running out of GPU memory or of the machine's (its CPU allocator)."""
    lowered = text.lower()
    return "out of memory" in lowered or "can't allocate memory" in lowered or "cannot allocate memory" in lowered


class TrainingError(RuntimeError):
    """Training stopped; the message says why and what is kept."""


def _explain_failure(err, cfg: TrainConfig) -> str:
    """One or two lines a person can act on, instead of a 200-line traceback."""
    text = str(err)
    newest = ckpt.newest_complete(cfg.save_dir, warn=lambda *_: None)
    kept = f" The newest complete checkpoint is {newest} (resume with --checkpoint {newest})." if newest else ""
    if is_out_of_memory(text):
        where = "" if "cuda" in text.lower() or cfg.use_gpu else " (the machine's memory)"
        if cfg.micro_batch_size > 1:
            fix = (f"try --micro_batch_size {cfg.micro_batch_size // 2} (the global --batch_size {cfg.batch_size} stays the same "
                   "through accumulation)")
        else:
            fix = "a micro batch of 1 is the least: a smaller model or --max_length"
        if not cfg.activation_checkpointing:
            fix += ", or --activation_checkpointing (recomputes activations: far less memory, ~30% more time)"
        return (f"out of memory{where} with micro_batch_size {cfg.micro_batch_size}: {fix}; `raylm plan` with the "
                f"same settings estimates what fits.{kept}")
    if "non-finite" in text:
        line = next((ln for ln in text.splitlines() if "non-finite" in ln), text)
        return line.split("FloatingPointError:")[-1].strip() + kept
    config_line = next((ln for ln in text.splitlines() if "ConfigError:" in ln), None)
    if config_line:  # a setting the worker found wrong (e.g. what --mixed_precision auto resolved to on its GPU)
        return f"{config_line.split('ConfigError:', 1)[1].strip()}{kept}"
    if "Address already in use" in text:
        return ("a port raylm/Ray needs is already in use (another Ray or training run?): stop it, or reuse it with "
                f"RAY_ADDRESS=auto.{kept}")
    failures = f"after {cfg.max_failures} restart(s) " if cfg.max_failures else ""
    first = [ln for ln in text.splitlines() if ln.strip()][-1:] or [text]
    if re.search(r"\b(FileNotFoundError|PermissionError|IsADirectoryError|NotADirectoryError|ModuleNotFoundError)\b",
                 first[0]):  # a restart meets the same again: more restarts cannot help
        return f"training failed {failures}on a worker: {first[0].strip()}{kept}"
    return (f"training failed {failures}(raise --max_failures to allow more restarts): {first[0].strip()}{kept}")
