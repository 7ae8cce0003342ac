"""Connecting to Ray, and choosing devices.

raylm joins a running Ray cluster when there is one (``RAY_ADDRESS`` set, or a cluster that
``ray start`` began on this machine), and otherwise starts a local one for the length of the
command. A local Ray that raylm starts serves its dashboard on 127.0.0.1 only; it never joins
another process's temporary Ray (which would vanish when that process ends).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def _started_cluster_address() -> str | None:
    """The address `ray start` recorded on this machine, if any (Ray's own lookup for ray.init())."""
    try:
        from ray._private.utils import read_ray_address

        return read_ray_address()
    except Exception:  # a private helper: if it moves, behave as if no cluster was started
        return None


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with the address in the message, when a host:port Ray address does not answer
    (Ray itself would retry for minutes)."""
    import socket

    if address in ("auto", "local") or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as e:
        raise ConnectionError(f"nothing answers at {address} ({e})") from None


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to (or start) Ray once per process."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or _started_cluster_address()
    if address:
        check_reachable(address)
        ray.init(logging_level=logging.WARNING, **_job_config())
    else:
        # The dashboard also serves Ray's state API, which Ray Train's clean-up of stopped runs
        # (Tune's early-stopped trials) relies on; it listens on 127.0.0.1 only.
        init_local_ray(num_cpus=num_cpus, _node_ip_address="127.0.0.1", logging_level=logging.WARNING)


def _package_search_path() -> list[str]:
    """The folder holding this raylm package, for Ray's workers to search first, where raylm is a source
    checkout (pip install -e) rather than an installed copy. Ray puts the driver's current folder on its
    workers' path; run from the folder above a checkout, its raylm/ (the repository, no __init__.py) was
    imported as an empty namespace package there, ahead of the editable install's import hook, and every
    Ray task failed with "cannot import name '__version__' from 'raylm'"."""
    root = Path(__file__).resolve().parents[1]
    return [] if root.name in ("site-packages", "dist-packages") else [str(root)]


def _job_config() -> dict:
    """ray.init's job_config argument that puts _package_search_path on the workers' path (none needed: {})."""
    paths = _package_search_path()
    if not paths:
        return {}
    from ray.job_config import JobConfig

    try:
        return {"job_config": JobConfig(_py_driver_sys_path=paths)}
    except TypeError:  # a Ray without the argument: its workers search the current folder as before
        return {}


def init_local_ray(**kwargs) -> None:
    """ray.init of a new local Ray with its dashboard on 127.0.0.1, or without the dashboard (and
    a warning saying what it costs) where Ray's dashboard packages (`ray[default]`) are missing."""
    import ray

    kwargs = {**_job_config(), **kwargs}
    try:  # Ray's own check, which ray.init(include_dashboard=True) makes only after starting its GCS
        from ray._private.utils import get_dashboard_dependency_error

        missing = get_dashboard_dependency_error()
    except ImportError:  # a Ray without it: try the dashboard
        missing = None
    if not missing:
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)
    else:
        sys.stderr.write(f"raylm: Ray's dashboard packages are missing ({missing}; pip install 'ray[default]'); "
                         "starting Ray without its dashboard, so `ray job submit` and Ray's state API are "
                         "unavailable\n")
        ray.init(include_dashboard=False, **kwargs)


def gpu_count(ray_cluster: bool) -> int:
    """GPUs there are: the connected Ray cluster's (ray_cluster), or those this process's PyTorch sees."""
    if ray_cluster:
        import ray

        return int(ray.cluster_resources().get("GPU", 0))
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


GPU_WORKER_CPUS = 8  # the most cores an automatic --cpus_per_worker gives a GPU worker (its data and launches)


def cpus_per_worker(num_workers: int, use_gpu: bool) -> int:
    """--cpus_per_worker when unset, for the connected Ray cluster (cores_per_worker of its live nodes and
    of the CPUs free now)."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    through_client = ray.util.client.ray.is_connected()  # ray://: this machine is not the cluster's node
    return cores_per_worker(nodes, num_workers, use_gpu, None if through_client else cpu_count(),
                            int(ray.available_resources().get("CPU", 0)))


def cores_per_worker(nodes: list[dict], num_workers: int, use_gpu: bool, local_cores: int | None,
                     free: int | None = None) -> int:
    """CPU cores for each worker, from the nodes' Ray resources ({"CPU": 8.0, "GPU": 1.0, ...} each). On CPU,
    the most each of num_workers workers can have with all of them placed at once (whole workers per node);
    on GPUs, a GPU node's cores per GPU, at most GPU_WORKER_CPUS. A one-node cluster counts no more than
    local_cores, the cores of the machine it runs on (a local Ray may be told of more logical CPUs than there
    are cores, and threads beyond the cores slow PyTorch down). No more than the `free` CPUs shared among the
    workers, where there are enough for one each: a run beside another on a shared cluster takes what is left
    rather than waiting for the other to end. 1 when no node can take a worker yet (an autoscaling cluster)."""
    nodes = [n for n in nodes if n.get("CPU", 0) >= 1]
    if len(nodes) == 1 and local_cores:
        nodes = [dict(nodes[0], CPU=min(nodes[0]["CPU"], local_cores))]
    if use_gpu:
        shares = [int(n["CPU"] // n["GPU"]) for n in nodes if n.get("GPU", 0) >= 1]
        each = max(1, min([GPU_WORKER_CPUS, *shares])) if shares else 1
    else:
        cores = [int(n["CPU"]) for n in nodes]
        each = next((e for e in range(max(cores, default=1), 0, -1) if sum(c // e for c in cores) >= num_workers), 1)
    if free is not None and free >= num_workers:
        each = min(each, free // num_workers)
    return each


def cpu_has_bf16_matmul_units(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX: Xeon 4th generation and later),
    where `--mixed_precision bf16` trains several times faster than fp32 (jobs/bench_vs_hf.py
    --precisions fp32 bf16). Read from the kernel's CPU flags; False where there are none (macOS, Windows)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    except OSError:
        pass
    return False


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_freed_memory_kept = False


def keep_freed_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = (1 << 31) - 1) -> bool:
    """Ask glibc's malloc to keep the memory a training step frees, for the next step to reuse.

    A CPU training step frees and allocates the same tens of megabytes of activations every step.
    By default glibc hands large freed blocks back to the kernel (blocks above its mmap threshold,
    and the top of the heap beyond its trim threshold), and the next step page-faults to map and
    zero them again: ~1 us a 4 KiB page, 1-10% of a small model's step on CPU (jobs/bench_vs_hf.py
    counts the faults per step). Blocks up to `mmap_threshold` now come from the heap, which is
    trimmed only when more than `trim_threshold` bytes are free at its top, so a process's memory
    stays at its peak. glibc 2.26 to 2.3x refuse an mmap threshold above 32 MiB; there it is 32
    MiB. Once per process; returns whether glibc took both settings (False elsewhere: other C
    libraries, macOS, Windows)."""
    global _freed_memory_kept
    if _freed_memory_kept:
        return True
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    int_max = (1 << 31) - 1  # mallopt takes a C int
    trimmed = bool(mallopt(_M_TRIM_THRESHOLD, min(max(trim_threshold, 0), int_max)))
    mapped = any(mallopt(_M_MMAP_THRESHOLD, min(max(value, 0), int_max))
                 for value in (mmap_threshold, min(mmap_threshold, 32 << 20)))
    _freed_memory_kept = trimmed and mapped
    return _freed_memory_kept
