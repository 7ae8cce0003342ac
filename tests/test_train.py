"""`raylm train`: the loop on one shared local Ray, tiny models on CPU."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raylm import checkpoint as ckpt
from raylm.config import ConfigError, TrainConfig, build_config
from raylm.metrics import read_jsonl
from raylm.runtime import cpu_count
from raylm.train import SimulatedFailure, TrainingError, lr_at, plan_run, train

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, learning_rate=1e-2, warmup_steps=3,
            log_interval=1, eval_interval=6, eval_steps=0, save_interval=6, batch_size=8)


def cfg_for(data, save_dir, **kw):
    return build_config(TrainConfig, overrides={"data_dir": str(data), "save_dir": str(save_dir), **TINY, **kw})


def losses(save_dir):
    return [r["loss"] for r in read_jsonl(Path(save_dir) / "metrics.jsonl") if r.get("loss") is not None]


def summary(save_dir):
    return json.loads((Path(save_dir) / "summary.json").read_text())


def weights(path):
    return ckpt.load_model_state(path)


def assert_same_weights(a, b, exact=True):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        if exact:
            assert torch.equal(wa[k], wb[k]), k
        else:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- pure parts


def test_lr_schedule_warmup_then_cosine_to_min():
    cfg = build_config(TrainConfig, overrides={"learning_rate": 1.0, "min_lr": 0.1, "warmup_steps": 10,
                                               "max_steps": 110})
    assert lr_at(1, cfg) == pytest.approx(0.1)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 110))


def test_config_errors_say_what_to_change(packed_data, tmp_path):
    with pytest.raises(ConfigError, match="micro_batch_size could be one of"):
        build_config(TrainConfig, overrides={"batch_size": 8, "micro_batch_size": 3})
    with pytest.raises(ConfigError, match="fewer than batch_size"):
        plan_run(cfg_for(packed_data, tmp_path, batch_size=128, micro_batch_size=8))
    with pytest.raises(ConfigError, match="raise --max_seq_len"):
        plan_run(cfg_for(packed_data, tmp_path, max_seq_len=8))
    with pytest.raises(ConfigError, match="run `raylm prepare"):
        plan_run(cfg_for(tmp_path / "nothing", tmp_path))
    with pytest.raises(ConfigError, match="num_kv_heads"):
        plan_run(cfg_for(packed_data, tmp_path, num_kv_heads=3))
    with pytest.raises(ConfigError, match="not to an object-store URI"):  # checkpoints are verified as files
        plan_run(cfg_for(packed_data, "s3://bucket/run"))


# ----------------------------------------------------------------------------- in-process runs


def test_exact_resume_is_bitwise(packed_data, tmp_path):
    straight = tmp_path / "straight"
    train(cfg_for(packed_data, straight, max_steps=12, launcher="local"))
    cut = tmp_path / "cut"
    with pytest.raises(SimulatedFailure):
        train(cfg_for(packed_data, cut, max_steps=12, launcher="local", simulate_failure_at_step=8))
    assert [s for s, _ in ckpt.list_checkpoints(cut)] == [6]
    train(cfg_for(packed_data, cut, max_steps=12, launcher="local", checkpoint=str(cut)))
    assert summary(cut)["start_step"] == 6
    assert losses(cut) == losses(straight)  # identical, not merely close
    assert len(losses(cut)) == 12  # the records of the interrupted attempt past step 6 were replaced
    assert_same_weights(straight / "final", cut / "final")
    # a fresh run into a folder with checkpoints must be explicit about resuming
    with pytest.raises(ConfigError, match="--checkpoint"):
        plan_run(cfg_for(packed_data, cut, max_steps=12))


def test_resume_refuses_other_model_or_data(packed_data, tmp_path):
    from conftest import write_packed_dataset

    run = tmp_path / "run"
    train(cfg_for(packed_data, run, max_steps=6, launcher="local"))
    with pytest.raises(ConfigError, match="hidden_size: checkpoint 32 vs requested 64"):
        plan_run(cfg_for(packed_data, tmp_path / "x", checkpoint=str(run), hidden_size=64, num_heads=4))
    other = write_packed_dataset(tmp_path / "other", seed=5, train_rows=40)
    with pytest.raises(ConfigError, match="different tokenizer"):
        plan_run(cfg_for(other, tmp_path / "y", checkpoint=str(run)))


def test_bf16_autocast_on_cpu_trains(packed_data, tmp_path):
    train(cfg_for(packed_data, tmp_path, max_steps=12, launcher="local", mixed_precision="bf16"))
    ls = losses(tmp_path)
    assert all(math.isfinite(x) for x in ls) and ls[-1] < ls[0] - 0.5


def test_bf16_residual_stream_trains_like_the_fp32_one(packed_data, tmp_path, capsys):
    """--residual_dtype bf16: the banner says so, and the run learns as the fp32-residual run with the
    same seed does (its losses within bf16 rounding, not the same numbers)."""
    train(cfg_for(packed_data, tmp_path / "fp32", max_steps=12, launcher="local", mixed_precision="bf16"))
    assert "Residual stream: fp32" in capsys.readouterr().out
    train(cfg_for(packed_data, tmp_path / "bf16", max_steps=12, launcher="local", mixed_precision="bf16",
                  residual_dtype="bf16"))
    assert "Residual stream: bf16" in capsys.readouterr().out
    ref, ls = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert len(ls) == len(ref) and ls != ref  # another numerics, not a no-op
    assert ls[-1] < ls[0] - 0.5 and all(abs(a - b) < 0.05 * b for a, b in zip(ls, ref)), (ls, ref)
    assert summary(tmp_path / "bf16")["final_val_loss"] == pytest.approx(summary(tmp_path / "fp32")["final_val_loss"],
                                                                         rel=0.02)


def test_bf16_residual_stream_needs_bf16_compute():
    for precision in ("off", "fp16"):
        with pytest.raises(ConfigError, match="residual_dtype bf16 needs --mixed_precision bf16"):
            build_config(TrainConfig, overrides={"mixed_precision": precision, "residual_dtype": "bf16"})
    with pytest.raises(ConfigError, match="residual_dtype .* must be one of fp32, bf16"):
        build_config(TrainConfig, overrides={"mixed_precision": "bf16", "residual_dtype": "fp16"})
    build_config(TrainConfig, overrides={"mixed_precision": "auto", "residual_dtype": "bf16"})  # bf16 where it can


def test_bf16_residual_stream_refused_where_auto_means_fp16(packed_data, tmp_path, monkeypatch):
    """--mixed_precision auto is fp16 on GPUs without bf16: the worker refuses a bf16 stream with the setting to
    change, and a Ray run's failure says that line, not "raise --max_failures"."""
    import raylm.train as train_module

    monkeypatch.setattr(train_module, "resolve_precision", lambda requested, device: "fp16")
    with pytest.raises(ConfigError, match="resolved to fp16 .* leave --residual_dtype at fp32"):
        train(cfg_for(packed_data, tmp_path, max_steps=1, launcher="local", mixed_precision="auto",
                      residual_dtype="bf16"))
    cfg = cfg_for(packed_data, tmp_path, max_failures=2)
    err = RuntimeError("Training failed.\nTraceback (most recent call last):\n  File \"raylm/train.py\"\n"
                       "raylm.config.ConfigError: --residual_dtype bf16 needs bf16 compute, but mixed precision "
                       "resolved to fp16 on cuda:0: leave --residual_dtype at fp32 here\n")
    said = train_module._explain_failure(err, cfg)
    assert said.startswith("--residual_dtype bf16 needs bf16 compute") and "max_failures" not in said


def test_fp32_cpu_banner_names_its_kernels_and_suggests_bf16_on_amx(packed_data, tmp_path, capsys, monkeypatch):
    """On a CPU with Intel AMX, bf16 trains several times faster than fp32: an fp32 run's banner says so."""
    import raylm.runtime as runtime

    tip = "Tip: this CPU multiplies bf16 matrices in hardware (Intel AMX): --mixed_precision bf16 trained"
    monkeypatch.setattr(runtime, "cpu_has_bf16_matmul_units", lambda: True)
    train(cfg_for(packed_data, tmp_path / "fp32", max_steps=2, launcher="local"))
    out = capsys.readouterr().out
    assert tip in out
    assert "Norm, SwiGLU and rotary kernels: fused (raylm/csrc/fused_cpu.cpp)" in out  # fp32 eager: raylm's own
    train(cfg_for(packed_data, tmp_path / "bf16", max_steps=2, launcher="local", mixed_precision="bf16"))
    out = capsys.readouterr().out
    assert "Tip:" not in out and "Norm, SwiGLU and rotary kernels: fused" in out  # bf16 autocast runs them too
    monkeypatch.setenv("RAYLM_FUSED_CPU_KERNELS", "0")
    train(cfg_for(packed_data, tmp_path / "off", max_steps=2, launcher="local"))
    assert "rotary kernels: separate PyTorch ops (RAYLM_FUSED_CPU_KERNELS=0)" in capsys.readouterr().out
    monkeypatch.delenv("RAYLM_FUSED_CPU_KERNELS")
    monkeypatch.setattr(runtime, "cpu_has_bf16_matmul_units", lambda: False)
    train(cfg_for(packed_data, tmp_path / "plain", max_steps=2, launcher="local"))
    assert "Tip:" not in capsys.readouterr().out


def test_bf16_matrix_units_are_read_from_the_cpu_flags(tmp_path):
    from raylm.runtime import cpu_has_bf16_matmul_units

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile amx_int8\n")
    assert cpu_has_bf16_matmul_units(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n")  # bf16 dot products, no AMX
    assert not cpu_has_bf16_matmul_units(str(info))
    assert not cpu_has_bf16_matmul_units(str(tmp_path / "missing"))  # no /proc (macOS, Windows)


@pytest.mark.slow
def test_compile_on_cpu_trains_and_matches_eager(packed_data, tmp_path, capsys):
    """--compile_model (and --compile_mode tune-kernels, whose search only changes GPU kernels) trains
    the same run as eager mode."""
    train(cfg_for(packed_data, tmp_path / "eager", max_steps=4, launcher="local", save_interval=0))
    train(cfg_for(packed_data, tmp_path / "compiled", max_steps=4, launcher="local", save_interval=0,
                  compile_model=True))
    train(cfg_for(packed_data, tmp_path / "tuned", max_steps=4, launcher="local", save_interval=0,
                  compile_model=True, compile_mode="tune-kernels"))
    assert "Compile: True (tune-kernels)" in capsys.readouterr().out
    for a, b, c in zip(losses(tmp_path / "eager"), losses(tmp_path / "compiled"), losses(tmp_path / "tuned")):
        assert a == pytest.approx(b, rel=1e-4) and a == pytest.approx(c, rel=1e-4)


def test_compile_mode_needs_a_compiled_model_and_maps_to_torch_compile(packed_data, tmp_path):
    from raylm.train import compile_options

    with pytest.raises(ConfigError, match="compile_mode max-autotune applies to a compiled model: add --compile_model"):
        cfg_for(packed_data, tmp_path, compile_mode="max-autotune")
    with pytest.raises(ConfigError, match="compile_mode .* must be one of default, tune-kernels, max-autotune"):
        cfg_for(packed_data, tmp_path, compile_model=True, compile_mode="fast")
    assert compile_options("default") == {}
    assert compile_options("tune-kernels") == {"options": {"coordinate_descent_tuning": True}}
    assert compile_options("max-autotune") == {"mode": "max-autotune-no-cudagraphs"}


def test_nonfinite_steps_are_skipped_then_stop(packed_data, tmp_path, monkeypatch):
    from raylm import model as model_mod

    real_forward = model_mod.LLMModel.forward
    calls = {"n": 0}
    poison = {"at": {3, 4}}  # forward calls (one micro-batch per step here) that return NaN

    def forward(self, *args, **kwargs):
        logits, loss = real_forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] in poison["at"]:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(model_mod.LLMModel, "forward", forward)
    train(cfg_for(packed_data, tmp_path / "skip", max_steps=8, launcher="local", micro_batch_size=8))
    s = summary(tmp_path / "skip")
    assert s["nonfinite_steps"] == 2 and math.isfinite(s["final_val_loss"])
    calls["n"], poison["at"] = 0, set(range(3, 100))
    with pytest.raises(FloatingPointError, match="Lower --learning_rate"):
        train(cfg_for(packed_data, tmp_path / "stop", max_steps=12, launcher="local", micro_batch_size=8,
                      max_nonfinite_steps=4, save_interval=2))
    # skipped steps leave the weights untouched, and the last good checkpoint is kept
    assert ckpt.newest_complete(tmp_path / "stop").name == "checkpoint_step_4"
    assert_same_weights(tmp_path / "stop" / "checkpoint_step_2", tmp_path / "stop" / "checkpoint_step_4")


def test_retention_keeps_newest(packed_data, tmp_path):
    train(cfg_for(packed_data, tmp_path, max_steps=10, launcher="local", save_interval=2, keep_checkpoints=2))
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [10, 8]
    assert (tmp_path / "final" / "manifest.json").exists() and (tmp_path / "loss_curve.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- on Ray


@pytest.mark.ray
def test_two_workers_match_one_worker_with_accumulation(ray_session, packed_data, tmp_path):
    two = tmp_path / "two"
    train(cfg_for(packed_data, two, max_steps=12, num_workers=2, micro_batch_size=4))
    one = tmp_path / "one"
    train(cfg_for(packed_data, one, max_steps=12, launcher="local", micro_batch_size=4))  # 2 accumulation steps
    s = summary(two)
    assert s["world_size"] == 2 and s["ranks_identical"]
    l2, l1 = losses(two), losses(one)
    assert l2[-1] < l2[0] - 0.5  # loss falls
    assert l2 == pytest.approx(l1, rel=1e-4)
    assert_same_weights(two / "final", one / "final", exact=False)


@pytest.mark.ray
def test_worker_death_restarts_from_checkpoint(ray_session, packed_data, tmp_path):
    straight = tmp_path / "straight"
    train(cfg_for(packed_data, straight, max_steps=12, num_workers=2, micro_batch_size=4))
    failing = tmp_path / "failing"
    train(cfg_for(packed_data, failing, max_steps=12, num_workers=2, micro_batch_size=4, max_failures=1,
                  simulate_failure_at_step=9))
    assert summary(failing)["start_step"] == 6  # the first step after the restart is 7
    assert losses(failing) == losses(straight)
    assert_same_weights(straight / "final", failing / "final")


@pytest.mark.ray
def test_failures_beyond_max_failures_exit_cleanly(ray_session, packed_data, tmp_path):
    with pytest.raises(TrainingError, match="raise --max_failures") as err:
        train(cfg_for(packed_data, tmp_path, max_steps=12, num_workers=2, micro_batch_size=4, max_failures=0,
                      simulate_failure_at_step=9))
    assert "checkpoint_step_6" in str(err.value)  # says what is kept and how to resume


@pytest.mark.ray
def test_relative_paths_mean_the_users_folder_on_ray_workers(ray_session, packed_data, tmp_path, monkeypatch):
    """The guide's commands pass ./processed_data and ./checkpoints; Ray Train runs its workers in folders of
    their own, so the paths are made absolute against the folder the command ran in."""
    from raylm.train import absolute_paths

    shutil.copytree(packed_data, tmp_path / "processed_data")
    monkeypatch.chdir(tmp_path)
    train(cfg_for("./processed_data", "./checkpoints", max_steps=2, save_interval=2))
    assert (tmp_path / "checkpoints" / "final").is_dir() and summary(tmp_path / "checkpoints")["final_step"] == 2
    # --cpus_per_worker unset: the one worker gets the cluster's cores (the test Ray's 4 logical CPUs, but no
    # more threads than this machine has cores), not one core of them
    assert summary(tmp_path / "checkpoints")["cpu_threads"] == min(4, cpu_count())
    resolved = absolute_paths(cfg_for("data", "run", checkpoint="run/final", init_from="~/model"))
    assert (resolved.data_dir, resolved.save_dir, resolved.checkpoint, resolved.init_from) == (
        str(tmp_path / "data"), str(tmp_path / "run"), str(tmp_path / "run" / "final"),
        str(Path.home() / "model"))
    remote = absolute_paths(cfg_for("s3://bucket/data", "gs://bucket/run"))
    assert (remote.data_dir, remote.save_dir) == ("s3://bucket/data", "gs://bucket/run")


def test_unset_cpus_per_worker_gives_each_worker_what_the_cluster_can_place():
    """CPU workers share the nodes' cores in whole workers per node; GPU workers get their node's cores per GPU,
    at most 8; a one-node cluster counts no more cores than the machine has."""
    from raylm.runtime import cores_per_worker

    assert cores_per_worker([{"CPU": 8.0}], 1, False, local_cores=8) == 8
    assert cores_per_worker([{"CPU": 8.0}], 2, False, local_cores=8) == 4
    assert cores_per_worker([{"CPU": 8.0}], 3, False, local_cores=8) == 2
    assert cores_per_worker([{"CPU": 4.0}], 1, False, local_cores=2) == 2  # a local Ray told of 4 CPUs on 2 cores
    assert cores_per_worker([{"CPU": 16.0}, {"CPU": 4.0}], 2, False, local_cores=2) == 8  # both on the big node
    assert cores_per_worker([{"CPU": 16.0}, {"CPU": 4.0}], 5, False, local_cores=2) == 4
    assert cores_per_worker([{"CPU": 0.0}], 1, False, local_cores=8) == 1  # nothing to place on yet
    assert cores_per_worker([{"CPU": 96.0, "GPU": 8.0}], 8, True, local_cores=96) == 8
    assert cores_per_worker([{"CPU": 16.0, "GPU": 8.0}, {"CPU": 8.0}], 8, True, local_cores=16) == 2
    assert cores_per_worker([{"CPU": 8.0}], 1, True, local_cores=8) == 1  # no GPU node (yet)
    assert cores_per_worker([{"CPU": 64.0}], 1, False, local_cores=None) == 64  # through ray://: not this machine
    # beside another run on a shared cluster: what is free, shared (or one each, to wait for, when nothing is)
    assert cores_per_worker([{"CPU": 16.0}], 2, False, local_cores=16, free=6) == 3
    assert cores_per_worker([{"CPU": 16.0}], 2, False, local_cores=16, free=1) == 8
    assert cores_per_worker([{"CPU": 96.0, "GPU": 8.0}], 2, True, local_cores=96, free=4) == 2


@pytest.mark.ray
def test_checkpoint_of_an_older_step_is_where_a_ray_run_starts(ray_session, packed_data, tmp_path):
    """Ray hands a new run the latest checkpoint of the earlier run in the same save_dir; --checkpoint of an
    older step (going back before a divergence) must still be where the run starts."""
    run = tmp_path / "run"
    train(cfg_for(packed_data, run, max_steps=4, save_interval=2, eval_interval=2))
    train(cfg_for(packed_data, run, max_steps=6, save_interval=2, eval_interval=2,
                  checkpoint=str(run / "checkpoint_step_2")))
    assert summary(run)["start_step"] == 2 and summary(run)["final_step"] == 6


@pytest.mark.ray
def test_resume_on_a_different_number_of_workers(ray_session, packed_data, tmp_path):
    one = tmp_path / "one"
    train(cfg_for(packed_data, one, max_steps=6, launcher="local", micro_batch_size=4))
    train(cfg_for(packed_data, one, max_steps=12, num_workers=2, micro_batch_size=4, checkpoint=str(one)))
    s = summary(one)
    assert s["start_step"] == 6 and s["world_size"] == 2 and s["final_step"] == 12


def test_loss_chunking_on_and_off_train_alike(packed_data, tmp_path):
    """--loss_chunking: the chunked loss head and the full-logits one give the same run, to rounding."""
    for setting in ("on", "off"):
        train(cfg_for(packed_data, tmp_path / setting, max_steps=6, launcher="local", eval_interval=3,
                      loss_chunking=setting))
    assert losses(tmp_path / "on") == pytest.approx(losses(tmp_path / "off"), rel=1e-4)
    assert summary(tmp_path / "on")["final_val_loss"] == pytest.approx(summary(tmp_path / "off")["final_val_loss"],
                                                                      rel=1e-4)
    with pytest.raises(ConfigError, match="loss_chunking"):
        cfg_for(packed_data, tmp_path / "bad", loss_chunking="sometimes")
    from raylm.train import chunked_loss_head

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [chunked_loss_head(d, s) for d in (cpu, cuda) for s in ("auto", "on", "off")] == [
        True, True, False, True, True, False]


_CHURN = """
import resource, sys, torch
from raylm.runtime import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():  # a step's activations: 64 MiB, every page written, then freed
    t = torch.ones(16 << 20); del t
for _ in range(12):  # glibc's aligned allocations take a few steps to find a freed block that fits
    step()
before = faults()
for _ in range(8):
    step()
print(kept, (faults() - before) / 8 / (64 << 20 >> 12))  # faults per page of each allocation
"""


def _huge_pages_always() -> bool:
    """Transparent huge pages on for every mapping: a fresh 64 MiB block then faults in 2 MiB at a time."""
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.skipif(_huge_pages_always(), reason="transparent huge pages 'always': faults are not counted per 4 KiB")
def test_keep_freed_memory_stops_a_step_from_page_faulting_its_memory_back(tmp_path):
    """CPU training calls keep_freed_memory(): memory a step frees is reused by the next without the
    kernel mapping (and zeroing) it again. Without it, glibc unmaps a 64 MiB block on free, and every
    allocation faults in all of its pages."""
    def fault_share(mode: str) -> tuple[str, float]:
        out = subprocess.run([sys.executable, "-c", _CHURN, mode], capture_output=True, text=True, check=True)
        kept, share = out.stdout.split()
        return kept, float(share)

    assert fault_share("default") == ("None", pytest.approx(1.0, abs=0.05))  # each allocation: every page
    kept, share = fault_share("keep")
    assert kept == "True" and share < 0.2  # at most one step in eight faulting its block in


def test_cpu_training_keeps_the_memory_its_steps_free(packed_data, tmp_path, monkeypatch):
    """The setting above is what a CPU run asks for, before its first step."""
    import raylm.runtime

    calls = []
    monkeypatch.setattr(raylm.runtime, "keep_freed_memory", lambda: calls.append("kept") or True)
    train(cfg_for(packed_data, tmp_path, max_steps=1, launcher="local", save_interval=0))
    assert calls == ["kept"]


def test_profile_steps_writes_where_the_time_went_and_keeps_it_out_of_throughput(packed_data, tmp_path):
    """--profile_steps N: the last N steps run under torch.profiler (never the warm-up ones); the
    table lands in save_dir/profile, and the profiled log window is not counted as throughput."""
    train(cfg_for(packed_data, tmp_path, max_steps=8, log_interval=2, launcher="local", profile_steps=2))
    table = (tmp_path / "profile" / "kernels.txt").read_text()
    assert table.startswith("Profile of 2 step(s): CPU operator self time")
    assert "matmul" in table and "aten::mm" in table and "slowest operators:" in table
    assert "fused elementwise (raylm's CPU kernels)" in table and "raylm_cpu::swiglu_backward" in table
    assert (tmp_path / "profile" / "trace.json").stat().st_size > 0
    # warm, unprofiled windows: steps 3-4 and 5-6 (the same tokens each); 7-8 are profiled, left out
    windows = {r["step"]: r["tokens_per_sec"] for r in read_jsonl(tmp_path / "metrics.jsonl")
               if r.get("tokens_per_sec")}
    harmonic = 2 / (1 / windows[4] + 1 / windows[6])
    assert summary(tmp_path)["tokens_per_sec_warm"] == pytest.approx(harmonic, rel=1e-6)
    with pytest.raises(ConfigError, match="profile_steps"):
        cfg_for(packed_data, tmp_path / "bad", profile_steps=-1)


def test_profile_window_skips_warm_up_and_fits_the_run():
    from raylm.profiling import category, profile_window

    assert profile_window(0, 100, 5, warm_steps=10) == (96, 100)  # the last five steps
    assert profile_window(0, 12, 5, warm_steps=10) == (11, 12)  # never inside the warm-up
    assert profile_window(0, 10, 5, warm_steps=10) is None  # nothing but warm-up: no profile
    assert profile_window(50, 60, 3, warm_steps=2) == (58, 60)  # resumed runs count from their start
    assert profile_window(0, 100, 0, warm_steps=2) is None
    assert category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n") == "matmul"
    assert category("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTT") == "matmul"
    assert category("flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>") == "attention"
    assert category("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16") == "attention"
    assert category("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "fused elementwise (inductor/triton)"
    assert category("## Call CompiledFxGraph fgjgscbp26ruww3wjj7vw3f ##") == "fused elementwise (inductor/triton)"
    assert category("raylm_cpu::rms_norm_backward") == "fused elementwise (raylm's CPU kernels)"
    assert category("void at::native::(anonymous)::multi_tensor_apply_kernel<FusedAdamMathFunctor>") == \
        "optimizer and clipping"


def test_attention_backend_sets_the_sdpa_priority_on_gpus_only(packed_data, tmp_path):
    from torch.nn.attention import SDPBackend

    from raylm.model import preferred_attention

    before = torch._C._get_sdp_priority_order()
    with preferred_attention(torch.device("cuda"), "cudnn"):
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.CUDNN_ATTENTION)
    with preferred_attention(torch.device("cuda"), "flash"):
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.FLASH_ATTENTION)
    assert torch._C._get_sdp_priority_order() == before  # restored
    with preferred_attention(torch.device("cpu"), "cudnn"), preferred_attention(torch.device("cuda"), "auto"):
        assert torch._C._get_sdp_priority_order() == before  # CPU and auto: PyTorch's own order
    with pytest.raises(ConfigError, match="attention_backend"):
        cfg_for(packed_data, tmp_path / "bad", attention_backend="fastest")


def test_profile_steps_stop_with_a_failed_run_and_say_when_a_run_is_too_short(packed_data, tmp_path, capsys):
    from raylm.train import SimulatedFailure

    # the run fails inside its profiled steps (5-8): the profiler stops with it, nothing is written
    with pytest.raises(SimulatedFailure):
        train(cfg_for(packed_data, tmp_path / "failed", max_steps=8, launcher="local", profile_steps=4,
                      simulate_failure_at_step=6))
    assert not torch._C._autograd._profiler_enabled()
    assert not (tmp_path / "failed" / "profile").exists()
    # a run made of warm-up steps only has nothing to profile, and says so
    train(cfg_for(packed_data, tmp_path / "short", max_steps=2, launcher="local", profile_steps=2))
    assert "--profile_steps 2: no profile" in capsys.readouterr().out
    assert not (tmp_path / "short" / "profile").exists()


def test_use_gpu_unset_means_gpus_when_there_are_any(packed_data, tmp_path, capsys):
    """The guide's GPU commands have no --use_gpu: unset, raylm trains on the GPUs it finds (this
    machine's for --launcher local, the Ray cluster's otherwise) and says so; given, it is obeyed."""
    from raylm.train import decide_use_gpu

    local = cfg_for(packed_data, tmp_path, launcher="local")
    assert local.use_gpu is None
    assert decide_use_gpu(local, 0).use_gpu is False and capsys.readouterr().out == ""
    assert decide_use_gpu(local, 1).use_gpu is True
    assert "--use_gpu unset and 1 GPU(s) here: training on GPUs (--use_gpu false keeps to CPU)" in capsys.readouterr().out
    on_ray = cfg_for(packed_data, tmp_path, launcher="ray")
    assert decide_use_gpu(on_ray, 4).use_gpu is True and "4 GPU(s) in the Ray cluster" in capsys.readouterr().out
    assert decide_use_gpu(cfg_for(packed_data, tmp_path, use_gpu=False), 4).use_gpu is False
    assert decide_use_gpu(cfg_for(packed_data, tmp_path, use_gpu=True), 0).use_gpu is True  # refused later, with why
    # the guide's "framework automatically splits work": one worker per GPU is asked for, and said so
    from raylm.train import RunPlan, _decide_device

    plan = RunPlan(on_ray, {}, None, None, None, None)
    assert _decide_device(plan, 8).cfg.num_workers == 1
    assert "training on 1 of the 8 GPUs in the Ray cluster (one per worker): --num_workers 8 uses them all" in \
        capsys.readouterr().out
    _decide_device(RunPlan(cfg_for(packed_data, tmp_path, num_workers=8, batch_size=8), {}, None, None, None, None), 8)
    assert "uses them all" not in capsys.readouterr().out
    # on this CPU machine an unset --use_gpu trains on CPU, and the checkpoint records the decision
    train(cfg_for(packed_data, tmp_path / "run", max_steps=2, launcher="local", save_interval=2))
    assert "Device: cpu" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "final" / "state.json").read_text())["train_config"]["use_gpu"] is False


def test_out_of_memory_under_the_local_launcher_names_a_micro_batch_that_may_fit(packed_data, tmp_path,
                                                                                  monkeypatch):
    """A GPU running out of memory in `--launcher local` gets the Ray path's advice, sizes included."""
    import raylm.train as train_module

    def out_of_memory(*_args, **_kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_module, "run_worker", out_of_memory)
    with pytest.raises(TrainingError, match=r"out of memory with micro_batch_size 4: try --micro_batch_size 2 "
                                            r"\(the global --batch_size 8 stays the same.*--activation_checkpointing"):
        train(cfg_for(packed_data, tmp_path, launcher="local", batch_size=8, micro_batch_size=4))
    # at a micro batch of 1 there is nothing to halve; a CPU run's allocator says it in its own words
    from raylm.train import _explain_failure

    cpu = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes")
    advice = _explain_failure(cpu, cfg_for(packed_data, tmp_path, batch_size=8, micro_batch_size=1))
    assert advice.startswith("out of memory (the machine's memory) with micro_batch_size 1: a micro batch of 1 is "
                             "the least") and "--activation_checkpointing" in advice and "raylm plan" in advice
    checkpointed = cfg_for(packed_data, tmp_path, batch_size=8, micro_batch_size=1, activation_checkpointing=True)
    assert "--activation_checkpointing" not in _explain_failure(cpu, checkpointed)
