"""`raylm prepare` from 1 to 2 workers, bpe against tiktoken, each against the encoder's own ceiling.

    python jobs/bench_prepare_scaling.py                        # a 50 MB corpus, 16 prepare runs: ~5 min on 2 cores
    python jobs/bench_prepare_scaling.py --size_mb 100 --workers 1 2 4 --repeats 1
    python jobs/bench_prepare_scaling.py --smoke                # a tiny run, for the tests

jobs/bench_prepare.py measures one tokenizer kind (bpe) at one worker count; this script adds the
two comparisons it lacks, with its corpus (`write_corpus`) and its ceiling (`ceiling`: tiktoken's
`encode_ordinary_batch` with num_threads = workers, on the same text, with the vocabulary prepare
trained). Every run is the whole `raylm.prepare.prepare` (find, sample, train the tokenizer,
tokenize, pack, write) into a fresh output folder, on one local Ray started beforehand with
num_cpus = the largest worker count, so Ray's start-up is not timed; runs alternate between kinds
and worker counts (and repeat, keeping the fastest) so that a busy moment of a shared machine
does not favour one of them. It prints, per kind and worker count:

- "whole": MB/s of the whole pipeline into an empty folder, and its ratio to the ceiling at the
  same number of threads;
- "ready": the same run again after deleting metadata.json, so prepare reuses the tokenizer it
  trained and rebuilds only the rows (what a larger corpus tends to, where reading the sample and
  training the tokenizer is a fixed cost), and its ratio to the ceiling;
- the speed-up from 1 to 2 workers of all three, and tiktoken over bpe.

Both kinds encode with tiktoken inside prepare ("bpe" is a Hugging Face BPE converted to tiktoken
ranks, "tiktoken" is the same trained BPE saved as a .tiktoken file), so they should be close.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_prepare import ceiling, write_corpus  # noqa: E402


def run_prepare(corpus: Path, out: Path, kind: str, workers: int, args, *, fresh: bool) -> dict:
    """One prepare run; its wall time (Ray's start excluded), phases and tokenizer file. fresh: into an
    empty folder (the tokenizer is trained); else the folder's dataset is rebuilt with the tokenizer it
    holds (prepare reuses a tokenizer made from the same input and settings)."""
    from raylm.config import PrepareConfig
    from raylm.prepare import METADATA, prepare

    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    else:
        (out / METADATA).unlink()
    cfg = PrepareConfig(input_dir=str(corpus), output_dir=str(out), tokenizer_type=kind,
                        vocab_size=args.vocab_size, max_length=args.max_length, num_workers=workers,
                        tokenizer_sample_mb=args.tokenizer_sample_mb)
    meta = prepare(cfg)
    timings = meta["timings"]
    return {"bytes": meta["text_bytes"], "seconds": timings["total"] - timings.get("ray_start", 0.0),
            "timings": timings, "workers_used": meta["num_workers_used"], "tokenizer_file": meta["tokenizer_file"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size_mb", type=float, default=50.0, help="corpus size")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare")
    p.add_argument("--kinds", nargs="+", default=["bpe", "tiktoken"], choices=["bpe", "tiktoken"])
    p.add_argument("--repeats", type=int, default=2, help="runs of each setting; the fastest counts")
    p.add_argument("--tokenizer_sample_mb", type=float, default=4.0)
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--max_length", type=int, default=2048)
    p.add_argument("--work_dir", default=None, help="where the corpus and outputs go (default: a temporary folder)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--smoke", action="store_true", help="a tiny corpus, small vocabulary: checks the script runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.size_mb, args.vocab_size, args.max_length, args.tokenizer_sample_mb, args.repeats = 0.3, 400, 64, 0.2, 1

    import ray

    load_before = os.getloadavg()[0]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="raylm-bench-scaling-"))
    corpus = work / f"corpus_{args.size_mb:g}mb"
    if not corpus.exists():
        files, written = write_corpus(corpus, args.size_mb, file_kb=(5, 30) if args.smoke else (20, 400))
        print(f"wrote {files} files, {written / 1e6:.1f} MB to {corpus}", file=sys.stderr)
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(num_cpus=max(args.workers), include_dashboard=False, logging_level="ERROR", configure_logging=False)
    runs: dict[tuple[str, int], dict] = {}
    try:
        for _ in range(args.repeats):
            for workers in args.workers:
                for kind in args.kinds:
                    out = work / f"out_{kind}_{workers}"
                    whole = run_prepare(corpus, out, kind, workers, args, fresh=True)
                    ready = run_prepare(corpus, out, kind, workers, args, fresh=False)
                    best = runs.setdefault((kind, workers), {"whole": whole, "ready": ready})
                    for name, r in (("whole", whole), ("ready", ready)):
                        if r["seconds"] < best[name]["seconds"]:
                            best[name] = r
    finally:
        if own_ray:
            ray.shutdown()
    for (kind, workers), r in runs.items():
        r["ceiling_mb_s"] = ceiling(corpus, work / f"out_{kind}_{workers}" / r["whole"]["tokenizer_file"], workers)
        r["mb_s"] = r["whole"]["bytes"] / 1e6 / r["whole"]["seconds"]
        r["ready_mb_s"] = r["ready"]["bytes"] / 1e6 / r["ready"]["seconds"]

    size_mb = next(iter(runs.values()))["whole"]["bytes"] / 1e6
    print(f"\nraylm prepare scaling: {size_mb:.1f} MB corpus, vocab {args.vocab_size}, max_length {args.max_length}, "
          f"tokenizer sample {args.tokenizer_sample_mb:g} MB, best of {args.repeats}, {os.cpu_count()} cores, "
          f"load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after")
    print("whole: the full prepare, tokenizer trained; ready: the same with the tokenizer already made. "
          "ceiling: tiktoken encode_ordinary_batch, threads = workers")
    print(f"{'kind':9s} {'workers':>7s} {'whole s':>7s} {'MB/s':>6s} {'ready s':>7s} {'MB/s':>6s} "
          f"{'ceiling MB/s':>12s} {'whole/ceil':>10s} {'ready/ceil':>10s}  phases of whole (s)")
    for (kind, workers), r in runs.items():
        phases = " ".join(f"{k}={v:.1f}" for k, v in r["whole"]["timings"].items() if k not in ("total", "ray_start"))
        print(f"{kind:9s} {workers:>7d} {r['whole']['seconds']:7.1f} {r['mb_s']:6.1f} {r['ready']['seconds']:7.1f} "
              f"{r['ready_mb_s']:6.1f} {r['ceiling_mb_s']:12.1f} {r['mb_s'] / r['ceiling_mb_s']:10.2f} "
              f"{r['ready_mb_s'] / r['ceiling_mb_s']:10.2f}  {phases}")
    first = min(args.workers)
    for kind in args.kinds:
        for workers in args.workers:
            if workers != first:
                a, b = runs[(kind, first)], runs[(kind, workers)]
                print(f"scaling {kind} {first} -> {workers} workers: whole x{b['mb_s'] / a['mb_s']:.2f}, "
                      f"ready x{b['ready_mb_s'] / a['ready_mb_s']:.2f}, "
                      f"ceiling x{b['ceiling_mb_s'] / a['ceiling_mb_s']:.2f}")
    if "bpe" in args.kinds and "tiktoken" in args.kinds:
        for workers in args.workers:
            t, b = runs[("tiktoken", workers)], runs[("bpe", workers)]
            print(f"tiktoken / bpe at {workers} worker(s): whole {t['mb_s'] / b['mb_s']:.2f}, "
                  f"ready {t['ready_mb_s'] / b['ready_mb_s']:.2f}, ceiling {t['ceiling_mb_s'] / b['ceiling_mb_s']:.2f}")
    results = {f"{kind}_{workers}": r for (kind, workers), r in runs.items()}
    if args.out:
        from raylm.storage import atomic_write_text

        atomic_write_text(args.out, json.dumps(results, indent=2))  # never a half-written file
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
