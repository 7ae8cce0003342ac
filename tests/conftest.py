"""One local Ray for the whole test session; tiny models; CPU only."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray cluster shared by every test that needs one (started on first use)."""
    import ray

    if not ray.is_initialized():
        from raylm.runtime import init_local_ray

        init_local_ray(num_cpus=4, logging_level="WARNING", configure_logging=False)
    yield ray
    ray.shutdown()


from raylm.data import write_synthetic_dataset as write_packed_dataset  # noqa: E402


@pytest.fixture(scope="session")
def packed_data(tmp_path_factory):
    return write_packed_dataset(tmp_path_factory.mktemp("packed"))
