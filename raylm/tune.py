"""`raylm tune`: sweep the learning rate and warmup of `raylm train` with Ray Tune, stopping lagging trials early.

    raylm tune --data_dir ./processed_data --save_dir ./sweep --model_size tiny --max_steps 2000 \
        --eval_interval 100 --save_interval 500 --num_samples 16 --lr_min 1e-4 --lr_max 3e-2 \
        --warmup_choices 0 100 300 --scheduler asha --grace_period 200 --max_concurrent_trials 2
    raylm tune --save_dir ./sweep --resume                      # continue an interrupted sweep as it was
    ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/tune_tiny_cpu.yaml

Each trial is a Ray Tune function trainable (`run_trial`) that builds the TorchTrainer of `raylm train`
(`plan_run` + `build_trainer`) from the shared TrainConfig with the trial's sampled learning_rate and
warmup_steps, and runs it. Rank 0's metrics of every evaluation reach Tune through Ray Train's
TuneReportCallback, so the scheduler (`SuccessiveHalving`, raylm's ASHA) can stop a trial whose validation
loss lags at its rung (`step` = grace_period, grace_period x reduction_factor, ...), judged again as other
trials reach that rung. The trial function only waits on its trainer, so it reserves no CPU; its training
workers reserve what `raylm train` would.

save_dir/ is the Tune experiment:

    sweep_config.yaml      every setting of the sweep; `--resume` continues it only with these settings
    trial_<id>/            one trial: the save_dir of its training run (metrics.jsonl, tensorboard/,
                           loss_curve.png, checkpoint_step_N/) and Tune's progress.csv and result.json
    tune_trials.json/.csv  every trial: learning_rate, warmup_steps, steps run, best validation loss,
                           stopped early or not; best first
    tune_val_loss.png      the validation loss of every trial against steps
    best_config.yaml       the best trial's TrainConfig, for `raylm train --config`

A resumed sweep (Tuner.restore) keeps its finished trials; an interrupted trial continues from its newest
checkpoint. The scheduler's record of earlier results is not restored, so it judges resumed trials afresh.
"""
from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import ray
from ray import tune as ray_tune
from ray.tune.schedulers import FIFOScheduler

from raylm import checkpoint as ckpt
from raylm.config import ConfigError, TrainConfig, TuneConfig, _coerce, build_config, dump_yaml, load_yaml, to_dict
from raylm.metrics import read_jsonl, save_figure
from raylm.storage import atomic_write_json, atomic_write_text, is_remote

TRIAL_PREFIX = "trial_"
SWEEP_CONFIG = "sweep_config.yaml"  # every setting of a sweep, in its save_dir: what --resume continues with
# Tune refuses an empty resource request; a trial's function only waits on its trainer, so it asks for a
# little memory and no CPU, and every CPU of the cluster stays free for training workers.
TRIAL_FUNCTION_RESOURCES = {"CPU": 0, "memory": 64 * 2**20}
TRIAL_POLL_INTERVAL_S = 0.25  # how often a trial's Train controller collects reports (Ray's default: 2 s)


# ----------------------------------------------------------------------------- configuration


def build_tune_configs(yaml_path=None, overrides: dict | None = None) -> tuple[TuneConfig, TrainConfig]:
    """One YAML file and one set of flags hold both: TuneConfig's keys configure the search, TrainConfig's
    are the training settings shared by all trials. Defaults < YAML file < flags; unknown keys are errors.
    With resume, the sweep's saved settings (save_dir/sweep_config.yaml) come before the YAML file and the
    flags: `raylm tune --save_dir ./sweep --resume` continues it as it was, and a setting given that differs
    from the saved one is refused (check_resume_settings)."""
    tune_keys = {f.name for f in dataclasses.fields(TuneConfig)}
    known = sorted(tune_keys | {f.name for f in dataclasses.fields(TrainConfig)})

    def split(data: dict, source: str) -> tuple[dict, dict]:
        data = {k.replace("-", "_"): v for k, v in data.items()}
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"unknown setting {key!r} in {source}.{hint} See `raylm tune --help`")
        return ({k: v for k, v in data.items() if k in tune_keys},
                {k: v for k, v in data.items() if k not in tune_keys})

    file_tune, file_train = split(load_yaml(yaml_path) if yaml_path else {}, f"config file {yaml_path}")
    flag_tune, flag_train = split(overrides or {}, "flags")
    # read before the configs are built: with --resume, their other settings may be valid only with the saved ones
    resume = _coerce("resume", bool, flag_tune.get("resume", file_tune.get("resume", False)))
    saved = Path(flag_train.get("save_dir") or file_train.get("save_dir") or TrainConfig.save_dir)
    saved = saved.expanduser().resolve() / SWEEP_CONFIG
    if resume and saved.is_file():  # the saved settings under the file and the flags
        saved_tune, saved_train = split(load_yaml(saved), str(saved))
        file_tune, file_train = saved_tune | file_tune, saved_train | file_train
    return (build_config(TuneConfig, yaml_data=file_tune, overrides=flag_tune),
            build_config(TrainConfig, yaml_data=file_train, overrides=flag_train))


def check_sweep(tcfg: TuneConfig, cfg: TrainConfig) -> None:
    """Refuse a sweep that cannot do what it promises, before anything starts."""
    if cfg.launcher != "ray":
        raise ConfigError("raylm tune runs every trial with Ray Train: drop --launcher local")
    if is_remote(cfg.save_dir):
        raise ConfigError(f"raylm tune keeps its sweep in a local or shared (NFS) folder, not {cfg.save_dir}: "
                          "give --save_dir a path")
    if cfg.checkpoint:
        raise ConfigError("--checkpoint resumes one training run; a sweep's trials start fresh. Use --init_from "
                          "to start every trial from those weights, or --resume to continue an interrupted sweep")
    if cfg.save_interval and (not cfg.eval_interval or cfg.save_interval % cfg.eval_interval):
        raise ConfigError(f"every checkpoint reaches Tune with the validation loss, so save_interval "
                          f"({cfg.save_interval}) must be a multiple of eval_interval ({cfg.eval_interval}): "
                          f"e.g. --save_interval {max(cfg.eval_interval, 1) * 5}, or 0 (only at the end)")
    if tcfg.scheduler == "asha":
        if tcfg.grace_period >= cfg.max_steps:
            raise ConfigError(f"grace_period ({tcfg.grace_period}) must be smaller than max_steps "
                              f"({cfg.max_steps}) for ASHA to stop any trial early: e.g. --grace_period "
                              f"{max(1, cfg.max_steps // 10)}, or --scheduler fifo")
        if not 0 < cfg.eval_interval < cfg.max_steps:
            raise ConfigError(f"ASHA stops trials on the validation loss of each evaluation: set --eval_interval "
                              f"between 1 and max_steps ({cfg.max_steps}), e.g. {max(1, tcfg.grace_period // 2)}")


def trial_config(base: dict, learning_rate: float, warmup_steps: int, save_dir: str | os.PathLike) -> TrainConfig:
    """The TrainConfig of one trial: the shared settings with its learning rate and warmup. The cosine
    still decays to the same fraction of the peak as in the shared settings (min_lr / learning_rate)."""
    ratio = base["min_lr"] / base["learning_rate"]
    return TrainConfig(**{**base, "learning_rate": learning_rate, "min_lr": learning_rate * ratio,
                          "warmup_steps": int(warmup_steps), "save_dir": str(save_dir)})


def shared_train_settings(cfg: TrainConfig) -> dict:
    """The TrainConfig every trial starts from, with absolute paths (trials run in Tune's working folders:
    train.absolute_paths, --init_from's too) and one CPU per worker unless --cpus_per_worker says otherwise."""
    from raylm.train import absolute_paths

    return to_dict(absolute_paths(cfg)) | {"cpus_per_worker": cfg.cpus_per_worker or 1}


def sweep_settings(tcfg: TuneConfig, cfg: TrainConfig) -> dict:
    """Every setting of the sweep, flat: what `raylm tune --config` reads (saved as sweep_config.yaml)."""
    search = {k: v for k, v in to_dict(tcfg).items() if k != "resume"}
    return search | shared_train_settings(cfg)


def search_space(tcfg: TuneConfig, cfg: TrainConfig) -> dict:
    """Tune's param_space: a log-uniform learning_rate and the warmup_steps (choices, range or fixed)."""
    if tcfg.warmup_choices:
        warmup = ray_tune.choice(list(tcfg.warmup_choices))
    elif tcfg.warmup_min is not None:
        warmup = ray_tune.randint(tcfg.warmup_min, tcfg.warmup_max + 1)  # randint excludes its upper end
    else:
        warmup = cfg.warmup_steps
    return {"learning_rate": ray_tune.loguniform(tcfg.lr_min, tcfg.lr_max), "warmup_steps": warmup}


def check_resume_settings(tcfg: TuneConfig, cfg: TrainConfig, saved_path: Path) -> TrainConfig:
    """--resume continues the sweep as it was started: refuse settings that differ from the saved ones.
    Returns cfg, with the saved --use_gpu where it is left unset now (it has no default of its own to
    differ by: a sweep started with --use_gpu false resumes on CPU, as it began, with or without the flag)."""
    saved = load_yaml(saved_path)
    if cfg.use_gpu is None and saved.get("use_gpu") is not None:
        cfg = dataclasses.replace(cfg, use_gpu=saved["use_gpu"])
    now = sweep_settings(tcfg, cfg)
    # a setting that a sweep saved by an older raylm lacks ran at its default (a later raylm added it)
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for config in (TuneConfig, TrainConfig) for f in dataclasses.fields(config)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    saved = {k: saved[k] if k in saved else defaults.get(k) for k in now}
    changed = [f"{k} (saved {saved.get(k)!r}, now {v!r})" for k, v in now.items() if saved.get(k) != v]
    if changed:
        raise ConfigError(f"--resume continues the sweep with its saved settings, but these differ: "
                          f"{'; '.join(changed)}. Continue it as it was with: raylm tune --config {saved_path} "
                          "--resume")
    return cfg


def trial_folder(trial_id: str) -> str:
    """trial_<id>: the save_dir of a trial's training run, and (but see training_dir) Tune's folder of it."""
    return f"{TRIAL_PREFIX}{trial_id}"


def trial_dir_name(trial) -> str:
    """Tune's trial_name_creator and trial_dirname_creator: trial_folder of the trial."""
    return trial_folder(trial.trial_id)


def trials_at_once(tcfg: TuneConfig, cfg: TrainConfig) -> int:
    """How many trials run concurrently: --max_concurrent_trials, refused if the cluster cannot place
    that many trainers at once (0: as many as it can)."""
    total = ray.cluster_resources()
    per_trial = {"CPU": cfg.num_workers * cfg.cpus_per_worker} | ({"GPU": cfg.num_workers} if cfg.use_gpu else {})
    fits = min(int(total.get(name, 0) // need) for name, need in per_trial.items())
    have = " and ".join(f"{int(total.get(name, 0))} {name}" for name in per_trial)
    needs = " and ".join(f"{need} {name}" for name, need in per_trial.items())
    if fits < 1:
        raise ConfigError(f"one trial (num_workers {cfg.num_workers} x cpus_per_worker {cfg.cpus_per_worker}"
                          f"{' x 1 GPU' if cfg.use_gpu else ''}) needs {needs}; the Ray cluster has {have}: lower "
                          "--num_workers or --cpus_per_worker")
    wanted = tcfg.max_concurrent_trials or fits
    if wanted > fits:
        raise ConfigError(f"--max_concurrent_trials {wanted}: each trial needs {needs} (num_workers x "
                          f"cpus_per_worker{' and a GPU per worker' if cfg.use_gpu else ''}) and the Ray cluster "
                          f"has {have}, enough for {fits} at once: use --max_concurrent_trials {fits}")
    return min(wanted, tcfg.num_samples)


# ----------------------------------------------------------------------------- one trial


def run_trial(config: dict, base: dict) -> None:
    """One trial (a Tune function trainable): the TorchTrainer of `raylm train` with the shared settings
    ``base`` and this trial's sampled learning rate and warmup (``config``). In a resumed sweep, an
    interrupted trial continues from its newest complete checkpoint."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from raylm.train import build_trainer, plan_run

    # Ray Train's controller collects its workers' reports by polling them, every 2 s by default, and the
    # sweep's scheduler can stop a trial only once its report arrives: trials poll more often, so a stopped
    # trial trains fewer steps past its rung. The controller inherits this variable from this process.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(TRIAL_POLL_INTERVAL_S))
    save_dir = Path(base["save_dir"]) / trial_folder(ray_tune.get_context().get_trial_id())
    cfg = trial_config(base, config["learning_rate"], config["warmup_steps"], save_dir)
    newest = ckpt.newest_complete(save_dir, warn=lambda *_: None)
    if newest is not None:
        cfg = dataclasses.replace(cfg, checkpoint=str(newest))
    trainer = build_trainer(plan_run(cfg), callbacks=[TuneReportCallback()])
    # Rank 0's reported metrics (and checkpoint paths) become this trial's Tune results.
    trainer.fit()


# ----------------------------------------------------------------------------- stopped trials' resources


def free_orphaned_placement_groups() -> int:
    """Release the resources of trainers whose Ray Train controller died; returns how many were freed.

    Stopping a trial ends its actor, and with it the Train controller the trial started, so the
    controller never removes its workers' placement group. Ray Train's PlacementGroupCleaner would,
    but it asks Ray's state API (served by the dashboard) whether the controller is alive; on a Ray
    started without the dashboard it cannot, the CPUs stay reserved until the sweep ends, and later
    trials wait forever. Freed here: placement groups of this job, not detached, whose creator was an
    actor that is now dead. (GCS keeps that record; the public placement_group_table() omits it.)
    """
    from ray._private.state import state
    from ray.core.generated.gcs_pb2 import PlacementGroupTableData
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job = ray.get_runtime_context().get_job_id()
    freed = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = PlacementGroupTableData.FromString(raw)
        orphaned = (pg.state != PlacementGroupTableData.REMOVED and pg.creator_actor_dead and not pg.is_detached
                    and not ray.ActorID(pg.creator_actor_id).is_nil() and pg.creator_job_id.hex() == job)
        if orphaned:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            freed += 1
    return freed


class FreeStoppedTrainers(ray_tune.Callback):
    """A Tune callback on the sweep's driver: free_orphaned_placement_groups() every few seconds."""

    def __init__(self, every_s: float = 2.0):
        self.every_s = every_s
        self._last = 0.0

    def on_step_begin(self, iteration, trials, **info):
        if time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            free_orphaned_placement_groups()


# ----------------------------------------------------------------------------- early stopping

_HUGE = 1e300  # the loss recorded for a NaN or infinite one: the worst, and still a number for percentiles


class SuccessiveHalving(FIFOScheduler):
    """Asynchronous successive halving (ASHA) that keeps judging: the ``--scheduler asha`` of raylm tune.

    Rungs lie at grace_period x reduction_factor**k steps, below max_t. A trial's validation loss at the
    first report at or past a rung is recorded there. A trial may go on only while its loss at its highest
    rung is within the best 1/reduction_factor of every loss recorded at that rung (the same percentile
    cut as Ray's ASHAScheduler). Ray's scheduler applies the cut once, when the trial arrives, so the first
    trials at each rung pass unopposed and a poor one among them trains to max_t; here the cut is applied
    again at each of the trial's later reports, against the trials that have reached the rung since. That
    is closer to the ASHA paper (Li et al., 2020), where a trial goes on only while it is in the top
    1/reduction_factor of its rung, and it pauses no one. A non-finite loss stops its trial at once. The
    record lives in the driver and starts afresh in a resumed sweep.
    """

    def __init__(self, *, time_attr: str, max_t: int, grace_period: int, reduction_factor: float):
        super().__init__()
        if grace_period < 1 or max_t <= grace_period or reduction_factor <= 1:
            raise ValueError(f"successive halving needs 1 <= grace_period < max_t and reduction_factor > 1, got "
                             f"grace_period {grace_period}, max_t {max_t}, reduction_factor {reduction_factor}")
        self.time_attr, self.reduction_factor = time_attr, float(reduction_factor)
        rungs, milestone = [], float(grace_period)
        while milestone < max_t:
            rungs.append(milestone)
            milestone *= reduction_factor
        self.rungs = rungs  # ascending
        self.recorded: dict[float, dict[str, float]] = {m: {} for m in rungs}  # rung -> trial id -> loss
        self.num_stopped = 0
        self._sign = 1.0

    def set_search_properties(self, metric, mode, **spec) -> bool:
        ok = super().set_search_properties(metric, mode, **spec)
        self._sign = -1.0 if mode == "max" else 1.0  # losses are kept lower-is-better
        return ok

    def cutoff(self, rung: float) -> float:
        """The highest loss at `rung` that still goes on: the 1/reduction_factor quantile of its record."""
        return float(np.percentile(list(self.recorded[rung].values()), 100.0 / self.reduction_factor))

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self.time_attr not in result or self._metric not in result:
            return self.CONTINUE
        loss = self._sign * float(result[self._metric])
        if not math.isfinite(loss):
            self.num_stopped += 1
            return self.STOP
        self.record(trial.trial_id, result[self.time_attr], loss)
        return self.judge(trial.trial_id)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if result and self.time_attr in result and self._metric in result:
            self.record(trial.trial_id, result[self.time_attr], self._sign * float(result[self._metric]))

    def record(self, trial_id: str, t: float, loss: float) -> None:
        """Record `loss` at the highest rung `t` has reached, if this trial has none there yet."""
        reached = [m for m in self.rungs if t >= m]
        if reached and trial_id not in self.recorded[reached[-1]]:
            self.recorded[reached[-1]][trial_id] = loss if math.isfinite(loss) else _HUGE

    def judge(self, trial_id: str) -> str:
        """STOP unless the trial is within the cut at its highest recorded rung."""
        for rung in reversed(self.rungs):
            if trial_id in self.recorded[rung]:
                if self.recorded[rung][trial_id] > self.cutoff(rung):
                    self.num_stopped += 1
                    return self.STOP
                break
        return self.CONTINUE

    def debug_string(self) -> str:
        rungs = ", ".join(f"{m:g}: {len(r)} trials" for m, r in self.recorded.items())
        return (f"Successive halving (reduction factor {self.reduction_factor:g}): {self.num_stopped} stopped; "
                f"rungs {rungs}")


# ----------------------------------------------------------------------------- the sweep


@dataclasses.dataclass
class TrialRow:
    """One line of the trials table."""

    trial: str  # trial_<id>: its folder in save_dir
    learning_rate: float
    warmup_steps: int
    steps: int  # optimizer steps it ran
    best_val_loss: float | None  # the lowest (finite) validation loss it reported
    stopped_early: bool  # stopped by ASHA before max_steps
    status: str  # finished | stopped early | unfinished (the sweep was interrupted) | error: <its last line>


@dataclasses.dataclass
class SweepResult:
    trials: list[TrialRow]  # best first
    best_config: str | None  # best_config.yaml
    best_checkpoint: str | None  # the best trial's newest checkpoint
    table_json: str
    table_csv: str
    plot: str | None  # tune_val_loss.png
    finished: bool  # False: interrupted; continue with --resume


def tune(tcfg: TuneConfig, cfg: TrainConfig) -> SweepResult:
    """Validate, run (or resume) the sweep on Ray, and write the trials table, the validation-loss
    plot and the best configuration into save_dir."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from raylm.runtime import ensure_ray, gpu_count
    from raylm.train import TrainingError, decide_use_gpu, plan_run

    check_sweep(tcfg, cfg)
    plan_run(cfg)  # the data, the model and the batch settings, checked once for all trials
    sweep_dir = Path(cfg.save_dir).expanduser().resolve()  # as build_tune_configs finds it again for --resume
    saved = sweep_dir / SWEEP_CONFIG
    exists = ray_tune.Tuner.can_restore(sweep_dir)
    if tcfg.resume and not exists:
        raise ConfigError(f"--resume: {sweep_dir} holds no sweep to continue; drop --resume to start one")
    if exists and not tcfg.resume:
        raise ConfigError(f"{sweep_dir} already holds a sweep: add --resume to continue it, or choose another "
                          "--save_dir")
    if tcfg.resume:
        cfg = check_resume_settings(tcfg, cfg, saved)
    ensure_ray()
    # --use_gpu unset: GPUs when the cluster has any (cfg itself stays as given: the sweep's saved settings)
    trial_cfg = decide_use_gpu(cfg, gpu_count(ray_cluster=True))
    # trials share the cluster: one core per worker unless --cpus_per_worker says otherwise
    trial_cfg = dataclasses.replace(trial_cfg, cpus_per_worker=cfg.cpus_per_worker or 1)
    at_once = trials_at_once(tcfg, trial_cfg)
    trainable = ray_tune.with_resources(ray_tune.with_parameters(run_trial, base=shared_train_settings(trial_cfg)),
                                        TRIAL_FUNCTION_RESOURCES)
    if tcfg.resume:
        tuner = ray_tune.Tuner.restore(str(sweep_dir), trainable, resume_unfinished=True, resume_errored=True)
    else:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(sweep_settings(tcfg, cfg), saved)
        scheduler = FIFOScheduler() if tcfg.scheduler == "fifo" else SuccessiveHalving(
            time_attr="step", max_t=cfg.max_steps, grace_period=tcfg.grace_period,
            reduction_factor=tcfg.reduction_factor)
        tuner = ray_tune.Tuner(
            trainable,
            param_space=search_space(tcfg, cfg),
            tune_config=ray_tune.TuneConfig(
                metric=tcfg.metric, mode="min", num_samples=tcfg.num_samples, scheduler=scheduler,
                search_alg=BasicVariantGenerator(max_concurrent=at_once, random_state=tcfg.search_seed),
                trial_name_creator=trial_dir_name, trial_dirname_creator=trial_dir_name),
            run_config=ray_tune.RunConfig(name=sweep_dir.name, storage_path=str(sweep_dir.parent),
                                          callbacks=[FreeStoppedTrainers()]),
        )
    grid = tuner.fit()
    rows = sorted((trial_row(r, cfg.max_steps) for r in grid),
                  key=lambda row: (row.best_val_loss is None, row.best_val_loss or 0.0))
    finished = grid.num_terminated + grid.num_errors == len(grid)
    result = write_report(rows, cfg, sweep_dir, finished)
    if rows and all(row.status.startswith("error") for row in rows):
        raise TrainingError(f"every trial failed, e.g. {rows[0].trial}: {rows[0].status.removeprefix('error: ')} "
                            f"(its log: {sweep_dir / rows[0].trial / 'error.txt'})")
    return result


def training_dir(result) -> Path:
    """The folder a trial trained in: save_dir/trial_<id> (run_trial). Tune's own folder for the trial is
    the same, except in a resumed sweep for a trial that the interrupted one had started after its last
    saved state: trial_<id> exists then, and Tune names its folder trial_<id>_<suffix> while the training
    continues in trial_<id> from its newest checkpoint."""
    path = Path(result.path)
    trial_id = (result.metrics or {}).get("trial_id")
    if not trial_id:
        match = re.match(rf"{TRIAL_PREFIX}([0-9a-f]+_\d+)", path.name)
        trial_id = match.group(1) if match else path.name.removeprefix(TRIAL_PREFIX)
    return path.parent / trial_folder(trial_id)


def trial_row(result, max_steps: int) -> TrialRow:
    """A trial's line, from its own metrics.jsonl (the training's record, consistent across resumes)."""
    trial_dir = training_dir(result)
    records = read_jsonl(trial_dir / "metrics.jsonl")
    values = [r["val_loss"] for r in records if r.get("val_loss") is not None and math.isfinite(r["val_loss"])]
    steps = max((r["step"] for r in records), default=0)
    if result.error:
        status = "error: " + error_line(str(result.error))
    elif not result.metrics.get("done") and not reached_the_end(trial_dir, max_steps):
        # Tune's own "done" is missing when a resumed trial was already at its end (it reports nothing
        # new); its complete checkpoint at max_steps is the training's own proof that it finished.
        status = "unfinished"
    else:
        status = "finished" if steps >= max_steps else "stopped early"
    return TrialRow(trial=trial_dir.name, learning_rate=result.config["learning_rate"],
                    warmup_steps=int(result.config["warmup_steps"]), steps=steps,
                    best_val_loss=min(values) if values else None, stopped_early=status == "stopped early",
                    status=status)


def reached_the_end(trial_dir: Path, max_steps: int) -> bool:
    """Whether the trial's newest complete checkpoint is at max_steps."""
    newest = ckpt.newest_complete(trial_dir, warn=lambda *_: None)
    return newest is not None and newest.name == ckpt.checkpoint_name(max_steps)


def error_line(traceback_text: str) -> str:
    """The last `SomeError: message` line of a trial's error (the root cause, under Ray's wrappers)."""
    lines = [ln.strip() for ln in traceback_text.splitlines() if ln.strip()]
    raised = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Failure)\b.*: ", ln)]
    return (raised or lines or ["unknown error"])[-1][:300]


def write_report(rows: list[TrialRow], cfg: TrainConfig, sweep_dir: Path, finished: bool) -> SweepResult:
    """Print the trials table; write it (JSON, CSV), the plot, and the best trial's config."""
    table = [dataclasses.asdict(row) for row in rows]
    table_json, table_csv = sweep_dir / "tune_trials.json", sweep_dir / "tune_trials.csv"
    atomic_write_json(table_json, table)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[f.name for f in dataclasses.fields(TrialRow)])
    writer.writeheader()
    writer.writerows(table)
    atomic_write_text(table_csv, buf.getvalue())
    curves = {row.trial: [(r["step"], r["val_loss"]) for r in read_jsonl(sweep_dir / row.trial / "metrics.jsonl")
                          if r.get("val_loss") is not None] for row in rows}
    best = next((row for row in rows if row.best_val_loss is not None and not row.status.startswith("error")), None)
    plot = sweep_dir / "tune_val_loss.png"
    plotted = plot_val_curves(rows, curves, plot, best=best.trial if best else None)

    print(format_table(rows))
    best_config = best_checkpoint = None
    if best is not None:
        best_cfg = trial_config(shared_train_settings(cfg), best.learning_rate, best.warmup_steps, sweep_dir / "best")
        best_config = sweep_dir / "best_config.yaml"
        dump_yaml(best_cfg, best_config)
        found = ckpt.newest_complete(sweep_dir / best.trial, warn=lambda *_: None)
        best_checkpoint = str(found) if found else None
        print(f"Best trial: {best.trial} (learning_rate {best.learning_rate:.3g}, warmup_steps {best.warmup_steps}, "
              f"val_loss {best.best_val_loss:.4f}); its checkpoint: {best_checkpoint}")
        print(f"Train with it: raylm train --config {best_config}")
    print(f"Trials table: {table_json} and {table_csv}")
    if plotted:
        print(f"Validation curves: {plot}")
    if not finished:
        print("The sweep was interrupted: run the same command with --resume to finish it")
    return SweepResult(rows, str(best_config) if best_config else None, best_checkpoint, str(table_json),
                       str(table_csv), str(plot) if plotted else None, finished)


def format_table(rows: list[TrialRow]) -> str:
    lines = [f"{'trial':<20} {'learning_rate':>13} {'warmup_steps':>12} {'steps':>7} {'best val_loss':>15}  status"]
    for row in rows:
        best = f"{row.best_val_loss:.4f}" if row.best_val_loss is not None else "-"
        lines.append(f"{row.trial:<20} {row.learning_rate:>13.3e} {row.warmup_steps:>12} {row.steps:>7} "
                     f"{best:>15}  {row.status}")
    return "\n".join(lines)


def plot_val_curves(rows: list[TrialRow], curves: dict[str, list[tuple[int, float]]], path: Path, *,
                    best: str | None) -> bool:
    """Validation loss against steps, one line per trial (the best one thick, those stopped early
    dashed), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(curves.values()):
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for row in rows:
        points = curves.get(row.trial)
        if not points:
            continue
        label = f"lr {row.learning_rate:.2e}, warmup {row.warmup_steps}" + (" (best)" if row.trial == best else "")
        ax.plot(*zip(*points), "--" if row.stopped_early else "-", marker="o", markersize=2,
                linewidth=2.2 if row.trial == best else 1.0, label=label)
    values = [v for points in curves.values() for _, v in points if math.isfinite(v)]
    if values and max(values) > 3 * min(values) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"raylm tune: {len(rows)} trials (dashed: stopped early)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    save_figure(fig, path)
    return True
