"""`raylm prepare` end to end: skipped files, token conservation, split, kinds, re-runs."""
from __future__ import annotations

import base64
import dataclasses
import importlib.util
import json
import os
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raylm.config import ConfigError, PrepareConfig
from raylm.prepare import DocumentRouter, RowPacker, input_fingerprint, prepare, split_value
from raylm.sources import discover, parse_documents
from raylm.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Helpers: a generated corpus, and reading a prepared dataset back into documents
# --------------------------------------------------------------------------------------------

def stdlib_words() -> list[str]:
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text(encoding="utf-8")
    return sorted(set(text.split()))[:2000]


def write_corpus(root: Path, n_files: int = 24, seed: int = 0, bad: bool = True) -> Path:
    """Text files of 5-400 words (some span many rows), a JSON Lines file, and bad files."""
    rng = np.random.default_rng(seed)
    words = stdlib_words()
    root.mkdir(parents=True)
    for i in range(n_files):
        n = int(rng.integers(5, 400))
        text = " ".join(rng.choice(words, size=n)) + f"\nfile {i} ünïcode 🎉\n"
        (root / f"d{i // 10}" / f"doc{i:03d}.txt").parent.mkdir(exist_ok=True)
        (root / f"d{i // 10}" / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
    records = [json.dumps({"text": f"record {j}: " + " ".join(rng.choice(words, size=30))}) for j in range(12)]
    (root / "records.jsonl").write_text("\n".join(records[:6] + ["{broken"] + records[6:]) + "\n")
    if bad:
        (root / "binary.txt").write_bytes(b"\x00\x01\x02 binary")
        (root / "latin1.md").write_bytes("caf\xe9".encode("latin-1"))
        (root / "empty.txt").write_bytes(b"")
        (root / "broken.json").write_text("{not json")
        os.mkfifo(root / "fifo.txt")
        outside = root.parent / f"{root.name}-outside.txt"
        outside.write_text("outside the input folder")
        os.symlink(outside, root / "escape.txt")
    return root


def config(input_dir, output_dir, **kw) -> PrepareConfig:
    base = dict(input_dir=str(input_dir), output_dir=str(output_dir), tokenizer_type="bpe", vocab_size=400,
                max_length=32, overlap=4, num_workers=2, val_fraction=0.2, rows_per_shard=64,
                tokenizer_sample_mb=0.05, seed=7)
    return PrepareConfig(**{**base, **kw})


def read_split(out: Path, meta: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
    files = meta["splits"][split]["files"]
    on_disk = sorted(p.relative_to(out).as_posix() for p in (out / "dataset" / split).iterdir())
    assert [f["path"] for f in files] == on_disk
    tables = [pq.read_table(out / f["path"]) for f in files]
    assert [t.num_rows for t in tables] == [f["rows"] for f in files]
    rows = np.concatenate([np.stack(t.column("input_ids").to_numpy(zero_copy_only=False)) for t in tables])
    lengths = np.concatenate([t.column("length").to_numpy() for t in tables])
    return rows, lengths


def split_documents(rows: np.ndarray, lengths: np.ndarray, overlap: int, eos: int) -> list[tuple]:
    """Undo the packing: drop each row's repeated start and its padding, cut at end-of-text."""
    stream = np.concatenate([row[(overlap if i else 0): n] for i, (row, n) in enumerate(zip(rows, lengths))])
    cuts = np.flatnonzero(stream == eos) + 1
    assert cuts[-1] == len(stream), "every document ends with end-of-text"
    return [tuple(doc) for doc in np.split(stream, cuts[:-1])]


def expected_documents(input_dir: Path, meta: dict, tok) -> dict[tuple, tuple]:
    """{(relpath, index): token ids + end-of-text} of every document of every accepted file."""
    cfg = meta["config"]
    skipped = {s["path"] for s in meta["skipped"]}
    docs = {}
    for f in discover(str(input_dir), cfg["extensions"], cfg["max_file_mb"]).files:
        if f.relpath in skipped:
            continue
        parsed = parse_documents(Path(f.path).read_bytes(), f.relpath, text_field=cfg["text_field"])
        for i, text in enumerate(parsed.docs):
            docs[(f.relpath, i)] = tuple(tok.encode(text)) + (tok.eos_token_id,)
    return docs


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_prepare", ROOT / "jobs" / "bench_prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("prepare") / "raw")


@pytest.fixture(scope="module")
def prepared(ray_session, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "out"
    return out, prepare(config(corpus, out))


# --------------------------------------------------------------------------------------------
# Packing and splitting, without Ray
# --------------------------------------------------------------------------------------------

class ListWriter:
    def __init__(self):
        self.rows, self.lengths = [], []

    def add(self, rows, lengths):
        self.rows += list(rows)
        self.lengths += list(lengths)

    def finish(self):
        pass


@pytest.mark.parametrize("n_tokens", [1, 7, 8, 9, 13, 14, 15, 200])
@pytest.mark.parametrize("overlap", [0, 3, 7])
def test_packer_keeps_every_token_and_pads_only_the_last_row(n_tokens, overlap):
    max_length = 8
    writer = ListWriter()
    packer = RowPacker(max_length, overlap, pad_token_id=999, writer=writer, dtype=np.uint32)
    stream = np.arange(n_tokens, dtype=np.uint32)
    for piece in np.array_split(stream, 5):
        packer.add(piece, documents=1)
    packer.finish()
    rows, lengths = np.array(writer.rows), np.array(writer.lengths)
    stride = max_length - overlap
    assert len(rows) == 1 + max(0, -(-(n_tokens - max_length) // stride))  # fewest rows that hold it all
    assert (lengths[:-1] == max_length).all() and 0 < lengths[-1] <= max_length
    assert (rows[-1, lengths[-1]:] == 999).all() and packer.padding_tokens == max_length - lengths[-1]
    rebuilt = np.concatenate([row[(overlap if i else 0): n] for i, (row, n) in enumerate(zip(rows, lengths))])
    assert rebuilt.tolist() == stream.tolist()
    for a, b in zip(rows, rows[1:]):  # each row starts with the previous row's last `overlap` tokens
        assert a[stride:stride + overlap].tolist() == b[:overlap].tolist()


def route(files: list[list[float]], val_fraction: float = 0.1):
    """Route files of documents with the given split values; document k of the whole stream is
    the tokens [k, EOS] with EOS = 99. Returns (train documents, validation documents)."""
    writers = ListWriter(), ListWriter()
    train, val = (RowPacker(4, 0, 0, w, np.uint32) for w in writers)
    router = DocumentRouter(val_fraction, train, val)
    k = 0
    for values in files:
        docs = [np.array([k + i, 99], np.uint32) for i in range(len(values))]
        k += len(values)

        def tokens(to_val: bool) -> np.ndarray:
            chosen = [d for d, v in zip(docs, values) if (v < val_fraction) == to_val]
            return np.concatenate(chosen) if chosen else np.zeros(0, np.uint32)

        router.add_file(tokens(False), tokens(True), np.full(len(values), 2), np.array(values))
    router.finish()
    streams = [np.concatenate([r[:n] for r, n in zip(w.rows, w.lengths)]) if w.rows else np.zeros(0) for w in writers]
    return [sorted(int(x) for x in stream if x != 99) for stream in streams]


def test_router_always_gives_validation_a_document():
    assert route([[0.5, 0.05, 0.9]]) == [[0, 2], [1]]  # the hash rule
    assert route([[0.5, 0.3, 0.9]]) == [[0, 2], [1]]  # none below 0.1: the smallest value moves
    assert route([[0.5, 0.3], [0.9, 0.05]]) == [[0, 1, 2], [3]]  # the held one goes back to train
    assert route([[0.01, 0.05, 0.9]]) == [[2], [0, 1]]


def test_split_depends_on_seed_path_and_index_only():
    values = [split_value(1, "a.txt", i) for i in range(1000)]
    assert values == [split_value(1, "a.txt", i) for i in range(1000)]
    assert values != [split_value(2, "a.txt", i) for i in range(1000)]
    assert 0.15 < np.mean(np.array(values) < 0.2) < 0.25


# --------------------------------------------------------------------------------------------
# End to end on the shared local Ray
# --------------------------------------------------------------------------------------------

def test_bad_files_are_skipped_with_their_reason_and_good_ones_kept(prepared):
    out, meta = prepared
    assert meta == json.loads((out / "metadata.json").read_text())
    reasons = {s["path"]: s["reason"] for s in meta["skipped"]}
    assert reasons == {"binary.txt": "binary", "latin1.md": "invalid_utf8", "empty.txt": "empty",
                       "broken.json": "malformed_json", "fifo.txt": "not_regular_file",
                       "escape.txt": "symlink_outside_input"}
    assert all({"path", "reason", "size"} <= set(s) for s in meta["skipped"])
    assert meta["files"] == {"found": 31, "accepted": 25, "skipped": 6, "other_extensions": {},
                             "by_reason": {"binary": 1, "empty": 1, "invalid_utf8": 1, "malformed_json": 1,
                                           "not_regular_file": 1, "symlink_outside_input": 1}}
    assert meta["bad_jsonl_lines"] == [{"path": "records.jsonl", "count": 1}]
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 24 + 12


def test_every_token_is_kept_once_and_no_document_leaks(prepared, corpus):
    out, meta = prepared
    tok = load_tokenizer(out)
    expected = expected_documents(corpus, meta, tok)
    found = {}
    for split in ("train", "val"):
        rows, lengths = read_split(out, meta, split)
        docs = split_documents(rows, lengths, meta["overlap"], meta["eos_token_id"])
        assert sum(map(len, docs)) == meta["splits"][split]["tokens"]
        assert len(docs) == meta["splits"][split]["documents"]
        found[split] = docs
    assert sorted(found["train"] + found["val"]) == sorted(expected.values())
    assert not set(found["train"]) & set(found["val"])
    val_rule = {key for key in expected if split_value(meta["config"]["seed"], key[0], key[1]) < 0.2}
    assert {expected[key] for key in val_rule} == set(found["val"])


def test_rows_have_the_declared_shape_and_ids_below_vocab(prepared):
    out, meta = prepared
    for split in ("train", "val"):
        schema = pq.read_schema(out / meta["splits"][split]["files"][0]["path"])
        assert str(schema.field("input_ids").type) == "fixed_size_list<element: uint16>[32]"
        assert str(schema.field("length").type) == "int32"
        rows, lengths = read_split(out, meta, split)
        assert rows.shape == (meta["splits"][split]["rows"], 32) and len(rows) >= 1
        assert rows.max() < meta["vocab_size"]
        assert (lengths[:-1] == 32).all() and 4 < lengths[-1] <= 32
        assert (rows[-1, lengths[-1]:] == meta["pad_token_id"]).all()
        assert meta["splits"][split]["padding_tokens"] == 32 - lengths[-1]
    assert len(meta["splits"]["train"]["files"]) > 1  # rows_per_shard 64: several shards


def test_metadata_has_what_training_needs(prepared):
    out, meta = prepared
    tok = load_tokenizer(out)
    assert (meta["vocab_size"], meta["eos_token_id"], meta["pad_token_id"]) == (tok.vocab_size, tok.eos_token_id,
                                                                               tok.pad_token_id)
    assert meta["tokenizer_file"] == "tokenizer.json" and meta["tokenizer_sha256"] == tok.sha256
    assert meta["config"] == dataclasses.asdict(config(meta["config"]["input_dir"], meta["config"]["output_dir"]))
    assert {"raylm_version", "max_length", "overlap", "tokenizer_type", "timings", "input_fingerprint"} <= set(meta)


def test_same_seed_same_shards_and_a_killed_run_finishes_identically(prepared, corpus, tmp_path, capsys):
    clean_out, clean = prepared
    out = tmp_path / "out"
    capsys.readouterr()
    prepare(config(corpus, out, tokenizer_sample_mb=0.001))  # a sample full after a few files
    bar = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("Reading files"))
    assert bar.startswith("Reading files: 100%") and "sample for the tokenizer, from" in bar, bar
    shutil.rmtree(out)
    prepare(config(corpus, out))

    def shard_bytes(folder, meta):
        files = meta["splits"]["train"]["files"] + meta["splits"]["val"]["files"]
        return {f["path"]: (folder / f["path"]).read_bytes() for f in files}

    first = json.loads((out / "metadata.json").read_text())
    assert shard_bytes(out, first) == shard_bytes(clean_out, clean)
    assert (out / "tokenizer.json").read_bytes() == (clean_out / "tokenizer.json").read_bytes()

    # "Kill" it in the middle of swapping a rebuild in: no metadata, a shard gone, leftovers of the scratch
    # folders (an older raylm's too).
    (out / "metadata.json").unlink()
    (out / first["splits"]["train"]["files"][1]["path"]).unlink()
    for scratch in (".next/dataset/train", ".dataset-building/train"):
        (out / scratch).mkdir(parents=True)
        (out / scratch / "part-00000.parquet").write_bytes(b"half a file")
    (out / "dataset" / "train" / ".part-00005.parquet.tmp-1234").write_bytes(b"half a file")
    capsys.readouterr()
    again = prepare(config(corpus, out))
    assert "Reusing the bpe tokenizer" in capsys.readouterr().out
    assert shard_bytes(out, again) == shard_bytes(clean_out, clean)
    assert sorted(p.name for p in (out / "dataset" / "train").iterdir()) == sorted(
        Path(f["path"]).name for f in clean["splits"]["train"]["files"])
    assert sorted(p.name for p in out.iterdir()) == [".tokenizer-stamp.json", "dataset", "metadata.json",
                                                      "tokenizer.json"]


def test_a_rebuild_that_fails_leaves_the_finished_dataset_as_it_was(prepared, corpus, tmp_path):
    """Changed input or settings rebuild the dataset beside the finished one, which stays usable (metadata,
    tokenizer and rows that agree) until the new one is complete."""
    from raylm.data import PackedRows

    out = tmp_path / "out"
    shutil.copytree(prepared[0], out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    one = tmp_path / "one"
    one.mkdir()
    (one / "only.txt").write_text("a single document, with other words than the corpus " * 40)
    with pytest.raises(ConfigError, match="single document"):  # fails after training its own tokenizer
        prepare(config(one, out, vocab_size=300))
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and ".next" not in p.parts}
    assert after == before
    rows = PackedRows(str(out), "train")
    assert len(rows.tokens) == prepared[1]["splits"]["train"]["rows"]
    assert load_tokenizer(out).sha256 == prepared[1]["tokenizer_sha256"]


def test_an_unchanged_rerun_reuses_the_dataset(prepared, corpus, tmp_path, capsys):
    out, meta = prepared
    capsys.readouterr()
    assert prepare(config(corpus, out)) == meta
    assert "Reusing the finished dataset" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="does not exist"):  # a typo leaves the dataset as it was
        prepare(config(corpus / "missing", out))
    assert (out / "metadata.json").is_file()


def test_the_input_fingerprint_sees_added_and_touched_files(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    fingerprint = input_fingerprint(discover(str(tmp_path), [".txt"], 1))
    assert input_fingerprint(discover(str(tmp_path), [".txt"], 1)) == fingerprint
    os.utime(tmp_path / "a.txt", ns=(1, 1))
    touched = input_fingerprint(discover(str(tmp_path), [".txt"], 1))
    (tmp_path / "b.txt").write_text("b")
    added = input_fingerprint(discover(str(tmp_path), [".txt"], 1))
    assert len({fingerprint, touched, added}) == 3


@pytest.mark.parametrize("kind", ["wordpiece", "tiktoken"])
def test_other_tokenizer_kinds_end_to_end(ray_session, tmp_path, kind):
    raw = write_corpus(tmp_path / "raw", n_files=8, seed=3, bad=False)
    out = tmp_path / "out"
    input_dir = f"file://{raw}" if kind == "tiktoken" else raw  # a file:// URI reads as the local folder
    meta = prepare(config(input_dir, out, tokenizer_type=kind, overlap=0, val_fraction=0.3))
    tok = load_tokenizer(out)
    assert tok.kind == meta["tokenizer_type"] == kind
    assert meta["tokenizer_file"] == ("tokenizer.tiktoken" if kind == "tiktoken" else "tokenizer.json")
    expected = expected_documents(raw, meta, tok)
    found = []
    for split in ("train", "val"):
        rows, lengths = read_split(out, meta, split)
        assert rows.max() < tok.vocab_size
        found += split_documents(rows, lengths, 0, tok.eos_token_id)
    assert sorted(found) == sorted(expected.values())


def test_named_tiktoken_encoding_with_a_large_vocab_uses_uint32(ray_session, tmp_path):
    raw = write_corpus(tmp_path / "raw", n_files=4, seed=4, bad=False)
    ranks_file = tmp_path / "cl100k_base.tiktoken"  # a stand-in: bytes only, cl100k's special tokens
    ranks_file.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    out = tmp_path / "out"
    meta = prepare(config(raw, out, tokenizer_type="tiktoken", tiktoken_encoding=str(ranks_file)))
    assert meta["vocab_size"] == 100277 and meta["token_dtype"] == "uint32"
    schema = pq.read_schema(out / meta["splits"]["train"]["files"][0]["path"])
    assert str(schema.field("input_ids").type) == "fixed_size_list<element: uint32>[32]"


def test_a_given_tokenizer_is_kept_under_the_standard_name(prepared, corpus, tmp_path):
    """--tokenizer_file of any name (here a hidden one) becomes the dataset's tokenizer.json, the name that
    metadata.json, checkpoints and exports look for."""
    given = tmp_path / ".my.tokenizer.json"
    given.write_bytes((prepared[0] / "tokenizer.json").read_bytes())
    meta = prepare(config(corpus, tmp_path / "out", tokenizer_file=str(given)))
    assert meta["tokenizer_file"] == "tokenizer.json" and meta["tokenizer_sha256"] == prepared[1]["tokenizer_sha256"]
    assert load_tokenizer(tmp_path / "out").sha256 == prepared[1]["tokenizer_sha256"]


def test_two_documents_still_give_a_validation_row(ray_session, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text("first document " * 20)
    (raw / "b.txt").write_text("second document " * 20)
    meta = prepare(config(raw, tmp_path / "out", val_fraction=0.01))
    assert meta["splits"]["val"]["rows"] >= 1 and meta["splits"]["train"]["rows"] >= 1
    assert (meta["splits"]["train"]["documents"], meta["splits"]["val"]["documents"]) == (1, 1)


def test_a_single_document_is_a_clear_error(ray_session, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "book.txt").write_text("the only document " * 50)
    with pytest.raises(ConfigError, match="single document"):
        prepare(config(raw, tmp_path / "out"))
    assert not (tmp_path / "out" / "metadata.json").exists()


def test_nothing_usable_and_missing_input_are_clear_errors(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_bytes(b"\x00binary")
    (raw / "b.json").write_text("{oops")
    (raw / "c.py").write_text("x = 1")
    with pytest.raises(ConfigError) as err:
        prepare(config(raw, tmp_path / "out"))
    message = str(err.value)
    assert "found 2 file(s)" in message and "binary content" in message and "malformed JSON" in message
    assert ".py: 1" in message and "--extensions" in message
    assert not (tmp_path / "out").exists()  # a run that made nothing leaves no empty folders behind
    (tmp_path / "mine").mkdir()  # ... but a folder it did not make stays, empty or not
    with pytest.raises(ConfigError):
        prepare(config(raw, tmp_path / "mine"))
    assert (tmp_path / "mine").is_dir()
    with pytest.raises(ConfigError, match="does not exist"):
        prepare(config(tmp_path / "nowhere", tmp_path / "out"))


def test_bench_smoke(ray_session, tmp_path, capsys):
    load_bench().main(["--smoke", "--work_dir", str(tmp_path)])
    report = capsys.readouterr().out
    assert "MB/s" in report and "ceiling" in report
    shutil.rmtree(tmp_path, ignore_errors=True)
