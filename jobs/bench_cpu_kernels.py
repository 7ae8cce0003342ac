"""raylm's fused CPU kernels (raylm/csrc/fused_cpu.cpp) on and off: raylm's own training step, nothing else.

    python jobs/bench_cpu_kernels.py                   # tiny and small-ish, fp32 and bf16: ~5 min on 2 cores
    python jobs/bench_cpu_kernels.py --sizes small-ish --precisions fp32 --repeats 3
    python jobs/bench_cpu_kernels.py --smoke           # seconds; what the tests run

For each pairing it trains raylm's model in eager mode as jobs/bench_vs_hf.py does (the same shapes,
batches, loop and windows) in a fresh process with the kernels on, then in another with
RAYLM_FUSED_CPU_KERNELS=0, and again `--repeats` times, alternating; each process prints the median tokens/s
of its windows. Off means: in fp32 the same maths as separate PyTorch operators (what runs where the kernels
cannot be built), in bf16 PyTorch's own operators. The ratio is the median of the on runs over the median of
the off runs. Other work on the machine moves single runs by several per cent: read the ratios with the
spread the runs print.

Compiled models run PyTorch's operators, which inductor fuses. Calling the kernels from compiled code (their
output shapes registered with torch.library.register_fake, so that torch.compile traces them) was built
and measured with this script: on/off 0.973 and 0.978 on tiny, 1.023 and 0.991 on small-ish (fp32, bf16),
within the runs' spread, and was left out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_vs_hf, beside this file

from bench_vs_hf import SIZES  # noqa: E402


def _child(size: str, precision: str, windows: int, steps: int, warmup: int) -> None:
    """One process, one setting of the switch (from the environment): prints one JSON line."""
    from bench_vs_hf import _Trainer

    from raylm.cpu_kernels import describe_cpu_kernels

    trainer = _Trainer(size, "raylm", False, precision=precision)
    trainer.warm(warmup)
    walls = [trainer.window(steps)[0] for _ in range(windows)]
    tokens = SIZES[size]["batch"] * SIZES[size]["seq"] * steps
    print(json.dumps({"tokens_per_s": tokens / statistics.median(walls), "kernels": describe_cpu_kernels()}))


def _run(args, size: str, precision: str, switch: str) -> dict:
    env = {**os.environ, "RAYLM_FUSED_CPU_KERNELS": switch}
    cmd = [sys.executable, __file__, "--child", size, precision, "--windows", str(args.windows),
           "--steps_per_window", str(args.steps_per_window), "--warmup_steps", str(args.warmup_steps)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{size} {precision} with RAYLM_FUSED_CPU_KERNELS={switch} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "small-ish"], choices=[s for s in SIZES if s != "smoke"])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=2, help="processes per setting of the switch, alternating")
    p.add_argument("--windows", type=int, default=7)
    p.add_argument("--steps_per_window", type=int, default=3)
    p.add_argument("--warmup_steps", type=int, default=4, help="untimed steps first")
    p.add_argument("--smoke", action="store_true", help="a seconds-long run with a toy model")
    p.add_argument("--child", nargs=2, metavar=("SIZE", "PRECISION"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(*args.child, args.windows, args.steps_per_window, args.warmup_steps)
        return
    if args.smoke:
        args.sizes, args.precisions = ["smoke"], ["fp32", "bf16"]
        args.repeats, args.windows, args.steps_per_window, args.warmup_steps = 1, 2, 1, 2

    import torch

    print(f"bench_cpu_kernels: CPU x{os.cpu_count()} ({torch.get_num_threads()} torch threads), torch "
          f"{torch.__version__}, {torch.backends.cpu.get_cpu_capability()}; {args.windows} windows of "
          f"{args.steps_per_window} steps per process, medians; {args.repeats} process(es) each way, alternating",
          flush=True)
    started = time.perf_counter()
    rows = []
    kernels = ""
    for size in args.sizes:
        for precision in args.precisions:
            on, off = [], []
            for _ in range(args.repeats):
                result = _run(args, size, precision, "1")
                on.append(result["tokens_per_s"])
                kernels = result["kernels"]
                off.append(_run(args, size, precision, "0")["tokens_per_s"])
            ratio = statistics.median(on) / statistics.median(off)
            rows.append((size, precision, on, off, ratio))
            print(f"  {size:<9} eager {precision}  on {' / '.join(f'{t:,.0f}' for t in on)}  "
                  f"off {' / '.join(f'{t:,.0f}' for t in off)} tokens/s  on/off {ratio:.3f}", flush=True)
    print("=" * 78)
    print(f"kernels when on: {kernels}")
    print(f"{'size':<9} {'mode':<5} {'prec':<5} {'on tok/s':>10} {'off tok/s':>10} {'on/off':>7}  spread on, off")
    for size, precision, on, off, ratio in rows:
        spread = f"{(max(on) - min(on)) / statistics.median(on):.1%}, {(max(off) - min(off)) / statistics.median(off):.1%}"
        print(f"{size:<9} {'eager':<5} {precision:<5} {statistics.median(on):>10,.0f} {statistics.median(off):>10,.0f} "
              f"{ratio:>7.3f}  {spread}")
    print(f"on/off: median tokens/s with the fused kernels over without (wall {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
