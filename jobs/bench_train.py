"""Training throughput: `raylm train` on Ray Train next to the same loop in a plain process.

    python jobs/bench_train.py                                    # CPU, tiny model (this machine)
    python jobs/bench_train.py --use_gpu --model_size small --seq_len 1024 --batch_size 64 \
        --micro_batch_size 32 --mixed_precision bf16 --compile_model --max_steps 80
    ray job submit --working-dir . -- python jobs/bench_train.py --use_gpu ...
    python jobs/bench_train.py --smoke                            # seconds; what the tests run

Both runs use one worker, the same model, data (random tokens) and settings; the only difference
is `--launcher ray` (a TorchTrainer worker) against `--launcher local` (this process). Each run's
throughput is its warm tokens/sec (steps after the first log window, so compilation and start-up
are left out). MFU = flops_per_token x tokens/sec / peak, where flops_per_token is PaLM's
6N + 12·L·H·T (raylm.model.flops_per_token) and peak is measured here: the best of a few large
matrix products (bf16 on GPU, fp32 on CPU); on GPU the datasheet dense bf16 peak is shown too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raylm.config import ATTENTION_BACKENDS, COMPILE_MODES, LOSS_CHUNKING, RESIDUAL_DTYPES, TrainConfig  # noqa: E402
from raylm.data import write_synthetic_dataset  # noqa: E402
from raylm.model import flops_per_token, model_config_from  # noqa: E402
from raylm.train import gpu_peak_flops, train  # noqa: E402


def measured_peak(device: str, dtype: torch.dtype, n: int = 4096, repeats: int = 5) -> float:
    """FLOP/s of the best of a few n x n x n matrix products on this device."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(repeats + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        (a @ b).sum().item()
        dt = time.perf_counter() - t
        best = max(best, 2 * n**3 / dt)
    return best


def set_inductor_config(pairs: list[str]) -> dict:
    """Apply KEY=VALUE pairs to torch._inductor.config (a value is a Python literal, or else the bare
    string); the ones applied."""
    import ast

    if not pairs:
        return {}
    from torch._inductor import config as inductor_config

    applied = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--inductor_config takes KEY=VALUE pairs, got {pair!r}")
        if not hasattr(inductor_config, key):
            print(f"bench_train: torch {torch.__version__} has no inductor option {key!r}; skipped")
            continue
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value  # max_autotune_gemm_backends=ATEN
        setattr(inductor_config, key, parsed)
        applied[key] = getattr(inductor_config, key)
    return applied


def run_once(args, data_dir: str, launcher: str, save_dir: str) -> dict:
    cfg = TrainConfig(
        data_dir=data_dir, save_dir=save_dir, model_size=args.model_size, hidden_size=args.hidden_size,
        num_layers=args.num_layers, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
        batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, max_steps=args.max_steps,
        warmup_steps=2, learning_rate=3e-4, log_interval=args.log_interval, eval_interval=0, eval_steps=1,
        save_interval=0, use_gpu=args.use_gpu, mixed_precision=args.mixed_precision,
        compile_model=args.compile_model, compile_mode=args.compile_mode, launcher=launcher,
        cpus_per_worker=args.cpus_per_worker, loss_chunking=args.loss_chunking, attention_backend=args.attention_backend,
        residual_dtype=args.residual_dtype,
        profile_steps=args.profile_steps if launcher == args.launchers.split(",")[-1] else 0)
    t = time.perf_counter()
    train(cfg)
    summary = json.loads((Path(save_dir) / "summary.json").read_text())
    summary["wall_s"] = time.perf_counter() - t
    return summary


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_size", default="tiny")
    p.add_argument("--hidden_size", type=int)
    p.add_argument("--num_layers", type=int)
    p.add_argument("--num_heads", type=int)
    p.add_argument("--num_kv_heads", type=int)
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--micro_batch_size", type=int, default=8)
    p.add_argument("--max_steps", type=int, default=30)
    p.add_argument("--log_interval", type=int, default=5)
    p.add_argument("--use_gpu", action="store_true")
    p.add_argument("--mixed_precision", default="off")
    p.add_argument("--compile_model", action="store_true")
    p.add_argument("--compile_mode", default="default", choices=COMPILE_MODES,
                   help="as `raylm train --compile_mode` (with --compile_model)")
    p.add_argument("--loss_chunking", default="auto", choices=LOSS_CHUNKING,
                   help="as `raylm train --loss_chunking`: auto = on (chunked), off = full logits")
    p.add_argument("--attention_backend", default="auto", choices=ATTENTION_BACKENDS,
                   help="as `raylm train --attention_backend`: the SDPA kernel to prefer on GPUs")
    p.add_argument("--residual_dtype", default="fp32", choices=RESIDUAL_DTYPES,
                   help="as `raylm train --residual_dtype`: bf16 halves the residual stream's bytes")
    p.add_argument("--profile_steps", type=int, default=0,
                   help="profile this many steps at the end of the last run (left out of its tokens/s)")
    p.add_argument("--cpus_per_worker", type=int, default=1)
    p.add_argument("--launchers", default="local,ray", help="which runs, in order")
    p.add_argument("--inductor_config", nargs="*", default=[], metavar="KEY=VALUE",
                   help="set torch._inductor.config options in this process before the runs, to A/B inductor's "
                        "settings (the local run only: Ray's workers are other processes); a key this torch "
                        "lacks is reported and skipped")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--smoke", action="store_true", help="a seconds-long run with a toy model")
    args = p.parse_args(argv)
    if args.smoke:
        args.model_size, args.hidden_size, args.num_layers, args.num_heads, args.num_kv_heads = None, 32, 2, 4, 2
        args.vocab_size, args.seq_len, args.batch_size, args.micro_batch_size = 256, 32, 4, 4
        args.max_steps, args.log_interval = 6, 2
    inductor = set_inductor_config(args.inductor_config)
    device = "cuda" if args.use_gpu else "cpu"
    model_cfg = model_config_from(args.model_size, vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                                  num_layers=args.num_layers, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads)
    rows = args.batch_size * (args.max_steps + 2)
    work = Path(tempfile.mkdtemp(prefix="raylm-bench-train-"))
    data_dir = write_synthetic_dataset(work / "data", vocab_size=args.vocab_size, max_length=args.seq_len,
                                       train_rows=rows, val_rows=max(2, args.micro_batch_size), pattern="random",
                                       partial_last=False)
    peak_dtype = torch.bfloat16 if args.use_gpu else torch.float32
    peak = measured_peak(device, peak_dtype, n=8192 if args.use_gpu else (512 if args.smoke else 2048))
    sheet = gpu_peak_flops(torch.cuda.get_device_name()) if args.use_gpu else None
    fpt = flops_per_token(model_cfg, args.seq_len)
    results = {"device": torch.cuda.get_device_name() if args.use_gpu else f"CPU x{os.cpu_count()}",
               "torch": torch.__version__, "model_size": args.model_size, "params": None,
               "seq_len": args.seq_len, "batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size,
               "mixed_precision": args.mixed_precision, "compile": args.compile_model,
               "compile_mode": args.compile_mode, "residual_dtype": args.residual_dtype,
               "inductor_config_of_the_local_run": inductor,
               "flops_per_token": fpt, "measured_peak_flops": peak, "datasheet_peak_flops": sheet, "runs": {}}
    for launcher in args.launchers.split(","):
        s = run_once(args, str(data_dir), launcher, str(work / f"run_{launcher}"))
        tps = s["tokens_per_sec_warm"]
        results["runs"][launcher] = {"tokens_per_sec": tps, "mfu_measured_peak": fpt * tps / peak if tps else None,
                                     "mfu_datasheet": fpt * tps / sheet if (tps and sheet) else None,
                                     "data_wait_p95_fraction": s.get("data_wait_p95_fraction"),
                                     "wall_s": s["wall_s"]}
        profile = work / f"run_{launcher}" / "profile" / "kernels.txt"
        if profile.exists():
            results["runs"][launcher]["profile"] = profile.read_text()  # the summary, a blank line, the table
        write_results(args.out, results)  # after each run: a run cut short later keeps this one's figures
    print("\n" + "=" * 72)
    print(f"bench_train: {results['device']}, torch {results['torch']}, model {args.model_size or 'custom'}, "
          f"seq {args.seq_len}, batch {args.batch_size} (micro {args.micro_batch_size}), "
          f"precision {args.mixed_precision}, compile {args.compile_model}"
          f"{' (' + args.compile_mode + ')' if args.compile_model else ''}, loss_chunking {args.loss_chunking}, "
          f"attention {args.attention_backend}, residual {args.residual_dtype}"
          + (f", inductor {' '.join(f'{k}={v!r}' for k, v in inductor.items())}" if inductor else ""))
    print(f"measured matmul peak: {peak / 1e12:.2f} TFLOP/s" + (f" | datasheet: {sheet / 1e12:.0f} TFLOP/s" if sheet else ""))
    for name, r in results["runs"].items():
        if r["tokens_per_sec"] is None:
            print(f"  {name:6s}: too few steps for a warm measurement")
            continue
        line = f"  {name:6s}: {r['tokens_per_sec']:>12,.0f} tokens/s | MFU {100 * r['mfu_measured_peak']:.1f}% of measured"
        if r["mfu_datasheet"]:
            line += f", {100 * r['mfu_datasheet']:.1f}% of datasheet"
        wait = r["data_wait_p95_fraction"]
        line += f" | data wait p95 {100 * wait:.2f}% of a step" if wait is not None else ""
        print(line)
    runs = results["runs"]
    if "ray" in runs and "local" in runs and runs["ray"]["tokens_per_sec"] and runs["local"]["tokens_per_sec"]:
        ratio = runs["ray"]["tokens_per_sec"] / runs["local"]["tokens_per_sec"]
        results["ray_over_local"] = ratio
        print(f"  Ray Train / plain process: {ratio:.3f} (overhead {100 * (1 - ratio):+.1f}%)")
    for name, r in results["runs"].items():
        if r.get("profile"):
            summary = r["profile"].split("\n\n")[0]
            print(f"  {name} run, profiled:\n" + "\n".join("    " + line for line in summary.splitlines()))
    print("=" * 72)
    write_results(args.out, results)
    return results


def write_results(out: str | None, results: dict) -> None:
    """The results as JSON at `out` (if given), through a temporary name."""
    if out:
        tmp = Path(out).with_name(Path(out).name + ".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(out)


if __name__ == "__main__":
    main()
