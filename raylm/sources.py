"""The raw text files of `raylm prepare`: finding them, reading them, and skipping bad ones.

    raylm prepare --input_dir ./raw_text_data --output_dir ./processed_data --extensions .txt .md .json .jsonl

`discover` walks the input folder (a local path or file:// URI, or an s3:// gs:// URI read through pyarrow's
filesystems) and sorts what it finds into files to read and files skipped for a reason that can be
seen before reading (size cap, symlinks that leave the folder, FIFOs and devices). `read_source`
then turns one file into documents, or into a skip reason: binary, invalid UTF-8, empty,
malformed JSON, unreadable. Nothing is dropped silently: every skipped file comes back as a
`Skipped` record and ends up in metadata.json.

A document is the unit that end-of-text tokens separate and that the train/validation split
assigns: a whole .txt/.md (or other --extensions) file, or one record of a .json/.jsonl file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import stat
from collections import Counter
from pathlib import PurePosixPath

import pyarrow.fs as pafs

from raylm import storage

# reason code -> what a person reads in the summary
SKIP_REASONS = {
    "binary": "binary content (NUL bytes)",
    "invalid_utf8": "not valid UTF-8 (--encoding_errors replace keeps such files)",
    "empty": "empty (no text)",
    "too_large": "larger than --max_file_mb",
    "malformed_json": "malformed JSON",
    "no_text": "JSON without a text field (see --text_field)",
    "unreadable": "unreadable",
    "symlink_outside_input": "symlink that leaves the input folder",
    "not_regular_file": "not a regular file (FIFO, device or socket)",
}

UTF8_BOM = "\ufeff"


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """A file to read: `path` inside the filesystem of the input folder, `relpath` relative to it."""

    path: str
    relpath: str
    size: int
    mtime_ns: int = 0


@dataclasses.dataclass(frozen=True)
class Skipped:
    path: str  # relative to the input folder
    reason: str  # a key of SKIP_REASONS
    size: int
    detail: str = ""


@dataclasses.dataclass
class Discovery:
    root: str  # the input folder as given (path or URI)
    files: list[SourceFile]  # sorted by relpath
    skipped: list[Skipped]
    other_extensions: Counter  # files not read because of their ending, by ending

    @property
    def found(self) -> int:
        return len(self.files) + len(self.skipped)


@dataclasses.dataclass
class ParsedFile:
    """What one file holds: its documents, or the reason it was skipped."""

    docs: list[str]
    skip: Skipped | None = None
    bad_lines: int = 0  # JSON Lines lines (or JSON array items) that held no usable text


def file_uri_path(input_dir: str) -> str | None:
    """The local path of a file:// URI (None for anything else). Such a folder is walked and read as the
    local folder it is, so that its symlinks are judged like any local folder's: pyarrow's local
    filesystem follows them, out of the folder too."""
    if not input_dir.startswith("file://"):
        return None
    from urllib.parse import unquote, urlparse

    parsed = urlparse(input_dir)
    if parsed.netloc not in ("", "localhost"):
        raise FileNotFoundError(f"{input_dir}: a file:// URI names a folder on this machine (file:///path)")
    return unquote(parsed.path)


def _local_path(input_dir: str) -> str | None:
    """The input folder as a local path (a plain path, or a file:// URI's); None for an object store."""
    return file_uri_path(input_dir) if "://" in input_dir else input_dir


def input_filesystem(input_dir: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) of the input folder."""
    local = _local_path(input_dir)
    return pafs.FileSystem.from_uri(input_dir) if local is None else storage.filesystem(local)


def reading_filesystem(input_dir: str) -> pafs.FileSystem | None:
    """The filesystem `read_source` reads input_dir's files through: None for a local folder, file://
    included (plain `open`, so symlinks and FIFOs were judged by `discover` first)."""
    return input_filesystem(input_dir)[0] if _local_path(input_dir) is None else None


def _extension(name: str) -> str:
    return PurePosixPath(name).suffix.lower()


def discover(input_dir: str, extensions: list[str], max_file_mb: float, exclude: str | None = None) -> Discovery:
    """Every file under input_dir whose ending is in `extensions`, searched recursively. A local
    `exclude` folder (the output folder, when it lies inside the input) is not searched.

    Raises FileNotFoundError when input_dir does not exist or is not a folder."""
    max_bytes = int(max_file_mb * 1e6)
    local = _local_path(input_dir)
    if local is None:  # an object store: no symlinks, FIFOs or devices to judge
        files, skipped, other = _walk_filesystem(input_dir, set(extensions), max_bytes)
    else:
        files, skipped, other = _walk_local(local, set(extensions), max_bytes, exclude)
    files.sort(key=lambda f: f.relpath)
    skipped.sort(key=lambda s: s.path)
    return Discovery(input_dir, files, skipped, other)


def _walk_local(root: str, extensions: set[str], max_bytes: int, exclude: str | None):
    """Walk a local folder without following symlinked folders (their targets are either inside
    the folder, and read there, or outside it, and reported)."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(root)
    real_root = os.path.realpath(root)
    excluded = os.path.realpath(exclude) if exclude else None
    files: list[SourceFile] = []
    skipped: list[Skipped] = []
    other: Counter = Counter()

    def rel(path: str) -> str:
        return PurePosixPath(os.path.relpath(path, root)).as_posix()

    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as e:
            skipped.append(Skipped(rel(folder) + "/", "unreadable", 0, e.strerror or str(e)))
            continue
        for entry in entries:
            wanted = _extension(entry.name) in extensions
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                target_is_dir = os.path.isdir(target)
                if os.path.commonpath([real_root, target]) != real_root:
                    if wanted or target_is_dir:
                        skipped.append(Skipped(rel(entry.path), "symlink_outside_input", 0, f"points to {target}"))
                    else:
                        other[_extension(entry.name) or "(none)"] += 1
                    continue
                if target_is_dir:
                    continue  # its files are read where it points, inside the input folder
                if not wanted:
                    other[_extension(entry.name) or "(none)"] += 1
                    continue
                try:
                    st = os.stat(entry.path)
                except OSError as e:  # a broken link
                    skipped.append(Skipped(rel(entry.path), "unreadable", 0, e.strerror or str(e)))
                    continue
            elif entry.is_dir(follow_symlinks=False):
                if os.path.realpath(entry.path) != excluded:
                    stack.append(entry.path)
                continue
            elif not wanted:
                other[_extension(entry.name) or "(none)"] += 1
                continue
            else:
                st = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                skipped.append(Skipped(rel(entry.path), "not_regular_file", 0))
            elif st.st_size > max_bytes:
                skipped.append(Skipped(rel(entry.path), "too_large", st.st_size))
            else:
                files.append(SourceFile(entry.path, rel(entry.path), st.st_size, st.st_mtime_ns))
    return files, skipped, other


def _walk_filesystem(uri: str, extensions: set[str], max_bytes: int):
    """Walk a folder through a pyarrow filesystem (object stores have no symlinks or FIFOs)."""
    fs, base = input_filesystem(uri)
    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(uri)
    files: list[SourceFile] = []
    skipped: list[Skipped] = []
    other: Counter = Counter()
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if info.type == pafs.FileType.Directory:
            continue
        relpath = PurePosixPath(info.path).relative_to(PurePosixPath(base)).as_posix()
        if _extension(relpath) not in extensions:
            other[_extension(relpath) or "(none)"] += 1
        elif info.type != pafs.FileType.File:
            skipped.append(Skipped(relpath, "not_regular_file", 0))
        elif info.size > max_bytes:
            skipped.append(Skipped(relpath, "too_large", info.size))
        else:
            files.append(SourceFile(info.path, relpath, info.size, info.mtime_ns or 0))
    return files, skipped, other


def read_bytes(source: SourceFile, fs: pafs.FileSystem | None, max_bytes: int) -> bytes:
    """The file's bytes (at most max_bytes + 1, so a file that grew past the cap is noticed)."""
    if fs is None:
        with open(source.path, "rb") as f:
            return f.read(max_bytes + 1)
    with fs.open_input_stream(source.path) as f:
        return f.read(max_bytes + 1)


def read_source(source: SourceFile, fs: pafs.FileSystem | None, *, max_bytes: int, text_field: str,
                encoding_errors: str) -> ParsedFile:
    """Read and parse one file. `fs` is None for local files, else the input's pyarrow filesystem."""
    try:
        data = read_bytes(source, fs, max_bytes)
    except OSError as e:
        detail = getattr(e, "strerror", None) or str(e)
        return ParsedFile([], Skipped(source.relpath, "unreadable", source.size, detail))
    if len(data) > max_bytes:
        return ParsedFile([], Skipped(source.relpath, "too_large", len(data)))
    return parse_documents(data, source.relpath, text_field=text_field, encoding_errors=encoding_errors)


def parse_documents(data: bytes, relpath: str, *, text_field: str = "text",
                    encoding_errors: str = "strict") -> ParsedFile:
    """Turn a file's bytes into documents: one per text file, one per JSON record or line."""

    def skip(reason: str, detail: str = "") -> ParsedFile:
        return ParsedFile([], Skipped(relpath, reason, len(data), detail))

    if not data:
        return skip("empty")
    if b"\0" in data:
        return skip("binary")
    try:
        text = data.decode("utf-8", errors=encoding_errors)
    except UnicodeDecodeError as e:
        return skip("invalid_utf8", f"byte {e.start}: {e.reason}")
    text = text.removeprefix(UTF8_BOM)
    if not text.strip():
        return skip("empty")

    ext = _extension(relpath)
    if ext not in (".json", ".jsonl"):
        return ParsedFile([text])
    if ext == ".json":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            # "Extra data" after a complete first value: the file holds JSON Lines.
            parsed = _parse_json_lines(text, text_field) if e.msg == "Extra data" else None
            if parsed is not None and parsed.docs:
                return parsed
            return skip("malformed_json", str(e))
        docs, bad = _records_to_docs(value, text_field)
        if not docs:
            return skip("no_text", f"no string {text_field!r} found")
        return ParsedFile(docs, bad_lines=bad)
    parsed = _parse_json_lines(text, text_field)
    if not parsed.docs:
        if parsed.bad_lines:
            return skip("malformed_json", f"none of {parsed.bad_lines} lines is a record with a string {text_field!r}")
        return skip("empty")
    return parsed


def _records_to_docs(value, text_field: str) -> tuple[list[str], int]:
    """A record, or an array of records / strings -> (texts, number of items without text)."""
    items = value if isinstance(value, list) else [value]
    docs: list[str] = []
    bad = 0
    for item in items:
        text = item.get(text_field) if isinstance(item, dict) else item
        if isinstance(text, str):
            if text.strip():  # a record with blank text is no document, and no error either
                docs.append(text)
        else:
            bad += 1
    return docs, bad


def _parse_json_lines(text: str, text_field: str) -> ParsedFile:
    docs: list[str] = []
    bad = 0
    for line in text.split("\n"):  # not splitlines(): JSON strings may hold U+2028 and friends
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad += 1
            continue
        line_docs, line_bad = _records_to_docs([record], text_field)
        docs.extend(line_docs)
        bad += line_bad
    return ParsedFile(docs, bad_lines=bad)
