"""Checkpoints: one directory per save, complete or ignored.

    save_dir/checkpoint_step_N/
        model.safetensors     weights (safetensors: nothing is unpickled)
        optimizer.pt          AdamW state, loaded with torch.load(weights_only=True)
        rng.pt                every RNG of every rank (torch, CUDA, numpy, python), weights_only too
        state.json            step, data cursor, scaler, counters, full config, model config,
                              tokenizer sha256, dataset fingerprint, raylm version
        tokenizer.json        the data's tokenizer (or tokenizer.tiktoken), so the folder stands alone
        manifest.json         size and sha256 of every file above; written last

A directory is used only if its manifest exists and every file matches it, so a save that was
killed half-way (or a truncated copy) is never resumed from: the previous complete one is.
Locally the directory is written under a temporary name and renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from raylm import __version__
from raylm.config import ConfigError
from raylm.storage import atomic_write_json, plain_name, tmp_name

CKPT_RE = re.compile(r"^checkpoint_step_(\d+)$")
MANIFEST = "manifest.json"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_name(step: int) -> str:
    return f"checkpoint_step_{step}"


def write_checkpoint_files(directory: str | os.PathLike, *, model_state: dict, optimizer_state: dict | None,
                           rng_states: list | None, state: dict, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write the files of one checkpoint into ``directory`` (which must be new), manifest last.
    ``extra_files`` (name -> bytes) travel along, e.g. the tokenizer."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=False)
    for name, data in (extra_files or {}).items():
        (directory / plain_name(name, "a checkpoint's extra files")).write_bytes(data)
    tensors, aliases = dedupe_shared(model_state)
    save_file(tensors, str(directory / "model.safetensors"),
              metadata={"format": "pt", "raylm": __version__, "aliases": json.dumps(aliases)})
    if optimizer_state is not None:
        torch.save(optimizer_state, directory / "optimizer.pt")
    if rng_states is not None:
        torch.save(rng_states, directory / "rng.pt")
    (directory / "state.json").write_text(json.dumps(state, indent=2, default=str) + "\n", encoding="utf-8")
    files = {}
    for p in sorted(directory.iterdir()):
        files[p.name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    atomic_write_json(directory / MANIFEST, {"step": state.get("step"), "files": files})
    return directory


def verify(directory: str | os.PathLike) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"unreadable manifest.json ({e})"
    for name, info in manifest.get("files", {}).items():
        p = directory / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != info["size"]:
            return f"{name} has {p.stat().st_size} bytes, expected {info['size']} (truncated?)"
        if sha256_file(p) != info["sha256"]:
            return f"{name} does not match its sha256 (corrupted?)"
    return None


def list_checkpoints(save_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint_step_N folder in save_dir, newest first."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in save_dir.iterdir() if p.is_dir() and (m := CKPT_RE.match(p.name))]
    return sorted(found, reverse=True)


def newest_complete(save_dir: str | os.PathLike, *, warn=print) -> Path | None:
    for _, path in list_checkpoints(save_dir):
        reason = verify(path)
        if reason is None:
            return path
        warn(f"skipping {path}: {reason}")
    return None


def resolve(path: str | os.PathLike, *, warn=print) -> Path:
    """A checkpoint folder, or a save_dir (then its newest complete checkpoint). Refuses broken ones
    with a message that names the newest usable alternative."""
    p = Path(path)
    if not p.exists() and p.suffix == ".pt" and p.with_suffix("").is_dir():
        # checkpoint_step_5000.pt: the single-file name other trainers use (and the guide shows);
        # raylm's checkpoint is the folder of that name
        p = p.with_suffix("")
    if not p.exists():
        kept = [c.name for _, c in list_checkpoints(p.parent)] if p.parent.is_dir() else []
        hint = (f"; {p.parent} holds {', '.join(kept)} (newest first; --keep_checkpoints sets how many are "
                "kept)" if kept else "")
        raise ConfigError(f"checkpoint {str(p)!r} does not exist{hint}")
    if (p / MANIFEST).exists() or CKPT_RE.match(p.name) or (p / "state.json").exists():
        reason = verify(p)
        if reason is None:
            return p
        alt = newest_complete(p.parent, warn=lambda *_: None)
        hint = f"; the newest complete checkpoint there is {alt}" if alt else ""
        raise ConfigError(f"checkpoint {p} is incomplete: {reason}{hint}")
    found = newest_complete(p, warn=warn)
    if found is None:
        raise ConfigError(f"{p} holds no complete checkpoint_step_N folder")
    return found


def load_state(directory: str | os.PathLike) -> dict:
    return json.loads((Path(directory) / "state.json").read_text(encoding="utf-8"))


def dedupe_shared(state: dict) -> tuple[dict, dict]:
    """Tied weights (one tensor under two names) are stored once; aliases maps the dropped name
    to the kept one, so loading restores both."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in state.items():
        key = (t.data_ptr(), t.shape, t.dtype) if t.device.type != "meta" else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    return tensors, aliases


def load_model_state(directory: str | os.PathLike) -> dict:
    from safetensors import safe_open

    path = str(Path(directory) / "model.safetensors")
    with safe_open(path, framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    state = load_file(path)
    for name, kept in aliases.items():
        state[name] = state[kept]
    return state


def load_optimizer_state(directory: str | os.PathLike) -> dict:
    return torch.load(Path(directory) / "optimizer.pt", map_location="cpu", weights_only=True)


def load_rng_states(directory: str | os.PathLike) -> list | None:
    p = Path(directory) / "rng.pt"
    return torch.load(p, map_location="cpu", weights_only=True) if p.exists() else None


def publish_local(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy a finished checkpoint folder into place atomically: copy to a temporary sibling name,
    then rename. A crash leaves only a hidden temporary folder, never a half checkpoint."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = tmp_name(dest), tmp_name(dest)
    try:
        shutil.copytree(src, tmp)
        if dest.exists():  # same step saved again (after a restart), or final/: the old one aside, not deleted
            os.replace(dest, old)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not dest.exists() and old.exists():  # the new one did not get there: the old one back
            os.replace(old, dest)
        shutil.rmtree(old, ignore_errors=True)
    return dest


def prune(save_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (incomplete ones older than the
    newest complete one go too). Returns what was deleted."""
    removed = []
    kept = 0
    for _, path in list_checkpoints(save_dir):
        if kept < keep and verify(path) is None:
            kept += 1
            continue
        if kept == 0:
            continue  # never delete anything newer than the newest complete checkpoint
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
