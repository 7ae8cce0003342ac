"""The loss head side by side: forward + backward of the output layer and the cross-entropy, raylm's
chunked loss (`--loss_chunking on`, the default) against full logits (`--loss_chunking off`), in eager
mode and compiled.

    python jobs/bench_loss_head.py --use_gpu          # the small model's head: 65,536 tokens, 768 x 32,000, bf16
    python jobs/bench_loss_head.py                    # CPU: 4,096 tokens, bf16 autocast
    python jobs/bench_loss_head.py --smoke            # seconds: what the tests run

The baseline is full logits, as `transformers` computes them: the (tokens x vocabulary) logits in the
compute dtype, their fp32 copy for the loss, and its gradient. Each mode prints the time of one forward +
backward (median of --repeats after a warm-up), the memory the step allocated at its peak on a GPU, and
chunked / full as a speed ratio. The input is what the model's final RMSNorm gives the head under
autocast: fp32 hidden states (fp32 weights, autocast's bf16 products).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raylm.model import IGNORE_INDEX, chunked_cross_entropy, loss_chunk_rows  # noqa: E402


def full_logits(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """LLMModel's head with return_logits=True: lm_head, then cross_entropy of the fp32 logits."""
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)


def time_head(head, hidden, weight, targets, dtype, repeats: int) -> tuple[float, int | None]:
    """(median ms of forward + backward, peak bytes allocated during one step on CUDA, else None)."""
    cuda = hidden.device.type == "cuda"
    autocast = torch.autocast(hidden.device.type, dtype=dtype, enabled=dtype is not None)

    def step():
        hidden.grad = weight.grad = None
        with autocast:
            loss = head(hidden, weight, targets)
        loss.backward()

    for _ in range(2):  # compiles, and the allocator settles
        step()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t))
    peak = None
    if cuda:
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    return statistics.median(times), peak


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--use_gpu", action="store_true")
    p.add_argument("--tokens", type=int, default=None, help="rows: micro batch x sequence (65,536 on GPU, 4,096 on CPU)")
    p.add_argument("--hidden_size", type=int, default=768)
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--modes", default="eager,compiled")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--smoke", action="store_true", help="a tiny head on CPU, seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.use_gpu, args.tokens, args.hidden_size, args.vocab_size, args.repeats = False, 1100, 32, 512, 2
    device = torch.device("cuda" if args.use_gpu else "cpu")
    tokens = args.tokens or (65536 if args.use_gpu else 4096)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, args.hidden_size, generator=g).to(device).requires_grad_()
    weight = (0.02 * torch.randn(args.vocab_size, args.hidden_size, generator=g)).to(device).requires_grad_()
    targets = torch.randint(0, args.vocab_size, (tokens,), generator=g).to(device)
    targets[::17] = IGNORE_INDEX  # some positions score nothing, as padding and document ends do
    name = torch.cuda.get_device_name() if args.use_gpu else "CPU"
    chunk = loss_chunk_rows(device, args.vocab_size)
    print(f"bench_loss_head: {name}, torch {torch.__version__}, {tokens:,} tokens, hidden {args.hidden_size}, "
          f"vocab {args.vocab_size:,}, {args.precision}, chunks of {chunk:,} rows")
    results = {"device": name, "torch": torch.__version__, "tokens": tokens, "hidden_size": args.hidden_size,
               "vocab_size": args.vocab_size, "precision": args.precision, "chunk_rows": chunk, "runs": {}}
    for mode in args.modes.split(","):
        row = {}
        for label, head in (("full", full_logits), ("chunked", chunked_cross_entropy)):
            fn = torch.compile(head) if mode == "compiled" else head
            torch._dynamo.reset()
            ms, peak = time_head(fn, hidden, weight, targets, dtype, args.repeats)
            row[label] = {"ms": ms, "peak_bytes": peak}
            mem = f" | peak {peak / 2**30:.2f} GiB" if peak is not None else ""
            print(f"  {mode:8s} {label:8s}: {ms:9.2f} ms per forward + backward{mem}")
        row["chunked_speedup"] = row["full"]["ms"] / row["chunked"]["ms"]
        results["runs"][mode] = row
        print(f"  {mode:8s} chunked / full: {row['chunked_speedup']:.3f}x the speed")
    if args.out:
        tmp = Path(args.out).with_name(Path(args.out).name + ".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(args.out)
    return results


if __name__ == "__main__":
    main()
