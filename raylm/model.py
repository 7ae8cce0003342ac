"""A Llama-style decoder-only language model in plain single-device PyTorch.

RMSNorm -> rotary embeddings -> grouped-query attention -> SwiGLU -> pre-norm block -> model.
The architecture is Llama's exactly (including the "rotate_half" rotary layout), so weights map
one-to-one onto `transformers.LlamaForCausalLM` (see `raylm/export.py`). Nothing here knows about
Ray, DDP or autocast: parallelism and precision are applied from outside by the training loop.

    from raylm.model import LLMModel, model_config_from
    model = LLMModel(model_config_from("tiny", vocab_size=8000))
    logits, loss = model(x, labels=x)        # the next-token shift happens inside the model
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from raylm.cpu_kernels import fused_cpu_ops

IGNORE_INDEX = -100  # label value whose position contributes no loss (padding, masked prompts)

# One (keys, values) pair per layer, each (B, n_kv_heads, max_cache_len, head_dim), written in place.
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def llama_intermediate_size(hidden_size: int, multiple_of: int = 256) -> int:
    """Llama's MLP width: 2/3 of 4*hidden (so SwiGLU's three matrices cost what a 4x MLP's two do),
    rounded up to a multiple of `multiple_of` for matmul efficiency. 768 -> 2048, 1024 -> 2816."""
    return multiple_of * math.ceil(int(8 * hidden_size / 3) / multiple_of)


@dataclass
class ModelConfig:
    """Shape and numerics of an `LLMModel`. The defaults are the "tiny" size (~22M parameters)."""

    vocab_size: int = 32000  # number of token ids (embedding rows); ids must be < vocab_size
    hidden_size: int = 384  # width of the residual stream, in features
    num_layers: int = 6  # number of transformer blocks
    num_heads: int = 6  # query heads per attention layer; head_dim = hidden_size / num_heads
    num_kv_heads: int | None = 2  # key/value heads (grouped-query attention); None = num_heads (MHA)
    intermediate_size: int | None = None  # SwiGLU hidden width, in features; None = Llama's rule
    max_seq_len: int = 1024  # longest sequence (prompt + generated), in tokens
    rope_theta: float = 10000.0  # rotary embedding base wavelength, in positions
    norm_eps: float = 1e-5  # RMSNorm epsilon added to the mean square
    tie_embeddings: bool = True  # share one matrix between the input embedding and the lm_head
    dropout: float = 0.0  # probability, applied to attention weights and residual branches in training
    init_std: float = 0.02  # standard deviation of the normal weight initialisation

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.intermediate_size is None:
            self.intermediate_size = llama_intermediate_size(self.hidden_size)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads}): "
                f"choose num_heads from {_divisors(self.hidden_size)}"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim = hidden_size / num_heads = {self.head_dim} must be even for rotary "
                f"embeddings: change hidden_size ({self.hidden_size}) or num_heads ({self.num_heads})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads}): "
                f"choose num_kv_heads from {_divisors(self.num_heads)}"
            )
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")

    @property
    def head_dim(self) -> int:
        """Features per attention head."""
        return self.hidden_size // self.num_heads


# Shapes of the named sizes; every other field keeps its ModelConfig default. Parameter counts
# at vocab 32000 with tied embeddings (total / without embeddings): tiny 21.7M / 9.4M,
# small 125.3M / 100.7M, medium 348.4M / 315.7M, large 804.2M / 755.1M, xl 1508.5M / 1443.0M.
# head_dim is 64 up to medium and 128 above (better for flash-attention kernels).
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 384, "num_layers": 6, "num_heads": 6, "num_kv_heads": 2},
    "small": {"hidden_size": 768, "num_layers": 16, "num_heads": 12, "num_kv_heads": 4},
    "medium": {"hidden_size": 1024, "num_layers": 28, "num_heads": 16, "num_kv_heads": 4},
    "large": {"hidden_size": 1536, "num_layers": 30, "num_heads": 12, "num_kv_heads": 4},
    "xl": {"hidden_size": 2048, "num_layers": 32, "num_heads": 16, "num_kv_heads": 4},
}


def model_config_from(size: str | None, **overrides) -> ModelConfig:
    """The config of a named size (or the defaults when `size` is None) with `overrides` applied.

    Overrides whose value is None are ignored, so unset command-line flags can be passed through. A
    num_heads override without a num_kv_heads one means standard attention (num_kv_heads = num_heads), as
    the guide has it ("omit --num_kv_heads for standard training"); the named sizes' own heads keep their
    grouped-query attention.
    """
    if size is not None and size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}: choose from {', '.join(MODEL_SIZES)}")
    fields = dict(MODEL_SIZES[size]) if size is not None else {}
    given = {key: value for key, value in overrides.items() if value is not None}
    if "num_heads" in given and "num_kv_heads" not in given:
        given["num_kv_heads"] = given["num_heads"]
    fields.update(given)
    return ModelConfig(**fields)


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token, for MFU.

    PaLM (Chowdhery et al. 2022), appendix B: 6 * N + 12 * L * H * Q * T, where N counts the
    matmul parameters (attention and MLP projections of every layer plus the lm_head; not the
    embedding lookup, not norms), L = num_layers, H * Q = num_heads * head_dim = hidden_size and
    T = seq_len. 6N is 2 FLOPs per multiply-add times 3 for forward + backward; the second term is
    the attention scores (QK^T) and weighted values (AV), counted for the full (non-causal) T x T
    matrix as PaLM does.
    """
    c = config
    attention = c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + c.hidden_size**2
    mlp = 3 * c.hidden_size * c.intermediate_size
    matmul_params = c.num_layers * (attention + mlp) + c.hidden_size * c.vocab_size
    return 6.0 * matmul_params + 12.0 * c.num_layers * c.hidden_size * seq_len


def count_target_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Number of positions that contribute to the loss of `LLMModel.forward(x, labels)`, i.e. labels
    after the next-token shift that are not IGNORE_INDEX. A 0-d int64 tensor (no host sync)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim: Llama's (non-interleaved) layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, n_heads, head_dim) by positions' angles cos, sin (T, head_dim), in fp32, with
    autograd's ops, as Llama writes it: the reference that the model's two implementations match
    (_RotaryQKV where the hand-written CPU functions run, _Rotary everywhere else)."""
    x32 = x.float()
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, head_dim): broadcast over heads
    return (x32 * cos + rotate_half(x32) * sin).type_as(x)


def _roll_rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + roll(x, head_dim / 2) * signed_sin in fp32, cast back to x's dtype. With signed_sin the
    sine table with its first half negated, roll(x) * signed_sin is rotate_half(x) * sin value for value
    (a negation is exact), but as one index shift that compiled code fuses into the multiply, where
    rotate_half's `cat` becomes a buffer of its own in the backward."""
    x32 = x.float()
    return (x32 * cos + torch.roll(x32, x.shape[-1] // 2, -1) * signed_sin).type_as(x)


class _Rotary(torch.autograd.Function):
    """The fused projection's output qkv (B, T, n_q + 2 n_kv, head_dim) -> q and k rotated, and v, on the
    plain-operator path: GPUs, compiled code, and eager CPU code that the hand-written functions below do
    not serve (16-bit weights, fp16 autocast). cos and signed_sin are (T, 1, head_dim); the rotation is
    computed in fp32.

    The forward is apply_rotary's arithmetic. The backward is the inverse rotation, g * cos - roll(g) *
    signed_sin (the tables repeat their halves), applied to q's and k's gradients separately and
    concatenated with v's into the gradient of qkv. Autograd's own backward of apply_rotary concatenates
    q's and k's gradients first and materialises rotate_half's fp32 intermediate: inductor made two
    kernels of it where this is one. Small model, micro-batch 32, on an H100: the rotary embedding's
    forward and backward took 0.153 ms per layer and micro-batch instead of 0.218, the step's elementwise
    kernels 51.1 ms instead of 53.1, and tokens/s rose 1.1% (jobs/gpu_check.sh with BASE and MICRO=32)."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, n_q: int, n_kv: int):
        qk, v = qkv.split((n_q + n_kv, n_kv), dim=2)
        q, k = _roll_rotate(qk, cos, signed_sin).split((n_q, n_kv), dim=2)  # one set of ops for q and k heads
        ctx.save_for_backward(cos, signed_sin)
        return q, k, v

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor):
        cos, signed_sin = ctx.saved_tensors
        inverse = -signed_sin  # rotating back: the same shift with the sine's sign flipped
        grad = torch.cat((_roll_rotate(grad_q, cos, inverse), _roll_rotate(grad_k, cos, inverse), grad_v), dim=2)
        return grad, None, None, None, None


# ----------------------------------------------------------------------------- hand-written backward passes
# Autograd's backward of RMSNorm, of the rotary embedding and of silu(gate) * up reads and writes the
# activations several times more than it must (RMSNorm's is decomposed into pow/mean/mul; rotate_half's
# `cat`, the split of the fused projections' outputs into q, k, v and into gate, up each cost a
# concatenation in the backward). Memory passes are what these ops cost on a CPU, so there raylm runs
# them as the functions below. Each does its forward and its backward in one pass with raylm's fused C++
# kernels (raylm/cpu_kernels.py, compiled on first use), or, where those cannot be built, with as few
# separate PyTorch ops as it can. Small-ish model (hidden 512, 8 layers), 2 cores, torch.profiler with
# shapes recorded, per training step: 147 ms in those PyTorch-op versions, 71 ms in the fused kernels (54
# ms in jobs/bench_vs_hf.py's lighter profile). Neither backward has a second derivative. Compiled code
# keeps the plain ops, which inductor fuses itself (the rotary embedding as _Rotary, above), and so do
# GPUs and fp16. Under bf16 CPU autocast the fused kernels run too (fused_under_autocast;
# no PyTorch-op versions there). Same values; RMSNorm saves 4 bytes per hidden unit less for the
# backward, and the fused SwiGLU 4 bytes per intermediate unit less (raylm/plan.py counts both).


def hand_written_backward(x: torch.Tensor) -> bool:
    """Whether x's ops run as the functions below: fp32 in eager mode on CPU, without autocast, with the
    fused kernels or their PyTorch-op versions. (Under bf16 autocast only the fused kernels do:
    fused_under_autocast. The PyTorch-op versions hold more temporaries than autograd's in 16 bits, which
    the memory planner would have to model.)"""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling())


def fused_under_autocast(x: torch.Tensor) -> bool:
    """Whether x's ops run as raylm's fused kernels under bf16 CPU autocast (`--mixed_precision bf16` on a
    CPU): there the kernels take the fp32 residual stream (RMSNorm) and the bf16 outputs of the matrix
    products (SwiGLU, the rotary embedding), compute in fp32 and round once, where PyTorch's operators
    round after each. Only where the kernels are loaded (no PyTorch-op versions in 16 bits)."""
    return (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and not torch.compiler.is_compiling()
            and fused_cpu_ops() is not None)


def _no_second_derivative() -> None:
    """The backward passes below are not differentiable themselves (C++ kernels, or out= operators): say
    so where a second derivative is asked for (backward with create_graph=True), instead of failing on an
    out= operator or returning a wrong one."""
    if torch.is_grad_enabled():
        raise RuntimeError("raylm's hand-written CPU backward passes (RMSNorm, SwiGLU, rotary embedding) have no "
                           "second derivative: differentiate twice with the plain operators, which a compiled "
                           "model or a GPU runs")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """(x1, x2) -> (x1 cos - sign x2 sin, x2 cos + sign x1 sin) on the halves of the last dim, into
    `out` or a new contiguous tensor: the rotary rotation (sign 1) or its inverse, which is its
    backward (-1)."""
    x1, x2 = x.chunk(2, dim=-1)
    if out is None:
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)
    o1, o2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin, value=sign)
    return out


class _RotaryQKV(torch.autograd.Function):
    """The fused projection's output qkv (B, T, n_q + 2 n_kv, head_dim) -> q and k rotated (two views of
    one new tensor) and v (a view of qkv), with cos, sin (T, 1, head_dim / 2). The backward writes the
    three gradients straight into one tensor shaped like qkv, where autograd would concatenate twice
    (q's with k's, then those with v's)."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q: int, n_kv: int):
        ctx.save_for_backward(cos, sin)
        ctx.n_q, ctx.n_kv = n_q, n_kv
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not as zeros to rotate
        fits = cos.dtype == torch.float32 and qkv.dtype in (torch.float32, torch.bfloat16)
        ops = ctx.ops = fused_cpu_ops() if fits else None  # the backward follows the forward
        if ops is not None:
            qk = ops.rotary_qk_forward(qkv, cos, sin, n_q + n_kv)
        else:
            qk = _rotate(qkv[:, :, :n_q + n_kv], cos, sin, 1.0).to(qkv.dtype)
        q, k = qk.split((n_q, n_kv), dim=2)
        return q, k, qkv[:, :, n_q + n_kv:]

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor | None, grad_k: torch.Tensor | None, grad_v: torch.Tensor | None):
        _no_second_derivative()
        cos, sin = ctx.saved_tensors
        n_q, n_kv = ctx.n_q, ctx.n_kv
        like = next(g for g in (grad_q, grad_k, grad_v) if g is not None)
        B, T, _, head_dim = like.shape
        if ctx.ops is not None:
            grad = ctx.ops.rotary_qkv_backward(grad_q, grad_k, grad_v, cos, sin, B, T, n_q, n_kv, head_dim)
            return grad, None, None, None, None
        cos, sin = cos.to(like.dtype), sin.to(like.dtype)
        grad = torch.empty(B, T, n_q + 2 * n_kv, head_dim, dtype=like.dtype, device=like.device)
        into_q, into_k, into_v = grad.split((n_q, n_kv, n_kv), dim=2)
        for g, into in ((grad_q, into_q), (grad_k, into_k)):
            _rotate(g, cos, sin, -1.0, out=into) if g is not None else into.zero_()
        into_v.copy_(grad_v) if grad_v is not None else into_v.zero_()
        return grad, None, None, None, None


class _RMSNorm(torch.autograd.Function):
    """weight * (x / rms(x)) of an fp32 x (hand_written_backward sends only those here)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        ops = ctx.ops = fused_cpu_ops() if weight.dtype == x.dtype else None
        if ops is not None:  # one pass; the backward recomputes normed from x (kept alive by the residual)
            out, rstd = ops.rms_norm_forward(x, weight, eps)
            ctx.save_for_backward(x, weight, rstd)
            return out
        # one pass for the sum of squares (a norm reads x once; x * x then sum would write and read a copy)
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        normed = x * rstd
        ctx.save_for_backward(normed, weight, rstd)
        return weight * normed

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        _no_second_derivative()
        if ctx.ops is not None:
            x, weight, rstd = ctx.saved_tensors
            grad_x, grad_weight = ctx.ops.rms_norm_backward(grad, x, weight, rstd, ctx.needs_input_grad[1])
            return grad_x, grad_weight if ctx.needs_input_grad[1] else None, None
        normed, weight, rstd = ctx.saved_tensors
        hidden = normed.shape[-1]
        # d/dx of weight * x * rstd(x): rstd * (g w - normed * mean(g w normed)), and the mean's sum is
        # (g * normed) @ w: one product serves both it and the weight's gradient, sum(g * normed)
        product = (grad * normed).reshape(-1, hidden)
        grad_weight = product.sum(dim=0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        dot = (product @ weight.to(product.dtype)).view(rstd.shape).div_(-hidden)
        return torch.addcmul(grad * weight, normed, dot).mul_(rstd), grad_weight, None


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up for h = [gate | up], the fused gate_up projection's output; the backward writes
    the gradients of both halves into one tensor instead of concatenating them."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        ops = ctx.ops = fused_cpu_ops()
        if ops is not None:  # one pass; the backward recomputes silu(gate) instead of keeping it
            ctx.save_for_backward(h)
            return ops.swiglu_forward(h)
        gate, up = h.chunk(2, dim=-1)
        activated = F.silu(gate)
        ctx.save_for_backward(h, activated)
        return activated * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        _no_second_derivative()
        if ctx.ops is not None:
            (h,) = ctx.saved_tensors
            return ctx.ops.swiglu_backward(grad, h)
        h, activated = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device)
        grad_gate, grad_up = grad_h.chunk(2, dim=-1)
        torch.mul(grad, activated, out=grad_up)
        torch.mul(grad, up, out=grad_gate)  # d(loss)/d(silu(gate)), then through silu, in place
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        return grad_h


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row of logits (B, vocab) -> (B,). temperature 0 means greedy (argmax).

    top_k keeps the k most likely tokens; top_p keeps the smallest set of most likely tokens whose
    probability reaches p (nucleus sampling; the most likely token is always kept).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (no mean subtraction, no bias), computed in fp32 like HF Llama."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hand_written_backward(x) or (x.dtype == self.weight.dtype == torch.float32 and fused_under_autocast(x)):
            return _RMSNorm.apply(x, self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).type_as(x)
        return self.weight * normed

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class RotaryEmbedding(nn.Module):
    """cos/sin tables of rotary position embeddings for positions [0, max_seq_len), in fp32.

    Non-persistent buffers: recomputed on construction, never stored in checkpoints. model.to(dtype)
    casts them too, which matches HF Llama (it casts its tables to the activations' dtype).
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim, dtype=torch.float32), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim, dtype=torch.float32), persistent=False)
        # sin with its first half negated: what the blocks multiply by (see _roll_rotate), made once here
        # rather than in every layer of every forward pass (two small kernels each, in eager GPU decoding)
        self.register_buffer("signed_sin", torch.empty(max_seq_len, head_dim, dtype=torch.float32),
                             persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)compute the tables in place, e.g. after `to_empty()` from the meta device."""
        device = self.cos.device
        exponents = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim
        inv_freq = 1.0 / (self.theta**exponents)  # (head_dim / 2,)
        positions = torch.arange(self.max_seq_len, device=device, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq)  # (max_seq_len, head_dim / 2)
        angles = torch.cat((angles, angles), dim=-1)  # (max_seq_len, head_dim): rotate_half layout
        with torch.no_grad():
            self.cos.copy_(angles.cos())
            self.sin.copy_(angles.sin())
            half = self.head_dim // 2
            self.signed_sin.copy_(torch.cat((-self.sin[:, :half], self.sin[:, half:]), dim=-1))

    def forward(self, start_pos: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (seq_len, head_dim) for positions start_pos .. start_pos + seq_len - 1."""
        return self.cos[start_pos : start_pos + seq_len], self.sin[start_pos : start_pos + seq_len]

    def layer_tables(self, start_pos: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed_sin (seq_len, head_dim) for those positions: what TransformerBlock takes."""
        return self.cos[start_pos : start_pos + seq_len], self.signed_sin[start_pos : start_pos + seq_len]


def preferred_attention(device: torch.device, backend: str = "auto"):
    """A context in which scaled_dot_product_attention on this CUDA device tries `backend` first
    ("flash": FlashAttention-2, "cudnn": cuDNN's fused attention) and falls back in PyTorch's
    order where that kernel cannot serve the shapes or dtype. "auto", and any CPU device, keep
    PyTorch's own choice. Compilation records the choice, so enter this before the first step."""
    if device.type != "cuda" or backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    rest = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    order = [first] + [b for b in rest if b != first]
    if "set_priority" in inspect.signature(sdpa_kernel).parameters:
        return sdpa_kernel(order, set_priority=True)
    return sdpa_kernel([first, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])  # torch < 2.6: no order, a subset


class GroupedQueryAttention(nn.Module):
    """Causal self-attention where groups of num_heads / num_kv_heads query heads share one
    key/value head. One fused Linear produces q, k and v."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.dropout = config.dropout
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=False)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        signed_sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        """x (B, T, hidden) at positions start_pos.. -> (B, T, hidden), with the rotary tables cos and
        signed_sin (T, head_dim; RotaryEmbedding.layer_tables). With kv_cache, this step's keys/values are
        written into it at [start_pos, start_pos + T) and all cached ones attended."""
        B, T, _ = x.shape
        qkv = self.qkv_proj(x).view(B, T, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        if hand_written_backward(qkv) or (qkv.dtype == torch.bfloat16 and fused_under_autocast(qkv)):
            half = self.head_dim // 2  # the tables repeat their first half (rotate_half layout): signed_sin's
            # second half is sin's first
            cos, sin = cos[:, None, :half].float(), signed_sin[:, None, half:].float()  # fp32, as apply_rotary
            q, k, v = _RotaryQKV.apply(qkv, cos, sin, self.num_heads, self.num_kv_heads)  # (B, T, n, hd) each
        else:
            q, k, v = _Rotary.apply(qkv, cos[:, None, :], signed_sin[:, None, :], self.num_heads, self.num_kv_heads)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, n, T, hd)

        mask, is_causal = None, True
        if kv_cache is not None:
            k_cache, v_cache = kv_cache  # (B, n_kv, max_cache_len, hd)
            end = start_pos + T
            k_cache[:, :, start_pos:end] = k
            v_cache[:, :, start_pos:end] = v
            k, v = k_cache[:, :, :end], v_cache[:, :, :end]  # (B, n_kv, S, hd), S = start_pos + T
            if T == 1:  # one new token sees every cached position
                is_causal = False
            elif start_pos > 0:  # several new tokens after a prefix: causal, offset by start_pos
                mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start_pos)
                is_causal = False
        # SDPA's enable_gqa shares each k/v head across its query group without copying, but on GPU
        # only the flash (fp16/bf16) and math kernels support it; in fp32 on GPU, repeat k/v per query
        # group so that the memory-efficient kernel stays eligible. The CPU flash kernel takes
        # enable_gqa in every dtype: the same outputs without the repeat's copies and their backward.
        enable_gqa = self.num_kv_heads != self.num_heads and (
            q.dtype in (torch.float16, torch.bfloat16) or q.device.type == "cpu")
        if self.num_kv_heads != self.num_heads and not enable_gqa:
            groups = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(groups, dim=1)  # (B, n_heads, S, hd)
            v = v.repeat_interleave(groups, dim=1)  # (B, n_heads, S, hd)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=enable_gqa,
        )  # (B, n_heads, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up fused into one Linear."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up_proj(x)  # (B, T, 2 x intermediate): gate | up
        if hand_written_backward(h) or (h.dtype == torch.bfloat16 and fused_under_autocast(h)):
            return self.down_proj(_SiluMul.apply(h))
        gate, up = h.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = GroupedQueryAttention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = SwiGLU(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        signed_sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, signed_sin, kv_cache, start_pos))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


# Tokens per chunk of the chunked loss on CPU. Loss head alone, forward and backward of 2,048 tokens (4,096
# at 512 x 8k), 2 cores, freed memory kept: 512 rows against 256 took 84.8 -> 84.2 ms at hidden 256 and 8k
# vocabulary, 157.6 -> 152.9 ms at 512 and 8k, 331.6 -> 318.7 ms at 512 x 8k with 4,096 tokens, 997 -> 951 ms
# at 768 and 32k; larger chunks won at some shapes and lost at others.
LOSS_CHUNK_ROWS = 512
GPU_LOSS_CHUNK_BYTES = 2**29  # on a GPU, chunks of ~512 MB of fp32 logits: a few large kernels, not hundreds of small
GPU_LOSS_CHUNK_MIN_ROWS = 256  # and never fewer rows than this, whatever the vocabulary


def loss_chunk_rows(device: torch.device, vocab_size: int) -> int:
    """Rows (tokens) per chunk of the chunked loss: LOSS_CHUNK_ROWS on CPU; on GPUs as many rows as
    GPU_LOSS_CHUNK_BYTES of fp32 logits hold (4,096 at a 32k vocabulary), a multiple of 256, so that
    kernel launches do not dominate."""
    if device.type == "cpu":
        return LOSS_CHUNK_ROWS
    return max(GPU_LOSS_CHUNK_MIN_ROWS, GPU_LOSS_CHUNK_BYTES // (4 * vocab_size) // 256 * 256)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight.T, targets), never holding all the logits.

    Rows go through in chunks: each chunk's logits (fp32) give its loss and, in the same pass while
    they are still in cache, the gradients for hidden and weight (softmax minus one-hot, times the
    inputs). The backward only scales those. A (B*T, vocab) logits tensor, its fp32 copy and its
    gradient are never made: less memory, and on CPU faster than the plain loss head (2k tokens,
    2 cores: 1.7x at hidden 256 and 8k vocab, 1.1x at 768 and 32k). Targets equal to IGNORE_INDEX
    add nothing.

    Eager code writes the gradients in place, into one tensor each. Compiled code builds them without
    mutating anything it saves for the backward: torch 2.11's torch.compile kept the tensors as they were
    before the in-place writes, so the saved gradients were zeros and a compiled model did not learn
    (torch 2.13 was right). Functional, the chunks' gradients are concatenated (the rows' gradients are held
    twice for a moment) and the weight's are summed out of place (one (vocab, hidden) fp32 temporary per
    chunk)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                with_grad: bool):
        functional = torch.compiler.is_compiling()  # no in-place writes to what the backward gets (see above)
        grad_hidden = torch.empty_like(hidden) if with_grad and not functional else None
        hidden_grads = []  # the chunks' gradients for hidden, when functional
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if with_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        device_type = hidden.device.type
        compute_dtype = hidden.dtype if hidden.dtype != torch.float32 else (
            torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else torch.float32)
        vocab = torch.arange(weight.shape[0], device=weight.device) if functional else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = (h @ weight.t()).float()
            valid = t != IGNORE_INDEX
            safe = torch.where(valid, t, 0)
            if functional:  # no in-place ops and no scatter: inductor fuses the softmax, the one-hot and the cast
                # to the compute dtype into one pass over the logits, and never writes an fp32 (rows, vocab) tensor
                shifted = logits - logits.amax(dim=-1, keepdim=True)
                log_sums = shifted.exp().sum(dim=-1, keepdim=True).log()
                picked = shifted.gather(1, safe[:, None])
                loss = loss + ((log_sums - picked).squeeze(1) * valid).sum()
                if with_grad:  # softmax minus one-hot, rows that add nothing zeroed
                    probs = ((shifted - log_sums).exp() - (vocab == safe[:, None]).to(logits.dtype)) * valid[:, None]
            else:
                # log-softmax by hand, so that the exponentials serve the softmax of the gradient too
                logits.sub_(logits.amax(dim=-1, keepdim=True))  # shifted: exp cannot overflow
                picked = logits.gather(1, safe[:, None]).squeeze(1)
                exps = logits.exp_()  # in place: the logits are not needed any more
                sums = exps.sum(dim=-1)
                loss = loss + ((sums.log() - picked) * valid).sum()
                if with_grad:
                    probs = exps.mul_((valid / sums)[:, None])  # softmax, and rows that add nothing zeroed
                    probs.scatter_add_(1, safe[:, None], -valid[:, None].to(probs.dtype))  # minus one-hot (fp32)
            if with_grad:
                # one cast, to what the products compute in: autocast would cast an fp32 `low` once per product
                low = probs.to(compute_dtype)
                if functional:
                    hidden_grads.append(low @ weight)
                else:
                    grad_hidden[start:start + chunk] = low @ weight
                if compute_dtype == torch.bfloat16:  # the product in bf16 (as autocast does), summed in fp32
                    grad_weight = grad_weight + low.t() @ h if functional else grad_weight.add_(low.t() @ h)
                elif functional:  # out-of-place addmm is on autocast's 16-bit list (in-place addmm_ is not)
                    with torch.autocast(device_type, enabled=False):
                        grad_weight = torch.addmm(grad_weight, probs.t(), h.float())
                else:  # fp32, in place (no (vocab, hidden) temporary per chunk); also for fp16, whose range a
                    # chunk's unscaled sum over thousands of rows could exceed (the loss scale cannot help here)
                    grad_weight.addmm_(probs.t(), h.float())
        if with_grad:
            if functional:
                grad_hidden = torch.cat(hidden_grads).to(hidden.dtype) if hidden_grads else torch.empty_like(hidden)
            ctx.save_for_backward(grad_hidden, grad_weight)  # fp32: scaled before any 16-bit cast
            ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, (grad_weight * grad_loss).to(ctx.weight_dtype), None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          reduction: str = "mean") -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE_INDEX) in fp32, computed in
    row chunks (see _ChunkedLinearCrossEntropy). hidden (N, H), weight (vocab, H), targets (N,)."""
    # Under no_grad the lm_head weight still "requires grad" (a parameter): ask autograd instead
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    chunk = loss_chunk_rows(hidden.device, weight.shape[0])
    total = _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk, with_grad)
    if reduction == "sum":
        return total
    count = (targets != IGNORE_INDEX).sum()
    # as F.cross_entropy: nan when nothing is scored, with zero (not nan) gradients
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


class LLMModel(nn.Module):
    """Llama-style causal language model: embed -> blocks -> RMSNorm -> lm_head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Training memory knob (set from outside, not saved): keep only each block's input in the
        # forward pass and recompute the block's activations in the backward pass.
        self.activation_checkpointing = False
        # Precision knob (set from outside, not saved): the dtype of the residual stream between the blocks.
        # None: the embedding's (fp32 weights give an fp32 stream, also under autocast). torch.bfloat16 under
        # bf16 autocast (`--residual_dtype bf16`): every residual add, norm input and their gradients move half
        # the bytes, as with FSDP's 16-bit weights; the norms still compute in fp32. Applied under autocast only.
        self.residual_dtype: torch.dtype | None = None
        self.init_weights()

    def init_weights(self) -> None:
        """GPT-2 initialisation: every matrix ~ N(0, init_std), the residual output projections
        (attention o_proj, MLP down_proj) scaled by 1/sqrt(2 * num_layers) so the residual stream's
        variance does not grow with depth; norms at 1. Also ties the lm_head to the embedding when
        configured and recomputes the rotary tables, so `to_empty()` from meta + init_weights() works."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (RMSNorm, RotaryEmbedding)):
                module.reset_parameters()
        residual_std = std / math.sqrt(2 * self.config.num_layers)
        for layer in self.layers:
            nn.init.normal_(layer.attn.o_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(layer.mlp.down_proj.weight, mean=0.0, std=residual_std)

    def _hidden_states(self, input_ids: torch.Tensor, kv_cache: KVCache | None, start_pos: int) -> torch.Tensor:
        """input_ids (B, T) -> final normed hidden states (B, T, hidden)."""
        T = input_ids.size(1)
        if start_pos + T > self.config.max_seq_len:
            raise ValueError(
                f"positions up to {start_pos + T} exceed max_seq_len ({self.config.max_seq_len}): "
                "use shorter sequences or a model with a larger max_seq_len"
            )
        cos, signed_sin = self.rotary.layer_tables(start_pos, T)  # (T, head_dim) each, shared by the layers
        x = self.embed_tokens(input_ids)  # (B, T, hidden)
        if self.residual_dtype is not None and torch.is_autocast_enabled(x.device.type):  # fp32 matmuls need fp32
            x = x.to(self.residual_dtype)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled() and kv_cache is None
        for i, layer in enumerate(self.layers):
            if recompute:  # the RNG state is saved and restored, so dropout masks are recomputed identically
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, signed_sin, None, start_pos, use_reentrant=False)
            else:
                x = layer(x, cos, signed_sin, kv_cache[i] if kv_cache is not None else None, start_pos)
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        loss_reduction: str = "mean",
        return_logits: bool = True,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """input_ids (B, T) -> (logits (B, T, vocab), loss or None).

        labels (B, T) are aligned with input_ids (pass labels=input_ids): logits at position t are
        scored against labels[t + 1]. Labels equal to IGNORE_INDEX (-100) add no loss. The loss is
        computed in fp32; "mean" averages over target tokens (nan if there are none), "sum" adds
        them up so the caller can divide by a token count gathered across micro-batches/workers
        (see count_target_tokens). return_logits=False (with labels) returns (None, loss) and
        computes the loss in chunks without ever holding the logits (chunked_cross_entropy): the
        same loss and gradients, less memory, faster on CPU. kv_cache/start_pos are for
        incremental decoding (new_kv_cache).
        """
        hidden = self._hidden_states(input_ids, kv_cache, start_pos)
        if labels is None:
            return self.lm_head(hidden), None  # (B, T, vocab)
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f'loss_reduction must be "mean" or "sum", got {loss_reduction!r}')
        # Shift the labels left instead of slicing the logits, which would copy the (B, T, vocab) tensor.
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)
        if not return_logits:
            return None, chunked_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight, targets.flatten(),
                                               loss_reduction)
        logits = self.lm_head(hidden)  # (B, T, vocab)
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction=loss_reduction
        )
        return logits, loss

    def new_kv_cache(self, batch_size: int, max_seq_len: int | None = None) -> KVCache:
        """Zeroed keys/values for `batch_size` sequences of up to max_seq_len (default the model's)
        tokens, on the model's device and in its dtype."""
        c, weight = self.config, self.embed_tokens.weight
        shape = (batch_size, c.num_kv_heads, max_seq_len or c.max_seq_len, c.head_dim)
        return [
            (torch.zeros(shape, dtype=weight.dtype, device=weight.device),
             torch.zeros(shape, dtype=weight.dtype, device=weight.device))
            for _ in range(c.num_layers)
        ]

    @torch.no_grad()
    def stream_tokens(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token of every sequence, (B,) per step, after the prompts input_ids (B, T).

        Sampling as in sample_next_token. Once a sequence has produced eos_token_id it yields
        eos_token_id; the stream ends when every sequence has, or after max_new_tokens steps.
        All prompts have the same length (no padding). Call model.eval() first to disable dropout.
        """
        B, T = input_ids.shape
        if T + max_new_tokens > self.config.max_seq_len:
            raise ValueError(
                f"prompt length ({T}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len "
                f"({self.config.max_seq_len}): shorten the prompt or ask for fewer tokens"
            )
        kv_cache = self.new_kv_cache(B, T + max_new_tokens) if use_cache else None
        tokens = input_ids  # everything so far; only fed to the model again when not caching
        step_input, start_pos = input_ids, 0
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            hidden = self._hidden_states(step_input if use_cache else tokens, kv_cache, start_pos)
            next_token = sample_next_token(self.lm_head(hidden[:, -1]), temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                next_token = next_token.masked_fill(done, eos_token_id)
                done = done | (next_token == eos_token_id)
            yield next_token
            if eos_token_id is not None and bool(done.all()):
                return
            if use_cache:
                start_pos += step_input.size(1)
                step_input = next_token[:, None]  # (B, 1)
            else:
                tokens = torch.cat((tokens, next_token[:, None]), dim=1)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """The prompts input_ids (B, T) followed by up to max_new_tokens generated tokens,
        (B, T + n) with n <= max_new_tokens (see stream_tokens)."""
        new_tokens = list(self.stream_tokens(
            input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, generator, use_cache
        ))
        return torch.cat([input_ids] + [token[:, None] for token in new_tokens], dim=1)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters, tied weights counted once. exclude_embeddings leaves out the
        vocabulary matrices (input embedding and, when untied, lm_head): blocks + final norm."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.embed_tokens.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total


def configure_optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices (linear weights and the embedding, as in
    nanoGPT: decaying the embedding keeps the tied lm_head bounded), none on 1-D parameters
    (norm gains, biases) where shrinking toward 0 only fights the normalisation."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
