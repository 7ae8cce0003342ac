"""Using a trained model: eval, generate, fine-tune, export, the demo, and the errors a newcomer meets."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raylm.config import ConfigError, DemoConfig, EvalConfig, ExportConfig, GenerateConfig, PrepareConfig, TrainConfig
from raylm.metrics import read_jsonl

NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
FOODS = ["pizza", "soup", "bread", "rice", "apples", "cheese", "noodles", "tea"]
SMALL = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, batch_size=16, learning_rate=1e-2,
             warmup_steps=10, log_interval=10, eval_steps=0, launcher="local")


def write_corpus(folder: Path, seed: int = 0, n: int = 400) -> Path:
    """Short documents ("alice likes pizza.") as JSON Lines: a model learns where they end."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": f"{rng.choice(NAMES)} likes {rng.choice(FOODS)}."}) for _ in range(n)]
    (folder / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_session):
    """A real prepared dataset (bpe) and a model trained on it in this process."""
    from raylm.prepare import prepare
    from raylm.train import train

    root = tmp_path_factory.mktemp("use")
    data = root / "data"
    prepare(PrepareConfig(input_dir=str(write_corpus(root / "text")), output_dir=str(data), vocab_size=300,
                          max_length=32, num_workers=1, val_fraction=0.1, min_frequency=1))
    save = root / "run"
    result = train(TrainConfig(data_dir=str(data), save_dir=str(save), max_steps=150, eval_interval=50,
                               save_interval=50, **SMALL))
    return {"root": root, "data": data, "save": save, "final": result.final_dir}


def test_eval_matches_training_and_perplexity_is_exp_loss(trained):
    from raylm.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(EvalConfig(checkpoint=trained["final"], data_dir=str(trained["data"])))
    last_val = [r["val_loss"] for r in read_jsonl(trained["save"] / "metrics.jsonl") if "val_loss" in r][-1]
    assert result["loss"] == pytest.approx(last_val, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["tokens"] > 0 and 0 < result["bits_per_byte"] < 8


def test_eval_on_ray_workers_equals_in_process(trained):
    from raylm.evaluate import evaluate_checkpoint

    one = evaluate_checkpoint(EvalConfig(checkpoint=trained["final"], split="train", max_rows=40))
    two = evaluate_checkpoint(EvalConfig(checkpoint=trained["final"], split="train", max_rows=40, num_workers=2))
    assert two["tokens"] == one["tokens"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)


def test_eval_on_gpus_that_are_not_there_is_refused_not_left_waiting(trained):
    """--use_gpu on Ray workers of a cluster without GPUs: refused at once (tasks that ask for a GPU
    would wait for one forever); unset, the same run evaluates on CPU."""
    from raylm.evaluate import evaluate_checkpoint

    with pytest.raises(ConfigError, match="the Ray cluster has no GPU"):
        evaluate_checkpoint(EvalConfig(checkpoint=trained["final"], max_rows=8, num_workers=2, use_gpu=True))
    assert evaluate_checkpoint(EvalConfig(checkpoint=trained["final"], max_rows=8, num_workers=2))["tokens"] > 0


def test_eval_raw_text_with_the_checkpoints_tokenizer(trained, tmp_path):
    from raylm.evaluate import evaluate_checkpoint

    write_corpus(tmp_path / "new", seed=9, n=50)
    (tmp_path / "new" / "image.txt").write_bytes(b"\x89PNG\x00\x00binary")  # skipped, and said so
    result = evaluate_checkpoint(EvalConfig(checkpoint=str(trained["save"]), input_dir=str(tmp_path / "new")))
    assert result["skipped"] == [{"path": "image.txt", "reason": "binary"}]
    seen = evaluate_checkpoint(EvalConfig(checkpoint=trained["final"], data_dir=str(trained["data"])))
    assert result["tokens"] > 100
    assert result["loss"] < seen["loss"] + 0.5  # the same language: close to the validation loss
    assert result["bytes"] == sum(len(json.loads(line)["text"].encode()) for line in
                                  (tmp_path / "new" / "docs.jsonl").read_text().splitlines())


def test_generate_is_deterministic_and_stops_at_end_of_text(trained):
    from raylm.evaluate import load_checkpoint
    from raylm.generate import generate_text

    cfg = GenerateConfig(checkpoint=trained["final"], prompt="alice likes", max_new_tokens=20, seed=3)
    first, again = generate_text(cfg, cfg.prompt), generate_text(cfg, cfg.prompt)
    assert first == again
    # greedy: the model has learned that a document ends after the full stop
    greedy = GenerateConfig(checkpoint=trained["final"], prompt="bob likes tea.", max_new_tokens=20, temperature=0)
    loaded = load_checkpoint(trained["final"])
    ids = loaded.tokenizer.encode(greedy.prompt)
    out = loaded.model.generate(torch.tensor([ids]), 20, temperature=0.0,
                                eos_token_id=loaded.tokenizer.eos_token_id)[0, len(ids):].tolist()
    assert out[0] == loaded.tokenizer.eos_token_id
    assert generate_text(greedy, greedy.prompt, loaded) == [""]
    # the CLI streams the same text
    proc = subprocess.run([sys.executable, "-m", "raylm", "generate", "--checkpoint", trained["final"],
                           "--prompt", "alice likes", "--max_new_tokens", "20", "--seed", "3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ("alice likes" + first[0]).strip()


def test_finetune_starts_at_the_checkpoints_loss(trained, tmp_path):
    from raylm.prepare import prepare
    from raylm.train import train

    new = tmp_path / "new_data"
    prepare(PrepareConfig(input_dir=str(write_corpus(tmp_path / "text", seed=5, n=200)), output_dir=str(new),
                          max_length=32, num_workers=1, val_fraction=0.1,
                          tokenizer_file=str(trained["data"] / "tokenizer.json")))
    run = tmp_path / "ft"
    train(TrainConfig(data_dir=str(new), save_dir=str(run), init_from=trained["final"], max_steps=5,
                      eval_interval=5, save_interval=5, **{**SMALL, "log_interval": 1, "learning_rate": 1e-3}))
    first = read_jsonl(run / "metrics.jsonl")[0]["loss"]
    assert first < math.log(300) - 2  # not a fresh model: ln(vocab) is ~5.7
    trained_loss = [r["loss"] for r in read_jsonl(trained["save"] / "metrics.jsonl") if "loss" in r][-1]
    assert first == pytest.approx(trained_loss, abs=0.3)


def test_a_different_tokenizer_is_refused(trained, tmp_path):
    from raylm.prepare import prepare
    from raylm.train import plan_run

    other = tmp_path / "other"
    prepare(PrepareConfig(input_dir=str(write_corpus(tmp_path / "text", seed=1)), output_dir=str(other),
                          vocab_size=280, max_length=32, num_workers=1, min_frequency=1))
    with pytest.raises(ConfigError, match="different tokenizer"):
        plan_run(TrainConfig(data_dir=str(other), save_dir=str(tmp_path / "x"), init_from=trained["final"],
                             **{k: v for k, v in SMALL.items() if k not in ("hidden_size", "num_layers", "num_heads",
                                                                            "num_kv_heads")}))


def test_export_loads_in_transformers_with_the_same_logits(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylm.cli import export_checkpoint
    from raylm.evaluate import load_checkpoint

    out = export_checkpoint(ExportConfig(checkpoint=trained["final"], output_dir=str(tmp_path / "hf")))
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    loaded = load_checkpoint(trained["final"])
    text = "carol likes soup."
    assert tok(text)["input_ids"] == loaded.tokenizer.encode(text)
    ids = torch.tensor([loaded.tokenizer.encode(text)])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, loaded.model(ids)[0], rtol=1e-4, atol=1e-4)


def test_init_from_a_hugging_face_folder_is_checked_before_training_and_trains(trained, tmp_path):
    """--init_from a Hugging Face Llama folder: its config.json is read on the driver, so a model raylm cannot
    import, clashing shape flags or another vocabulary are one clear line before any worker starts; a good
    one trains from the exported weights (the loss starts where the checkpoint's ended)."""
    import shutil

    from raylm.cli import export_checkpoint
    from raylm.prepare import prepare
    from raylm.train import plan_run, train

    hf = export_checkpoint(ExportConfig(checkpoint=trained["final"], output_dir=str(tmp_path / "hf")))
    settings = {k: v for k, v in SMALL.items() if k not in ("hidden_size", "num_layers", "num_heads", "num_kv_heads")}
    plan = plan_run(TrainConfig(data_dir=str(trained["data"]), save_dir=str(tmp_path / "ok"), init_from=hf,
                                **settings))
    assert plan.init_kind == "hf" and plan.model_config["hidden_size"] == SMALL["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size: the model's 64 vs requested 128"):
        plan_run(TrainConfig(data_dir=str(trained["data"]), save_dir=str(tmp_path / "x"), init_from=hf,
                             **settings, hidden_size=128))
    with pytest.raises(ConfigError, match=r"model_size: the model's shape \(its config.json\) vs requested 'small'"):
        plan_run(TrainConfig(data_dir=str(trained["data"]), save_dir=str(tmp_path / "x"), init_from=hf,
                             **settings, model_size="small"))
    other = tmp_path / "other"
    prepare(PrepareConfig(input_dir=str(write_corpus(tmp_path / "text", seed=1)), output_dir=str(other),
                          vocab_size=280, max_length=32, num_workers=1, min_frequency=1))
    with pytest.raises(ConfigError, match=r"differs from the data's.*--tokenizer_file .*hf/tokenizer.json"):
        plan_run(TrainConfig(data_dir=str(other), save_dir=str(tmp_path / "x"), init_from=hf, **settings))
    gpt2 = tmp_path / "gpt2"
    shutil.copytree(hf, gpt2)
    (gpt2 / "config.json").write_text(json.dumps(json.loads((gpt2 / "config.json").read_text())
                                                 | {"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="model_type is 'gpt2', only 'llama'"):
        plan_run(TrainConfig(data_dir=str(trained["data"]), save_dir=str(tmp_path / "x"), init_from=str(gpt2),
                             **settings))
    longer = tmp_path / "longer"  # rows of 64 tokens; the model was trained at 32
    prepare(PrepareConfig(input_dir=str(write_corpus(tmp_path / "text64", seed=2)), output_dir=str(longer),
                          max_length=64, num_workers=1, tokenizer_file=str(trained["data"] / "tokenizer.json")))
    for source in (hf, trained["final"]):
        with pytest.raises(ConfigError, match="raise --max_seq_len"):
            plan_run(TrainConfig(data_dir=str(longer), save_dir=str(tmp_path / "x"), init_from=source, **settings))
        plan = plan_run(TrainConfig(data_dir=str(longer), save_dir=str(tmp_path / "x"), init_from=source,
                                    max_seq_len=64, **settings))
        assert plan.model_config["max_seq_len"] == 64
    run = tmp_path / "ft"
    train(TrainConfig(data_dir=str(trained["data"]), save_dir=str(run), init_from=hf, max_steps=2,
                      save_interval=2, eval_interval=2, **{**settings, "log_interval": 1, "learning_rate": 1e-4}))
    trained_loss = [r["loss"] for r in read_jsonl(trained["save"] / "metrics.jsonl") if "loss" in r][-1]
    assert read_jsonl(run / "metrics.jsonl")[0]["loss"] == pytest.approx(trained_loss, abs=0.3)


def test_demo_runs_end_to_end_at_a_reduced_size(ray_session, tmp_path, capsys):
    from raylm.demo import run_demo

    result = run_demo(DemoConfig(output_dir=str(tmp_path / "demo"), corpus_mb=0.4, vocab_size=512, max_length=64,
                                 max_steps=60))
    out = capsys.readouterr().out
    assert result["val_loss"] < result["unigram_loss"]
    assert "Unigram baseline" in out and "Sample:" in out and "raylm generate --checkpoint" in out
    assert (Path(result["hf_dir"]) / "model.safetensors").exists()
    for artifact in ("processed_data/metadata.json", "checkpoints/final/manifest.json", "checkpoints/loss_curve.png",
                     "checkpoints/metrics.jsonl"):
        assert (tmp_path / "demo" / artifact).exists(), artifact
    # a folder of one's own work is never the demo's to replace
    mine = tmp_path / "project"
    (mine / "checkpoints" / "final").mkdir(parents=True)  # `raylm train`'s default --save_dir
    for extra in ([], ["corpus", "processed_data"]):  # ... with folders named like the demo's, not made by it
        for name in extra:
            (mine / name).mkdir()
        for fresh in (False, True):
            with pytest.raises(ConfigError, match="not made by raylm demo"):
                run_demo(DemoConfig(output_dir=str(mine), max_steps=1, fresh=fresh))
        assert sorted(p.name for p in mine.iterdir()) == sorted(["checkpoints", *extra])
    assert (mine / "checkpoints/final").is_dir()


# ----------------------------------------------------------------------------- newcomer errors


def run_cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "raylm", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_ray_workers_import_raylm_from_a_folder_holding_a_raylm_checkout(tmp_path):
    """Run from the folder above a clone (which holds raylm/, the repository), Ray's workers, which search the
    driver's current folder first, must still import the installed raylm, not the repository as an empty
    namespace package."""
    import raylm

    (tmp_path / "raylm").mkdir()  # a checkout's top folder: no __init__.py
    script = tmp_path / "scripts" / "probe.py"  # outside the current folder, as a console script is
    script.parent.mkdir()
    script.write_text("import ray\nfrom raylm.runtime import ensure_ray\nensure_ray(num_cpus=1)\n"
                      "print('WORKER', ray.get(ray.remote(lambda: __import__('raylm').__file__).remote()))\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=180,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"WORKER {raylm.__file__}" in proc.stdout


def test_cpu_only_torch_with_use_gpu_says_what_to_do(packed_data, tmp_path):
    proc = run_cli("train", "--data_dir", str(packed_data), "--save_dir", str(tmp_path), "--use_gpu",
                   "--launcher", "local")
    assert proc.returncode == 2
    # a CPU-only build of torch is named as such; a CUDA build on a machine without a GPU sees none
    expected = "CPU-only build" if torch.version.cuda is None else "no GPU is visible"
    assert expected in proc.stderr and "Traceback" not in proc.stderr


def test_use_gpu_on_a_cluster_without_gpus(ray_session, packed_data, tmp_path):
    from raylm.train import train

    with pytest.raises(ConfigError, match="has no GPU"):
        train(TrainConfig(data_dir=str(packed_data), save_dir=str(tmp_path), use_gpu=True, max_steps=1))


def test_unreachable_ray_is_one_line(packed_data, tmp_path):
    proc = run_cli("train", "--data_dir", str(packed_data), "--save_dir", str(tmp_path), "--max_steps", "1",
                   env={"RAY_ADDRESS": "127.0.0.1:9"}, timeout=180)
    assert proc.returncode == 1
    assert "cannot reach Ray" in proc.stderr and "Traceback" not in proc.stderr


def test_unstable_training_is_one_line(packed_data, tmp_path):
    proc = run_cli("train", "--data_dir", str(packed_data), "--save_dir", str(tmp_path), "--launcher", "local",
                   "--hidden_size", "32", "--num_layers", "1", "--num_heads", "4", "--max_steps", "30",
                   "--learning_rate", "1e30", "--warmup_steps", "0", "--grad_clip", "0", "--max_nonfinite_steps", "2")
    assert proc.returncode == 1
    assert "Lower --learning_rate" in proc.stderr and "Traceback" not in proc.stderr
