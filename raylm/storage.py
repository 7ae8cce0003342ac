"""Where files live: local paths or s3:// / gs:// URIs, and atomic writes.

Every file raylm writes goes to a temporary name first and is then renamed, so a crash leaves
either the old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from raylm.config import ConfigError

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "az://")


def is_remote(path: str | os.PathLike) -> bool:
    return str(path).startswith(REMOTE_SCHEMES)


def filesystem(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    path = str(path)
    if is_remote(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


class UnsafeName(ConfigError):
    """A file name read from a metadata.json, state.json or index file that would leave its folder."""


def _is_plain(name) -> bool:
    """A file name with no folder part, not . or .., not hidden, no backslash: what raylm itself writes."""
    return isinstance(name, str) and bool(name) and name == PurePosixPath(name).name and not name.startswith(".") \
        and "\\" not in name


def plain_name(name, source: str) -> str:
    """`name` if it is a plain file name (_is_plain), the kind raylm writes into metadata.json and state.json;
    UnsafeName otherwise, naming `source`. Such names are joined to the folder that holds the file: one edited
    (or shared) to say ../secret or /etc/passwd must not read or write there."""
    if not _is_plain(name):
        raise UnsafeName(f"{source} names the file {name!r}, which is not a plain file name in its folder: "
                         "refusing to read or write outside the folder (was the file edited?)")
    return name


def relative_inside(path, source: str) -> str:
    """`path` if it is a relative path of plain names (so it stays inside its folder), as the shard paths in
    metadata.json are (dataset/train/part-00000.parquet); UnsafeName otherwise."""
    parts = path.split("/") if isinstance(path, str) else []
    if not parts or not all(_is_plain(part) for part in parts):
        raise UnsafeName(f"{source} names the path {path!r}, which leaves its folder: refusing to read it "
                         "(was the file edited?)")
    return path


def tmp_name(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike):
    with open(path, encoding="utf-8") as f:
        return json.load(f)
