"""Reading prepared data for training: Parquet rows by index, in a seeded order.

Ray Data iterators cannot be checkpointed, so training reads the prepared Parquet rows by index
instead (../DESIGN.md). The global order of epoch e is ``permutation(seed, e)`` of all rows; each
optimizer step takes the next ``batch_size`` rows of it, and rank r of W takes its contiguous
slice of those. The cursor ``(epoch, position)`` is all the state there is, so a run resumes
exactly, and on any number of workers (the order does not depend on W).
"""
from __future__ import annotations

import dataclasses
import os
import queue
import threading

import numpy as np
import pyarrow.parquet as pq
import torch

from raylm.config import ConfigError
from raylm.storage import atomic_write_json, filesystem, is_remote, plain_name, read_json, relative_inside

IGNORE_INDEX = -100  # label value the model's loss ignores (padding)


def read_metadata(data_dir: str) -> dict:
    """metadata.json of a prepared dataset, with a clear error when it is missing, and its file names
    checked (storage.plain_name, storage.relative_inside) before anything is read through them."""
    if is_remote(data_dir):
        fs, path = filesystem(data_dir)
        try:
            with fs.open_input_stream(f"{path.rstrip('/')}/metadata.json") as f:
                import json

                meta = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{data_dir}/metadata.json not found: run `raylm prepare --output_dir {data_dir}` "
                              "first (its metadata.json is written last, when the dataset is complete)") from None
    else:
        meta_path = os.path.join(data_dir, "metadata.json")
        if not os.path.isfile(meta_path):
            raise ConfigError(f"{meta_path} not found: run `raylm prepare --output_dir {data_dir}` first "
                              "(its metadata.json is written last, when the dataset is complete)")
        meta = read_json(meta_path)
    source = f"{data_dir}/metadata.json"
    if meta.get("tokenizer_file") is not None:
        plain_name(meta["tokenizer_file"], source)
    for split in (meta.get("splits") or {}).values():
        for entry in split.get("files") or []:
            relative_inside(entry.get("path"), source)
    return meta


class PackedRows:
    """All rows of one split as a (N, max_length) integer array plus their lengths.

    Rows are small integers (uint16 for vocabularies up to 65,536), so 100M tokens take 200 MB.
    """

    def __init__(self, data_dir: str, split: str, meta: dict | None = None):
        meta = meta or read_metadata(data_dir)
        files = meta["splits"][split]["files"]
        if not files:
            raise ConfigError(f"{data_dir}: the {split} split has no rows; prepare more text")
        fs, root = filesystem(data_dir)
        tokens, lengths = [], []
        for entry in files:
            shard = relative_inside(entry["path"], f"{data_dir}/metadata.json")
            table = pq.read_table(f"{root.rstrip('/')}/{shard}", filesystem=fs,
                                  columns=["input_ids", "length"])
            col = table.column("input_ids").combine_chunks()
            width = col.type.list_size
            flat = col.values.to_numpy(zero_copy_only=False)
            tokens.append(flat.reshape(-1, width))
            lengths.append(table.column("length").to_numpy().astype(np.int64))
        self.tokens = np.concatenate(tokens) if len(tokens) > 1 else tokens[0]
        self.lengths = np.concatenate(lengths) if len(lengths) > 1 else lengths[0]
        self.max_length = self.tokens.shape[1]

    @classmethod
    def from_arrays(cls, tokens: np.ndarray, lengths: np.ndarray) -> "PackedRows":
        rows = cls.__new__(cls)
        rows.tokens, rows.lengths, rows.max_length = tokens, lengths, tokens.shape[1]
        return rows

    def head(self, n: int) -> "PackedRows":
        return PackedRows.from_arrays(self.tokens[:n], self.lengths[:n])

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) for these row indices; padding labelled IGNORE_INDEX."""
        ids = torch.from_numpy(self.tokens[rows].astype(np.int64))
        labels = ids.clone()
        pad = torch.arange(self.max_length)[None, :] >= torch.from_numpy(self.lengths[rows])[:, None]
        labels[pad] = IGNORE_INDEX
        return ids, labels

    def target_tokens(self, rows: np.ndarray) -> int:
        """Positions that contribute to the loss (the model predicts tokens 1..length-1 of a row)."""
        return int(np.maximum(self.lengths[rows] - 1, 0).sum())


@dataclasses.dataclass
class Cursor:
    """Where the data order stands: the next row is ``permutation(seed, epoch)[position]``."""

    epoch: int = 0
    position: int = 0


def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


class BatchPlan:
    """Turns the cursor into global batches; deterministic in (seed, cursor), independent of W.

    An epoch's tail shorter than one global batch is skipped (the next epoch reshuffles), so every
    step sees exactly batch_size rows.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int, cursor: Cursor | None = None):
        if num_rows < batch_size:
            raise ConfigError(f"the training split has {num_rows} rows, fewer than batch_size ({batch_size}): "
                              f"lower --batch_size to at most {num_rows} or prepare more text")
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.cursor = dataclasses.replace(cursor) if cursor else Cursor()
        self._order_epoch, self._order = -1, None

    def _order_for(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order, self._order_epoch = epoch_order(self.num_rows, self.seed, epoch), epoch
        return self._order

    def next_global_batch(self) -> np.ndarray:
        if self.cursor.position + self.batch_size > self.num_rows:
            self.cursor = Cursor(self.cursor.epoch + 1, 0)
        order = self._order_for(self.cursor.epoch)
        rows = order[self.cursor.position:self.cursor.position + self.batch_size]
        self.cursor = Cursor(self.cursor.epoch, self.cursor.position + self.batch_size)
        return rows


def rank_slice(rows: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    per = len(rows) // world_size
    return rows[rank * per:(rank + 1) * per]


class Prefetcher:
    """Builds the next step's micro-batches on a background thread (pinned, copied to the device
    without blocking), so the training loop never waits on data indexing.

    Each item is (micro_batches [(ids, labels)...], global_target_tokens, cursor_after).
    """

    def __init__(self, rows: PackedRows, plan: BatchPlan, rank: int, world_size: int, micro_batch_size: int,
                 device: torch.device, depth: int = 2):
        self.rows, self.plan, self.rank, self.world = rows, plan, rank, world_size
        self.micro, self.device = micro_batch_size, device
        self.pin = device.type == "cuda"
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, daemon=True, name="raylm-prefetch")
        self._thread.start()

    def _make(self):
        global_rows = self.plan.next_global_batch()
        cursor = dataclasses.replace(self.plan.cursor)
        n_tokens = self.rows.target_tokens(global_rows)
        mine = rank_slice(global_rows, self.rank, self.world)
        micro_batches = []
        for i in range(0, len(mine), self.micro):
            ids, labels = self.rows.batch(mine[i:i + self.micro])
            if self.pin:
                ids, labels = ids.pin_memory(), labels.pin_memory()
            micro_batches.append((ids, labels))
        return micro_batches, n_tokens, cursor

    def _work(self):
        try:
            while not self._stop.is_set():
                item = self._make()
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surface the error in the training loop, not silently
            self._q.put(e)

    def next(self):
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        micro_batches, n_tokens, cursor = item
        moved = [(ids.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True))
                 for ids, labels in micro_batches]
        return moved, n_tokens, cursor

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)


def write_synthetic_dataset(out_dir, *, vocab_size=64, max_length=16, train_rows=64, val_rows=8, seed=0,
                            partial_last=True, pattern="count"):
    """A prepared-dataset folder (Parquet shards + metadata.json, prepare's format) without text or
    tokenizer, for tests and benchmarks that should not depend on tokenizer training.
    pattern="count": each row counts up from a random start by a random stride (learnable);
    pattern="random": uniform random tokens (throughput benchmarks). The last row of each split
    is partial (padded) when asked."""
    from pathlib import Path

    import pyarrow as pa

    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    splits = {}
    for split, n in (("train", train_rows), ("val", val_rows)):
        d = out / "dataset" / split
        d.mkdir(parents=True, exist_ok=True)
        if pattern == "random":
            rows = rng.integers(2, vocab_size, size=(n, max_length))
        else:
            starts = rng.integers(2, vocab_size, size=n)
            step = rng.integers(1, 4, size=n)
            rows = (starts[:, None] + step[:, None] * np.arange(max_length)[None, :]) % (vocab_size - 2) + 2
        lengths = np.full(n, max_length, dtype=np.int32)
        if partial_last:
            lengths[-1] = max_length // 2
            rows[-1, max_length // 2:] = 1  # pad id
        files = []
        half = (n + 1) // 2
        for k, (a, b) in enumerate(((0, half), (half, n))):
            if a == b:
                continue
            dtype = np.uint16 if vocab_size <= 65536 else np.uint32
            arr = pa.FixedSizeListArray.from_arrays(pa.array(rows[a:b].reshape(-1).astype(dtype)), max_length)
            table = pa.table({"input_ids": arr, "length": pa.array(lengths[a:b])})
            name = f"dataset/{split}/part-{k:05d}.parquet"
            pq.write_table(table, out / name)
            files.append({"path": name, "rows": b - a})
        splits[split] = {"rows": n, "tokens": int(lengths.sum()), "documents": n, "padding_tokens":
                         int((max_length - lengths).sum()), "files": files}
    meta = {"raylm_version": "test", "vocab_size": vocab_size, "max_length": max_length, "overlap": 0,
            "tokenizer_type": "synthetic", "tokenizer_file": None, "tokenizer_sha256": f"synthetic-{seed}",
            "eos_token_id": 0, "pad_token_id": 1, "splits": splits}
    atomic_write_json(out / "metadata.json", meta)  # last, as prepare writes it: it marks a complete dataset
    return out
