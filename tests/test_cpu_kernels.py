"""raylm's fused fp32 CPU kernels (raylm/csrc/fused_cpu.cpp via raylm/cpu_kernels.py): the same values
as the PyTorch ops they replace, at widths that are and are not multiples of the vector width and on
enough rows to run on several threads; and what happens where they cannot be built."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from raylm.cpu_kernels import _compile_flags, fused_cpu_ops

needs_kernels = pytest.mark.skipif(_compile_flags() is None, reason="built for AVX2 and AVX-512 CPUs only")


@pytest.fixture(scope="module")
def ops():
    loaded = fused_cpu_ops()
    assert loaded is not None, "the fused CPU kernels did not build (see the warning)"
    return loaded


def _close(ours, expected, what):
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


@needs_kernels
@pytest.mark.parametrize("rows,width", [(3, 37), (4096, 83), (5, 1536)])  # tails (8 and 16 lanes); threads; real
def test_swiglu_matches_silu_times_up(ops, rows, width):
    torch.manual_seed(0)
    h = (torch.randn(rows, 2 * width) * 4).requires_grad_()  # large |gate| too: exp at both ends
    gate, up = h.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    _close(ops.swiglu_forward(h.detach()), expected.detach(), "forward")
    grad = torch.randn(rows, width)
    (expected_grad,) = torch.autograd.grad(expected, h, grad)
    _close(ops.swiglu_backward(grad, h.detach()), expected_grad, "backward")


@needs_kernels
@pytest.mark.parametrize("rows,hidden", [(3, 45), (4096, 41), (7, 512)])  # tails for 8 and 16 lanes; threads
@pytest.mark.parametrize("weight_grad", [True, False])
def test_rms_norm_matches_pytorchs(ops, rows, hidden, weight_grad):
    torch.manual_seed(0)
    x = (torch.randn(rows, hidden) * 3).requires_grad_()
    weight = torch.empty(hidden).uniform_(0.5, 1.5).requires_grad_()
    expected = F.rms_norm(x, (hidden,), weight, eps=1e-5)
    out, rstd = ops.rms_norm_forward(x.detach(), weight.detach(), 1e-5)
    _close(out, expected.detach(), "forward")
    _close(rstd, torch.rsqrt(x.detach().pow(2).mean(-1, keepdim=True) + 1e-5), "rstd")
    grad = torch.randn(rows, hidden)
    gx, gw = torch.autograd.grad(expected, (x, weight), grad)
    ours_x, ours_w = ops.rms_norm_backward(grad, x.detach(), weight.detach(), rstd, weight_grad)
    _close(ours_x, gx, "grad x")
    if weight_grad:  # summed over rows per thread, then over threads: a different order, the same sum
        torch.testing.assert_close(ours_w, gw, rtol=1e-4, atol=1e-4)


def _rotate(x, cos, sin):  # Llama's rotate_half convention, written out
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@needs_kernels
@pytest.mark.parametrize("head_dim", [16, 40, 64])  # halves 8 (all tail), 20 (16 + 4), 32
def test_rotary_matches_the_rotation_and_its_inverse(ops, head_dim):
    torch.manual_seed(0)
    B, T, n_q, n_kv = 8, 128, 4, 2  # 1,024 positions: more than one thread's share
    angles = torch.randn(T, head_dim // 2)
    cos, sin = angles.cos(), angles.sin()
    qkv = torch.randn(B, T, n_q + 2 * n_kv, head_dim, requires_grad=True)
    expected = _rotate(qkv[:, :, :n_q + n_kv], cos[:, None], sin[:, None])
    _close(ops.rotary_qk_forward(qkv.detach(), cos, sin, n_q + n_kv), expected.detach(), "forward")
    v = qkv[:, :, n_q + n_kv:]
    q, k = expected.split((n_q, n_kv), dim=2)
    # gradients laid out as SDPA's are, (B, heads, T, D) transposed; some outputs unused (None)
    grads = [torch.randn(B, t.shape[2], T, head_dim).transpose(1, 2) for t in (q, k, v)]
    for used in ((0, 1, 2), (0,), (1, 2), (2,)):
        (want,) = torch.autograd.grad([(q, k, v)[i] for i in used], qkv, [grads[i] for i in used], retain_graph=True)
        given = [grads[i] if i in used else None for i in range(3)]
        ours = ops.rotary_qkv_backward(*given, cos, sin, B, T, n_q, n_kv, head_dim)
        _close(ours, want, f"backward of outputs {used}")


@needs_kernels
@pytest.mark.parametrize("rows,width", [(3, 37), (4096, 83)])
def test_bf16_swiglu_is_the_fp32_maths_rounded_once(ops, rows, width):
    """In bf16 (CPU autocast) the kernels load bf16, compute in fp32 and round the result once: within one
    bf16 rounding of the fp32 result on the same inputs."""
    torch.manual_seed(0)
    h = (torch.randn(rows, 2 * width) * 4).bfloat16()
    grad = torch.randn(rows, width).bfloat16()
    h32 = h.float().requires_grad_()
    gate, up = h32.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    (expected_grad,) = torch.autograd.grad(expected, h32, grad.float())
    out, out_grad = ops.swiglu_forward(h), ops.swiglu_backward(grad, h)
    assert out.dtype == out_grad.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected.detach().bfloat16(), rtol=8e-3, atol=1e-5)
    torch.testing.assert_close(out_grad, expected_grad.bfloat16(), rtol=8e-3, atol=1e-5)


@needs_kernels
def test_bf16_rotary_is_the_fp32_rotation_rounded_once(ops):
    torch.manual_seed(0)
    B, T, n_q, n_kv, head_dim = 8, 128, 4, 2, 40
    angles = torch.randn(T, head_dim // 2)
    cos, sin = angles.cos(), angles.sin()
    qkv = torch.randn(B, T, n_q + 2 * n_kv, head_dim).bfloat16()
    expected = _rotate(qkv[:, :, :n_q + n_kv].float(), cos[:, None], sin[:, None]).bfloat16()
    out = ops.rotary_qk_forward(qkv, cos, sin, n_q + n_kv)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=8e-3, atol=1e-5)
    grads = [torch.randn(B, heads, T, head_dim).bfloat16().transpose(1, 2) for heads in (n_q, n_kv, n_kv)]
    back = ops.rotary_qkv_backward(*grads, cos, sin, B, T, n_q, n_kv, head_dim)
    assert back.dtype == torch.bfloat16
    inverse = _rotate(torch.cat(grads[:2], dim=2).float(), cos[:, None], -sin[:, None]).bfloat16()
    torch.testing.assert_close(back[:, :, :n_q + n_kv], inverse, rtol=8e-3, atol=1e-5)
    assert torch.equal(back[:, :, n_q + n_kv:], grads[2])  # v's gradient copied as it is
    with pytest.raises(RuntimeError, match="differ in dtype"):
        ops.rotary_qkv_backward(grads[0], grads[1].float(), None, cos, sin, B, T, n_q, n_kv, head_dim)


@needs_kernels
def test_bf16_autocast_runs_the_kernels_with_the_values_of_pytorchs_operators(ops, monkeypatch):
    """`--mixed_precision bf16` on CPU: RMSNorm (fp32 residual in), SwiGLU and the rotary embedding (bf16
    in) run as the kernels, and the loss and every gradient agree with PyTorch's operators to bf16's
    precision (the kernels round once where the operators round after each step)."""
    from torch.profiler import profile

    from raylm.model import LLMModel, ModelConfig

    torch.manual_seed(0)
    model = LLMModel(ModelConfig(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                 max_seq_len=64, tie_embeddings=False)).train()
    ids = torch.randint(0, 97, (3, 64), generator=torch.Generator().manual_seed(1))

    def step():
        model.zero_grad()
        with profile() as prof:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _, loss = model(ids, labels=ids)
            loss.backward()
        ran = {e.key for e in prof.key_averages() if e.key.startswith("raylm_cpu::")}
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}, ran

    loss, grads, ran = step()
    assert ran == {f"raylm_cpu::{op}" for op in ("rms_norm_forward", "rms_norm_backward", "swiglu_forward",
                                                  "swiglu_backward", "rotary_qk_forward", "rotary_qkv_backward")}
    monkeypatch.setenv("RAYLM_FUSED_CPU_KERNELS", "0")
    plain_loss, plain_grads, plain_ran = step()
    assert not plain_ran
    torch.testing.assert_close(loss, plain_loss, rtol=1e-2, atol=0)
    for name, grad in grads.items():
        error = (grad - plain_grads[name]).norm() / plain_grads[name].norm()
        assert error < 0.03, (name, error.item())


@needs_kernels
def test_kernels_refuse_other_dtypes_with_a_clear_error(ops):
    with pytest.raises(RuntimeError, match="must be float32 or bfloat16, got Half"):
        ops.swiglu_forward(torch.zeros(2, 8, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="must be float32, got BFloat16"):  # RMSNorm: fp32 only (autocast's input)
        ops.rms_norm_forward(torch.zeros(2, 8, dtype=torch.bfloat16), torch.ones(8), 1e-5)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 3])
def test_rms_norm_weight_gradient_is_the_same_sum_on_any_number_of_threads(ops, threads):
    torch.manual_seed(0)
    x, weight, grad = torch.randn(3000, 45), torch.rand(45) + 0.5, torch.randn(3000, 45)
    _, rstd = ops.rms_norm_forward(x, weight, 1e-5)
    expected = (grad * x * rstd).sum(0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _, grad_weight = ops.rms_norm_backward(grad, x, weight, rstd, True)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(grad_weight, expected, rtol=1e-4, atol=1e-4)


@needs_kernels
def test_kernels_share_pytorchs_openmp_runtime(ops):
    """Linked against the OpenMP library PyTorch loaded: one runtime, one pool of threads."""
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps
                    if os.path.basename(line.split()[-1]).startswith(("libgomp", "libiomp5", "libomp"))}
    assert len(runtimes) == 1, runtimes


@needs_kernels
def test_the_switch_turns_loaded_kernels_off_and_a_second_derivative_is_refused(ops, monkeypatch):
    """RAYLM_FUSED_CPU_KERNELS=0 takes effect even after the kernels have loaded (the profiler shows which
    operators ran); a second derivative through the hand-written passes raises and says why, instead of
    returning zeros."""
    from torch.profiler import profile

    from raylm.model import LLMModel, ModelConfig

    torch.manual_seed(0)
    model = LLMModel(ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                 max_seq_len=16))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))

    def fused_ops_ran() -> bool:
        with profile() as prof:
            model(ids, labels=ids)[1].backward()
        return any(event.key.startswith("raylm_cpu::") for event in prof.key_averages())

    assert fused_ops_ran()
    monkeypatch.setenv("RAYLM_FUSED_CPU_KERNELS", "0")
    assert not fused_ops_ran()
    monkeypatch.delenv("RAYLM_FUSED_CPU_KERNELS")
    for switch in ("1", "0"):  # the fused kernels, and the PyTorch-operator versions (out= operators)
        monkeypatch.setenv("RAYLM_FUSED_CPU_KERNELS", switch)
        _, loss = model(ids, labels=ids)
        with pytest.raises(RuntimeError, match="hand-written CPU backward passes .* have no second derivative"):
            torch.autograd.grad(loss, model.layers[0].mlp.gate_up_proj.weight, create_graph=True)


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


def _folder_for(source, root, monkeypatch):
    """The build folder raylm.cpu_kernels picks for `source` under `root` (computed as a child process will)."""
    import raylm.cpu_kernels as kernels

    with monkeypatch.context() as patch:
        patch.setattr(kernels, "SOURCE", source)
        patch.setenv("TORCH_EXTENSIONS_DIR", str(root))
        return kernels._build_dir(kernels._compile_flags())


_TRY = """
    import warnings
    import raylm.cpu_kernels as kernels
    kernels.SOURCE = kernels.Path({source!r})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        print("OPS", kernels.fused_cpu_ops())
    print("MESSAGE", [str(w.message) for w in caught])
"""


@needs_kernels
def test_processes_building_at_once_all_report_the_compilers_error(tmp_path):
    """Several workers of one machine start together: one compiles while the others wait for it, and each
    reports the compiler's own error (not a missing library from the build that never finished)."""
    broken = tmp_path / "fused_cpu.cpp"
    broken.write_text("#error this compiler cannot build the kernels\n")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "builds")}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(_TRY.format(source=str(broken)))], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    for output in outputs:
        assert "OPS None" in output and "error: #error this compiler cannot build the kernels" in output, output
    assert sum("compiling the fused CPU kernels" in output for output in outputs) == 1  # one compiled


@needs_kernels
def test_a_build_folder_others_can_write_to_is_refused(tmp_path, monkeypatch):
    """A shared TORCH_EXTENSIONS_DIR that other users can write to could hand this process their library."""
    source = tmp_path / "fused_cpu.cpp"
    source.write_text("// never compiled\n")
    folder = _folder_for(source, tmp_path / "shared", monkeypatch)
    folder.mkdir(parents=True)
    folder.chmod(0o777)
    result = _run(_TRY.format(source=str(source)), {"TORCH_EXTENSIONS_DIR": str(tmp_path / "shared")})
    assert "OPS None" in result.stdout and "writable by others" in result.stdout, result.stdout + result.stderr
    assert "compiling" not in result.stdout


@needs_kernels
def test_a_failed_build_warns_once_trains_with_pytorch_ops_and_is_not_retried(tmp_path, monkeypatch):
    """A compiler that rejects the source: a warning that says what to do, training on with the plain
    ops (the same loss), and later processes skip the attempt (its seconds) but still say why."""
    broken = tmp_path / "fused_cpu.cpp"
    broken.write_text("#error this compiler cannot build the kernels\n")
    code = f"""
        import os, warnings, torch
        import raylm.cpu_kernels as kernels
        kernels.SOURCE = kernels.Path({str(broken)!r})
        path_before = os.environ.get("PATH")
        print("EXPECTED", kernels.fused_cpu_kernels_expected())  # the planner's question: never builds
        from raylm.model import LLMModel, ModelConfig
        torch.manual_seed(0)
        model = LLMModel(ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                     max_seq_len=16))
        ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, loss = model(ids, labels=ids)
            loss.backward()
            model(ids, labels=ids)
        print("WARNINGS", len([w for w in caught if "fused CPU kernels" in str(w.message)]))
        print("MESSAGE", [str(w.message) for w in caught][:1])
        print("STATUS", kernels.fused_cpu_kernels_status())
        print("LOSS", round(loss.item(), 6))
        print("PATH KEPT", os.environ.get("PATH") == path_before)  # ninja's folder was on it for the build only
    """
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "builds")}
    folder = _folder_for(broken, tmp_path / "builds", monkeypatch)
    folder.mkdir(parents=True)
    (folder / "lock").write_text("")  # torch's build lock, as a build killed half-way leaves it: no hang
    first = _run(code, env)
    assert first.returncode == 0, first.stderr
    assert "WARNINGS 1" in first.stdout  # once per process, however many calls
    assert "compiling the fused CPU kernels" in first.stdout
    assert "error: #error this compiler cannot build" in first.stdout  # the compiler's own words
    assert f"delete {tmp_path / 'builds'}" in first.stdout  # and what to delete once it is fixed
    assert "A C++ compiler (g++) and ninja" in first.stdout and "RAYLM_FUSED_CPU_KERNELS=0" in first.stdout
    assert "STATUS unavailable" in first.stdout
    assert "EXPECTED True" in first.stdout and "PATH KEPT True" in first.stdout
    assert list((tmp_path / "builds").rglob("FAILED"))

    second = _run(code, env)
    assert second.returncode == 0, second.stderr
    assert "compiling the fused CPU kernels" not in second.stdout  # not tried again
    assert "EXPECTED False" in second.stdout  # the FAILED marker, read without building
    assert "an earlier build failed: RuntimeError: " in second.stdout and "error: #error" in second.stdout
    assert f"delete {tmp_path / 'builds'}" in second.stdout and "to try again" in second.stdout
    assert "WARNINGS 1" in second.stdout

    plain = _run(code.replace("kernels.SOURCE = ", "_ = "), {**env, "RAYLM_FUSED_CPU_KERNELS": "0"})
    assert plain.returncode == 0, plain.stderr
    assert "WARNINGS 0" in plain.stdout and "STATUS off (RAYLM_FUSED_CPU_KERNELS=0)" in plain.stdout

    def loss(result):
        return next(line for line in result.stdout.splitlines() if line.startswith("LOSS"))
    assert loss(first) == loss(plain)  # both ran the same separate PyTorch ops
