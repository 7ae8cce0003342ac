"""What only a GPU can show: CUDA through Ray Train, bf16/fp16, torch.compile with Triton, flash
attention. Skipped without CUDA; run on a GPU machine with `python -m pytest tests/test_gpu.py`."""
import json
from pathlib import Path

import pytest
import torch

from raylm.config import TrainConfig
from raylm.model import LLMModel, model_config_from

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_attention_runs_on_the_flash_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = model_config_from("small", vocab_size=1024, max_seq_len=512)
    model = LLMModel(cfg).cuda()
    x = torch.randint(0, 1024, (2, 512), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        _, loss = model(x, labels=x)  # raises if flash cannot serve these shapes/dtypes
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("precision,compile_model,residual", [("bf16", True, "fp32"), ("bf16", True, "bf16"),
                                                              ("fp16", False, "fp32")])
def test_ray_train_on_gpu(ray_session, packed_data, tmp_path, precision, compile_model, residual):
    from raylm.train import train

    cfg = TrainConfig(data_dir=str(packed_data), save_dir=str(tmp_path), hidden_size=64, num_layers=2, num_heads=4,
                      batch_size=8, max_steps=12, warmup_steps=2, learning_rate=3e-3, log_interval=2,
                      eval_interval=6, eval_steps=0, save_interval=6, use_gpu=True, mixed_precision=precision,
                      compile_model=compile_model, residual_dtype=residual)
    result = train(cfg)
    summary = json.loads((Path(tmp_path) / "summary.json").read_text())
    assert summary["nonfinite_steps"] == 0 and summary["final_val_loss"] < 4.0
    assert result.final_dir and (Path(result.final_dir) / "model.safetensors").exists()


def test_gpu_logits_match_cpu_and_generation_runs():
    torch.manual_seed(0)
    model = LLMModel(model_config_from("tiny", vocab_size=512, max_seq_len=128)).eval()
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        cpu_logits, _ = model(x)
        model.cuda()
        torch.backends.cuda.matmul.allow_tf32 = False
        gpu_logits, _ = model(x.cuda())
    torch.testing.assert_close(gpu_logits.cpu(), cpu_logits, rtol=1e-3, atol=1e-4)
    out = model.generate(x.cuda(), 20, temperature=0.8, top_k=20, generator=torch.Generator("cuda").manual_seed(0))
    assert out.shape == (2, 36) and int(out.max()) < 512


@pytest.mark.parametrize("backend", ["flash", "cudnn"])
def test_preferred_attention_kernel_serves_grouped_query_attention(backend):
    """--attention_backend: the preferred kernel really runs raylm's GQA shapes (its name is in the
    profile) and gives the loss and gradients of the math kernel, to bf16 rounding."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    from raylm.model import preferred_attention

    torch.manual_seed(0)
    model = LLMModel(model_config_from("small", vocab_size=1024, max_seq_len=512)).cuda()
    x = torch.randint(0, 1024, (2, 512), device="cuda")

    def loss_and_grad():
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x, labels=x)
        loss.backward()
        return loss.item(), model.layers[0].attn.qkv_proj.weight.grad.clone()

    with preferred_attention(torch.device("cuda"), backend), profile(activities=[ProfilerActivity.CUDA]) as prof:
        loss, grad = loss_and_grad()
    with sdpa_kernel(SDPBackend.MATH):
        ref_loss, ref_grad = loss_and_grad()
    kernels = " ".join(e.key.lower() for e in prof.key_averages())
    # cuDNN's attention kernels have "flash" in their names too: flash means flash and no cuDNN
    ran = "cudnn" if "cudnn" in kernels else "flash" if "flash" in kernels else "another kernel"
    assert ran == backend, f"{ran} ran, not {backend}: {kernels[:2000]}"
    assert loss == pytest.approx(ref_loss, rel=1e-2)
    assert float((grad.float() - ref_grad.float()).norm() / ref_grad.float().norm()) < 0.05
