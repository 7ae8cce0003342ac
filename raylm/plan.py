"""`raylm plan`: the memory one training worker needs, before you rent the GPUs.

    raylm plan --model_size large --max_length 2048 --micro_batch_size 4 --num_workers 8 \
        --strategy fsdp --mixed_precision bf16 --activation_checkpointing --gpu_memory_gb 80

`estimate_memory` adds up, per worker, the bytes of the weights, gradients, AdamW state, the
framework's buffers and the activations one micro batch keeps for the backward pass, for this
repository's model (raylm/model.py) and training loop (raylm/train.py); `largest_micro_batch` turns
that into the largest micro batch that fits a GPU. `measure_peak` runs one real training step and
measures its peak, so the estimate is checked, not hoped for (tests/test_plan.py on CPU,
tests/test_gpu_plan.py and jobs/bench_memory.py on a GPU). `raylm train` prints the estimate in its
banner.
"""
from __future__ import annotations

import dataclasses

import torch

from raylm.model import ModelConfig

GIB = 2**30
# Share of GPU memory a plan leaves free: the CUDA context, NCCL buffers, cuBLAS workspaces and
# the caching allocator's fragmentation are not in the estimate.
HEADROOM = 0.10


def param_counts(c: ModelConfig) -> dict[str, int]:
    """Parameters: total (tied embedding counted once), per block, outside the blocks ("root":
    embedding, final norm, untied lm_head) and in matrices that autocast copies to 16 bits (every
    Linear, the lm_head included)."""
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    attention = c.hidden_size * (q + 2 * kv) + q * c.hidden_size
    mlp = 3 * c.hidden_size * c.intermediate_size
    block = attention + mlp + 2 * c.hidden_size  # + two RMSNorm gains
    embed = c.vocab_size * c.hidden_size
    root = embed + (0 if c.tie_embeddings else embed) + c.hidden_size
    return {"total": c.num_layers * block + root, "block": block, "root": root,
            "matmul": c.num_layers * (attention + mlp) + embed, "block_matmul": attention + mlp}


def _regime(strategy: str, world: int, precision: str, residual: str = "fp32") -> str:
    """How the training loop runs the model: 'fp32'; 'autocast' (plain/DDP, bf16 or fp16 autocast,
    fp32 weights and residual stream); 'autocast_r16' (the same with `--residual_dtype bf16`: a bf16
    residual stream); 'fsdp_mixed' (FSDP's MixedPrecisionPolicy: 16-bit weights and activations
    throughout, no autocast)."""
    if precision == "off":
        return "fp32"
    if strategy == "fsdp" and world > 1:
        return "fsdp_mixed"
    return "autocast_r16" if residual == "bf16" else "autocast"


def activation_bytes_per_token(c: ModelConfig, regime: str, act_ckpt: bool = False,
                               device: str = "cuda", compile_model: bool = False,
                               precision: str = "bf16") -> dict[str, int]:
    """Bytes per token that a forward pass keeps for the backward pass (autograd's saved tensors,
    counted by storage), read off raylm/model.py op by op and checked with saved_tensors_hooks:

      s = 4 (fp32) or 2 (16-bit compute), q = num_heads x head_dim, kv = num_kv_heads x head_dim
      RMSNorm        its fp32 input, the normed tensor, the output the next matmul saves:
                     12h (fp32), 10h (autocast: fp32 residual, 16-bit copy for the matmul),
                     8h (fsdp_mixed and autocast_r16: fp32 upcast + two 16-bit tensors); + 4
                     bytes of rstd.
                     On CPU in fp32 raylm/model.py's _RMSNorm keeps the normed tensor instead
                     of its input (or, with the fused kernels, its input but not the normed
                     tensor): 8h. Compiled code runs the plain ops, but inductor recomputes
                     the normed tensor in the backward: 8h too (measured)
      attention      q and k, views of one rotated tensor s·(q + kv); v, a view that keeps the
                     fused qkv output s·(q + 2kv) alive; except on GPU in fp32, where k and v are
                     repeated to every query head (s·q each; raylm/model.py does so to keep the
                     memory-efficient kernel); the output s·q (o_proj's input is a view of it);
                     logsumexp 4·num_heads
      SwiGLU         gate|up output s·2I, silu(gate) s·I, their product s·I  -> 4·s·I; 3·s·I
                     on CPU in eager fp32 or bf16 autocast with raylm's fused kernels
                     (raylm/cpu_kernels.py), whose backward recomputes silu(gate), and in
                     compiled code on CPU, whose plain ops inductor recomputes the same way.
                     Under bf16 autocast their RMSNorm keeps its fp32 input but not the normed
                     tensor: 6h (compiled: the same; with a bf16 stream the PyTorch ops run: 8h,
                     not measured compiled)
      layer          2 x RMSNorm + attention + SwiGLU
      checkpointed   only the block's input, the residual stream: 4h (fp32, autocast) or 2h
                     (fsdp_mixed, autocast_r16);
                     in the backward pass one block at a time is recomputed ("recompute": its
                     layer bytes plus the gradients in flight in its backward: of silu(gate) and
                     up, 2·s·I, and of the residual stream)
      head           token ids 8, targets 8, final RMSNorm, logits s·V (the loop holds them),
                     log-probabilities 4·V (cross_entropy computes them in fp32)
      loss_forward   16-bit logits are copied to fp32 for the loss: 4·V for a moment (0 in fp32)
      loss_backward  the gradients of the log-probabilities and of the logits, fp32: 8·V, alive
                     for a moment at the start of the backward pass
      after_head     what is left of the head when the blocks' backward starts: ids, targets, logits
    Dropout is taken as 0 (pre-training); its masks would add 2h bytes per layer.
    """
    h, I, V = c.hidden_size, c.intermediate_size, c.vocab_size
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    s = 4 if regime == "fp32" else 2
    # Saved as raylm's fused CPU kernels save (raylm/cpu_kernels.py), in fp32 and bf16 autocast: in eager mode
    # where they run, and in compiled code, which runs the plain ops but whose partitioner recomputes the normed
    # tensor and silu(gate) in the backward (the same bytes, measured: tests/test_plan.py)
    fused = False
    if device == "cpu" and (regime == "fp32" or (regime in ("autocast", "autocast_r16") and precision == "bf16")):
        from raylm.cpu_kernels import fused_cpu_kernels_expected

        fused = compile_model or fused_cpu_kernels_expected()  # decided without building them: no side effects
    norm = {"fp32": 12, "autocast": 10, "autocast_r16": 8, "fsdp_mixed": 8}[regime] * h + 4
    # (a bf16 stream's norms run the PyTorch ops everywhere: the fused CPU RMSNorm takes an fp32 input)
    if device == "cpu" and ((fused and regime != "autocast_r16") or regime == "fp32"):  # its input or normed, not both (the PyTorch-op versions too)
        norm -= 4 * h
    repeat_kv = s == 4 and kv != q and device != "cpu"  # as GroupedQueryAttention.forward decides
    kv_saved = 2 * s * q if repeat_kv else s * (q + 2 * kv)
    attention = s * (q + kv) + kv_saved + s * q + 4 * c.num_heads
    swiglu = 3 * s * I if fused else 4 * s * I  # the fused backward recomputes silu(gate)
    layer = 2 * norm + attention + swiglu
    residual = 2 * h if regime in ("fsdp_mixed", "autocast_r16") else 4 * h
    return {"layer": layer, "stored_per_layer": residual if act_ckpt else layer,
            "recompute": layer + 2 * s * I + residual, "head": 16 + norm + s * V + 4 * V,
            "loss_forward": 4 * V if s == 2 else 0, "loss_backward": 8 * V, "after_head": 16 + s * V, "logits": s * V}


def estimate_memory(model_cfg: ModelConfig, seq_len: int, micro_batch: int, world: int = 1, strategy: str = "ddp",
                    precision: str = "off", act_ckpt: bool = False, accumulation_steps: int = 1,
                    device: str = "cuda", compile_model: bool = False, residual: str = "fp32") -> dict[str, int]:
    """Bytes per worker at the peak of a training step, by component (and "total"), with the loss
    computed from full logits (`--loss_chunking off`); the chunked loss that training runs by default
    needs less, so for it this is an upper bound.

    P = parameters (param_counts), W = world, s = 2 for bf16/fp16 else 4, tokens = micro_batch x seq_len.
    Always resident:
      parameters   4P, or 4P / W sharded by FSDP (fp32 master weights either way)
      optimizer    8P (AdamW exp_avg and exp_avg_sq, fp32), FSDP 8P / W
      DDP (W > 1)  its gradient buckets, 4P (counted under buffers)
    The rest depends on the moment; the peak is the largest of four (activation_bytes_per_token
    gives the per-token terms, x tokens):
      end of forward     L x stored_per_layer + head + loss_forward (+ s·V when accumulating: the
                         loop holds the previous micro-step's logits until this forward returns)
      loss backward      L x stored_per_layer + head + loss_backward
      last block's       L x stored_per_layer + after_head + recompute (checkpointing), or + only the
        backward         gradients in flight, 2·s·I + residual; the embedding/lm_head gradient exists
      first block's      every gradient but its own; after_head + recompute (+ its checkpointed
        backward         input); the backward pass reaches the blocks last to first
    with
      gradients    none before the first backward of a step (zero_grad sets them to None), all of
                   them from the second micro-step on when accumulating: 4P, or FSDP 4P / W after its
                   reduce-scatter, but 4P while accumulating (FSDP2 keeps unsharded fp32 gradients
                   between micro-steps when gradient sync is off)
      autocast     16-bit copies of the matrices (s x their parameters): all of them at the end of
                   the forward pass (autocast caches them); then the ones the backward pass still
                   needs (with checkpointing: the lm_head's at the loss, one block's in a block)
      FSDP         gathered weights (s bytes each) of the root (embedding, norm, head), kept from
                   forward to backward, and in a block's backward of two blocks (computing and
                   prefetched) with their unsharded gradients (s, plus an fp32 copy for the
                   reduce-scatter when s == 2), and the root's unsharded gradients
    """
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy must be ddp or fsdp, got {strategy!r}")
    precision = "bf16" if precision == "auto" else precision
    sharded = strategy == "fsdp" and world > 1
    regime = _regime(strategy, world, precision, residual)
    autocasting = regime in ("autocast", "autocast_r16")
    n = param_counts(model_cfg)
    P, L = n["total"], model_cfg.num_layers
    s = 4 if precision == "off" else 2
    shard = world if sharded else 1
    t = activation_bytes_per_token(model_cfg, regime, act_ckpt, device, compile_model, precision)
    tokens = micro_batch * seq_len
    stored = L * t["stored_per_layer"]
    accumulating = accumulation_steps > 1

    grads_all = 4 * P // (1 if accumulating else shard)
    grads_before = grads_all if accumulating else 0
    root_grads = 0 if accumulating or sharded else 4 * n["root"]
    copies = s * n["matmul"] if autocasting else 0
    head_copy = s * (n["matmul"] - L * n["block_matmul"]) if autocasting else 0
    block_copy = s * n["block_matmul"] if autocasting else 0
    fsdp_root = fsdp_block = fsdp_two_blocks = 0
    if sharded:  # gathered weights, and unsharded gradients before the reduce-scatter (none while accumulating:
        # those are the fp32 accumulators counted in grads_all)
        reduce = 0 if accumulating else s + (4 if s == 2 else 0)
        fsdp_root = s * n["root"]
        fsdp_block = (s + reduce) * n["block"] + reduce * n["root"]
        fsdp_two_blocks = fsdp_block + (s + reduce) * n["block"]
    in_flight = t["recompute"] if act_ckpt else t["recompute"] - t["layer"]  # the block's own bytes are in stored
    moments = [  # (gradients, buffers, activations)
        # end of forward
        (grads_before, copies + fsdp_root,
         tokens * (stored + t["head"] + t["loss_forward"] + (t["logits"] if accumulating else 0))),
        # loss backward
        (grads_before, (head_copy if act_ckpt else copies) + fsdp_root,
         tokens * (stored + t["head"] + t["loss_backward"])),
        # the last block's backward (the first one the backward pass reaches)
        (grads_before + root_grads, (block_copy if act_ckpt else copies - head_copy) + fsdp_root + fsdp_two_blocks,
         tokens * (stored + t["after_head"] + in_flight)),
        # the first block's backward (the last one it reaches): every gradient but its own exists
        (grads_all - (0 if accumulating else 4 * n["block"] // shard), block_copy + fsdp_root + fsdp_block,
         tokens * (t["after_head"] + t["recompute"] + (t["stored_per_layer"] if act_ckpt else 0))),
    ]
    gradients, buffers, activations = max(moments, key=sum)
    out = {
        "parameters": 4 * P // shard,
        "gradients": gradients,
        "optimizer": 8 * P // shard,
        "buffers": buffers + (4 * P if strategy == "ddp" and world > 1 else 0),
        "activations": activations,
    }
    out["total"] = sum(out.values())
    return out


def largest_micro_batch(model_cfg: ModelConfig, seq_len: int, gpu_bytes: float, world: int = 1,
                        strategy: str = "ddp", precision: str = "bf16", act_ckpt: bool = False,
                        accumulation_steps: int = 1, device: str = "cuda", residual: str = "fp32") -> int:
    """The largest micro batch whose estimate fits (1 - HEADROOM) of gpu_bytes; 0 if none does.
    The estimate grows with the micro batch (piecewise linearly): double, then bisect."""
    def fits(mb: int) -> bool:
        args = (world, strategy, precision, act_ckpt, accumulation_steps, device)
        return estimate_memory(model_cfg, seq_len, mb, *args, residual=residual)["total"] <= gpu_bytes * (1 - HEADROOM)

    if not fits(1):
        return 0
    lo, hi = 1, 2  # fits(lo), and hi is to be tested
    while fits(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB"


def describe(est: dict[str, int]) -> str:
    """One line for the training banner, in GiB (MiB for small models)."""
    unit, name = (GIB, "GiB") if est["total"] >= GIB else (2**20, "MiB")
    parts = ", ".join(f"{k} {est[k] / unit:,.1f}" for k in ("parameters", "gradients", "optimizer", "buffers",
                                                           "activations"))
    return f"{est['total'] / unit:,.1f} {name} ({parts})"


# ----------------------------------------------------------------------------- `raylm plan`


def plan(cfg) -> dict:
    """Print the memory table of a PlanConfig and the largest micro batch that fits; return both."""
    from raylm.config import ConfigError
    from raylm.model import model_config_from

    fields = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "tie_embeddings")
    try:
        model_cfg = model_config_from(cfg.model_size or "tiny", vocab_size=cfg.vocab_size,
                                      max_seq_len=cfg.max_length, **{f: getattr(cfg, f) for f in fields})
    except ValueError as e:
        raise ConfigError(str(e)) from None
    precision = "bf16" if cfg.mixed_precision == "auto" else cfg.mixed_precision
    world, acc = cfg.num_workers, cfg.accumulation_steps
    args = (world, cfg.strategy, precision, cfg.activation_checkpointing, acc)
    est = estimate_memory(model_cfg, cfg.max_length, cfg.micro_batch_size, *args, residual=cfg.residual_dtype)
    gpu_bytes = cfg.gpu_memory_gb * GIB
    best = largest_micro_batch(model_cfg, cfg.max_length, gpu_bytes, *args, residual=cfg.residual_dtype)
    n = param_counts(model_cfg)
    sharded = cfg.strategy == "fsdp" and world > 1
    w = "32-bit" if precision == "off" else precision
    split = f", 1/{world} each" if sharded else ""
    grads_note = split if sharded and acc == 1 else (", unsharded while accumulating" if sharded else "")
    if est["gradients"] == 0:
        grads_note += " (none yet at this peak: the step's first backward pass)"
    notes = []
    if cfg.strategy == "ddp" and world > 1:
        notes.append("DDP gradient buckets")
    if not sharded and precision != "off":
        notes.append(f"{w} autocast weight copies")
    if sharded:
        notes.append(f"FSDP: gathered {w} weights (and unsharded grads in a block's backward)")
    rows = [
        ("parameters", f"fp32{split}", est["parameters"]),
        ("gradients", f"fp32{grads_note}", est["gradients"]),
        ("optimizer state", f"AdamW, 2 x fp32{split}", est["optimizer"]),
        ("buffers", "; ".join(notes) or "-", est["buffers"]),
        ("activations", f"{cfg.micro_batch_size} x {cfg.max_length} tokens"
                        f"{', checkpointed' if cfg.activation_checkpointing else ''}", est["activations"]),
    ]
    strategy_note = cfg.strategy + (" (1 worker: same as ddp)" if cfg.strategy == "fsdp" and world == 1 else "")
    print(f"Model: {cfg.model_size or 'tiny'}: {n['total'] / 1e6:,.1f}M parameters, hidden {model_cfg.hidden_size}, "
          f"layers {model_cfg.num_layers}, vocab {model_cfg.vocab_size}")
    print(f"Run: {world} worker(s), {strategy_note}, precision {precision}, micro batch {cfg.micro_batch_size} x "
          f"{cfg.max_length} tokens, accumulation {acc}, activation checkpointing {cfg.activation_checkpointing}"
          + (", bf16 residual stream" if cfg.residual_dtype == "bf16" and not sharded else ""))
    print(f"{'component':<17}{'per worker':>14}  note")
    for name, note, value in rows:
        print(f"{name:<17}{gib(value):>14}  {note}")
    print(f"{'total':<17}{gib(est['total']):>14}  {100 * est['total'] / gpu_bytes:.0f}% of {cfg.gpu_memory_gb:g} GiB "
          f"({100 * HEADROOM:.0f}% is kept free for CUDA, NCCL and fragmentation)")
    if best == 0:
        print("Largest micro batch that fits: none. Try --strategy fsdp with more workers, "
              "--activation_checkpointing, a shorter --max_length or a smaller model.")
    else:
        print(f"Largest micro batch that fits: {best}")
    return {"estimate": est, "largest_micro_batch": best, "model_config": dataclasses.asdict(model_cfg)}


# ----------------------------------------------------------------------------- measuring


def measure_peak(model_cfg: ModelConfig, seq_len: int, micro_batch: int, *, precision: str = "off",
                 act_ckpt: bool = False, device: str = "cpu", micro_steps: int = 2, seed: int = 0,
                 compile_model: bool = False, residual: str = "fp32") -> int:
    """Peak bytes of one training step of a single-worker model, measured, not estimated: the loop of
    raylm/train.py (micro_steps forward/backward passes under autocast when precision is bf16/fp16,
    clipping, an AdamW step), after one warm-up step so the optimizer state exists. The loss is the
    full-logits one (`--loss_chunking off`) that estimate_memory models; the default chunked loss needs less.
    compile_model: the model through torch.compile (compiled in the warm-up step).

    CUDA: torch.cuda.max_memory_allocated over the step (everything the caching allocator handed out).
    CPU: there is no allocator high-water mark, so: the bytes that exist before the step (weights,
    optimizer state, the batch; summed by storage) plus the largest growth of allocated CPU memory
    during the step, from torch.profiler's allocation events (profile_memory=True records every
    allocation and free of the CPU allocator, autograd's saved tensors and kernels' temporaries
    included, not only tensors Python can see).
    """
    from raylm.model import LLMModel, configure_optimizer_groups
    from raylm.train import fused_adamw

    torch.manual_seed(seed)
    dev = torch.device(device)
    model = LLMModel(dataclasses.replace(model_cfg, max_seq_len=max(model_cfg.max_seq_len, seq_len))).to(dev)
    model.activation_checkpointing = act_ckpt
    model.residual_dtype = torch.bfloat16 if residual == "bf16" else None
    optimizer = torch.optim.AdamW(configure_optimizer_groups(model, 0.1), lr=1e-4, fused=fused_adamw(dev))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "auto": torch.bfloat16}.get(precision)
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, model_cfg.vocab_size, (micro_batch, seq_len), generator=g).to(dev)
               for _ in range(micro_steps)]

    runner = torch.compile(model) if compile_model else model

    def step():
        for ids in batches:
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                _, loss = runner(ids, labels=ids, loss_reduction="sum")  # the full-logits loss, as estimate_memory models
            (loss / ids.numel()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer state now exists, as in every step but the first
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        step()
        torch.cuda.synchronize(dev)
        return int(torch.cuda.max_memory_allocated(dev))
    existing = [*model.parameters(), *model.buffers(), *batches,
                *(t for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t))]
    return cpu_peak_bytes(step, existing)


def cpu_peak_bytes(fn, existing: list[torch.Tensor]) -> int:
    """Peak CPU bytes while fn() runs: the storages of `existing` (what lives before; DTensors count
    their local shard) plus the largest growth of allocated memory during fn(), summed from
    torch.profiler's allocation and free events in time order."""
    from torch.profiler import ProfilerActivity, profile

    live = {}
    for t in existing:
        t = t.to_local() if hasattr(t, "to_local") else t
        live[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return sum(live.values()) + peak


def relative_error(estimate: int, measured: int) -> float:
    return (estimate - measured) / measured

