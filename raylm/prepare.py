"""`raylm prepare`: a folder of raw text -> a tokenizer and fixed-length rows of token ids.

    raylm prepare --input_dir ./raw_text_data --output_dir ./processed_data \\
        --tokenizer_type bpe --vocab_size 32000 --max_length 2048 --num_workers 4

Steps, each printed as it runs:

1. Find the files (sources.discover); skip what can be judged without reading.
2. Read a bounded sample (--tokenizer_sample_mb, whole files in a seeded order) and train the
   tokenizer on it, so memory does not grow with the corpus; saved as tokenizer.json or
   tokenizer.tiktoken. Training runs as a Ray task while the workers of step 3 start up.
3. Ray Data spreads the files over --num_workers actors, each with the tokenizer loaded once; they
   read, check, parse and tokenize whole files (a file's problems are found here, so every
   file is read once, plus the sample). The driver receives the files' tokens in order,
   routes each document to train or validation, and packs each split's stream (documents, each
   followed by end-of-text) into rows of max_length tokens, `overlap` tokens repeated across row
   boundaries. Only the last row of a split is partial; it is padded and its `length` says where
   the padding starts. Rows are written as Parquet shards of --rows_per_shard rows.
4. metadata.json is written last: its presence means the dataset is complete.

The split is by document and depends only on the seed and the document's place (file path,
index in the file): a document goes to validation when hash(seed, path, index) < val_fraction.
If no document does, the one with the smallest hash does, so a validation row always exists.

Output layout (column types as in `dataset_schema`):

    output_dir/metadata.json                      sizes, counts, skipped files, config, timings
    output_dir/tokenizer.json | tokenizer.tiktoken
    output_dir/dataset/{train,val}/part-00000.parquet ...   input_ids, length

Re-running on an unchanged input with the same settings reuses the finished dataset; a run that
was stopped part-way reuses its tokenizer and rebuilds the rows in a scratch folder, which
replaces dataset/ only when complete.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raylm import __version__, storage
from raylm.config import ConfigError, PrepareConfig, to_dict
from raylm.sources import SKIP_REASONS, Discovery, SourceFile, Skipped, discover, read_source, reading_filesystem
from raylm.tokenizer import (HF_FILE, TIKTOKEN_FILE, TIKTOKEN_SIDECAR, RaylmTokenizer, load_tokenizer, named_tiktoken,
                             train_tokenizer)

METADATA = "metadata.json"
DATASET_DIR = "dataset"
NEXT_DIR = ".next"  # a run's tokenizer and dataset/ while it builds them; moved into place when complete
PREVIOUS_DIR = ".previous"  # the replaced dataset, for the moment of the swap
OLD_BUILD_DIR = ".dataset-building"  # where raylm 0.x before NEXT_DIR built its rows: removed when seen
TOKENIZER_STAMP = ".tokenizer-stamp.json"  # which inputs and settings trained the saved tokenizer
TOKENIZER_FILES = (HF_FILE, TIKTOKEN_FILE, TIKTOKEN_SIDECAR, TOKENIZER_STAMP)  # a dataset's tokenizer, any kind
SPLITS = ("train", "val")
FILE_COLUMNS = ("relpath", "skip_reason", "skip_detail", "size", "bad_lines")  # per file, from the workers
UNIT_BYTES = 4_000_000  # files are handed to workers in units of about this many bytes...
UNIT_FILES = 256  # ...or this many files, whichever comes first
BACKEND_CHECK_BYTES = 256_000  # sample text on which tiktoken must match Hugging Face (bpe)
# Settings that change the tokenizer; any other setting only changes the rows.
TOKENIZER_SETTINGS = ("tokenizer_type", "vocab_size", "seed", "text_field", "extensions", "max_file_mb",
                      "encoding_errors", "tokenizer_sample_mb", "tiktoken_encoding", "min_frequency", "tokenizer_file")


# ---------------------------------------------------------------------------------------------
# Small pure helpers
# ---------------------------------------------------------------------------------------------

def hash01(*parts) -> float:
    """A deterministic number in [0, 1) for the given parts (seeded splits and samples)."""
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_value(seed: int, relpath: str, doc_index: int) -> float:
    """A document goes to validation when this is below val_fraction."""
    return hash01(seed, "split", relpath, doc_index)


def token_dtype(vocab_size: int) -> pa.DataType:
    return pa.uint16() if vocab_size <= 65536 else pa.uint32()


def dataset_schema(vocab_size: int, max_length: int) -> pa.Schema:
    return pa.schema([("input_ids", pa.list_(token_dtype(vocab_size), max_length)), ("length", pa.int32())])


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def input_fingerprint(discovery: Discovery) -> str:
    """Changes when a file is added, removed, resized or touched."""
    return _fingerprint({
        "files": [(f.relpath, f.size, f.mtime_ns) for f in discovery.files],
        "skipped": [(s.path, s.reason, s.size) for s in discovery.skipped],
    })


def _settings(cfg: PrepareConfig, names=None) -> dict:
    """The settings that decide the output (not where it goes, nor how many workers make it)."""
    values = to_dict(cfg)
    values = {k: v for k, v in values.items() if k not in ("output_dir", "num_workers")}
    if names is not None:
        values = {k: values[k] for k in names}
    return {"raylm_version": __version__, **values}


class Progress:
    """A one-line progress bar on stderr ("Reading files: 40%|████      | 60/150")."""

    def __init__(self, label: str, total: int, width: int = 24):
        self.label, self.total, self.width = label, max(total, 0), width
        self.done = 0
        self._last = 0.0
        self._tty = sys.stderr.isatty()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._tty and time.monotonic() - self._last > 0.1:
            self._last = time.monotonic()
            print("\r" + self._line(), end="", file=sys.stderr, flush=True)

    def close(self, note: str = "") -> None:
        print(("\r" if self._tty else "") + self._line(note), file=sys.stderr, flush=True)

    def _line(self, note: str = "") -> str:
        frac = self.done / self.total if self.total else 1.0
        filled = int(frac * self.width)
        bar = "█" * filled + " " * (self.width - filled)
        return f"{self.label}: {int(frac * 100):3d}%|{bar}| {self.done}/{self.total}" + (f" {note}" if note else "")


# ---------------------------------------------------------------------------------------------
# Packing rows and writing shards
# ---------------------------------------------------------------------------------------------

class ShardWriter:
    """Collects rows of one split and writes them as Parquet shards of rows_per_shard rows."""

    def __init__(self, folder: Path, schema: pa.Schema, rows_per_shard: int, listed_as: str):
        self.folder, self.schema, self.rows_per_shard = folder, schema, rows_per_shard
        self.listed_as = listed_as  # the folder's path in metadata.json, once the dataset is complete
        self.folder.mkdir(parents=True, exist_ok=True)
        self._rows: list[np.ndarray] = []  # (k, max_length) blocks
        self._lengths: list[np.ndarray] = []
        self._buffered = 0
        self.files: list[dict] = []

    def add(self, rows: np.ndarray, lengths: np.ndarray) -> None:
        self._rows.append(rows)
        self._lengths.append(lengths)
        self._buffered += len(rows)
        while self._buffered >= self.rows_per_shard:
            self._write(self.rows_per_shard)

    def finish(self) -> None:
        if self._buffered:
            self._write(self._buffered)

    def _write(self, n: int) -> None:
        rows = np.concatenate(self._rows)
        lengths = np.concatenate(self._lengths)
        self._rows, self._lengths = [rows[n:]], [lengths[n:]]
        self._buffered -= n
        ids_type = self.schema.field("input_ids").type
        flat = pa.array(rows[:n].reshape(-1), type=ids_type.value_type)
        table = pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(flat, ids_type.list_size),
                          "length": pa.array(lengths[:n], type=pa.int32())}, schema=self.schema)
        path = self.folder / f"part-{len(self.files):05d}.parquet"
        tmp = storage.tmp_name(path)
        pq.write_table(table, tmp, row_group_size=1024, compression="zstd", compression_level=1)
        os.replace(tmp, path)
        self.files.append({"path": f"{self.listed_as}/{path.name}", "rows": n})


class RowPacker:
    """Cuts one split's token stream into rows of max_length tokens, `overlap` tokens repeated
    at the start of each next row. Row k holds stream[k*stride : k*stride + max_length]."""

    def __init__(self, max_length: int, overlap: int, pad_token_id: int, writer: ShardWriter, dtype):
        self.max_length, self.overlap = max_length, overlap
        self.stride = max_length - overlap
        self.pad_token_id, self.writer, self.dtype = pad_token_id, writer, dtype
        self._chunks: list[np.ndarray] = []  # the stream from the start of the next row on
        self._pending = 0
        self.tokens = self.rows = self.padding_tokens = self.documents = 0

    def add(self, ids: np.ndarray, documents: int) -> None:
        self.tokens += len(ids)
        self.documents += documents
        self._chunks.append(ids)
        self._pending += len(ids)
        if self._pending >= 64 * self.max_length:  # cut in batches: few, large numpy calls
            self._cut_full_rows()

    def _cut_full_rows(self) -> np.ndarray:
        stream = np.concatenate(self._chunks or [np.zeros(0, self.dtype)]).astype(self.dtype, copy=False)
        n = (len(stream) - self.max_length) // self.stride + 1 if len(stream) >= self.max_length else 0
        if n:
            rows = np.lib.stride_tricks.sliding_window_view(stream, self.max_length)[:: self.stride][:n]
            self.writer.add(np.ascontiguousarray(rows), np.full(n, self.max_length, np.int32))
            self.rows += n
            stream = stream[n * self.stride:]
        self._chunks, self._pending = [stream], len(stream)
        return stream

    def finish(self) -> None:
        rest = self._cut_full_rows()
        # After a full row, the first `overlap` tokens of `rest` are already in it.
        if len(rest) > (self.overlap if self.rows else 0):
            row = np.full((1, self.max_length), self.pad_token_id, self.dtype)
            row[0, : len(rest)] = rest
            self.writer.add(row, np.array([len(rest)], np.int32))
            self.rows += 1
            self.padding_tokens = self.max_length - len(rest)
        self._chunks, self._pending = [], 0
        self.writer.finish()


class DocumentRouter:
    """Sends each file's documents to the train or validation packer, in file order.

    Until the first validation document appears, the train document with the smallest split
    value is held back: if the stream ends with no validation document, it becomes one."""

    def __init__(self, val_fraction: float, train: RowPacker, val: RowPacker):
        self.val_fraction = val_fraction
        self.train, self.val = train, val
        self._held: tuple[float, np.ndarray] | None = None

    def add_file(self, train_ids, val_ids, doc_lengths, doc_values) -> None:
        if self.val.documents or not len(doc_lengths):
            self.train.add(train_ids, int(np.sum(doc_values >= self.val_fraction)))
            self.val.add(val_ids, int(np.sum(doc_values < self.val_fraction)))
            return
        train_at = val_at = 0
        for length, value in zip(doc_lengths, doc_values):
            if value < self.val_fraction:
                self.val.add(val_ids[val_at: val_at + length], 1)
                val_at += length
                self._release()
                continue
            doc = train_ids[train_at: train_at + length]
            train_at += length
            if self.val.documents:
                self.train.add(doc, 1)
            elif self._held is None or value < self._held[0]:
                self._release()
                self._held = (value, doc)
            else:
                self.train.add(doc, 1)

    def _release(self) -> None:
        if self._held is not None:
            self.train.add(self._held[1], 1)
            self._held = None

    def finish(self) -> None:
        if self._held is not None:  # no document went to validation: the held one does
            self.val.add(self._held[1], 1)
            self._held = None
        self.train.finish()
        self.val.finish()


# ---------------------------------------------------------------------------------------------
# The Ray Data worker
# ---------------------------------------------------------------------------------------------

class TokenizeFiles:
    """Ray Data actor: reads, checks, parses and tokenizes units of files.

    The tokenizer arrives as {"ref": ObjectRef of a tokenizer package}: its files' contents, so
    workers on other machines load it too, and a reference, so workers can start while it is
    still being trained. One output row per input file, in input order."""

    def __init__(self, tokenizer: dict, input_dir: str, seed: int, val_fraction: float, max_bytes: int,
                 text_field: str, encoding_errors: str):
        import ray

        self._tmp = tempfile.TemporaryDirectory(prefix="raylm-tokenizer-")
        self.tok = _load_package(ray.get(tokenizer["ref"]), Path(self._tmp.name))  # loaded once per worker
        self.fs = reading_filesystem(input_dir)
        self.seed, self.val_fraction = seed, val_fraction
        self.read_args = dict(max_bytes=max_bytes, text_field=text_field, encoding_errors=encoding_errors)
        self.eos = np.array([self.tok.eos_token_id], np.uint32)

    def __call__(self, batch: dict) -> pa.Table:
        rows = [self.tokenize_file(SourceFile(str(path), str(relpath), int(size), int(mtime)))
                for unit in zip(batch["paths"], batch["relpaths"], batch["sizes"], batch["mtimes"])
                for path, relpath, size, mtime in zip(*unit)]
        columns = {k: [row[k] for row in rows] for k in rows[0]}
        return pa.table({
            **{k: pa.array(columns[k], pa.int64() if k in ("size", "bad_lines") else pa.string())
               for k in FILE_COLUMNS},
            **{k: _list_array(columns[k]) for k in ("train_ids", "val_ids", "doc_lengths", "doc_values")},
        })

    def tokenize_file(self, source: SourceFile) -> dict:
        """One file -> its skip reason, or its documents' tokens (each followed by end-of-text)
        grouped by split, with each document's length and split value."""
        parsed = read_source(source, self.fs, **self.read_args)
        pieces: dict[str, list[np.ndarray]] = {"train": [], "val": []}
        lengths, values = [], []
        for i, doc in enumerate(parsed.docs):
            value = split_value(self.seed, source.relpath, i)
            ids = self.tok.encode_to_numpy(doc)
            pieces["val" if value < self.val_fraction else "train"] += [ids, self.eos]
            lengths.append(len(ids) + 1)
            values.append(value)
        skip = parsed.skip
        return {
            "relpath": source.relpath,
            "skip_reason": skip.reason if skip else "",
            "skip_detail": skip.detail if skip else "",
            "size": skip.size if skip else source.size,
            "bad_lines": parsed.bad_lines,
            **{f"{split}_ids": np.concatenate(p) if p else np.zeros(0, np.uint32) for split, p in pieces.items()},
            "doc_lengths": np.array(lengths, np.int64),
            "doc_values": np.array(values, np.float64),
        }


def _list_array(arrays: list[np.ndarray]) -> pa.ListArray:
    offsets = np.zeros(len(arrays) + 1, np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(arrays)))


def _work_units(files: list[SourceFile]) -> list[dict]:
    """Consecutive files grouped into units of about UNIT_BYTES (a big file is a unit alone)."""
    units: list[dict] = []
    current: list[SourceFile] = []
    size = 0
    for f in files:
        if current and (size + f.size > UNIT_BYTES or len(current) >= UNIT_FILES):
            units.append(current)
            current, size = [], 0
        current.append(f)
        size += f.size
    if current:
        units.append(current)
    return [{"paths": [f.path for f in u], "relpaths": [f.relpath for f in u], "sizes": [f.size for f in u],
             "mtimes": [f.mtime_ns for f in u]} for u in units]


@contextlib.contextmanager
def _ray_data_settings():
    """Ray Data as prepare needs it: blocks kept in order; our progress line instead of its
    progress bars and start/finish log lines. Restored afterwards."""
    import logging

    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start)
    quiet = [logging.getLogger(f"ray.data._internal.{name}") for name in ("progress", "execution.streaming_executor")]
    levels = [logger.level for logger in quiet]
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start = saved
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


# ---------------------------------------------------------------------------------------------
# The stages
# ---------------------------------------------------------------------------------------------

def _discover(cfg: PrepareConfig) -> Discovery:
    if not cfg.input_dir:
        raise ConfigError("input_dir is not set: pass --input_dir ./raw_text_data "
                          "(a folder of .txt .md .json .jsonl files)")
    try:
        return discover(cfg.input_dir, cfg.extensions, cfg.max_file_mb, exclude=cfg.output_dir)
    except FileNotFoundError:
        raise ConfigError(f"input_dir {cfg.input_dir!r} does not exist or is not a folder") from None


def _nothing_usable(cfg: PrepareConfig, discovery: Discovery, skipped: list[Skipped]) -> ConfigError:
    """The error for an input folder from which no document could be read."""
    found = f"found {discovery.found} file(s) ending in {' '.join(cfg.extensions)}"
    if skipped:
        reasons = ", ".join(f"{n} {SKIP_REASONS[r]}" for r, n in _count_reasons(skipped).items())
        found += f", and skipped all of them: {reasons}"
    if discovery.other_extensions:
        others = ", ".join(f"{ext}: {n}" for ext, n in discovery.other_extensions.most_common(5))
        found += f". Files with other endings ({others}) are not read; add them with --extensions"
    return ConfigError(f"no usable text in {cfg.input_dir!r}: {found}")


def _count_reasons(skipped: list[Skipped]) -> dict[str, int]:
    return dict(sorted(Counter(s.reason for s in skipped).items()))


def _read_sample(cfg: PrepareConfig, discovery: Discovery) -> tuple[list[str], list[Skipped]]:
    """Whole files in a seeded order until tokenizer_sample_mb of text (the last one cut)."""
    fs = reading_filesystem(cfg.input_dir)
    order = sorted(discovery.files, key=lambda f: hash01(cfg.seed, "sample", f.relpath))
    budget = int(cfg.tokenizer_sample_mb * 1e6)
    texts: list[str] = []
    skipped: list[Skipped] = []
    progress = Progress("Reading files", len(order))
    for source in order:
        if budget <= 0:
            break
        parsed = read_source(source, fs, max_bytes=int(cfg.max_file_mb * 1e6), text_field=cfg.text_field,
                             encoding_errors=cfg.encoding_errors)
        if parsed.skip:
            skipped.append(parsed.skip)
        for doc in parsed.docs:
            data = doc.encode("utf-8")
            if len(data) > budget:
                doc = data[:budget].decode("utf-8", errors="ignore")
            texts.append(doc)
            budget -= len(data)
            if budget <= 0:
                break
        progress.update()
    sample_mb = (int(cfg.tokenizer_sample_mb * 1e6) - max(budget, 0)) / 1e6
    if progress.done < len(order):  # the sample is full: the bar ends there, at 100%, saying so
        progress.total = progress.done
        progress.close(f"({sample_mb:.1f} MB sample for the tokenizer, from {progress.done:,} of {len(order):,} "
                       "files: --tokenizer_sample_mb sets its size)")
    else:
        progress.close(f"({sample_mb:.1f} MB sample for the tokenizer)")
    return texts, skipped


def _tokenizer_package(tok: RaylmTokenizer) -> dict:
    """A tokenizer as plain data that travels to workers: {"name", "files": {name: bytes}, "backend"}, under
    the standard names (tokenizer.json; tokenizer.tiktoken and its sidecar), whatever the files it came from
    are called (--tokenizer_file ./my.tok.json): a dataset's and a checkpoint's tokenizer are always found."""
    name = TIKTOKEN_FILE if tok.kind == "tiktoken" else HF_FILE
    files = {name: tok.path.read_bytes()}
    if tok.kind == "tiktoken":
        files[TIKTOKEN_SIDECAR] = tok.path.with_name(TIKTOKEN_SIDECAR).read_bytes()
    return {"name": name, "files": files, "backend": tok.backend}


def _load_package(package: dict, folder: Path) -> RaylmTokenizer:
    """Write a tokenizer package's files into folder (atomically) and load it from there."""
    for name, data in package["files"].items():
        storage.atomic_write_bytes(folder / name, data)
    return load_tokenizer(folder / package["name"], backend=package["backend"])


def train_tokenizer_package(kind: str, texts: list[str], vocab_size: int, min_frequency: int) -> dict:
    """Train a tokenizer and return it as a package. prepare runs this as a Ray task, so the
    workers start while it trains."""
    with tempfile.TemporaryDirectory(prefix="raylm-train-tokenizer-") as tmp:
        tok = train_tokenizer(kind, texts, vocab_size=vocab_size, min_frequency=min_frequency, out_dir=tmp)
        if tok.kind == "bpe":
            tok = _check_bpe_backend(tok, texts)
        return _tokenizer_package(tok)


def _check_bpe_backend(tok: RaylmTokenizer, texts: list[str]) -> RaylmTokenizer:
    """tiktoken encodes our BPE; make sure it gives Hugging Face's ids on some of the sample."""
    if tok.backend != "tiktoken":
        return tok
    hf = load_tokenizer(tok.path, backend="hf")
    probe, size = [], 0
    for text in texts:
        probe.append(text[: BACKEND_CHECK_BYTES - size])
        size += len(probe[-1])
        if size >= BACKEND_CHECK_BYTES:
            break
    if all(tok.encode(t) == hf.encode(t) for t in probe):
        return tok
    print("  warning: tiktoken and Hugging Face disagree on this BPE; encoding with Hugging Face (slower)",
          file=sys.stderr)
    return hf


def _write_stamp(out: Path, key: str, tok: RaylmTokenizer) -> None:
    storage.atomic_write_json(out / TOKENIZER_STAMP, {"key": key, "file": tok.path.name, "sha256": tok.sha256,
                                                      "backend": tok.backend})


def _stamped_tokenizer(folder: Path, key: str) -> RaylmTokenizer | None:
    """The tokenizer saved in folder by a run with the same inputs and settings (key), if it is intact."""
    stamp_path = folder / TOKENIZER_STAMP
    if not stamp_path.is_file():
        return None
    stamp = storage.read_json(stamp_path)
    tok_path = folder / storage.plain_name(stamp.get("file"), str(stamp_path))
    if stamp.get("key") != key or not tok_path.is_file():
        return None
    tok = load_tokenizer(tok_path, backend=stamp["backend"])
    return tok if tok.sha256 == stamp["sha256"] else None


def _start_tokenizer(cfg: PrepareConfig, discovery: Discovery, out: Path, key: str, finished: Path | None = None):
    """(ObjectRef of the tokenizer package, the tokenizer if it is already in out, else None).

    Reuses the tokenizer an earlier run made from the same input and settings (in out, from an interrupted
    run, or in `finished`, the folder of the complete dataset, copied into out); loads a named tiktoken
    encoding; or reads the sample here and trains in a Ray task."""
    import ray

    tok = _stamped_tokenizer(out, key)
    if tok is None and finished is not None and (earlier := _stamped_tokenizer(finished, key)) is not None:
        tok = _load_package(_tokenizer_package(earlier), out)
        _write_stamp(out, key, tok)
    if tok is not None:
        print(f"Reusing the {tok.kind} tokenizer of an earlier run ({tok.path.name}, vocab {tok.vocab_size:,})")
        return ray.put(_tokenizer_package(tok)), tok
    if cfg.tokenizer_file:
        try:
            given = load_tokenizer(cfg.tokenizer_file)
        except FileNotFoundError as e:
            raise ConfigError(f"--tokenizer_file: {e}") from None
        tok = _load_package(_tokenizer_package(given), out)  # the dataset carries its own copy
        print(f"Using the {tok.kind} tokenizer {cfg.tokenizer_file} (vocab {tok.vocab_size:,}, "
              f"sha256 {tok.sha256[:12]})")
        _write_stamp(out, key, tok)
        return ray.put(_tokenizer_package(tok)), tok
    if cfg.tokenizer_type == "tiktoken" and cfg.tiktoken_encoding:
        print(f"Loading tiktoken encoding {cfg.tiktoken_encoding}...")
        tok = named_tiktoken(cfg.tiktoken_encoding, out)
        _write_stamp(out, key, tok)
        return ray.put(_tokenizer_package(tok)), tok
    texts, skipped = _read_sample(cfg, discovery)
    if not texts:
        raise _nothing_usable(cfg, discovery, discovery.skipped + skipped)
    print(f"Training {cfg.tokenizer_type} tokenizer...")
    train = ray.remote(num_cpus=0)(train_tokenizer_package)  # it waits on no worker slot
    return train.remote(cfg.tokenizer_type, texts, cfg.vocab_size, cfg.min_frequency), None


def _tokenize_dataset(cfg: PrepareConfig, units: list[dict], tokenizer_ref, workers: int):
    import ray

    return ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
        TokenizeFiles, batch_size=1, batch_format="numpy", num_cpus=1,
        compute=ray.data.ActorPoolStrategy(size=max(1, min(workers, len(units)))),
        fn_constructor_kwargs=dict(
            tokenizer={"ref": tokenizer_ref}, input_dir=cfg.input_dir, seed=cfg.seed,
            val_fraction=cfg.val_fraction, max_bytes=int(cfg.max_file_mb * 1e6), text_field=cfg.text_field,
            encoding_errors=cfg.encoding_errors))


def _in_background(fn, *args) -> Future:
    """fn(*args) in a daemon thread (an interrupted prepare does not wait for it); its Future."""
    future: Future = Future()

    def run():
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001  (handed to whoever asks for the result)
            future.set_exception(e)

    threading.Thread(target=run, name=f"raylm-{fn.__name__}", daemon=True).start()
    return future


def _save_trained(tokenizer_ref, out: Path, key: str) -> RaylmTokenizer:
    """Wait for the tokenizer training task; save its files in out, with their stamp."""
    import ray

    tok = _load_package(ray.get(tokenizer_ref), out)
    _write_stamp(out, key, tok)
    return tok


class _FileTally:
    """Per-file outcomes as they come back from the workers: skipped, accepted, bad lines."""

    def __init__(self):
        self.skipped: list[Skipped] = []
        self.bad_jsonl_lines: list[dict] = []
        self.accepted = self.text_bytes = 0

    def add(self, relpath: str, skip_reason: str, skip_detail: str, size: int, bad_lines: int) -> bool:
        """Record one file (a worker's output row); True when it was accepted."""
        if bad_lines:
            self.bad_jsonl_lines.append({"path": relpath, "count": bad_lines})
        if skip_reason:
            self.skipped.append(Skipped(relpath, skip_reason, size, skip_detail))
            return False
        self.accepted += 1
        self.text_bytes += size
        return True


def _tokenize_and_write(cfg: PrepareConfig, discovery: Discovery, out: Path, build: Path, key: str,
                        finished: Path | None = None) -> dict:
    """Train or load the tokenizer (into out) while Ray Data starts workers that tokenize every file; pack
    and write the rows into build, in file order."""
    import ray

    t = time.perf_counter()
    tokenizer_ref, tok = _start_tokenizer(cfg, discovery, out, key, finished)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    workers = min(cfg.num_workers, cpus)
    if workers < cfg.num_workers:
        print(f"  num_workers {cfg.num_workers} > {cpus} CPUs in the Ray cluster: using {workers}")
    units = _work_units(discovery.files)
    tally = _FileTally()
    # the trained tokenizer is saved here while the workers start, not after
    trained = _in_background(_save_trained, tokenizer_ref, out, key) if tok is None else None
    with _ray_data_settings():
        batches = iter(_tokenize_dataset(cfg, units, tokenizer_ref, workers).iter_batches(
            batch_size=None, batch_format="pyarrow", prefetch_batches=4))
        try:
            first = next(batches)  # the workers start now, and wait for the tokenizer
        except Exception:
            ray.get(tokenizer_ref)  # if training failed, raise its error rather than the workers'
            raise
        if trained is not None:
            tok = trained.result()
            if tok.vocab_size < cfg.vocab_size:
                print(f"  the sample holds only {tok.vocab_size:,} distinct tokens (asked for {cfg.vocab_size:,})")
        startup_seconds = time.perf_counter() - t

        schema = dataset_schema(tok.vocab_size, cfg.max_length)
        dtype = np.uint16 if schema.field("input_ids").type.value_type == pa.uint16() else np.uint32
        packers = {split: RowPacker(cfg.max_length, cfg.overlap, tok.pad_token_id,
                                    ShardWriter(build / split, schema, cfg.rows_per_shard, f"{DATASET_DIR}/{split}"),
                                    dtype)
                   for split in SPLITS}
        router = DocumentRouter(cfg.val_fraction, packers["train"], packers["val"])
        progress = Progress("Tokenizing and chunking files", len(discovery.files))
        for table in itertools.chain([first], batches):
            columns = {name: table.column(name).combine_chunks() for name in table.column_names}
            for i in range(table.num_rows):
                if tally.add(**{k: columns[k][i].as_py() for k in FILE_COLUMNS}):
                    router.add_file(*(columns[k][i].values.to_numpy(zero_copy_only=False)
                                      for k in ("train_ids", "val_ids", "doc_lengths", "doc_values")))
            progress.update(table.num_rows)
        progress.close()
    router.finish()
    if not packers["val"].documents:
        raise _nothing_usable(cfg, discovery, discovery.skipped + tally.skipped)
    if not packers["train"].documents:
        raise ConfigError(f"{cfg.input_dir!r} holds a single document; the train/validation split is by "
                          "document, so it needs at least two: split the file (e.g. by chapter) or add files")
    return {"tokenizer": tok, "tally": tally, "packers": packers, "workers": workers,
            "startup_seconds": startup_seconds}


def _import_ray_data() -> None:
    import ray.data  # noqa: F401  (a later import waits for this one to finish)


def prepare(cfg: PrepareConfig) -> dict:
    """Run `raylm prepare`; returns the metadata (also written to output_dir/metadata.json)."""
    from raylm.runtime import ensure_ray

    started = time.perf_counter()
    out = Path(cfg.output_dir).resolve()
    discovery = _discover(cfg)
    fingerprint = input_fingerprint(discovery)
    settings_fingerprint = _fingerprint(_settings(cfg))
    print(f"Found {discovery.found:,} files" + (f" ({sum(discovery.other_extensions.values()):,} others with "
                                                 "endings not in --extensions)" if discovery.other_extensions else ""))
    meta_path = out / METADATA
    if meta_path.is_file():
        previous = storage.read_json(meta_path)
        unchanged = (previous.get("input_fingerprint"), previous.get("settings_fingerprint")) == (
            fingerprint, settings_fingerprint)
        if unchanged:
            print(f"Reusing the finished dataset in {out}: input files and settings are unchanged "
                  f"(delete {meta_path} to rebuild it)")
            _print_summary(previous)
            return previous
        # the finished dataset stays usable until the new one is complete (_swap_in)
        print(f"Rebuilding {out}: input files or settings changed (the current dataset stays until the new "
              "one is complete)")
    if not discovery.files:
        raise _nothing_usable(cfg, discovery, discovery.skipped)
    made_out = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    timings = {"discover": time.perf_counter() - started}
    t = time.perf_counter()
    ensure_ray()
    timings["ray_start"] = time.perf_counter() - t
    # Ray Data takes ~0.5 s to import: let it load while the tokenizer sample is read. (Not during
    # ensure_ray, whose own imports of Ray's modules could race it.)
    threading.Thread(target=_import_ray_data, name="raylm-import-ray-data", daemon=True).start()

    t = time.perf_counter()
    stage = out / NEXT_DIR  # the new tokenizer and rows, out of the way of the finished dataset
    shutil.rmtree(out / OLD_BUILD_DIR, ignore_errors=True)
    shutil.rmtree(stage / DATASET_DIR, ignore_errors=True)  # rows of an interrupted run (its tokenizer is kept)
    stage.mkdir(parents=True, exist_ok=True)
    tokenizer_key = _fingerprint({"input": fingerprint, "settings": _settings(cfg, TOKENIZER_SETTINGS)})
    try:
        result = _tokenize_and_write(cfg, discovery, stage, stage / DATASET_DIR, tokenizer_key, finished=out)
    except BaseException:
        # a run that failed before making anything leaves no empty folders behind (and no folder it did not make)
        _remove_if_empty(stage, *([out] if made_out else []))
        raise
    # sample, training and the workers' start, up to the first tokenized files; then the rest
    timings["tokenizer_and_worker_start"] = result["startup_seconds"]
    timings["tokenize_and_write"] = time.perf_counter() - t - result["startup_seconds"]
    timings["total"] = time.perf_counter() - started

    meta = _metadata(cfg, discovery, result, timings, fingerprint, settings_fingerprint)
    _swap_in(stage, out, meta)
    _print_summary(meta)
    print(f"Wrote {out} in {timings['total']:.1f} s ({meta['text_bytes'] / 1e6 / timings['total']:.1f} MB/s)")
    return meta


def _remove_if_empty(*folders: Path) -> None:
    """Remove each folder that holds nothing (a failed run's scratch folder, then its output folder); a
    trained tokenizer or any other file keeps its folder (a rerun reuses the tokenizer)."""
    for folder in folders:
        with contextlib.suppress(OSError):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def _swap_in(stage: Path, out: Path, meta: dict) -> None:
    """Replace out's dataset and tokenizer with the complete ones in stage, metadata.json last: it marks a
    complete dataset, so a crash in these few renames leaves a folder that the next run rebuilds (reusing
    the tokenizer), never one whose rows and tokenizer disagree."""
    previous = out / PREVIOUS_DIR
    shutil.rmtree(previous, ignore_errors=True)
    previous.mkdir()
    (out / METADATA).unlink(missing_ok=True)
    for name in (DATASET_DIR, *TOKENIZER_FILES):
        if (out / name).exists():
            os.replace(out / name, previous / name)
    for entry in stage.iterdir():
        os.replace(entry, out / entry.name)
    storage.atomic_write_json(out / METADATA, meta)
    shutil.rmtree(previous, ignore_errors=True)
    shutil.rmtree(stage, ignore_errors=True)


def _metadata(cfg: PrepareConfig, discovery: Discovery, result: dict, timings: dict, fingerprint: str,
              settings_fingerprint: str) -> dict:
    tok, tally = result["tokenizer"], result["tally"]
    skipped = sorted(discovery.skipped + tally.skipped, key=lambda s: s.path)
    splits = {split: {"rows": packer.rows, "tokens": packer.tokens, "documents": packer.documents,
                      "padding_tokens": packer.padding_tokens, "files": packer.writer.files}
              for split, packer in result["packers"].items()}
    return {
        "raylm_version": __version__,
        "vocab_size": tok.vocab_size,
        "max_length": cfg.max_length,
        "overlap": cfg.overlap,
        "tokenizer_type": tok.kind,
        "tokenizer_file": tok.path.name,
        "tokenizer_sha256": tok.sha256,
        "tokenizer_backend": tok.backend,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "token_dtype": str(token_dtype(tok.vocab_size)),
        "splits": splits,  # tokens: each split's stream (documents + end-of-text), every token once
        "files": {"found": discovery.found, "accepted": tally.accepted, "skipped": len(skipped),
                  "by_reason": _count_reasons(skipped),
                  "other_extensions": dict(discovery.other_extensions.most_common())},
        "text_bytes": tally.text_bytes,
        "skipped": [dataclasses.asdict(s) for s in skipped],
        "bad_jsonl_lines": tally.bad_jsonl_lines,
        "config": to_dict(cfg),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "num_workers_used": result["workers"],
        "input_fingerprint": fingerprint,
        "settings_fingerprint": settings_fingerprint,
    }


def _print_summary(meta: dict) -> None:
    train, val = meta["splits"]["train"]["rows"], meta["splits"]["val"]["rows"]
    print(f"Created {train + val:,} training examples")
    print(f"Train examples: {train:,}")
    print(f"Validation examples: {val:,}")
    files = meta["files"]
    if files["skipped"]:
        print(f"Skipped {files['skipped']:,} of {files['found']:,} files (listed in metadata.json):")
        for reason, n in files["by_reason"].items():
            print(f"  {SKIP_REASONS.get(reason, reason)}: {n:,}")
    if meta["bad_jsonl_lines"]:
        lines = sum(b["count"] for b in meta["bad_jsonl_lines"])
        print(f"Dropped {lines:,} JSON lines/records without text in {len(meta['bad_jsonl_lines']):,} file(s) "
              "(the good ones are kept)")
