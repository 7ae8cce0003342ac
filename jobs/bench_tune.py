"""Benchmark of `raylm tune`: ASHA against FIFO (every trial to the end) on the same search space.

    python jobs/bench_tune.py                  # 12 trials per scheduler, 2 at a time: ~5 min on 2 cores
    python jobs/bench_tune.py --num_samples 16 --max_steps 300
    python jobs/bench_tune.py --smoke          # 2 trials per scheduler, a few steps: for the tests
    ray job submit --working-dir . -- python jobs/bench_tune.py

Both sweeps draw the same learning rates and warmups (one search_seed) and train the same tiny model on
a synthetic prepared dataset (`raylm.data.write_synthetic_dataset`: rows that count up by a random
stride, so the loss can fall far, and how far depends on the learning rate). For each scheduler it
prints the compute spent in trial-steps (optimizer steps summed over trials, including the steps a
stopped trial ran before Ray stopped it, read from each trial's metrics.jsonl), the best validation
loss found, and the wall time; then ASHA's share of FIFO's trial-steps and the gap between their best
losses. Target: ASHA within 2% of FIFO's best validation loss for at most 40% of its trial-steps.
Wall time falls less than trial-steps: every trial, however short, pays Ray Train's start-up (~10-30 s here).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

MODEL = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


def sweep_settings(args, scheduler: str, data_dir: Path, save_dir: Path) -> dict:
    return dict(
        data_dir=str(data_dir), save_dir=str(save_dir), **MODEL, batch_size=16, max_steps=args.max_steps,
        log_interval=1, eval_interval=args.eval_interval, eval_steps=4, save_interval=0,
        num_samples=args.num_samples, lr_min=1e-4, lr_max=1e-1, warmup_choices=[0, args.eval_interval],
        scheduler=scheduler, grace_period=args.eval_interval, reduction_factor=args.reduction_factor,
        max_concurrent_trials=2, search_seed=args.seed)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_samples", type=int, default=12, help="trials per scheduler")
    parser.add_argument("--max_steps", type=int, default=200, help="steps of a trial that runs to the end")
    parser.add_argument("--eval_interval", type=int, default=10, help="steps between evaluations (ASHA's rungs)")
    parser.add_argument("--reduction_factor", type=float, default=3.0, help="ASHA keeps 1 in this many at a rung")
    parser.add_argument("--seed", type=int, default=0, help="search_seed of both sweeps")
    parser.add_argument("--out_dir", default="", help="where the data and both sweeps go (default: a temp folder)")
    parser.add_argument("--smoke", action="store_true", help="2 trials per scheduler, 4 steps: for the tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_samples, args.max_steps, args.eval_interval = 2, 4, 2

    from raylm.data import write_synthetic_dataset
    from raylm.runtime import ensure_ray
    from raylm.storage import atomic_write_text
    from raylm.tune import build_tune_configs, tune

    out = Path(args.out_dir or tempfile.mkdtemp(prefix="raylm-bench-tune-"))
    data = write_synthetic_dataset(out / "data", vocab_size=256, max_length=64, train_rows=4096, val_rows=64,
                                   seed=args.seed)
    ensure_ray()
    figures = {}
    for scheduler in ("asha", "fifo"):
        t0 = time.perf_counter()
        result = tune(*build_tune_configs(overrides=sweep_settings(args, scheduler, data, out / scheduler)))
        best = result.trials[0]
        figures[scheduler] = {
            "trial_steps": sum(row.steps for row in result.trials), "best_val_loss": best.best_val_loss,
            "best_learning_rate": best.learning_rate, "best_warmup_steps": best.warmup_steps,
            "stopped_early": sum(row.stopped_early for row in result.trials), "wall_s": time.perf_counter() - t0,
            "num_samples": args.num_samples, "max_steps": args.max_steps}
    asha, fifo = figures["asha"], figures["fifo"]
    figures["ratios"] = {"trial_steps": asha["trial_steps"] / fifo["trial_steps"],
                         "best_val_loss": asha["best_val_loss"] / fifo["best_val_loss"],
                         "wall": asha["wall_s"] / fifo["wall_s"]}
    atomic_write_text(out / "bench_tune.json", json.dumps(figures, indent=2))  # never a half-written file

    print(f"\n{args.num_samples} trials per scheduler, max_steps {args.max_steps}, 2 at a time; results in {out}")
    print(f"{'scheduler':<10} {'trial-steps':>11} {'best val loss':>14} {'best lr':>9} {'warmup':>6} "
          f"{'stopped':>7} {'wall s':>7}")
    for name in ("asha", "fifo"):
        f = figures[name]
        print(f"{name:<10} {f['trial_steps']:>11} {f['best_val_loss']:>14.4f} {f['best_learning_rate']:>9.2e} "
              f"{f['best_warmup_steps']:>6} {f['stopped_early']:>7} {f['wall_s']:>7.0f}")
    r = figures["ratios"]
    met = r["trial_steps"] <= 0.40 and r["best_val_loss"] <= 1.02
    verdict = "not judged (smoke run)" if args.smoke else ("met" if met else "missed")
    print(f"ASHA / FIFO: trial-steps {r['trial_steps']:.1%}, best val loss {r['best_val_loss']:.4f}, "
          f"wall {r['wall']:.1%}. Target (<= 40% of the steps, within 2% of the loss): {verdict}")
    return figures


if __name__ == "__main__":
    main()
