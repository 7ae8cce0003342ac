"""The largest model and micro batch that train on one GPU, with and without activation checkpointing,
and the measured peak memory next to raylm's estimate (`raylm plan`).

    python jobs/bench_memory.py                                   # one GPU: small .. xl, seq 2048, bf16
    python jobs/bench_memory.py --sizes medium,large --seq_len 4096 --out memory.json
    ray job submit --working-dir . --entrypoint-num-gpus 1 -- python jobs/bench_memory.py
    python jobs/bench_memory.py --smoke                           # CPU, seconds: the script and the estimate

For each model size and each setting of --activation_checkpointing, one real training step (two
micro-steps, clipping, a fused AdamW step; raylm.plan.measure_peak) runs at micro batch 1, 2, 4, ...
until CUDA runs out of memory, then bisects: the largest micro batch that trains. At that micro batch
the measured peak (torch.cuda.max_memory_allocated) is printed next to the estimate, and the largest
micro batch the estimate predicts (raylm.plan.largest_micro_batch, which keeps 10% of the GPU free)
next to the one found. A size that does not train even at micro batch 1 does not fit this GPU.

--strategy fsdp on one GPU is the same as ddp: with one worker there is nothing to shard, so raylm
trains the plain model (the banner says so). FSDP saves memory per GPU only across several GPUs:
`raylm plan --num_workers N --strategy fsdp` shows how much.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raylm.model import model_config_from  # noqa: E402
from raylm.plan import GIB, estimate_memory, largest_micro_batch, measure_peak, relative_error  # noqa: E402
from raylm.storage import atomic_write_text  # noqa: E402


def try_step(model_cfg, seq_len: int, micro_batch: int, precision: str, act_ckpt: bool, device: str) -> int | None:
    """Measured peak bytes of one training step, or None when it runs out of memory."""
    try:
        return measure_peak(model_cfg, seq_len, micro_batch, precision=precision, act_ckpt=act_ckpt, device=device)
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def largest_that_trains(model_cfg, seq_len: int, precision: str, act_ckpt: bool, limit: int) -> tuple[int, int | None]:
    """(largest micro batch that trains, its measured peak); (0, None) if micro batch 1 does not."""
    peaks = {}

    def ok(mb: int) -> bool:
        peaks[mb] = try_step(model_cfg, seq_len, mb, precision, act_ckpt, "cuda")
        return peaks[mb] is not None

    if not ok(1):
        return 0, None
    lo, hi = 1, 2
    while hi <= limit and ok(hi):
        lo, hi = hi, 2 * hi
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo, peaks[lo]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="small,medium,large,xl", help="named model sizes, smallest first")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--mixed_precision", default="bf16", choices=("off", "bf16", "fp16"))
    p.add_argument("--max_micro_batch", type=int, default=256, help="stop searching here")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--smoke", action="store_true", help="CPU, a toy model: estimate vs measured in seconds")
    args = p.parse_args(argv)
    results = {"torch": torch.__version__, "seq_len": args.seq_len, "precision": args.mixed_precision, "runs": []}

    if args.smoke or not torch.cuda.is_available():
        if not args.smoke:
            print("No CUDA GPU: running the CPU smoke check instead (there is no out-of-memory to search for on CPU).")
        cfg = model_config_from(None, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, vocab_size=1024)
        results["device"] = "CPU"
        print(f"bench_memory smoke: CPU, hidden 128, 4 layers, vocab 1024, seq 128, {args.mixed_precision}")
        print(f"{'act_ckpt':>8} {'micro':>5} {'measured MiB':>13} {'estimate MiB':>13} {'error':>7}")
        for act_ckpt in (False, True):
            for mb in (1, 4):
                measured = measure_peak(cfg, 128, mb, precision=args.mixed_precision, act_ckpt=act_ckpt)
                est = estimate_memory(cfg, 128, mb, precision=args.mixed_precision, act_ckpt=act_ckpt,
                                      accumulation_steps=2, device="cpu")["total"]
                err = relative_error(est, measured)
                results["runs"].append({"act_ckpt": act_ckpt, "micro_batch": mb, "measured": measured,
                                        "estimate": est, "error": err})
                print(f"{act_ckpt!s:>8} {mb:>5} {measured / 2**20:>13.1f} {est / 2**20:>13.1f} {100 * err:>+6.1f}%")
        worst = max(abs(r["error"]) for r in results["runs"])
        print(f"largest |estimate - measured| / measured: {100 * worst:.1f}%")
    else:
        gpu = torch.cuda.get_device_properties(0)
        results["device"], results["gpu_bytes"] = gpu.name, gpu.total_memory
        print(f"bench_memory: {gpu.name} ({gpu.total_memory / GIB:.1f} GiB), seq {args.seq_len}, "
              f"{args.mixed_precision}, one GPU (ddp and fsdp are the same here)")
        print(f"{'size':>7} {'act_ckpt':>8} {'largest micro':>13} {'predicted':>9} {'measured GiB':>12} "
              f"{'estimate GiB':>12} {'error':>7}")
        for size in args.sizes.split(","):
            cfg = model_config_from(size, vocab_size=args.vocab_size, max_seq_len=args.seq_len)
            for act_ckpt in (False, True):
                best, peak = largest_that_trains(cfg, args.seq_len, args.mixed_precision, act_ckpt,
                                                 args.max_micro_batch)
                predicted = largest_micro_batch(cfg, args.seq_len, gpu.total_memory, precision=args.mixed_precision,
                                                act_ckpt=act_ckpt, accumulation_steps=2)
                est = estimate_memory(cfg, args.seq_len, max(best, 1), precision=args.mixed_precision,
                                      act_ckpt=act_ckpt, accumulation_steps=2)["total"]
                err = relative_error(est, peak) if peak else None
                results["runs"].append({"size": size, "act_ckpt": act_ckpt, "largest_micro_batch": best,
                                        "predicted_micro_batch": predicted, "measured": peak, "estimate": est,
                                        "error": err})
                shown = f"{peak / GIB:>12.2f} {est / GIB:>12.2f} {100 * err:>+6.1f}%" if peak else \
                    f"{'-':>12} {est / GIB:>12.2f} {'-':>7}"
                print(f"{size:>7} {act_ckpt!s:>8} {best or 'none':>13} {predicted:>9} {shown}", flush=True)
        for act_ckpt in (False, True):
            fitting = [r["size"] for r in results["runs"] if r["act_ckpt"] == act_ckpt and r["largest_micro_batch"]]
            print(f"largest size that trains with activation checkpointing {act_ckpt}: "
                  f"{fitting[-1] if fitting else 'none'}")
    if args.out:
        atomic_write_text(args.out, json.dumps(results, indent=2))  # never a half-written file
    return results


if __name__ == "__main__":
    main()
