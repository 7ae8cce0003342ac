"""Checkpoints are complete or ignored; tied weights survive; retention keeps the newest."""
import json

import pytest
import torch

from raylm import checkpoint as ckpt
from raylm.config import ConfigError


def _write(save_dir, step, tied=False):
    w = torch.randn(4, 3)
    state = {"a.weight": w, "b.weight": w if tied else torch.randn(4, 3)}
    tmp = save_dir / f".tmp{step}" / ckpt.checkpoint_name(step)
    ckpt.write_checkpoint_files(tmp, model_state=state, optimizer_state={"state": {}, "param_groups": []},
                                rng_states=[{"torch": torch.get_rng_state()}], state={"step": step},
                                extra_files={"tokenizer.json": b"{}"})
    return ckpt.publish_local(tmp, save_dir / ckpt.checkpoint_name(step)), state


class _RunsCode:
    """Unpickling this would create a file: what an unsafe torch.load of a shared checkpoint allows."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_truncated_newest_checkpoint_is_never_picked(tmp_path):
    _write(tmp_path, 5)
    newest, _ = _write(tmp_path, 10)
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[: len(data) // 2])  # a kill during the copy
    assert ckpt.verify(newest) and "truncated" in ckpt.verify(newest)
    assert ckpt.newest_complete(tmp_path, warn=lambda *_: None).name == "checkpoint_step_5"
    assert ckpt.resolve(tmp_path, warn=lambda *_: None).name == "checkpoint_step_5"
    with pytest.raises(ConfigError, match="newest complete checkpoint there is .*checkpoint_step_5"):
        ckpt.resolve(newest)


def test_missing_manifest_means_unfinished(tmp_path):
    path, _ = _write(tmp_path, 3)
    (path / "manifest.json").unlink()
    assert "did not finish" in ckpt.verify(path)
    assert ckpt.newest_complete(tmp_path, warn=lambda *_: None) is None


def test_tied_weights_round_trip_and_files_are_safe(tmp_path):
    path, state = _write(tmp_path, 1, tied=True)
    loaded = ckpt.load_model_state(path)
    assert torch.equal(loaded["a.weight"], state["a.weight"])
    assert loaded["b.weight"] is loaded["a.weight"]
    # every non-safetensors file loads with weights_only=True (no arbitrary unpickling)
    assert ckpt.load_optimizer_state(path) == {"state": {}, "param_groups": []}
    assert len(ckpt.load_rng_states(path)) == 1
    import pickle

    ran = tmp_path / "ran"
    for name in ("optimizer.pt", "rng.pt"):  # a shared checkpoint's pickle that runs code when unpickled
        (path / name).write_bytes(pickle.dumps(_RunsCode(str(ran)), protocol=2))
    for load in (ckpt.load_optimizer_state, ckpt.load_rng_states):
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            load(path)
    assert not ran.exists()
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.pt", "rng.pt", "state.json", "tokenizer.json"}


def test_publish_leaves_no_partial_folder_on_failure(tmp_path, monkeypatch):
    src, _ = _write(tmp_path / "a", 1)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "replace", boom)
    with pytest.raises(OSError):
        ckpt.publish_local(src, tmp_path / "b" / "checkpoint_step_1")
    assert list((tmp_path / "b").iterdir()) == []  # neither the checkpoint nor a temporary copy


def test_republishing_over_an_existing_folder_keeps_the_old_one_if_the_new_one_fails(tmp_path, monkeypatch):
    """final/ (and a step saved again after a restart) is replaced by renames: the old folder is moved aside,
    not deleted first, and comes back if the new one cannot be moved in."""
    first, _ = _write(tmp_path / "a", 1)
    second, _ = _write(tmp_path / "a", 2)
    final = ckpt.publish_local(first, tmp_path / "final")
    real_replace, calls = ckpt.os.replace, []

    def second_replace_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new folder into place
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", second_replace_fails)
    with pytest.raises(OSError, match="disk full"):
        ckpt.publish_local(second, final)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert ckpt.verify(final) is None and ckpt.load_state(final)["step"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    ckpt.publish_local(second, final)
    assert ckpt.verify(final) is None and ckpt.load_state(final)["step"] == 2


def test_prune_keeps_newest_complete(tmp_path):
    for s in (1, 2, 3, 4):
        _write(tmp_path, s)
    removed = ckpt.prune(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["checkpoint_step_1", "checkpoint_step_2"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 3]


def test_resume_accepts_the_single_file_name_and_lists_what_is_kept(tmp_path):
    """--checkpoint save_dir/checkpoint_step_N.pt (the name single-file trainers and the guide use)
    finds raylm's checkpoint_step_N folder; a checkpoint that is gone (pruned, or a typo) is refused
    with the ones that are there, newest first."""
    for step in (2000, 10000):
        _write(tmp_path, step)
    assert ckpt.resolve(tmp_path / "checkpoint_step_2000.pt") == tmp_path / "checkpoint_step_2000"
    with pytest.raises(ConfigError, match=r"checkpoint_step_5000.pt' does not exist; .* holds checkpoint_step_10000, "
                                          r"checkpoint_step_2000 \(newest first; --keep_checkpoints"):
        ckpt.resolve(tmp_path / "checkpoint_step_5000.pt")
    with pytest.raises(ConfigError, match=r"does not exist$"):
        ckpt.resolve(tmp_path / "nowhere" / "checkpoint_step_1")


def test_file_names_read_from_metadata_state_and_index_files_never_leave_their_folder(packed_data, tmp_path):
    """metadata.json, state.json and a safetensors index name files that raylm joins to their folder; one
    edited (or shared) to name ../secret must not make raylm read or write outside that folder."""
    import shutil

    from raylm.data import PackedRows
    from raylm.evaluate import load_checkpoint
    from raylm.export import _load_hf_weights
    from raylm.storage import UnsafeName
    from raylm.tokenizer import load_tokenizer
    from raylm.train import _tokenizer_files

    (tmp_path / "secret.txt").write_text("must not be read")
    data = tmp_path / "data"
    shutil.copytree(packed_data, data)
    meta = json.loads((data / "metadata.json").read_text())
    for name in ("../secret.txt", str(tmp_path / "secret.txt"), "sub/../../secret.txt", ".hidden"):
        with pytest.raises(UnsafeName, match="not a plain file name"):
            _tokenizer_files(meta | {"tokenizer_file": name}, str(data))
        (data / "metadata.json").write_text(json.dumps(meta | {"tokenizer_file": name}))
        with pytest.raises(UnsafeName):
            load_tokenizer(data)
    shard = meta["splits"]["train"]["files"][0]
    meta["splits"]["train"]["files"][0] = shard | {"path": "../" + shard["path"]}
    with pytest.raises(UnsafeName, match="leaves its folder"):
        PackedRows(str(data), "train", meta)

    from raylm.model import LLMModel, ModelConfig

    config = ModelConfig(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2, max_seq_len=8)
    shared = ckpt.write_checkpoint_files(  # a complete checkpoint whose state.json names a file outside it
        tmp_path / "run" / "checkpoint_step_2", model_state=LLMModel(config).state_dict(), optimizer_state=None,
        rng_states=None, state={"step": 2, "model_config": config.__dict__,
                                "data": {"tokenizer_file": "../../secret.txt"}})
    with pytest.raises(UnsafeName):
        load_checkpoint(str(shared))
    with pytest.raises(UnsafeName):
        ckpt.write_checkpoint_files(tmp_path / "new", model_state={"a": torch.zeros(1)}, optimizer_state=None,
                                    rng_states=None, state={"step": 1}, extra_files={"../escaped.txt": b"x"})
    assert not (tmp_path / "escaped.txt").exists()

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../secret.safetensors"}}))
    with pytest.raises(UnsafeName):
        _load_hf_weights(hf)
