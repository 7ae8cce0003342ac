"""The built-in corpus of `raylm demo`: the Python standard library's own source files.

    raylm demo                                    # writes it, then prepares and trains on it
    python -c "from raylm.corpus import write_builtin_corpus; print(write_builtin_corpus('./stdlib_corpus'))"
    raylm prepare --input_dir ./stdlib_corpus --output_dir ./processed_data --extensions .py

Nothing is downloaded and no text is shipped with raylm: every Python installation carries these
files. The selection is deterministic for a given Python: the .py files under
`sysconfig.get_paths()["stdlib"]`, sorted by path, without site-packages, the test suites and a
few packages that are mostly data or tooling, taken in order until the next one would pass max_mb.
"""
from __future__ import annotations

import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "ensurepip", "__pycache__"}


def builtin_corpus_files(max_mb: float = 4.0) -> list[tuple[Path, str]]:
    """(source file, path relative to the standard library) of the corpus, in order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found: list[tuple[str, Path]] = []
    for folder, dirs, files in os.walk(stdlib):
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS]
        for name in files:
            path = Path(folder, name)
            if name.endswith(".py") and path.is_file() and not path.is_symlink():
                found.append((path.relative_to(stdlib).as_posix(), path))
    found.sort()
    budget = int(max_mb * 1e6)
    selected: list[tuple[Path, str]] = []
    for relpath, path in found:
        size = path.stat().st_size
        if size > budget:
            break
        budget -= size
        selected.append((path, relpath))
    return selected


def write_builtin_corpus(dest_dir: str | os.PathLike, max_mb: float = 4.0) -> Path:
    """Copy the corpus into dest_dir and return it. The copy is built in a temporary folder and
    renamed into place, so dest_dir is either complete or absent; an existing dest_dir that
    already holds exactly these files is kept as it is."""
    dest = Path(dest_dir).resolve()
    selected = builtin_corpus_files(max_mb)
    wanted = {relpath: path.stat().st_size for path, relpath in selected}
    if dest.is_dir():
        present = {p.relative_to(dest).as_posix(): p.stat().st_size for p in dest.rglob("*") if p.is_file()}
        if present == wanted:
            return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        for path, relpath in selected:
            target = tmp / relpath
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
