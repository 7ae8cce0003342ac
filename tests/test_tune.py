"""`raylm tune`: sweeps of tiny models on the shared local Ray (4 CPUs: 2 trials x 1 worker at a time)."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raylm import checkpoint as ckpt
from raylm.cli import main as raylm_main
from raylm.config import ConfigError, TrainConfig, TuneConfig, build_config, dump_yaml
from raylm.metrics import read_jsonl
from raylm.tune import (SuccessiveHalving, build_tune_configs, check_resume_settings, check_sweep,
                        sweep_settings, trial_config, tune)

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, log_interval=1, eval_steps=0, batch_size=8)
# Log-uniform over 1e-5..3e-2 draws some learning rates too small to learn anything in 16 steps (their loss
# stays near ln(64)); ASHA, halving at steps 2, 4 and 8, stops those.
SWEEP = dict(max_steps=16, eval_interval=2, save_interval=8, num_samples=4, lr_min=1e-5, lr_max=3e-2,
             warmup_choices=[0, 2], scheduler="asha", grace_period=2, reduction_factor=2, max_concurrent_trials=2)


def configs(data, save_dir, **kw):
    return build_tune_configs(overrides={"data_dir": str(data), "save_dir": str(save_dir), **TINY, **SWEEP, **kw})


def val_losses(trial_dir):
    return [r["val_loss"] for r in read_jsonl(Path(trial_dir) / "metrics.jsonl") if r.get("val_loss") is not None]


# ----------------------------------------------------------------------------- refused before anything starts


@pytest.mark.parametrize("settings, message", [
    (dict(lr_min=1e-2, lr_max=1e-3), r"lr_min \(0.01\) must be smaller than lr_max \(0.001\)"),
    (dict(lr_min=0), "must be positive"),
    (dict(num_samples=0), r"num_samples \(0\) must be at least 1"),
    (dict(warmup_choices=[10, -1]), "must all be >= 0"),
    (dict(warmup_min=10), "--warmup_min and --warmup_max go together"),
    (dict(reduction_factor=1), "must be greater than 1"),
])
def test_bad_search_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        build_config(TuneConfig, overrides=settings)


@pytest.mark.parametrize("settings, message", [
    (dict(launcher="local"), "drop --launcher local"),
    (dict(save_interval=5), r"save_interval \(5\) must be a multiple of eval_interval \(2\)"),
    (dict(grace_period=16), r"grace_period \(16\) must be smaller than max_steps \(16\)"),
    (dict(eval_interval=0, save_interval=0), "set --eval_interval"),
    (dict(checkpoint="somewhere"), "--resume to continue an interrupted sweep"),
])
def test_sweeps_that_cannot_work_are_refused(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        check_sweep(*configs(tmp_path / "data", tmp_path / "sweep", **settings))


def test_one_yaml_holds_search_and_training_settings(tmp_path):
    path = tmp_path / "sweep.yaml"
    dump_yaml({"num_samples": 3, "lr_max": 0.05, "max_steps": 7, "hidden_size": 48}, path)
    tcfg, cfg = build_tune_configs(path, {"max_steps": 9})
    assert (tcfg.num_samples, tcfg.lr_max, cfg.max_steps, cfg.hidden_size) == (3, 0.05, 9, 48)
    dump_yaml({"lr_maxx": 1}, path)
    with pytest.raises(ConfigError, match="Did you mean"):
        build_tune_configs(path)
    path.write_text("lr_max: [0.05\n")  # malformed: one line with where, not a parser traceback
    with pytest.raises(ConfigError, match=r"is not valid YAML: .*line 1, column"):
        build_tune_configs(path)


def test_resume_keeps_the_saved_use_gpu_when_the_flag_is_left_unset(tmp_path):
    """A sweep started with --use_gpu false (or true) resumes as it began when --resume omits the flag;
    a flag that says otherwise is refused, with the command that continues the sweep as saved."""
    saved = tmp_path / "sweep_config.yaml"
    dump_yaml(sweep_settings(*configs(tmp_path / "data", tmp_path / "sweep", use_gpu=False)), saved)
    tcfg, unset = configs(tmp_path / "data", tmp_path / "sweep")
    assert unset.use_gpu is None
    assert check_resume_settings(tcfg, unset, saved).use_gpu is False
    _, gpu = configs(tmp_path / "data", tmp_path / "sweep", use_gpu=True)
    with pytest.raises(ConfigError, match=rf"use_gpu \(saved False, now True\).*raylm tune --config {saved} --resume"):
        check_resume_settings(tcfg, gpu, saved)
    dump_yaml(sweep_settings(tcfg, unset), saved)  # started with the flag unset: resumes unset (decided on Ray)
    assert check_resume_settings(tcfg, unset, saved).use_gpu is None


def test_resume_takes_the_saved_settings_that_the_command_leaves_out(tmp_path):
    """`raylm tune --save_dir ./sweep --resume` continues the sweep as it was saved: settings not given come
    from sweep_config.yaml (not from the defaults, which a resumed sweep then refused as changed), and one
    given that differs is still refused."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    tcfg, cfg = configs(tmp_path / "data", sweep, num_samples=5, lr_max=0.02, max_steps=40, hidden_size=48)
    dump_yaml(sweep_settings(tcfg, cfg), sweep / "sweep_config.yaml")
    resumed_tcfg, resumed = build_tune_configs(overrides={"save_dir": str(sweep), "resume": True})
    assert (resumed_tcfg.num_samples, resumed_tcfg.lr_max, resumed.max_steps, resumed.hidden_size) == (5, 0.02, 40, 48)
    assert resumed_tcfg.resume and check_resume_settings(resumed_tcfg, resumed, sweep / "sweep_config.yaml")
    changed_tcfg, changed = build_tune_configs(overrides={"save_dir": str(sweep), "resume": True, "num_samples": 8})
    with pytest.raises(ConfigError, match=r"num_samples \(saved 5, now 8\)"):
        check_resume_settings(changed_tcfg, changed, sweep / "sweep_config.yaml")
    fresh_tcfg, _ = build_tune_configs(overrides={"save_dir": str(sweep)})  # without --resume: the defaults
    assert fresh_tcfg.num_samples == TuneConfig().num_samples


def test_resume_accepts_a_sweep_saved_before_a_setting_existed(tmp_path):
    """A sweep_config.yaml from an older raylm lacks the settings added since (e.g. residual_dtype): those ran
    at their defaults, so resuming with the defaults is no change, and another value is still refused."""
    saved = tmp_path / "sweep_config.yaml"
    tcfg, cfg = configs(tmp_path / "data", tmp_path / "sweep")
    older = sweep_settings(tcfg, cfg)
    del older["residual_dtype"], older["attention_backend"]
    dump_yaml(older, saved)
    assert check_resume_settings(tcfg, cfg, saved) == cfg
    _, bf16 = configs(tmp_path / "data", tmp_path / "sweep", mixed_precision="bf16", residual_dtype="bf16")
    with pytest.raises(ConfigError, match=r"residual_dtype \(saved 'fp32', now 'bf16'\)"):
        check_resume_settings(tcfg, bf16, saved)


def test_trial_config_keeps_the_decay_ratio():
    base = build_config(TrainConfig, overrides={"learning_rate": 3e-4, "min_lr": 3e-5, "save_dir": "x"})
    cfg = trial_config(vars(base), 1e-2, 7, "/sweep/trial_a")
    assert (cfg.learning_rate, cfg.warmup_steps, cfg.save_dir) == (1e-2, 7, "/sweep/trial_a")
    assert cfg.min_lr == pytest.approx(1e-3)


# ----------------------------------------------------------------------------- the early-stopping rule


class _Trial:
    def __init__(self, trial_id):
        self.trial_id = trial_id


def _halving(**kw):
    scheduler = SuccessiveHalving(time_attr="step", **({"max_t": 200, "grace_period": 10, "reduction_factor": 3} | kw))
    scheduler.set_search_properties("val_loss", "min")
    return scheduler


def test_halving_rungs_are_geometric_below_max_t():
    assert _halving().rungs == [10, 30, 90]
    assert _halving(grace_period=2, max_t=16, reduction_factor=2).rungs == [2, 4, 8]
    with pytest.raises(ValueError, match="grace_period < max_t"):
        _halving(grace_period=200)


def test_a_trial_that_passed_a_rung_unopposed_is_stopped_once_better_trials_reach_it():
    """The case Ray's ASHAScheduler gets wrong for the first trials: it lets the first arrival at a rung
    through for good. Both schedulers see the same reports; only raylm's stops the poor first trial."""
    from ray.tune.schedulers import ASHAScheduler

    ray_asha = ASHAScheduler(time_attr="step", metric="val_loss", mode="min", max_t=200, grace_period=10,
                             reduction_factor=3, stop_last_trials=False)
    ours = _halving()
    poor, good, better = _Trial("poor"), _Trial("good"), _Trial("better")
    for s in (ray_asha, ours):
        s.on_trial_add(None, poor), s.on_trial_add(None, good), s.on_trial_add(None, better)
    reports = [(poor, 10, 5.0), (good, 10, 2.0), (better, 10, 1.0), (poor, 20, 4.9), (good, 20, 1.9),
               (better, 20, 0.9)]
    ray_actions = [ray_asha.on_trial_result(None, t, {"step": n, "val_loss": v}) for t, n, v in reports]
    our_actions = [ours.on_trial_result(None, t, {"step": n, "val_loss": v}) for t, n, v in reports]
    # Each arrival beats the ones before it, so Ray lets all three through, to train on to step 200.
    assert ray_actions == ["CONTINUE"] * 6
    # Once all three are at rung 10, only the best third goes on.
    assert our_actions == ["CONTINUE"] * 3 + ["STOP", "STOP", "CONTINUE"]
    assert ours.num_stopped == 2


def test_a_trial_is_judged_at_its_highest_rung_only():
    s = _halving()
    a, b, c = _Trial("a"), _Trial("b"), _Trial("c")
    assert s.on_trial_result(None, a, {"step": 10, "val_loss": 3.0}) == "CONTINUE"
    assert s.on_trial_result(None, a, {"step": 30, "val_loss": 1.0}) == "CONTINUE"
    # Two trials better than "a" at rung 10 do not stop it: it is past rung 30, alone there.
    assert s.on_trial_result(None, b, {"step": 10, "val_loss": 2.0}) == "CONTINUE"
    assert s.on_trial_result(None, c, {"step": 10, "val_loss": 0.5}) == "CONTINUE"
    assert s.on_trial_result(None, a, {"step": 40, "val_loss": 0.9}) == "CONTINUE"
    assert s.on_trial_result(None, b, {"step": 20, "val_loss": 1.9}) == "STOP"  # not in the best third of 3
    # "c" reaches rung 30 with a better loss: now "a" is outside the best third there.
    assert s.on_trial_result(None, c, {"step": 30, "val_loss": 0.4}) == "CONTINUE"
    assert s.on_trial_result(None, a, {"step": 50, "val_loss": 0.8}) == "STOP"
    assert s.recorded[30] == {"a": 1.0, "c": 0.4}


def test_reports_without_the_metric_are_ignored_and_a_nonfinite_loss_stops():
    s = _halving()
    t = _Trial("t")
    assert s.on_trial_result(None, t, {"step": 10, "lr": 1e-3}) == "CONTINUE"
    assert s.on_trial_result(None, t, {"step": 10, "val_loss": float("nan")}) == "STOP"
    s.on_trial_complete(None, t, {"step": 10, "val_loss": float("nan")})  # what Tune calls after a STOP
    assert s.recorded[10]["t"] > 1e100  # kept as the worst loss, so the rung's cut stays a number
    assert s.on_trial_result(None, _Trial("v"), {"step": 10, "val_loss": 3.0}) == "CONTINUE"
    u = _Trial("u")
    assert s.on_trial_result(None, u, {"step": 5, "val_loss": 9.0}) == "CONTINUE"  # before the first rung
    assert set(s.recorded[10]) == {"t", "v"}


def test_halving_maximises_when_the_mode_is_max():
    s = SuccessiveHalving(time_attr="step", max_t=100, grace_period=10, reduction_factor=2)
    s.set_search_properties("accuracy", "max")
    assert s.on_trial_result(None, _Trial("low"), {"step": 10, "accuracy": 0.2}) == "CONTINUE"
    assert s.on_trial_result(None, _Trial("high"), {"step": 10, "accuracy": 0.9}) == "CONTINUE"
    assert s.on_trial_result(None, _Trial("low"), {"step": 11, "accuracy": 0.3}) == "STOP"


@pytest.mark.ray
def test_more_concurrent_trials_than_the_cluster_places_are_refused(ray_session, packed_data, tmp_path):
    with pytest.raises(ConfigError, match="enough for 4 at once: use --max_concurrent_trials 4"):
        tune(*configs(packed_data, tmp_path / "sweep", max_concurrent_trials=5))
    with pytest.raises(ConfigError, match="lower --num_workers"):
        tune(*configs(packed_data, tmp_path / "sweep", num_workers=8))
    assert not (tmp_path / "sweep").exists()  # nothing started


# ----------------------------------------------------------------------------- sweeps on Ray


@pytest.mark.ray
def test_asha_sweep_finds_the_best_trial_and_its_config_trains(ray_session, packed_data, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    result = tune(*configs(packed_data, sweep))
    assert result.finished and len(result.trials) == 4
    rows = {row.trial: row for row in result.trials}
    # every trial trained into its own folder under save_dir: metrics, TensorBoard, Tune's CSV
    for name, row in rows.items():
        assert (sweep / name / "tensorboard").is_dir() and (sweep / name / "progress.csv").exists()
        assert row.best_val_loss == min(val_losses(sweep / name))
    stopped = [row for row in result.trials if row.stopped_early]
    assert stopped and all(row.steps < 16 for row in stopped)
    assert all(row.steps == 16 for row in result.trials if not row.stopped_early)
    best = result.trials[0]
    assert best.best_val_loss == min(row.best_val_loss for row in result.trials)
    assert not best.stopped_early and best.best_val_loss < min(row.best_val_loss for row in stopped)
    assert json.loads(Path(result.table_json).read_text())[0]["trial"] == best.trial
    assert Path(result.table_csv).read_text().splitlines()[1].startswith(best.trial)
    assert Path(result.plot).stat().st_size > 10_000
    assert ckpt.verify(result.best_checkpoint) is None and Path(result.best_checkpoint).parent.name == best.trial
    assert f"Best trial: {best.trial}" in capsys.readouterr().out

    written = yaml.safe_load(Path(result.best_config).read_text())
    assert set(written) <= set(TrainConfig.__dataclass_fields__)
    assert (written["learning_rate"], written["warmup_steps"]) == (best.learning_rate, best.warmup_steps)
    assert written["data_dir"] == str(packed_data) and written["save_dir"] == str(sweep / "best")
    # the YAML, unchanged, is a `raylm train --config` file
    assert raylm_main(["train", "--config", result.best_config, "--launcher", "local", "--max_steps", "4"]) == 0
    assert (sweep / "best" / "final").is_dir() and len(val_losses(sweep / "best")) == 2


def test_a_trial_renamed_by_tune_on_resume_is_read_from_the_folder_it_trained_in(tmp_path):
    """A trial that an interrupted sweep started after its last saved state already has its trial_<id> folder
    when the sweep resumes: Tune names its own folder trial_<id>_<suffix>, while run_trial continues the training
    in trial_<id>. The table reads the training's folder (with or without the trial_id Tune reports)."""
    from types import SimpleNamespace

    from raylm.tune import trial_row

    sweep = tmp_path / "sweep"
    trained, renamed = sweep / "trial_fb50b_00003", sweep / "trial_fb50b_00003_e93a"
    trained.mkdir(parents=True)
    renamed.mkdir()
    (trained / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"step": 4, "loss": 3.0, "val_loss": 2.5}, {"step": 8, "loss": 2.0, "val_loss": 2.25})))
    for metrics in ({"done": True, "trial_id": "fb50b_00003"}, {"done": True}):
        result = SimpleNamespace(path=str(renamed), metrics=metrics, error=None,
                                 config={"learning_rate": 1e-3, "warmup_steps": 2})
        row = trial_row(result, max_steps=8)
        assert (row.trial, row.steps, row.best_val_loss, row.status) == ("trial_fb50b_00003", 8, 2.25, "finished")


def finished_trials(sweep_dir: Path) -> set[str]:
    """Trials that Tune's saved experiment state records as finished (empty while it is being written)."""
    done = set()
    for state_file in sweep_dir.glob("experiment_state-*.json"):
        try:
            trials = json.loads(state_file.read_text())["trial_data"]
        except (ValueError, KeyError, OSError):
            continue
        done |= {t["trial_id"] for t in (json.loads(s) for s, _ in trials) if t["status"] == "TERMINATED"}
    return done


@pytest.mark.ray
@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_session, packed_data, tmp_path):
    sweep = tmp_path / "sweep"
    flags = ["--data_dir", str(packed_data), "--save_dir", str(sweep), "--scheduler", "fifo", "--max_steps", "8",
             "--eval_interval", "4", "--save_interval", "4", "--num_samples", "4", "--max_concurrent_trials", "2",
             "--lr_min", "1e-3", "--lr_max", "1e-2", "--warmup_steps", "2"]
    flags += [x for k, v in TINY.items() for x in (f"--{k}", str(v))]
    env = os.environ | {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "raylm", "tune", *flags], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while not finished_trials(sweep):
            assert proc.poll() is None, "the sweep exited before any trial finished"
            assert time.monotonic() < deadline, "no trial finished within 4 minutes"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = finished_trials(sweep)
    assert 0 < len(finished) < 4  # killed part-way
    before = {t: (sweep / f"trial_{t}" / "metrics.jsonl").stat().st_mtime_ns for t in finished}

    assert raylm_main(["tune", *flags, "--resume"]) == 0
    trials = json.loads((sweep / "tune_trials.json").read_text())
    assert [t["steps"] for t in trials] == [8] * 4  # every trial trained to the end
    # Also a trial that reached its last checkpoint just before the kill, before Tune saved its end.
    assert [t["status"] for t in trials] == ["finished"] * 4
    after = {t: (sweep / f"trial_{t}" / "metrics.jsonl").stat().st_mtime_ns for t in finished}
    assert after == before  # the finished trials were not trained again


@pytest.mark.ray
def test_bench_smoke_runs_both_schedulers_and_reports_their_cost(ray_session, tmp_path):
    """The benchmark script runs (2 trials, 4 steps: too few for ASHA to be sure to stop one; that ASHA stops
    trials early is test_asha_sweep_finds_the_best_trial_and_its_config_trains's to show)."""
    spec = importlib.util.spec_from_file_location("bench_tune", ROOT / "jobs" / "bench_tune.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    figures = bench.main(["--smoke", "--out_dir", str(tmp_path)])
    fifo, asha = figures["fifo"], figures["asha"]
    assert fifo["trial_steps"] == fifo["num_samples"] * fifo["max_steps"]  # FIFO runs every trial to the end
    assert asha["trial_steps"] <= fifo["trial_steps"]
    assert asha["best_val_loss"] > 0 and fifo["best_val_loss"] > 0


@pytest.mark.ray
def test_a_sweep_whose_every_trial_fails_says_why(ray_session, packed_data, tmp_path):
    from raylm.train import TrainingError

    with pytest.raises(TrainingError, match="every trial failed") as err:
        tune(*configs(packed_data, tmp_path / "sweep", num_samples=1, scheduler="fifo", max_steps=4,
                      simulate_failure_at_step=3))
    assert "WorkerGroupError: Training failed due to worker errors" in str(err.value)
    log = Path(str(err.value).rsplit("its log: ", 1)[1].rstrip(")"))
    assert "A worker health check failed" in log.read_text()
