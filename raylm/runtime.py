"""Connecting to Ray, and choosing devices.

raylm joins a running Ray cluster when there is one (``RAY_ADDRESS`` set, or ``ray start`` run on
this machine), and otherwise starts a local one for the length of the command. A local Ray that
raylm starts serves its dashboard on 127.0.0.1 only.
"""
from __future__ import annotations

import logging
import os


def ensure_ray(num_cpus: int | None = None, *, quiet: bool = True) -> None:
    """Connect to (or start) Ray once per process."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict = dict(
        logging_level=logging.WARNING if quiet else logging.INFO,
        log_to_driver=True,
        # Our package travels to workers through the installed environment (or the job's
        # working_dir); no need to ship the driver's cwd again.
    )
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
        return
    try:
        # An existing local cluster started with `ray start --head`.
        ray.init(address="auto", **kwargs)
        return
    except (ConnectionError, RuntimeError, ValueError):
        pass
    ray.init(num_cpus=num_cpus, include_dashboard=False, dashboard_host="127.0.0.1", **kwargs)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
