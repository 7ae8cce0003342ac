"""One local Ray for the whole test session; tiny models; CPU only."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray cluster shared by every test that needs one (started on first use)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, dashboard_host="127.0.0.1",
                 logging_level="WARNING", configure_logging=False)
    yield ray
    ray.shutdown()


def write_packed_dataset(out_dir, *, vocab_size=64, max_length=16, train_rows=64, val_rows=8, seed=0,
                         partial_last=True):
    """A real prepared-dataset folder (Parquet shards + metadata.json) in prepare's format, with a
    learnable pattern (each row counts up modulo a small cycle), for training tests that should not
    depend on tokenizer training. The last row of each split is partial (padded) when asked."""
    import json
    from pathlib import Path

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    splits = {}
    for split, n in (("train", train_rows), ("val", val_rows)):
        d = out / "dataset" / split
        d.mkdir(parents=True, exist_ok=True)
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
            arr = pa.FixedSizeListArray.from_arrays(pa.array(rows[a:b].reshape(-1).astype(np.uint16)), max_length)
            table = pa.table({"input_ids": arr, "length": pa.array(lengths[a:b])})
            name = f"dataset/{split}/part-{k:05d}.parquet"
            pq.write_table(table, out / name)
            files.append({"path": name, "rows": b - a})
        splits[split] = {"rows": n, "tokens": int(lengths.sum()), "documents": n, "padding_tokens":
                         int((max_length - lengths).sum()), "files": files}
    meta = {"raylm_version": "test", "vocab_size": vocab_size, "max_length": max_length, "overlap": 0,
            "tokenizer_type": "synthetic", "tokenizer_file": None, "tokenizer_sha256": f"synthetic-{seed}",
            "eos_token_id": 0, "pad_token_id": 1, "splits": splits}
    (out / "metadata.json").write_text(json.dumps(meta))
    return out


@pytest.fixture(scope="session")
def packed_data(tmp_path_factory):
    return write_packed_dataset(tmp_path_factory.mktemp("packed"))
