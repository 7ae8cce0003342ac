"""Ray clusters: a real two-node cluster on this machine, jobs through the Jobs API, token
authentication, and the `ray up` files of cluster/ checked by Ray's own config code.

    .venv/bin/python -m pytest tests/test_cluster.py -q

The two nodes are separate `ray start --block` processes (each with 1 CPU, its own temp dir and
its own ports), fully apart from the session's local Ray: they are stopped by signalling only the
processes started here (each carries a marker in its environment), never with `ray stop`, which
would stop every Ray on the machine.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CLUSTER_FILES = sorted((REPO / "cluster").glob("*.yaml"))
RAY_UP_FILES = [p for p in CLUSTER_FILES if "provider" in (yaml.safe_load(p.read_text()) or {})]
JOB_CONFIGS = ["tiny_cpu", "small_1gpu", "multi_gpu", "multi_node"]
MARKER = "RAYLM_TEST_CLUSTER"  # every process of the test cluster inherits this variable


# ----------------------------------------------------------------------------- the two-node cluster


def _ray_cli() -> list[str]:
    exe = VENV_BIN / "ray"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ray.scripts.scripts"]


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _marked_pids(marker_value: str) -> list[int]:
    """Processes whose environment carries this cluster's marker (ours, whatever they renamed
    themselves to: Ray workers rewrite their command line)."""
    needle = f"{MARKER}={marker_value}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in Path(entry.path, "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


def _listen_addresses(port: int) -> set[str]:
    """Local IPv4/IPv6 addresses with a socket listening on this TCP port (from /proc/net/tcp*)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                host, port_hex = local.rsplit(":", 1)
                if state != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                    continue
                raw = bytes.fromhex(host)
                if len(raw) == 4:
                    found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                else:  # four little-endian 32-bit words
                    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                    found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found


def _as_dict(state) -> dict:
    return state if isinstance(state, dict) else dataclasses.asdict(state)


class TwoNodeCluster:
    """A Ray head and one worker node on this machine, token authentication on, dashboard and
    Jobs API on 127.0.0.1 only. Each node offers 1 CPU and a custom resource naming it."""

    def __init__(self, root: Path):
        self.root = root
        self.token = secrets.token_hex(32)
        self.marker = secrets.token_hex(8)
        gcs, dashboard, client, agent_head, agent_worker = _free_ports(5)
        self.gcs_port, self.dashboard_port = gcs, dashboard
        self.url = f"http://127.0.0.1:{dashboard}"
        self.gcs_address = f"127.0.0.1:{gcs}"
        # nothing of this process's Ray settings (RAY_ADDRESS, the session Ray's auth mode...)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "RAYLM_"))}
        env.update({
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, MARKER: self.marker,
            # the venv's python/raylm for job entrypoints, as on a node where raylm is installed
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0", "TOKENIZERS_PARALLELISM": "false",
            # Ray's own state clients inside the cluster (Ray Train's placement-group cleaner) look
            # for "the" local cluster; on a machine that also runs the session's Ray, name ours
            "RAY_API_SERVER_ADDRESS": self.url,
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "2",  # nothing to drain at teardown
        })
        self.env = env
        self.procs: list[subprocess.Popen] = []
        self.head_log, self.worker_log = root / "head.log", root / "worker.log"
        self._ports = (client, agent_head, agent_worker)
        self.node_ids: dict[str, str] = {}
        self.stopped = False

    def start(self) -> None:
        client, agent_head, agent_worker = self._ports
        root, gcs, dashboard = self.root, self.gcs_port, self.dashboard_port
        common = ["--block", "--num-cpus", "1", "--num-gpus", "0", "--object-store-memory", str(200 * 2**20),
                  "--disable-usage-stats"]
        self._start(["--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                     "--include-dashboard", "true", "--ray-client-server-port", str(client),
                     "--dashboard-agent-listen-port", str(agent_head), "--temp-dir", str(root / "head"),
                     "--resources", json.dumps({"test_head_node": 1}), *common], self.head_log)
        self._wait(lambda: self._nodes_alive() >= 1, "the head node", 90)
        self._start(["--address", self.gcs_address, "--dashboard-agent-listen-port", str(agent_worker),
                     "--temp-dir", str(root / "worker"), "--resources", json.dumps({"test_worker_node": 1}), *common],
                    self.worker_log)
        self._wait(lambda: self._nodes_alive() >= 2, "the worker node", 90)
        self.node_ids = {self._node_role(n): n["node_id"] for n in self._nodes() if n["state"] == "ALIVE"}

    # -- plumbing

    def logs(self) -> str:
        return "".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}\n"
                       for p in (self.head_log, self.worker_log) if p.exists())

    @property
    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def _start(self, args: list[str], log: Path) -> None:
        with open(log, "wb") as out:
            self.procs.append(subprocess.Popen([*_ray_cli(), "start", *args], stdout=out, stderr=subprocess.STDOUT,
                                               env=self.env, start_new_session=True, cwd=self.root))

    def _wait(self, ready, what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"`ray start` exited ({p.returncode}) while waiting for {what}:\n"
                                       + self.logs())
            with contextlib.suppress(Exception):
                if ready():
                    return
            time.sleep(0.5)
        raise TimeoutError(f"{what} did not come up in {timeout_s:.0f} s\n" + self.logs())

    def _nodes(self) -> list[dict]:
        from ray.util.state import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        client = StateApiClient(address=self.url, headers=self.auth)
        return [_as_dict(n) for n in client.list(StateResource.NODES, options=ListApiOptions(detail=True),
                                                 raise_on_missing_output=False)]

    def _nodes_alive(self) -> int:
        return sum(n["state"] == "ALIVE" for n in self._nodes())

    @staticmethod
    def _node_role(node: dict) -> str:
        total = node.get("resources_total") or {}
        return "head" if "test_head_node" in total else "worker" if "test_worker_node" in total else "other"

    def actors(self, class_name: str) -> list[dict]:
        from ray.util.state import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        client = StateApiClient(address=self.url, headers=self.auth)
        opts = ListApiOptions(filters=[("class_name", "=", class_name)], detail=True, limit=1000)
        return [_as_dict(a) for a in client.list(StateResource.ACTORS, options=opts, raise_on_missing_output=False)]

    def jobs_client(self, token: str | None = None):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.url, headers={"Authorization": f"Bearer {token or self.token}"})

    def stop(self) -> list[int]:
        """SIGTERM each `ray start --block` (each stops its own node's processes), then SIGKILL
        whatever still carries this cluster's marker (a few of Ray's helpers outlive their parent).
        Only processes with the marker are ever signalled. Returns those still alive after that
        (none). Safe to call twice."""
        if self.stopped:
            return []
        self.stopped = True
        for p in reversed(self.procs):  # the worker node first
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        deadline = time.monotonic() + 15
        while (left := _marked_pids(self.marker)) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        return _marked_pids(self.marker)


@pytest.fixture(scope="module")
def cluster():
    import importlib.util

    if importlib.util.find_spec("aiohttp") is None:  # the dashboard, Jobs API and state API need it
        raise RuntimeError("the Ray dashboard is not installed: raylm's dependency must be ray[default,...]")
    root = Path(tempfile.mkdtemp(prefix="rlc-", dir="/tmp"))  # short: Ray's unix sockets live under it
    c = TwoNodeCluster(root)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def write_text_corpus(folder: Path, files: int = 4, paragraphs: int = 60) -> Path:
    """A few small .txt files of plain English-like sentences (enough for a 300-token BPE)."""
    import random

    words = ("the model reads text and learns to predict the next token from the tokens before it a cluster "
             "of machines trains it faster when every node holds a copy and gradients are averaged over all "
             "workers after each step").split()
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 20))).capitalize() + "."
                 for _ in range(paragraphs)]
        (folder / f"doc_{i}.txt").write_text("\n\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _wait_for_job(client, job_id: str, timeout_s: float) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(1)
    client.stop_job(job_id)
    raise TimeoutError(f"job {job_id} did not finish in {timeout_s:.0f} s:\n{client.get_job_logs(job_id)[-4000:]}")


# ----------------------------------------------------------------------------- jobs on two nodes


def test_prepare_and_two_worker_training_run_as_jobs_across_both_nodes(cluster, tmp_path):
    """`raylm prepare` and `jobs/pretrain.py` submitted through the Jobs API; training's two workers
    (1 CPU each, one CPU per node) must land one on each node; the checkpoint is complete; the logs
    stream back to the submitting terminal."""
    from ray.job_submission import JobStatus

    from raylm import checkpoint as ckpt

    assert set(cluster.node_ids) == {"head", "worker"}, cluster.node_ids
    raw, data, save = write_text_corpus(tmp_path / "raw"), tmp_path / "processed", tmp_path / "checkpoints"

    # 1. prepare, through the Python SDK (what `ray job submit` does underneath)
    client = cluster.jobs_client()
    prep_id = client.submit_job(
        entrypoint=f"raylm prepare --input_dir {raw} --output_dir {data} --tokenizer_type bpe --vocab_size 300 "
                   "--max_length 32 --num_workers 1",
        runtime_env={"working_dir": str(REPO), "excludes": [".git", ".venv", "runs"]},
    )
    status = _wait_for_job(client, prep_id, 150)
    prep_logs = client.get_job_logs(prep_id)
    assert status == JobStatus.SUCCEEDED, prep_logs[-4000:]
    meta = json.loads((data / "metadata.json").read_text())
    assert meta["vocab_size"] <= 300 and meta["max_length"] == 32 and meta["splits"]["train"]["rows"] >= 8

    # 2. train, through the `ray job submit` command line, exactly as a user types it
    entry = ["python", "jobs/pretrain.py", "--config", "jobs/configs/tiny_cpu.yaml",
             "--data_dir", str(data), "--save_dir", str(save), "--num_workers", "2", "--cpus_per_worker", "1",
             "--hidden_size", "32", "--num_layers", "1", "--num_heads", "2", "--num_kv_heads", "1",
             "--batch_size", "4", "--micro_batch_size", "2", "--max_steps", "4", "--warmup_steps", "1",
             "--log_interval", "1", "--eval_interval", "0", "--eval_steps", "1", "--save_interval", "2"]
    submit = subprocess.run(
        [*_ray_cli(), "job", "submit", "--address", cluster.url, "--working-dir", ".", "--", *entry],
        cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=240)
    out = submit.stdout + submit.stderr
    assert submit.returncode == 0, out[-6000:]
    assert re.search(r"Job 'raysubmit_\w+' succeeded", out), out[-3000:]
    # the workers' log lines streamed back while the job ran (`ray job submit` tails them)
    assert "World size: 2" in out and re.search(r"Step 4/4 \| Loss: \d", out), out[-3000:]

    # 3. the two training workers ran one per node
    workers = cluster.actors("RayTrainWorker")
    nodes_used = {a["node_id"] for a in workers}
    assert len(workers) == 2 and nodes_used == set(cluster.node_ids.values()), (workers, cluster.node_ids)

    # 4. the run's record and its checkpoints, written to the shared folder
    summary = json.loads((save / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["final_step"] == 4 and summary["ranks_identical"], summary
    assert ckpt.verify(save / "final") is None
    steps = [step for step, _ in ckpt.list_checkpoints(save)]
    assert steps[0] == 4 and all(ckpt.verify(path) is None for _, path in ckpt.list_checkpoints(save)), steps
    # the Jobs API keeps the logs too, for `ray job logs`
    train_id = re.search(r"Job '(raysubmit_\w+)' succeeded", out).group(1)
    assert "Step 4/4" in client.get_job_logs(train_id)


# ----------------------------------------------------------------------------- safe by default


def test_dashboard_and_job_api_listen_on_loopback_only(cluster):
    assert _listen_addresses(cluster.dashboard_port) == {"127.0.0.1"}


def test_the_local_ray_raylm_starts_serves_its_dashboard_on_loopback_only(ray_session):
    """The tests' own Ray is started by raylm.runtime.init_local_ray, as `raylm train` starts one when there is
    no cluster: its dashboard (and job API) must listen on 127.0.0.1 only."""
    from ray._private.worker import get_dashboard_url

    url = get_dashboard_url()
    assert url, "raylm's local Ray started without its dashboard"
    assert _listen_addresses(int(url.rsplit(":", 1)[1])) == {"127.0.0.1"}


def test_job_submission_without_the_token_is_refused(cluster):
    import requests

    def submitted() -> list[str]:
        return [j.entrypoint for j in cluster.jobs_client().list_jobs()]

    body = {"entrypoint": "echo should-never-run"}
    no_token = requests.post(f"{cluster.url}/api/jobs/", json=body, timeout=10)
    assert no_token.status_code == 401, no_token.text
    wrong = requests.post(f"{cluster.url}/api/jobs/", json=body, timeout=10,
                          headers={"Authorization": f"Bearer {secrets.token_hex(32)}"})
    assert wrong.status_code == 403, wrong.text
    # reading is protected too: the job list, the logs, the cluster state
    assert requests.get(f"{cluster.url}/api/jobs/", timeout=10).status_code == 401
    assert requests.get(f"{cluster.url}/api/v0/nodes", timeout=10).status_code == 401

    # the command line a user would type, with the wrong token and with none
    for token_env in ({"RAY_AUTH_TOKEN": secrets.token_hex(32)}, {"RAY_AUTH_MODE": "disabled"}):
        env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_TOKEN"} | token_env
        r = subprocess.run([*_ray_cli(), "job", "submit", "--address", cluster.url, "--no-wait", "--",
                            "echo", "should-never-run"], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0, r.stdout + r.stderr
        assert re.search(r"401|403|[Aa]uthentication|Unauthorized|Forbidden", r.stdout + r.stderr), r.stdout + r.stderr
    assert not any("should-never-run" in e for e in submitted())

    # Ray's own ports (the GCS, which must listen beyond loopback for the other nodes) refuse a
    # driver without the token just the same
    env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_TOKEN"} | {"RAY_AUTH_MODE": "disabled"}
    r = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address='{cluster.gcs_address}')"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "InvalidAuthToken" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]


# ----------------------------------------------------------------------------- cluster files


def _ray_up_config(path: Path) -> dict:
    """What `ray up` does with the file before it touches any machine or cloud: defaults merged
    (prepare_config) and Ray's JSON schema checked (validate_config). For the on-premises file the
    provider's own bootstrap runs too: it needs no cloud account."""
    from ray.autoscaler._private.commands import _bootstrap_config
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    config = prepare_config(raw)
    validate_config(config)
    if raw["provider"]["type"] == "local":
        config = _bootstrap_config(raw, no_config_cache=True)
        validate_config(config)
    return config


def test_there_are_cluster_files_for_aws_gcp_and_on_premises():
    providers = {yaml.safe_load(p.read_text())["provider"]["type"] for p in RAY_UP_FILES}
    assert {"aws", "gcp", "local"} <= providers, [p.name for p in RAY_UP_FILES]


@pytest.mark.parametrize("path", RAY_UP_FILES, ids=lambda p: p.name)
def test_cluster_file_passes_rays_own_validation(path):
    config = _ray_up_config(path)
    assert config["head_node_type"] in config["available_node_types"]


@pytest.mark.parametrize("path", RAY_UP_FILES, ids=lambda p: p.name)
def test_cluster_file_is_safe_by_default(path):
    raw = yaml.safe_load(path.read_text())
    config = _ray_up_config(path)
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    text = path.read_text()
    # every `ray start` runs with token authentication; the head's dashboard/Jobs API on loopback
    ray_starts = [c for c in starts if "ray start" in c]
    assert ray_starts and all("RAY_AUTH_MODE=token" in c for c in ray_starts), ray_starts
    head = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert all("--dashboard-host=127.0.0.1" in c for c in head), head
    assert "0.0.0.0" not in "\n".join(starts)
    # the token travels to every node from the admin's machine, never through the file itself
    assert "~/.ray/auth_token" in config["file_mounts"], config["file_mounts"]
    assert not re.search(r"RAY_AUTH_TOKEN=\w", text)
    # nothing reachable from the internet except SSH from an admin network the user fills in
    settings = json.dumps(raw)  # the file without its comments
    assert "0.0.0.0/0" not in settings and "::/0" not in settings
    kind = raw["provider"]["type"]
    if kind == "aws":
        # Ray creates a security group with SSH open to 0.0.0.0/0 for any node type without one:
        # every node type names the group set up as in cluster/README.md
        for name, node_type in config["available_node_types"].items():
            assert node_type["node_config"].get("SecurityGroupIds"), name
        assert "security_group" not in raw["provider"]
    if kind == "gcp":
        # Ray would put nodes on the project's default network (SSH open to the internet there):
        # every node type names the subnetwork whose firewall cluster/README.md sets up
        for name, node_type in config["available_node_types"].items():
            nics = node_type["node_config"].get("networkInterfaces")
            assert nics and all("subnetworks/" in nic["subnetwork"] for nic in nics), name


@pytest.mark.parametrize("path", RAY_UP_FILES, ids=lambda p: p.name)
def test_cluster_file_installs_raylm_on_every_node_and_mounts_shared_storage(path):
    config = _ray_up_config(path)
    # prepare_config merges setup_commands into both head_setup_commands and worker_setup_commands
    for key in ("head_setup_commands", "worker_setup_commands"):
        commands = "\n".join(config[key])
        assert re.search(r"pip install .*raylm", commands), (key, commands)
        assert "/mnt/raylm" in commands, (key, commands)  # the shared storage of jobs/configs/*.yaml
    for name in JOB_CONFIGS:
        cfg = yaml.safe_load((REPO / "jobs" / "configs" / f"{name}.yaml").read_text())
        assert cfg["data_dir"].startswith("/mnt/raylm/") and cfg["save_dir"].startswith("/mnt/raylm/")


@pytest.mark.parametrize("path", [p for p in RAY_UP_FILES if yaml.safe_load(p.read_text())["provider"]["type"] != "local"],
                         ids=lambda p: p.name)
def test_cloud_cluster_file_has_cpu_workers_for_prepare_and_gpu_workers_for_training(path):
    config = _ray_up_config(path)
    types = config["available_node_types"]
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    cpu = [k for k, v in workers.items() if not v.get("resources", {}).get("GPU")]
    gpu = [k for k, v in workers.items() if v.get("resources", {}).get("GPU")]
    assert cpu and gpu, workers
    # the guide's 4 machines x 8 GPUs: the multi_node config's 32 workers fit
    multi = yaml.safe_load((REPO / "jobs" / "configs" / "multi_node.yaml").read_text())
    capacity = sum(types[k]["resources"]["GPU"] * types[k]["max_workers"] for k in gpu)
    assert capacity >= multi["num_workers"], capacity
    per_node_cpus = min(types[k]["resources"]["CPU"] // types[k]["resources"]["GPU"] for k in gpu)
    assert per_node_cpus >= multi["cpus_per_worker"]


def test_aws_node_configs_are_valid_ec2_launch_requests():
    """Each node_config is what Ray passes to EC2 RunInstances (plus MinCount/MaxCount, which Ray
    adds): checked against botocore's own EC2 API model, offline."""
    botocore_session = pytest.importorskip("botocore.session")
    from botocore.validate import ParamValidator

    shape = botocore_session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    for path in RAY_UP_FILES:
        config = _ray_up_config(path)
        if config["provider"]["type"] != "aws":
            continue
        for name, node_type in config["available_node_types"].items():
            request = {**node_type["node_config"], "MinCount": 1, "MaxCount": 1}
            request.pop("SubnetIds", None)  # Ray's own key: it picks one subnet from the list
            report = ParamValidator().validate(request, shape)
            assert not report.has_errors(), f"{path.name} {name}: {report.generate_report()}"


def _discovery_errors(value, schema: dict, schemas: dict, where: str) -> list[str]:
    """Differences between a value and a Google API discovery-document schema (field names, types,
    enums): a dry run of the request body without calling the API."""
    if "$ref" in schema:
        schema = schemas[schema["$ref"]]
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            return [f"{where}: expected an object, got {value!r}"]
        errors = []
        for key, item in value.items():
            sub = schema.get("properties", {}).get(key) or schema.get("additionalProperties")
            errors += (_discovery_errors(item, sub, schemas, f"{where}.{key}") if sub
                       else [f"{where}.{key}: no such field"])
        return errors
    if kind == "array":
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {value!r}"]
        return [e for i, item in enumerate(value) for e in _discovery_errors(item, schema["items"], schemas,
                                                                             f"{where}[{i}]")]
    if kind == "boolean" and not isinstance(value, bool):
        return [f"{where}: expected true/false, got {value!r}"]
    if kind == "integer" and not isinstance(value, int):
        return [f"{where}: expected an integer, got {value!r}"]
    if kind == "string":
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            return [f"{where}: expected a string, got {value!r}"]
        if "enum" in schema and value not in schema["enum"]:
            return [f"{where}: {value!r} is not one of {schema['enum']}"]
    return []


def test_gcp_node_configs_are_valid_compute_engine_instances():
    """Each node_config is the body Ray sends to Compute Engine's instances.insert: checked against
    the Compute API's discovery document that google-api-python-client ships, offline."""
    googleapiclient = pytest.importorskip("googleapiclient")
    doc = Path(googleapiclient.__file__).parent / "discovery_cache" / "documents" / "compute.v1.json"
    schemas = json.loads(doc.read_text())["schemas"]
    for path in RAY_UP_FILES:
        config = _ray_up_config(path)
        if config["provider"]["type"] != "gcp":
            continue
        for name, node_type in config["available_node_types"].items():
            errors = _discovery_errors(node_type["node_config"], {"$ref": "Instance"}, schemas, name)
            assert not errors, f"{path.name}: {errors}"


def test_every_placeholder_is_explained_in_the_readme():
    readme = (REPO / "cluster" / "README.md").read_text()
    for path in CLUSTER_FILES:
        for placeholder in set(re.findall(r"REPLACE_ME\w*", path.read_text())):
            assert placeholder in readme, f"{path.name}: {placeholder} is not explained in cluster/README.md"


def test_kuberay_rayjob_runs_the_multi_node_job_with_token_auth_and_no_public_service():
    import ray

    job = yaml.safe_load((REPO / "cluster" / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    cluster_spec = spec["rayClusterSpec"]
    assert cluster_spec["authOptions"]["mode"] == "token"
    assert cluster_spec["rayVersion"] == ray.__version__  # the Ray that raylm pins, as in cluster/Dockerfile
    assert f"rayproject/ray:{ray.__version__}-" in (REPO / "cluster" / "Dockerfile").read_text()
    assert "jobs/pretrain.py" in spec["entrypoint"] and "jobs/configs/multi_node.yaml" in spec["entrypoint"]
    settings = json.dumps(job)
    assert not re.search(r"LoadBalancer|NodePort|Ingress|0\.0\.0\.0/0", settings)
    assert "headService" not in cluster_spec["headGroupSpec"]
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    for group in groups:  # shared storage on every pod, at the path of jobs/configs/*.yaml
        mounts = [m for c in group["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])]
        assert any(m["mountPath"] == "/mnt/raylm" for m in mounts), group
    gpus = sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) * g["replicas"]
               for g in cluster_spec["workerGroupSpecs"] for c in g["template"]["spec"]["containers"])
    multi = yaml.safe_load((REPO / "jobs" / "configs" / "multi_node.yaml").read_text())
    assert gpus >= multi["num_workers"]


def test_on_premises_file_is_the_guides_four_machines():
    raw = yaml.safe_load((REPO / "cluster" / "onprem.yaml").read_text())
    config = _ray_up_config(REPO / "cluster" / "onprem.yaml")
    assert raw["provider"]["head_ip"] and len(raw["provider"]["worker_ips"]) == 3
    node_type = config["available_node_types"][config["head_node_type"]]
    assert node_type["min_workers"] == node_type["max_workers"] == 3


# ----------------------------------------------------------------------------- jobs/ configs


@pytest.mark.parametrize("name", JOB_CONFIGS)
def test_job_config_is_a_valid_train_config(name):
    from raylm.config import TrainConfig, build_config

    cfg = build_config(TrainConfig, REPO / "jobs" / "configs" / f"{name}.yaml")
    assert cfg.batch_size % (cfg.micro_batch_size * cfg.num_workers) == 0
    expected_workers = {"tiny_cpu": 2, "small_1gpu": 1, "multi_gpu": 4, "multi_node": 32}[name]
    assert cfg.num_workers == expected_workers and cfg.use_gpu == (name != "tiny_cpu")
    assert os.path.isabs(cfg.data_dir) and os.path.isabs(cfg.save_dir)  # a job's cwd is a temporary copy


# ----------------------------------------------------------------------------- teardown (last: it stops the cluster)


def test_stopping_the_cluster_ends_its_processes_and_no_other_ray(cluster, ray_session):
    """`ray stop` ends every Ray process on the machine; the test cluster's teardown signals only
    the processes it started. The session's local Ray keeps working through it."""
    @ray_session.remote
    def one() -> int:
        return 1

    assert ray_session.get(one.remote(), timeout=120) == 1
    ours = _marked_pids(cluster.marker)
    assert len(ours) >= 6, ours  # GCS, two raylets, dashboard, agents, ...
    assert cluster.stop() == []
    assert _marked_pids(cluster.marker) == []
    assert not any(p.poll() is None for p in cluster.procs)
    assert ray_session.get(one.remote(), timeout=60) == 1


def test_local_ray_starts_without_its_dashboard_when_its_packages_are_missing(tmp_path):
    """A Ray installed without ray[default]'s dashboard packages (the GPU machines' wheels) refuses
    include_dashboard=True; raylm then starts Ray without the dashboard and says what that costs."""
    script = (
        "import ray, ray._private.utils as u\n"
        "u.get_dashboard_dependency_error = lambda: \"No module named 'aiohttp_cors'\"\n"
        "from raylm.runtime import init_local_ray\n"
        "init_local_ray(num_cpus=1, logging_level='ERROR')\n"
        "print('resources', ray.cluster_resources().get('CPU'))\n"
        "ray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resources 1.0" in done.stdout
    assert "dashboard packages are missing" in done.stderr and "ray[default]" in done.stderr
