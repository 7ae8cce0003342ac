"""Connecting to Ray, and choosing devices.

raylm joins a running Ray cluster when there is one (``RAY_ADDRESS`` set, or a cluster that
``ray start`` began on this machine), and otherwise starts a local one for the length of the
command. A local Ray that raylm starts has no dashboard and listens on 127.0.0.1 only; it never
joins another process's temporary Ray (which would vanish when that process ends).
"""
from __future__ import annotations

import logging
import os


def _started_cluster_address() -> str | None:
    """The address `ray start` recorded on this machine, if any (Ray's own lookup for ray.init())."""
    try:
        from ray._private.utils import read_ray_address

        return read_ray_address()
    except Exception:  # a private helper: if it moves, behave as if no cluster was started
        return None


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to (or start) Ray once per process."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS") or _started_cluster_address():
        ray.init(logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1", logging_level=logging.WARNING)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
