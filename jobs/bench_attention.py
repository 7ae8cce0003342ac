"""Attention kernels side by side: forward + backward of raylm's causal grouped-query attention
(scaled_dot_product_attention with enable_gqa) on each SDPA backend that can serve the shapes.

    python jobs/bench_attention.py --use_gpu                       # the small model's shapes, bf16
    python jobs/bench_attention.py --use_gpu --model_size medium --seq_len 2048
    python jobs/bench_attention.py --smoke                         # CPU, seconds: what the tests run

The baseline is FlashAttention-2 (PyTorch's first choice on most GPUs); each other backend prints
its time and its speed relative to flash, with the TFLOP/s each reaches (causal: half of the
4 * B * heads * T^2 * head_dim multiply-adds of forward, times 3.5 for forward + backward, as
FlashAttention's own benchmark counts). `raylm train --attention_backend` picks one of them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raylm.model import model_config_from  # noqa: E402
from raylm.storage import atomic_write_text  # noqa: E402


def _backends():
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def default_choice(q, k, v) -> str:
    """The backend PyTorch picks on its own for these inputs (its private dispatcher; '?' if gone)."""
    try:
        chosen = torch._fused_sdp_choice(q, k, v, is_causal=True, enable_gqa=k.size(1) != q.size(1))
    except Exception:  # noqa: BLE001 - private API, report instead of failing
        return "?"
    for name, backend in _backends().items():
        if int(backend) == int(chosen):
            return name
    return str(chosen)


def time_backend(name: str, q, k, v, grad, repeats: int) -> float | None:
    """Seconds per forward + backward on backend `name`, or None when it cannot serve these inputs."""
    from torch.nn.attention import sdpa_kernel

    gqa = k.size(1) != q.size(1)

    def once():
        q.grad = k.grad = v.grad = None
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        out.backward(grad)

    try:
        with sdpa_kernel(_backends()[name]):
            for _ in range(2):  # warm-up: kernel selection, cuDNN graph build
                once()
            if q.is_cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(repeats):
                once()
            if q.is_cuda:
                torch.cuda.synchronize()
            return (time.perf_counter() - t) / repeats
    except RuntimeError as e:  # "No available kernel" and friends
        print(f"  {name:9s}: cannot serve these inputs ({str(e).splitlines()[0][:100]})")
        return None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_size", default="small")
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--micro_batch_size", type=int, default=32)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--use_gpu", action="store_true")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--smoke", action="store_true", help="CPU, toy shapes, seconds")
    args = p.parse_args(argv)
    cfg = model_config_from(args.model_size)
    heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads or cfg.num_heads, cfg.head_dim
    B, T = args.micro_batch_size, args.seq_len
    device = "cuda" if args.use_gpu else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.smoke:
        B, T, heads, kv_heads, head_dim, args.repeats, dtype = 2, 64, 4, 2, 16, 2, torch.float32
    gen = torch.Generator(device).manual_seed(0)
    q = torch.randn(B, heads, T, head_dim, device=device, dtype=dtype, generator=gen, requires_grad=True)
    k = torch.randn(B, kv_heads, T, head_dim, device=device, dtype=dtype, generator=gen, requires_grad=True)
    v = torch.randn(B, kv_heads, T, head_dim, device=device, dtype=dtype, generator=gen, requires_grad=True)
    grad = torch.randn(B, heads, T, head_dim, device=device, dtype=dtype, generator=gen)
    flops = 3.5 * 4 * B * heads * T * T * head_dim / 2  # causal: half the score matrix
    names = ["flash", "cudnn", "efficient", "math"] if args.use_gpu else ["flash", "math"]
    device_name = torch.cuda.get_device_name() if args.use_gpu else "CPU"
    print(f"bench_attention: {device_name}, torch {torch.__version__}, batch {B}, heads {heads} (kv {kv_heads}), "
          f"seq {T}, head_dim {head_dim}, {dtype}, causal, forward + backward")
    print(f"  PyTorch's own choice for these inputs: {default_choice(q, k, v)}")
    results = {"device": device_name, "torch": torch.__version__, "shape": [B, heads, kv_heads, T, head_dim],
               "dtype": str(dtype), "default": default_choice(q, k, v), "seconds": {}}
    for name in names:
        results["seconds"][name] = time_backend(name, q, k, v, grad, args.repeats)
    base = results["seconds"].get("flash")
    for name, s in results["seconds"].items():
        if s is None:
            continue
        ratio = f" | {base / s:.2f}x flash's speed" if base and name != "flash" else ""
        print(f"  {name:9s}: {1e3 * s:8.3f} ms | {flops / s / 1e12:7.1f} TFLOP/s{ratio}")
    if args.out:
        atomic_write_text(args.out, json.dumps(results, indent=2))  # never a half-written file
    return results


if __name__ == "__main__":
    main()
