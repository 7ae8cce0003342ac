"""Finding and reading raw files: every bad kind is skipped with its reason, good files are kept."""
from __future__ import annotations

import json
import os
import stat
from urllib.parse import quote

import pyarrow.fs as pafs
import pytest

from raylm.sources import SKIP_REASONS, discover, parse_documents, read_source, reading_filesystem

MB = 1e6


def read_all(discovery, **kw):
    """{relpath: ParsedFile} for every file discovery accepted."""
    kw = {"max_bytes": int(MB), "text_field": "text", "encoding_errors": "strict", **kw}
    return {f.relpath: read_source(f, None, **kw) for f in discovery.files}


@pytest.fixture
def messy(tmp_path):
    """An input folder with one file of every kind, good and bad."""
    root = tmp_path / "in"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "good.txt").write_text("plain text file\n")
    (root / "sub" / "notes.md").write_text("# heading\n\nmarkdown body")
    (root / "sub" / "deeper" / "bom.txt").write_bytes("\ufeffstarts with a BOM".encode("utf-8"))
    (root / "binary.txt").write_bytes(b"abc\x00def")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.md").write_text("  \n\t\n")
    (root / "big.txt").write_text("x" * 3000)
    (root / "broken.json").write_text('{"text": "unterminated')
    (root / "record.json").write_text(json.dumps({"text": "one record"}))
    (root / "records.json").write_text(json.dumps([{"text": "first"}, {"text": "second"}, {"id": 3}]))
    (root / "strings.json").write_text(json.dumps(["alpha", "beta"]))
    (root / "notext.json").write_text(json.dumps({"body": "wrong field"}))
    (root / "lines.jsonl").write_text('{"text": "l1"}\nnot json\n\n{"text": "l2"}\n{"other": 1}\n')
    (root / "lines_in.json").write_text('{"text": "j1"}\n{"text": "j2"}\n')
    (root / "allbad.jsonl").write_text("nope\nstill nope\n")
    (root / "code.py").write_text("print('not read by default')\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("must not be read")
    os.symlink(outside / "secret.txt", root / "leak.txt")
    os.symlink(outside, root / "leakdir")
    os.symlink(root / "good.txt", root / "alias.txt")  # inside the folder: read
    os.symlink(root / "sub", root / "subalias")  # a folder inside: read once, where it is
    os.symlink(root / "missing.txt", root / "dangling.txt")
    os.mkfifo(root / "pipe.txt")
    return root


def test_discover_sorts_files_and_skips_what_it_can_judge_without_reading(messy):
    found = discover(str(messy), [".txt", ".md", ".json", ".jsonl"], max_file_mb=2000 / MB)
    relpaths = [f.relpath for f in found.files]
    assert relpaths == sorted(relpaths)
    assert "sub/deeper/bom.txt" in relpaths and "alias.txt" in relpaths
    assert not any(p.startswith("subalias/") or p.startswith("leakdir/") for p in relpaths)
    reasons = {s.path: s.reason for s in found.skipped}
    assert reasons == {
        "big.txt": "too_large",
        "dangling.txt": "unreadable",
        "leak.txt": "symlink_outside_input",
        "leakdir": "symlink_outside_input",
        "pipe.txt": "not_regular_file",
    }
    assert found.other_extensions == {".py": 1}
    assert found.found == len(found.files) + len(found.skipped)


def test_read_keeps_good_files_and_names_the_reason_for_each_bad_one(messy):
    parsed = read_all(discover(str(messy), [".txt", ".md", ".json", ".jsonl"], max_file_mb=1))
    reasons = {path: p.skip.reason for path, p in parsed.items() if p.skip}
    assert reasons == {
        "binary.txt": "binary",
        "latin1.txt": "invalid_utf8",
        "empty.txt": "empty",
        "blank.md": "empty",
        "broken.json": "malformed_json",
        "notext.json": "no_text",
        "allbad.jsonl": "malformed_json",
    }
    assert set(reasons.values()) <= set(SKIP_REASONS)
    docs = {path: p.docs for path, p in parsed.items() if not p.skip}
    assert docs["good.txt"] == docs["alias.txt"] == ["plain text file\n"]
    assert docs["sub/deeper/bom.txt"] == ["starts with a BOM"]
    assert docs["record.json"] == ["one record"]
    assert docs["records.json"] == ["first", "second"] and parsed["records.json"].bad_lines == 1
    assert docs["strings.json"] == ["alpha", "beta"]
    assert docs["lines.jsonl"] == ["l1", "l2"] and parsed["lines.jsonl"].bad_lines == 2
    assert docs["lines_in.json"] == ["j1", "j2"]
    assert docs["big.txt"] == ["x" * 3000]


def test_invalid_utf8_can_be_kept_with_replacement_characters():
    parsed = parse_documents("caf\xe9 ok".encode("latin-1"), "a.txt", encoding_errors="replace")
    assert parsed.skip is None and parsed.docs == ["caf\ufffd ok"]


def test_text_field_and_extensions_are_settings(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"content": "c1"}\n{"text": "t1"}\n')
    (tmp_path / "b.py").write_text("x = 1\n")
    found = discover(str(tmp_path), [".jsonl", ".py"], max_file_mb=1)
    parsed = read_all(found, text_field="content")
    assert parsed["a.jsonl"].docs == ["c1"] and parsed["a.jsonl"].bad_lines == 1
    assert parsed["b.py"].docs == ["x = 1\n"]


def test_devices_are_not_read(tmp_path):
    try:
        os.mknod(tmp_path / "null.txt", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except (PermissionError, OSError):
        pytest.skip("cannot create a device node here")
    found = discover(str(tmp_path), [".txt"], max_file_mb=1)
    assert [(s.path, s.reason) for s in found.skipped] == [("null.txt", "not_regular_file")]


def test_a_file_that_vanishes_or_grows_after_discovery_is_reported(tmp_path):
    (tmp_path / "gone.txt").write_text("here for now")
    (tmp_path / "grows.txt").write_text("small")
    found = discover(str(tmp_path), [".txt"], max_file_mb=20 / MB)
    (tmp_path / "gone.txt").unlink()
    (tmp_path / "grows.txt").write_text("now much larger than ten bytes")
    parsed = read_all(found, max_bytes=20)
    assert parsed["gone.txt"].skip.reason == "unreadable"
    assert parsed["grows.txt"].skip.reason == "too_large"


def test_file_uri_is_the_local_folder_with_its_symlinks_judged_alike(messy):
    """A file:// URI is walked and read as the local folder: links that leave it are skipped, not followed
    (pyarrow's local filesystem follows them, which would read outside/secret.txt)."""
    local = discover(str(messy), [".txt", ".md"], max_file_mb=1)
    uri = discover(f"file://{quote(str(messy))}", [".txt", ".md"], max_file_mb=1)
    assert [(f.path, f.relpath) for f in uri.files] == [(f.path, f.relpath) for f in local.files]
    assert uri.skipped == local.skipped
    assert {s.path for s in uri.skipped if s.reason == "symlink_outside_input"} == {"leak.txt", "leakdir"}
    assert reading_filesystem(f"file://{messy}") is None  # read with plain open, as a local folder
    with pytest.raises(FileNotFoundError, match="file:///path"):
        discover(f"file://otherhost{messy}", [".txt"], max_file_mb=1)


def test_object_store_walk_goes_through_pyarrow_filesystems(messy):
    """s3:// and gs:// folders are walked and read through pyarrow's filesystems (here its local one, on the
    regular files: object stores have no symlinks or FIFOs)."""
    from raylm.sources import _walk_filesystem

    local = discover(str(messy), [".txt", ".md"], max_file_mb=1)
    fs = pafs.LocalFileSystem()
    files, _, _ = _walk_filesystem(f"file://{messy}", {".txt", ".md"}, int(MB))
    by_path = {f.relpath: f for f in files}
    good = {f.relpath for f in local.files} - {"dangling.txt", "pipe.txt"}
    assert good <= set(by_path)
    for relpath in ("good.txt", "sub/notes.md"):
        a = read_source(by_path[relpath], fs, max_bytes=int(MB), text_field="text", encoding_errors="strict")
        b = read_source(next(f for f in local.files if f.relpath == relpath), None, max_bytes=int(MB),
                        text_field="text", encoding_errors="strict")
        assert a.docs == b.docs and a.docs


def test_missing_folder_and_excluded_output_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        discover(str(tmp_path / "nope"), [".txt"], max_file_mb=1)
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "processed").mkdir()
    (tmp_path / "processed" / "metadata.json").write_text("{}")
    found = discover(str(tmp_path), [".txt", ".json"], max_file_mb=1, exclude=str(tmp_path / "processed"))
    assert [f.relpath for f in found.files] == ["a.txt"]


def test_builtin_corpus_is_the_same_stdlib_files_every_time(tmp_path):
    from raylm.corpus import write_builtin_corpus

    first = write_builtin_corpus(tmp_path / "corpus", max_mb=0.3)
    files = sorted(p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file())
    assert files and all(f.endswith(".py") for f in files)
    assert not any(part in ("test", "tests", "idlelib", "site-packages") for f in files for part in f.split("/"))
    assert sum((first / f).stat().st_size for f in files) <= 0.3e6
    (first / files[0]).write_text("changed")  # a damaged copy is rebuilt
    again = write_builtin_corpus(tmp_path / "corpus", max_mb=0.3)
    assert sorted(p.relative_to(again).as_posix() for p in again.rglob("*") if p.is_file()) == files
    assert (again / files[0]).read_text() != "changed"
    assert [p.name for p in tmp_path.iterdir()] == ["corpus"]  # no temporary folder left behind
    found = discover(str(again), [".py"], max_file_mb=1)
    assert len(found.files) == len(files) and not found.skipped


def test_json_lines_split_on_newlines_only():
    data = '{"text": "a\u2028b"}\r\n{"text": "c"}\n'.encode("utf-8")
    assert parse_documents(data, "x.jsonl").docs == ["a\u2028b", "c"]
