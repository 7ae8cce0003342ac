"""`raylm eval`: loss, perplexity and bits per byte of a checkpoint.

    raylm eval --checkpoint ./checkpoints/final                      # the training data's validation split
    raylm eval --checkpoint ./checkpoints/final --data_dir ./other_processed
    raylm eval --checkpoint ./checkpoints/final --input_dir ./new_text --num_workers 4 --json

Bits per byte = total loss in nats / ln 2 / UTF-8 bytes of the text scored, so models with
different tokenizers can be compared. With --num_workers N > 1, Ray tasks score shards of the
rows in parallel and their sums are added.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch

from raylm import checkpoint as ckpt
from raylm.config import ConfigError, EvalConfig
from raylm.data import PackedRows, read_metadata
from raylm.storage import plain_name


@dataclasses.dataclass
class Loaded:
    """A checkpoint ready for inference."""

    path: Path
    model: torch.nn.Module
    state: dict
    tokenizer: object | None  # raylm.tokenizer.RaylmTokenizer, when the checkpoint carries one


def load_checkpoint(path: str, device: str | torch.device = "cpu") -> Loaded:
    """Model (eval mode) and tokenizer of a checkpoint folder, save_dir/final, or a save_dir."""
    from raylm.model import LLMModel, ModelConfig

    folder = ckpt.resolve(path)
    state = ckpt.load_state(folder)
    model = LLMModel(ModelConfig(**state["model_config"]))
    model.load_state_dict(ckpt.load_model_state(folder))
    model.to(device).eval()
    tokenizer = None
    name = (state.get("data") or {}).get("tokenizer_file")
    if name and (folder / plain_name(name, f"{folder}/state.json")).is_file():
        from raylm.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(folder / name)
    return Loaded(folder, model, state, tokenizer)


def rows_from_text(texts: list[str], tokenizer, max_length: int, pad_id: int) -> PackedRows:
    """Documents -> one token stream (end-of-text between documents) -> rows of max_length,
    the last one padded: the same packing as prepare, without overlap."""
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer.encode(text))
        stream.append(tokenizer.eos_token_id)
    n_rows = max(1, math.ceil(len(stream) / max_length))
    tokens = np.full((n_rows, max_length), pad_id, dtype=np.int64)
    flat = np.asarray(stream, dtype=np.int64)
    tokens.reshape(-1)[:len(flat)] = flat
    lengths = np.full(n_rows, max_length, dtype=np.int64)
    lengths[-1] = len(flat) - (n_rows - 1) * max_length
    return PackedRows.from_arrays(tokens, lengths)


def _read_input_texts(cfg: EvalConfig) -> tuple[list[str], list]:
    """Documents of the raw files, read and checked exactly as `raylm prepare` reads them."""
    from raylm.sources import discover, read_source, reading_filesystem

    try:
        discovery = discover(cfg.input_dir, cfg.extensions, max_file_mb=512.0)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    fs = reading_filesystem(cfg.input_dir)
    texts, skipped = [], list(discovery.skipped)
    for source in discovery.files:
        parsed = read_source(source, fs, max_bytes=512 << 20, text_field=cfg.text_field, encoding_errors="strict")
        if parsed.skip is not None:
            skipped.append(parsed.skip)
        texts.extend(parsed.docs)
    if not texts:
        raise ConfigError(f"{cfg.input_dir}: no readable text files with endings {', '.join(cfg.extensions)}")
    return texts, skipped


def _score(checkpoint: str, rows: PackedRows, indices: np.ndarray, micro_batch_size: int, device: str):
    from raylm.train import loss_sums

    loaded = load_checkpoint(checkpoint, device)
    return loss_sums(loaded.model, rows, indices, micro_batch_size=micro_batch_size, device=torch.device(device))


def _count_bytes(rows: PackedRows, tokenizer, overlap: int) -> int | None:
    """UTF-8 bytes of the text in these rows (each row's overlap with the previous one left out)."""
    if tokenizer is None:
        return None
    pieces = []
    for i in range(len(rows)):
        start = overlap if (i and overlap) else 0
        pieces.append(rows.tokens[i, start:rows.lengths[i]])
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    ids = ids[ids != tokenizer.eos_token_id]
    return len(tokenizer.decode(ids.tolist()).encode("utf-8"))


def evaluate_checkpoint(cfg: EvalConfig) -> dict:
    from raylm.runtime import ensure_ray, gpu_count
    from raylm.train import _no_cuda_message, no_cluster_gpu_message

    on_ray = cfg.num_workers > 1
    if on_ray:
        ensure_ray()
    gpus = gpu_count(ray_cluster=on_ray)  # this machine's, or the Ray cluster's for Ray workers
    use_gpu = gpus > 0 if cfg.use_gpu is None else cfg.use_gpu
    if use_gpu and not gpus:  # (Ray tasks asking for a GPU would wait for one forever)
        raise ConfigError(no_cluster_gpu_message() if on_ray else _no_cuda_message())
    device = "cuda" if use_gpu else "cpu"
    loaded = load_checkpoint(cfg.checkpoint, "cpu")
    data = loaded.state.get("data") or {}
    max_length = int(data.get("max_length") or loaded.model.config.max_seq_len)
    overlap, skipped = 0, []
    if cfg.input_dir:
        if loaded.tokenizer is None:
            raise ConfigError(f"{loaded.path} carries no tokenizer file, so raw text cannot be tokenized; "
                              "use --data_dir with data prepared by the same tokenizer")
        texts, skipped = _read_input_texts(cfg)
        rows = rows_from_text(texts, loaded.tokenizer, max_length, int(data.get("pad_token_id") or 0))
        source = cfg.input_dir
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    else:
        data_dir = cfg.data_dir or loaded.state.get("train_config", {}).get("data_dir")
        if not data_dir:
            raise ConfigError("give --data_dir (a prepared dataset) or --input_dir (raw text)")
        meta = read_metadata(data_dir)
        if data.get("tokenizer_sha256") and meta.get("tokenizer_sha256") != data["tokenizer_sha256"]:
            raise ConfigError(f"{data_dir} was prepared with a different tokenizer than {loaded.path} was trained "
                              "with; evaluate raw text with --input_dir instead")
        rows = PackedRows(data_dir, cfg.split, meta)
        overlap = int(meta.get("overlap") or 0)
        source = f"{data_dir} ({cfg.split} split)"
        n_bytes = None
    n = len(rows) if not cfg.max_rows else min(cfg.max_rows, len(rows))
    if n_bytes is None or n < len(rows):
        n_bytes = _count_bytes(rows.head(n), loaded.tokenizer, overlap)
    indices = np.arange(n)
    if cfg.num_workers == 1:
        from raylm.train import loss_sums

        loaded.model.to(device)
        total, count = loss_sums(loaded.model, rows, indices, micro_batch_size=cfg.micro_batch_size,
                                 device=torch.device(device))
    else:
        import ray

        score = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(_score)
        rows_ref = ray.put(rows)
        shards = [s for s in np.array_split(indices, cfg.num_workers) if len(s)]
        parts = ray.get([score.remote(str(loaded.path), rows_ref, s, cfg.micro_batch_size, device) for s in shards])
        total, count = sum(p[0] for p in parts), sum(p[1] for p in parts)
    loss = total / count if count else float("nan")
    result = {
        "checkpoint": str(loaded.path), "step": loaded.state.get("step"), "source": source, "rows": int(n),
        "tokens": int(count), "loss": loss, "perplexity": math.exp(min(loss, 50)),
        "bits_per_byte": (total / math.log(2) / n_bytes) if n_bytes else None, "bytes": n_bytes,
        "workers": cfg.num_workers,
        # raw files left out, as prepare reports them: nothing is dropped without a word
        "skipped": [{"path": s.path, "reason": s.reason} for s in skipped],
    }
    if cfg.json:
        print(json.dumps(result))
    else:
        print(f"Checkpoint: {result['checkpoint']} (step {result['step']})")
        print(f"Evaluated: {source}: {n:,} rows, {count:,} tokens")
        if skipped:
            from raylm.sources import SKIP_REASONS

            print(f"Skipped {len(skipped):,} file(s): " + "; ".join(
                f"{s.path} ({SKIP_REASONS.get(s.reason, s.reason)})" for s in skipped[:10])
                  + (f"; and {len(skipped) - 10:,} more (--json lists them all)" if len(skipped) > 10 else ""))
        print(f"Loss: {loss:.4f} | Perplexity: {result['perplexity']:.2f}"
              + (f" | Bits per byte: {result['bits_per_byte']:.4f}" if result["bits_per_byte"] else ""))
    return result


def unigram_entropy(data_dir: str, split: str = "train") -> float:
    """Entropy (nats/token) of the data's unigram distribution: the loss of a model that knows only
    token frequencies. A trained model should be well below it."""
    rows = PackedRows(data_dir, split)
    mask = np.arange(rows.max_length)[None, :] < rows.lengths[:, None]
    counts = np.bincount(rows.tokens[mask].astype(np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
