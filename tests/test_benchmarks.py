"""Every benchmark in jobs/ runs end to end in --smoke mode and prints its summary (not its timings).

The scripts run as subprocesses with this interpreter, all started at once: each one spends most
of its time waiting on its own local Ray to start, so together they take about as long as the
slowest one. A script that does not exist (yet) is skipped.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # ~1-2 minutes for all, on 2 cores

JOBS = Path(__file__).resolve().parents[1] / "jobs"
TIMEOUT_S = 600  # per script, on a busy 2-core machine

# script -> lines its summary must print (each a substring of some line of its output)
EXPECTED = {
    "bench_train.py": ["bench_train: CPU", "measured matmul peak:", "local :", "ray   :", "Ray Train / plain process:",
                       "data wait p95"],
    "bench_vs_hf.py": ["bench_vs_hf: CPU", "HF attn_implementation=sdpa", "each model in a process of its own",
                       "raylm/HF paired   best per CPU-s   faults/step", "smoke     eager    fp32 ",
                       "smoke     eager    bf16 ", "bf16 / fp32 tokens/s, smoke eager: raylm ",
                       "target raylm >= 1.1x HF in every fp32 pairing:",
                       "smoke eager fp32, raylm: Profile of 1 step(s): CPU operator self time",
                       "smoke eager bf16, transformers: Profile of 1 step(s)", "  matmul  ",
                       "raylm's RMSNorm, SwiGLU and rotary kernels in eager mode: fused (raylm/csrc/fused_cpu.cpp)",
                       "fused elementwise (raylm's CPU kernels)"],
    "bench_cpu_kernels.py": ["bench_cpu_kernels: CPU", "smoke     eager fp32  on ", "smoke     eager bf16  on ",
                             "kernels when on: fused (raylm/csrc/fused_cpu.cpp)", "on/off: median tokens/s"],
    "bench_prepare.py": ["raylm prepare, bpe vocab 400", "ceiling", "peak PSS MB"],
    "bench_prepare_scaling.py": ["raylm prepare scaling:", "ceiling MB/s", "scaling bpe 1 -> 2 workers:",
                                 "scaling tiktoken 1 -> 2 workers:", "tiktoken / bpe at 2 worker(s):"],
    "bench_tune.py": ["trial-steps", "asha", "fifo", "ASHA / FIFO:"],
    "bench_memory.py": ["bench_memory smoke: CPU", "largest |estimate - measured| / measured:"],
    "bench_loss_head.py": ["bench_loss_head: CPU", "chunks of 512 rows", "eager    full    :", "compiled chunked :",
                           "eager    chunked / full:", "compiled chunked / full:"],
    "bench_attention.py": ["bench_attention: CPU", "PyTorch's own choice for these inputs:", "flash    :",
                           "math     :", "x flash's speed"],
}


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """{script: (exit code, output)} of every present script's --smoke run, run concurrently."""
    logs = tmp_path_factory.mktemp("bench-smoke")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # each script starts (and stops) its own local Ray
    started = {}
    for name in EXPECTED:
        if not (JOBS / name).is_file():
            continue
        log = open(logs / f"{name}.log", "w")
        proc = subprocess.Popen([sys.executable, str(JOBS / name), "--smoke"], stdout=log, stderr=subprocess.STDOUT,
                                cwd=logs, env=env, text=True)
        started[name] = (proc, log)
    results = {}
    for name, (proc, log) in started.items():
        try:
            code = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        log.close()
        results[name] = (code, (logs / f"{name}.log").read_text(errors="replace"))
    return results


@pytest.mark.parametrize("script", list(EXPECTED))
def test_benchmark_runs_in_smoke_mode_and_prints_its_summary(script, smoke_runs):
    if not (JOBS / script).is_file():
        pytest.skip(f"jobs/{script} does not exist yet")
    code, output = smoke_runs[script]
    assert code == 0, f"jobs/{script} --smoke exited with {code}:\n{output[-4000:]}"
    missing = [line for line in EXPECTED[script] if line not in output]
    assert not missing, f"jobs/{script} --smoke did not print {missing}:\n{output[-4000:]}"


def test_bench_vs_hf_trains_the_same_model_in_both_processes(smoke_runs):
    """raylm and transformers train in processes of their own, from the same weights and batches: their first
    losses (printed at the end of the smoke row) must agree, or the two are not the same model."""
    code, output = smoke_runs["bench_vs_hf.py"]
    assert code == 0, output[-4000:]
    row = next(line for line in output.splitlines() if line.startswith("smoke     eager    fp32"))
    ours, theirs = (float(x) for x in row.rsplit(None, 3)[1::2])
    assert ours == pytest.approx(theirs, abs=1e-4), row


def test_bench_vs_hf_says_when_a_worker_process_dies(monkeypatch):
    """A model's worker killed mid-benchmark (the out-of-memory killer, say) gives one clear error, and
    closing it afterwards neither raises nor hangs."""
    import signal

    monkeypatch.syspath_prepend(str(JOBS))  # the spawned worker imports the script's module too
    import bench_vs_hf

    worker = bench_vs_hf._OwnProcess("smoke", "raylm", False, None)
    os.kill(worker.proc.pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match=r"worker process died \(exit code -9"):
        worker("warm", 1)
    worker.close()
    assert not worker.proc.is_alive()


def test_bench_train_sets_inductor_options_and_skips_unknown_ones(monkeypatch, capsys):
    """`--inductor_config KEY=VALUE` (an A/B of inductor's settings on a GPU) sets the options this torch has,
    as Python literals, says which it skipped, and refuses a pair without '='."""
    from torch._inductor import config as inductor_config

    monkeypatch.syspath_prepend(str(JOBS))
    import bench_train

    before = (inductor_config.max_pointwise_cat_inputs, inductor_config.force_pointwise_cat,
              inductor_config.max_autotune_gemm_backends)
    # inductor's own patch() puts them back afterwards (pytest's monkeypatch leaves its config module broken)
    with inductor_config.patch(max_pointwise_cat_inputs=before[0], force_pointwise_cat=before[1],
                               max_autotune_gemm_backends=before[2]):
        applied = bench_train.set_inductor_config(["max_pointwise_cat_inputs=1", "force_pointwise_cat=True",
                                                   "no_such_option=3", "max_autotune_gemm_backends=ATEN"])
        assert applied == {"max_pointwise_cat_inputs": 1, "force_pointwise_cat": True,
                           "max_autotune_gemm_backends": "ATEN"}  # a bare word is a string
        assert inductor_config.max_pointwise_cat_inputs == 1 and inductor_config.force_pointwise_cat is True
        assert "has no inductor option 'no_such_option'; skipped" in capsys.readouterr().out
        with pytest.raises(SystemExit, match="KEY=VALUE"):
            bench_train.set_inductor_config(["max_pointwise_cat_inputs"])
    assert (inductor_config.max_pointwise_cat_inputs, inductor_config.force_pointwise_cat,
            inductor_config.max_autotune_gemm_backends) == before


def test_bench_train_writes_each_runs_figures_before_the_next_run(monkeypatch, tmp_path):
    """A GPU lease can end mid-benchmark: --out holds every finished run's figures (and the residual
    stream's dtype) before the next run starts, so a run cut short by its time limit keeps what it measured."""
    import json

    monkeypatch.syspath_prepend(str(JOBS))
    import bench_train

    out = tmp_path / "results.json"
    started = []

    def fake_run(args, data_dir, launcher, save_dir):
        started.append(launcher)
        if launcher == "ray":  # the stage's time limit strikes here
            assert json.loads(out.read_text())["runs"]["local"]["tokens_per_sec"] == 1234.0
            raise KeyboardInterrupt
        return {"tokens_per_sec_warm": 1234.0, "data_wait_p95_fraction": 0.01, "wall_s": 1.0}

    monkeypatch.setattr(bench_train, "run_once", fake_run)
    with pytest.raises(KeyboardInterrupt):
        bench_train.main(["--smoke", "--launchers", "local,ray", "--residual_dtype", "fp32", "--out", str(out)])
    assert started == ["local", "ray"]
    saved = json.loads(out.read_text())
    assert saved["residual_dtype"] == "fp32" and list(saved["runs"]) == ["local"]
    assert not out.with_name("results.json.tmp").exists()
