"""Benchmark of `raylm prepare`: throughput against tiktoken's ceiling, and memory as the corpus grows.

    python jobs/bench_prepare.py                       # 100 MB and 400 MB corpora, about 4 minutes on 2 cores
    python jobs/bench_prepare.py --sizes_mb 25 100 --num_workers 4
    python jobs/bench_prepare.py --smoke               # a tiny run, for the tests

It writes a synthetic, text-like corpus (words of the Python standard library's own source,
drawn Zipf-style, in sentences and paragraphs, spread over many .txt files), runs the whole
`prepare` (find, sample, train the tokenizer, tokenize, pack, write) on each size in a fresh
process on a fresh local Ray, and prints:

- MB/s of the whole pipeline (input bytes / wall time of `prepare`, Ray already started);
- the ceiling: tiktoken's `encode_ordinary_batch` with num_threads = cores, on the same text,
  with the vocabulary that prepare trained, and the ratio of the two;
- peak memory: the largest sum of proportional set sizes (PSS) of this process and every Ray
  process it started (driver, workers, raylet, object store pages), and the driver's peak RSS;
- the floor that Ray Data sets: after prepare, on the same Ray, the seconds an empty pipeline of
  the same shape (the same number of blocks, an actor pool of num_workers, a map that returns its
  input) takes to deliver its first batch. No token can be encoded before the workers run, and
  the encoding itself cannot beat the ceiling, so no pipeline built on Ray Data can do better
  than size / (floor + size / ceiling): the "best possible ratio" column. Ray Data is already
  imported and the machine warm by then, so the floor is on the low side.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SENTENCE_ENDS = [". ", ". ", ". ", "? ", "! ", ".\n", ".\n\n"]


def stdlib_words(limit: int = 30000) -> list[str]:
    """The most common words of the standard library's source (identifiers and comment words)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    counts: collections.Counter = collections.Counter()
    for path in sorted(stdlib.glob("*.py")):
        counts.update(re.findall(r"[A-Za-z][a-z]+|[A-Z]+|\d+", path.read_text(encoding="utf-8", errors="replace")))
    return [w for w, _ in counts.most_common(limit)]


def write_corpus(dest: Path, total_mb: float, seed: int = 0, file_kb: tuple[int, int] = (20, 400)) -> tuple[int, int]:
    """Files of file_kb KB (min, max) of Zipf-sampled words in sentences; returns (files, bytes)."""
    words = np.array(stdlib_words())
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(words) + 1) ** 1.05
    weights /= weights.sum()
    ends = np.array(SENTENCE_ENDS)
    dest.mkdir(parents=True, exist_ok=True)
    written = files = 0
    while written < total_mb * 1e6:
        n_words = int(rng.integers(file_kb[0] * 1000, file_kb[1] * 1000)) // 6
        picked = words[rng.choice(len(words), size=n_words, p=weights)]
        lengths = rng.integers(4, 24, size=n_words // 4 + 1)
        starts = np.cumsum(lengths)
        starts = starts[starts < n_words]
        seps = np.full(n_words, " ", dtype=object)
        seps[starts - 1] = ends[rng.integers(0, len(ends), size=len(starts))]
        picked = picked.astype(object)
        picked[starts] = [w.capitalize() for w in picked[starts]]
        text = "".join((picked + seps).tolist()).strip() + ".\n"
        (dest / f"part_{files // 100:03d}" / f"doc_{files:05d}.txt").parent.mkdir(exist_ok=True)
        (dest / f"part_{files // 100:03d}" / f"doc_{files:05d}.txt").write_text(text, encoding="utf-8")
        written += len(text.encode("utf-8"))
        files += 1
    return files, written


class MemorySampler(threading.Thread):
    """Samples the PSS of this process and all its descendants (the local Ray) every 0.1 s."""

    def __init__(self):
        super().__init__(daemon=True)
        import psutil

        self.me = psutil.Process()
        self.peak_total = self.peak_driver = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            total = 0
            for proc in [self.me, *self.me.children(recursive=True)]:
                try:
                    total += proc.memory_full_info().pss
                except Exception:  # a process that just ended
                    pass
            self.peak_total = max(self.peak_total, total)
            self.peak_driver = max(self.peak_driver, self.me.memory_info().rss)
            self._done.wait(0.1)

    def stop(self) -> None:
        self._done.set()
        self.join()


def measure(corpus: Path, out: Path, num_workers: int, sample_mb: float, vocab_size: int, max_length: int) -> dict:
    """One prepare run in this process, with memory sampled; on a fresh local Ray unless one is
    already running here (as in the tests)."""
    import ray

    from raylm.config import PrepareConfig
    from raylm.prepare import prepare

    t = time.perf_counter()
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(num_cpus=num_workers, include_dashboard=False, logging_level="ERROR", configure_logging=False)
    ray_start = time.perf_counter() - t
    cfg = PrepareConfig(input_dir=str(corpus), output_dir=str(out), tokenizer_type="bpe", vocab_size=vocab_size,
                        max_length=max_length, num_workers=num_workers, tokenizer_sample_mb=sample_mb)
    sampler = MemorySampler()
    sampler.start()
    t = time.perf_counter()
    meta = prepare(cfg)
    seconds = time.perf_counter() - t
    sampler.stop()
    floor = empty_pipeline_seconds(corpus, num_workers)
    if own_ray:
        ray.shutdown()
    return {"seconds": seconds, "ray_start_s": ray_start, "bytes": meta["text_bytes"], "timings": meta["timings"],
            "peak_pss_mb": sampler.peak_total / 1e6, "peak_driver_rss_mb": sampler.peak_driver / 1e6,
            "empty_pipeline_s": floor,
            "rows": meta["splits"]["train"]["rows"] + meta["splits"]["val"]["rows"]}


class _PassThrough:
    """The map of the empty pipeline: an actor that returns its batch."""

    def __call__(self, batch):
        return batch


def empty_pipeline_seconds(corpus: Path, num_workers: int) -> float:
    """Seconds for an empty Ray Data pipeline shaped like prepare's (one block per work unit of
    this corpus, an actor pool of num_workers) to deliver its first batch."""
    import ray.data

    from raylm.config import PrepareConfig
    from raylm.prepare import _discover, _ray_data_settings, _work_units

    units = _work_units(_discover(PrepareConfig(input_dir=str(corpus), output_dir="unused")).files)
    with _ray_data_settings():
        t = time.perf_counter()
        batches = iter(ray.data.from_items([{"unit": i} for i in range(len(units))], override_num_blocks=len(units))
                       .map_batches(_PassThrough, batch_size=1, num_cpus=1,
                                    compute=ray.data.ActorPoolStrategy(size=max(1, min(num_workers, len(units)))))
                       .iter_batches(batch_size=None))
        next(batches)
        seconds = time.perf_counter() - t
        for _ in batches:
            pass
    return seconds


def ceiling(corpus: Path, tokenizer_path: Path, threads: int, chunk_mb: float = 16.0) -> float:
    """MB/s of tiktoken's encode_ordinary_batch(num_threads=threads) over the corpus, with the
    vocabulary prepare trained. Files are read (untimed) and encoded in chunks of chunk_mb, so
    the ids of a large corpus do not pile up in memory and slow the measurement down; each
    chunk's time is the best of two, so a busy moment of the machine does not lower the ceiling."""
    from raylm.tokenizer import load_tokenizer

    enc = load_tokenizer(tokenizer_path)._enc
    paths = sorted(corpus.rglob("*.txt"))
    size = seconds = 0.0
    chunk: list[str] = []
    for i, path in enumerate(paths):
        chunk.append(path.read_text(encoding="utf-8"))
        if sum(map(len, chunk)) >= chunk_mb * 1e6 or i == len(paths) - 1:
            best = float("inf")
            for _ in range(2):
                t = time.perf_counter()
                enc.encode_ordinary_batch(chunk, num_threads=threads)
                best = min(best, time.perf_counter() - t)
            seconds += best
            size += sum(len(text.encode("utf-8")) for text in chunk)
            chunk = []
    return size / 1e6 / seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes_mb", type=float, nargs="+", default=[100, 400],
                   help="corpus sizes; the memory line compares the first and the last")
    p.add_argument("--num_workers", type=int, default=os.cpu_count())
    p.add_argument("--tokenizer_sample_mb", type=float, default=4.0)
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--max_length", type=int, default=2048)
    p.add_argument("--work_dir", default=None, help="where corpora and outputs go (default: a temporary folder)")
    p.add_argument("--smoke", action="store_true", help="one tiny corpus, small vocabulary: checks the script runs")
    p.add_argument("--measure", nargs=2, metavar=("CORPUS", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes_mb, args.vocab_size, args.max_length, args.tokenizer_sample_mb = [0.3], 400, 64, 0.2
        args.num_workers = min(args.num_workers, 2)

    settings = [str(args.num_workers), str(args.tokenizer_sample_mb), str(args.vocab_size), str(args.max_length)]
    if args.measure:
        n, s, v, m = settings
        print(json.dumps(measure(Path(args.measure[0]), Path(args.measure[1]), int(n), float(s), int(v), int(m))))
        return

    load_before = os.getloadavg()[0]  # other work on the machine skews every figure below
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="raylm-bench-"))
    results = []
    for size in args.sizes_mb:
        corpus, out = work / f"corpus_{size:g}mb", work / f"out_{size:g}mb"
        if not corpus.exists():
            files, written = write_corpus(corpus, size, file_kb=(5, 30) if args.smoke else (20, 400))
            print(f"wrote {files} files, {written / 1e6:.1f} MB to {corpus}", file=sys.stderr)
        shutil.rmtree(out, ignore_errors=True)
        if args.smoke:  # in this process (and on its Ray, if it has one)
            result = measure(corpus, out, args.num_workers, args.tokenizer_sample_mb, args.vocab_size, args.max_length)
        else:  # a fresh process per size, so one run's memory does not show in the next
            proc = subprocess.run([sys.executable, __file__, "--measure", str(corpus), str(out),
                                   "--num_workers", settings[0], "--tokenizer_sample_mb", settings[1],
                                   "--vocab_size", settings[2], "--max_length", settings[3]],
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"prepare failed on {corpus}:\n{proc.stderr[-4000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["ceiling_mb_s"] = ceiling(corpus, out / "tokenizer.json", args.num_workers)
        result.update(size_mb=result["bytes"] / 1e6, mb_s=result["bytes"] / 1e6 / result["seconds"])
        # the best ratio any Ray Data pipeline could reach: the empty pipeline's start, then encoding at the ceiling
        encode_s = result["size_mb"] / result["ceiling_mb_s"]
        result["best_possible_ratio"] = encode_s / (result["empty_pipeline_s"] + encode_s)
        results.append(result)

    print(f"\nraylm prepare, bpe vocab {args.vocab_size}, max_length {args.max_length}, {args.num_workers} workers, "
          f"tokenizer sample {args.tokenizer_sample_mb:g} MB, {os.cpu_count()} cores, "
          f"load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after")
    print(f"{'corpus MB':>9} {'prepare s':>9} {'MB/s':>6} {'ceiling':>7} {'ratio':>5} {'peak PSS MB':>11} "
          f"{'driver RSS MB':>13} {'empty Ray Data s':>16} {'best possible ratio':>19}  phases (s)")
    for r in results:
        phases = " ".join(f"{k}={v:.1f}" for k, v in r["timings"].items() if k != "total")
        print(f"{r['size_mb']:9.1f} {r['seconds']:9.1f} {r['mb_s']:6.1f} {r['ceiling_mb_s']:7.1f} "
              f"{r['mb_s'] / r['ceiling_mb_s']:5.2f} {r['peak_pss_mb']:11.0f} "
              f"{r['peak_driver_rss_mb']:13.0f} {r['empty_pipeline_s']:16.2f} "
              f"{r['best_possible_ratio']:19.2f}  {phases}")
    if len(results) > 1:
        first, last = results[0], results[-1]
        print(f"memory: {last['size_mb'] / first['size_mb']:.1f}x the corpus -> "
              f"{last['peak_pss_mb'] / first['peak_pss_mb']:.2f}x the peak PSS")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
