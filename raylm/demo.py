"""`raylm demo`: the whole pipeline on a built-in corpus, on this machine, in a few minutes.

    raylm demo                                  # ./raylm_demo: data, checkpoints, plots, HF export
    raylm demo --output_dir /tmp/demo --max_steps 200

The corpus is Python's own standard library source (every Python installation has it), so the
demo downloads nothing and ships no copied text. Steps: prepare (BPE tokenizer + Parquet) ->
train a small model on local Ray -> evaluate -> sample -> export to Hugging Face format.
"""
from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

from raylm.config import DemoConfig, EvalConfig, ExportConfig, GenerateConfig, PrepareConfig, TrainConfig

# A model that learns visibly in a few CPU minutes (~3.6M parameters with a 4096 vocabulary).
DEMO_MODEL = dict(hidden_size=192, num_layers=4, num_heads=6, num_kv_heads=2)
MARKER = ".raylm-demo"  # in every folder the demo made: the only kind it deletes anything in
DEMO_ENTRIES = {"corpus", "processed_data", "checkpoints", "hf_model"}  # a demo folder of a raylm before MARKER


def _prepared_from(corpus: Path) -> bool:
    """Whether corpus's sibling processed_data/ was prepared from it, as the demo prepares: a demo folder."""
    from raylm.storage import read_json

    try:
        meta = read_json(corpus.parent / "processed_data" / "metadata.json")
        return Path(meta["config"]["input_dir"]).resolve() == corpus.resolve()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _claim(out: Path) -> None:
    """Make out the demo's folder, or refuse one that holds anything else: the demo replaces its own
    checkpoints/ (and all of out with --fresh), which must never be someone's own work."""
    from raylm.config import ConfigError

    names = {p.name for p in out.iterdir()} if out.exists() else set()
    older_demo = {"corpus", "processed_data"} <= names <= DEMO_ENTRIES and _prepared_from(out / "corpus")
    if names and MARKER not in names and not older_demo:
        raise ConfigError(f"{out} is not empty and was not made by raylm demo: choose another --output_dir "
                          "(the demo replaces its checkpoints there)")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()


def run_demo(cfg: DemoConfig) -> dict:
    from raylm.corpus import write_builtin_corpus
    from raylm.evaluate import evaluate_checkpoint, unigram_entropy
    from raylm.generate import generate_text
    from raylm.prepare import prepare
    from raylm.train import train

    out = Path(cfg.output_dir).resolve()
    _claim(out)
    if cfg.fresh:
        shutil.rmtree(out)
        _claim(out)
    t0 = time.perf_counter()
    print(f"raylm demo: everything lands in {out}\n")

    print("[1/5] Built-in corpus: Python standard library source files")
    corpus = write_builtin_corpus(out / "corpus", max_mb=cfg.corpus_mb)
    data_dir = out / "processed_data"
    print("\n[2/5] raylm prepare")
    prepare(PrepareConfig(input_dir=str(corpus), output_dir=str(data_dir), tokenizer_type="bpe",
                          vocab_size=cfg.vocab_size, max_length=cfg.max_length, num_workers=2,
                          extensions=[".py"], val_fraction=0.05))

    save_dir = out / "checkpoints"
    if save_dir.exists():  # a previous demo's run: start training afresh, keep the prepared data
        shutil.rmtree(save_dir)
    print("\n[3/5] raylm train")
    result = train(TrainConfig(
        data_dir=str(data_dir), save_dir=str(save_dir), **DEMO_MODEL, batch_size=16, max_steps=cfg.max_steps,
        learning_rate=2e-3, min_lr=2e-4, warmup_steps=min(50, cfg.max_steps // 10), weight_decay=0.1,
        num_workers=cfg.num_workers, log_interval=max(1, cfg.max_steps // 30), eval_interval=max(1, cfg.max_steps // 6),
        eval_steps=0, save_interval=max(1, cfg.max_steps // 3), keep_checkpoints=2))

    print("\n[4/5] raylm eval and raylm generate")
    ev = evaluate_checkpoint(EvalConfig(checkpoint=result.final_dir, data_dir=str(data_dir)))
    baseline = unigram_entropy(str(data_dir))
    print(f"Unigram baseline (a model that knows only token frequencies): {baseline:.4f} nats/token; "
          f"this model: {ev['loss']:.4f} ({math.exp(baseline - ev['loss']):.1f}x lower perplexity)")
    sample = generate_text(GenerateConfig(checkpoint=result.final_dir, prompt=cfg.prompt, max_new_tokens=160,
                                          temperature=0.7, top_k=40, seed=0), cfg.prompt)[0]
    print("\nSample:\n" + "-" * 60 + f"\n{cfg.prompt}{sample}\n" + "-" * 60)

    print("\n[5/5] raylm export (Hugging Face Llama format)")
    from raylm.cli import export_checkpoint

    hf_dir = export_checkpoint(ExportConfig(checkpoint=result.final_dir, output_dir=str(out / "hf_model"),
                                            overwrite=True))
    minutes = (time.perf_counter() - t0) / 60
    print(f"""
Done in {minutes:.1f} minutes. Everything is in {out}:
  corpus/                 the text it trained on
  processed_data/         tokenizer.json, dataset/ (Parquet), metadata.json
  checkpoints/final/      the trained model (+ checkpoint_step_N/ to resume from)
  checkpoints/loss_curve.png, metrics.jsonl, tensorboard/
  hf_model/               loads with transformers.AutoModelForCausalLM.from_pretrained

Next:
  raylm generate --checkpoint {save_dir}/final --prompt "import os"
  raylm eval --checkpoint {save_dir}/final --json
  tensorboard --logdir {save_dir}/tensorboard
  raylm prepare --input_dir ./my_text --output_dir ./my_data   # then: raylm train --data_dir ./my_data
""")
    return {"output_dir": str(out), "val_loss": ev["loss"], "unigram_loss": baseline, "sample": sample,
            "final_dir": result.final_dir, "hf_dir": str(hf_dir), "minutes": minutes}
