"""memshard on a Ray cluster: the launcher configs against the schema in the ray wheel, the documented
`ray job submit` against a real head started on loopback, the KubeRay RayJob, and K shards on
fractional CPUs, custom resources and GPUs."""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import ray
import yaml
from conftest import all_runs
from mlflow.tracking import MlflowClient
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.job_submission import JobStatus, JobSubmissionClient

from memshard import SUBPACKAGES
from memshard.commands.cli import build_parser
from memshard.config import build_config
from memshard.data import load_dataset, resolve_dataset
from memshard.orchestrator.cluster import plan_actor_resources, resolve_ray_address
from memshard.orchestrator.rounds import start_shard_driver
from memshard.orchestrator.sharding import split_into_shards
from memshard.orchestrator.train import train

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # `ray` and `memshard` of the Python running the tests
LAUNCHER_CONFIGS = ["cluster.yaml", "deploy/cluster-onprem.yaml"]
MUST_NOT_UPLOAD = [".git", ".venv", "mlruns", "mlflow.db", ".memshard", "data"]


# ---- which cluster -----------------------------------------------------------------------------

def test_the_ray_address_asked_for_beats_ray_address_which_beats_a_local_instance(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert resolve_ray_address("10.0.0.2:6379") == "10.0.0.2:6379"
    assert resolve_ray_address("auto") == "auto"  # the cluster on this machine, asked for by name
    assert resolve_ray_address(None) == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "")
    assert resolve_ray_address(None) is None  # a local instance of our own
    monkeypatch.delenv("RAY_ADDRESS")
    assert resolve_ray_address(None) is None


# ---- the cluster-launcher configs -------------------------------------------------------------

def ray_schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS)
def test_launcher_config_validates_against_the_schema_in_the_ray_wheel(path):
    config = yaml.safe_load((REPO / path).read_text())
    validator = jsonschema.Draft7Validator(ray_schema())
    validator.validate(config)
    # What `ray up` does before it contacts a provider: merge the provider's defaults, resolve the
    # node types, and validate again (head type known, min_workers within max_workers, ...).
    validate_config(prepare_config(copy.deepcopy(config)))
    # The schema is strict enough to catch a typo, so passing it means something.
    misspelled = {**copy.deepcopy(config), "max_worker": 4}
    assert not validator.is_valid(misspelled)


def test_cluster_yaml_has_a_cpu_head_gpu_workers_memshard_and_mlflow():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # drivers and MLflow only: no shard actor on the head
    (worker,) = [t for name, t in types.items() if name != config["head_node_type"]]
    assert worker["resources"]["GPU"] >= 1 and 1 <= worker["min_workers"] <= worker["max_workers"]
    # Ray's own image at the installed (pinned) Ray version, on Python 3.11.
    for image in (config["docker"]["image"], config["docker"]["head_image"]):
        assert image.startswith(f"rayproject/ray:{ray.__version__}-py311-")
    assert config["file_mounts"]["~/memshard"] == "."
    for commands in (config["head_setup_commands"], config["worker_setup_commands"]):
        assert any(c.startswith("pip install") and "-e ~/memshard" in c for c in commands)
    assert set(MUST_NOT_UPLOAD) <= set(config["rsync_exclude"])
    check_head_starts_mlflow_and_token_auth(config)


def test_onprem_variant_names_its_hosts_and_starts_the_same_services():
    config = yaml.safe_load((REPO / "deploy" / "cluster-onprem.yaml").read_text())
    provider = config["provider"]
    assert provider["type"] == "local" and provider["head_ip"] and len(provider["worker_ips"]) >= 1
    assert any("-e ~/memshard" in c for c in config["setup_commands"])
    assert any(f"ray[default]=={ray.__version__}" in c for c in config["setup_commands"])
    assert any("--num-cpus=0" in c for c in config["head_start_ray_commands"])
    check_head_starts_mlflow_and_token_auth(config)


def check_head_starts_mlflow_and_token_auth(config: dict) -> None:
    head = " ".join(config["head_start_ray_commands"])
    mlflow_server = re.search(r"mlflow server (.*?)>", head).group(1).split()
    assert "--backend-store-uri" in mlflow_server and "--artifacts-destination" in mlflow_server
    assert mlflow_server[mlflow_server.index("--backend-store-uri") + 1].startswith("sqlite:///")
    assert mlflow_server[mlflow_server.index("--host") + 1] == "127.0.0.1"
    assert "--dashboard-host=127.0.0.1" in head
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("export RAY_AUTH_MODE=token" in c and "ray start" in c for c in commands)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


# ---- KubeRay ----------------------------------------------------------------------------------

def test_kuberay_rayjob_runs_memshard_on_gpu_workers():
    job = yaml.safe_load((REPO / "deploy" / "kuberay-rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    check_memshard_train_command(shlex.split(spec["entrypoint"]))
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__ and cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (group,) = cluster["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def check_memshard_train_command(argv: list[str]) -> None:
    """The entrypoint is a `memshard train` command that memshard itself accepts."""
    assert argv[:2] == ["memshard", "train"]
    args = build_parser().parse_args(argv[1:])
    build_config(args.preset or "digits", args.config, overrides={"iet.shards": args.shards}, sets=args.set)


# ---- job submission to a real cluster -----------------------------------------------------------

@dataclass
class JobCluster:
    dashboard_url: str
    gcs_address: str
    token: str
    client: JobSubmissionClient

    def client_env(self) -> dict[str, str]:
        """What a user's shell has: the venv on PATH, token auth on, the cluster's token."""
        env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
               "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        env.pop("RAY_ADDRESS", None)
        return env


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def cluster_pids(token: str) -> list[int]:
    """Every process of the test cluster: they all carry its unique token in their environment."""
    marker = f"RAY_AUTH_TOKEN={token}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                pass  # gone, or not ours
    return pids


@pytest.fixture(scope="module")
def job_cluster():
    """A Ray cluster of its own, started like a user's head node: `ray start --head` with 2 CPUs,
    token authentication and every server on 127.0.0.1, reached only through the Jobs HTTP API.

    It shares nothing with the session's `ray_cluster` (own ports, temp dir and token). It is
    stopped by killing exactly its own processes — never `ray stop`, which would stop every Ray
    instance on the machine, the session's cluster included.
    """
    temp_dir = tempfile.mkdtemp(prefix="msj-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    token = secrets.token_hex(32)
    gcs, dashboard, agent, client_server = free_ports(4)
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           # Ray otherwise advertises (and serves on) the machine's network address even when told
           # 127.0.0.1; in this mode every Ray server of the cluster listens on loopback only.
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(Path(temp_dir) / "ray-start.log", "w")
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client_server}",
         "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{dashboard}"
    try:
        client = None
        deadline = time.monotonic() + 180
        while client is None:
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`ray start --head` did not come up: {(Path(temp_dir) / 'ray-start.log').read_text()[-3000:]}")
            try:
                client = JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"})
            except Exception:  # not listening yet
                time.sleep(1)
        yield JobCluster(url, f"127.0.0.1:{gcs}", token, client)
    finally:
        try:
            for job in client.list_jobs() if client else []:
                if not job.status.is_terminal():
                    client.stop_job(job.submission_id)
        finally:
            os.killpg(head.pid, signal.SIGKILL)  # `ray start --block` and the daemons it started
            head.wait(timeout=60)
            deadline = time.monotonic() + 60
            while (left := cluster_pids(token)) and time.monotonic() < deadline:  # workers, job drivers
                for pid in left:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.5)
            log.close()
            shutil.rmtree(temp_dir, ignore_errors=True)
            assert not cluster_pids(token), "processes of the test cluster outlived it"


def wait_for_job(client: JobSubmissionClient, submission_id: str, limit_s: float = 900) -> tuple[JobStatus, str]:
    """The job's final status and its logs; a job still running after `limit_s` is stopped (a hang guard)."""
    deadline = time.monotonic() + limit_s
    while not (status := client.get_job_status(submission_id)).is_terminal():
        if time.monotonic() > deadline:
            client.stop_job(submission_id)
            pytest.fail(f"job {submission_id} still {status} after {limit_s:g} s:\n{client.get_job_logs(submission_id)[-3000:]}")
        time.sleep(2)
    return status, client.get_job_logs(submission_id)


def documented_job_submit() -> tuple[list[str], list[str]]:
    """The `ray job submit` command of docs/cluster.md: (its options, its entrypoint)."""
    text = (REPO / "docs" / "cluster.md").read_text()
    (block,) = re.findall(r"```bash\n(ray job submit .*?)\n```", text, re.S)
    argv = shlex.split(block.replace("\\\n", " "))
    split = argv.index("--")
    return argv[:split], argv[split + 1:]


def documented_runtime_env(store: str) -> dict:
    options, _ = documented_job_submit()
    runtime_env = json.loads(options[options.index("--runtime-env-json") + 1])
    runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] = store
    return runtime_env


def test_documented_runtime_env_excludes_what_must_not_upload(job_cluster, tmp_path):
    """The documented excludes on their own (no .gitignore to help): what must stay local stays local."""
    work = tmp_path / "checkout"
    for name in [".git/objects", ".venv/bin", "mlruns/0", ".memshard/checkpoints", "data/images", "orchestrator"]:
        (work / name).mkdir(parents=True)
        (work / name / "file.txt").write_text("x")
    (work / "mlflow.db").write_text("x")
    (work / "orchestrator" / "data.py").write_text("x")  # a module named data must still go
    runtime_env = {**documented_runtime_env(f"sqlite:///{tmp_path}/mlflow.db"), "working_dir": str(work)}
    listing = "import os; print('UPLOADED', sorted(os.path.join(d, f) for d, _, fs in os.walk('.') for f in fs))"
    job = job_cluster.client.submit_job(entrypoint=f'python -c "{listing}"', runtime_env=runtime_env)
    status, logs = wait_for_job(job_cluster.client, job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    uploaded = ast.literal_eval(re.search(r"UPLOADED (\[.*\])", logs).group(1))
    assert uploaded == ["./orchestrator/data.py", "./orchestrator/file.txt"]


def test_a_job_runs_the_uploaded_code_not_the_installed_one(job_cluster, tmp_path):
    """`--working-dir .` uploads a checkout: its memshard (and the top-level folders it maps as
    subpackages) is what the job and its actors import, though memshard is installed on the node."""
    work = tmp_path / "checkout"
    for name in ["memshard", *SUBPACKAGES]:  # a checkout holds every folder memshard maps
        shutil.copytree(REPO / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    (work / "orchestrator" / "__init__.py").write_text("UPLOADED = True\n")
    probe = ("import ray, memshard.orchestrator as o; ray.init(); "
             "f = ray.remote(lambda: __import__('memshard.orchestrator').orchestrator.__file__); "
             "print('DRIVER', o.__file__, getattr(o, 'UPLOADED', False)); print('ACTOR', ray.get(f.remote()))")
    job = job_cluster.client.submit_job(entrypoint=f'python -c "{probe}"',
                                        runtime_env={**documented_runtime_env(f"sqlite:///{tmp_path}/m.db"),
                                                     "working_dir": str(work)})
    status, logs = wait_for_job(job_cluster.client, job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    driver = re.search(r"DRIVER (\S+) (\w+)", logs)
    actor = re.search(r"ACTOR (\S+)", logs).group(1)
    assert driver.group(2) == "True" and str(REPO) not in driver.group(1), logs[-2000:]
    assert str(REPO) not in actor and actor.endswith("orchestrator/__init__.py"), logs[-2000:]


def test_documented_ray_job_submit_trains_and_logs_to_one_mlflow_store(job_cluster, tmp_path):
    """docs/cluster.md's command, run by the real `ray` CLI from the repository root; only the
    address, the tracking URI and the training size differ."""
    options, entrypoint = documented_job_submit()
    check_memshard_train_command(entrypoint)  # the documented training command itself is valid
    assert options[:3] == ["ray", "job", "submit"] and options[options.index("--working-dir") + 1] == "."
    store = f"sqlite:///{tmp_path}/mlflow.db"
    options[options.index("--address") + 1] = job_cluster.dashboard_url
    options[options.index("--runtime-env-json") + 1] = json.dumps(documented_runtime_env(store))
    submission_id = f"memshard-{secrets.token_hex(4)}"
    command = [str(VENV_BIN / "ray"), *options[1:], "--submission-id", submission_id, "--no-wait", "--",
               "memshard", "train", "--preset", "tiny", "--no-progress", "--register-as", "job-model"]
    submitted = subprocess.run(command, cwd=REPO, env=job_cluster.client_env(), capture_output=True, text=True,
                               timeout=300)
    assert submitted.returncode == 0, submitted.stderr[-3000:]

    status, logs = wait_for_job(job_cluster.client, submission_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "registered model: job-model version 1" in logs

    (run,) = all_runs(store)
    assert run.info.status == "FINISHED"
    assert run.data.tags["ray.address"] == job_cluster.gcs_address  # it ran on that cluster
    assert run.data.params["shards"] == "2"
    (version,) = MlflowClient(store).search_model_versions("name='job-model'")
    assert version.run_id == run.info.run_id and str(version.version) == "1"


def test_sixteen_shards_train_on_a_two_cpu_node(job_cluster, tmp_path):
    """K = 16 on 2 CPUs works: `auto` gives each actor 0.12 CPU (decided in docs/cluster.md)."""
    store = f"sqlite:///{tmp_path}/mlflow.db"
    job = job_cluster.client.submit_job(
        entrypoint="memshard train --preset tiny --shards 16 --rounds 1 --local-steps 2 --no-progress "
                   "--register-as sixteen",
        runtime_env={**documented_runtime_env(store), "working_dir": str(REPO)},
    )
    status, logs = wait_for_job(job_cluster.client, job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]

    (run,) = all_runs(store)
    assert run.info.status == "FINISHED" and run.data.params["shards"] == "16"
    assert run.data.tags["actor.resources"] == str({"CPU": 0.12}) and run.data.tags["nodes"] == "1"
    sizes = [run.data.metrics[f"shard_{k}_size"] for k in range(16)]
    assert sum(sizes) == 1797 and min(sizes) > 0
    assert all(np.isfinite(run.data.metrics[f"shard_{k}_loss"]) for k in range(16))
    assert MlflowClient(store).search_model_versions("name='sixteen'")


# ---- placement on the session's multi-node cluster ------------------------------------------------

def test_auto_sizing_skips_a_head_that_offers_no_cpus():
    """cluster.yaml's layout: a 0-CPU head beside the workers (it once divided by zero)."""
    cpu_only = plan_actor_resources(build_config("tiny"), 4, [{"CPU": 0.0}, {"CPU": 1.0}, {"CPU": 1.0}])
    assert (cpu_only.cpus, cpu_only.gpus) == (0.5, 0.0)
    gpus = plan_actor_resources(build_config("tiny"), 8, [{"CPU": 0.0}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}])
    assert (gpus.cpus, gpus.gpus) == (1.0, 0.25)


def test_more_shards_than_nodes_share_a_custom_resource(ray_cluster, mlflow_store):
    """3 actors on the 2 nodes that offer `worker_slot`, half a slot each: both nodes are used."""
    cfg = build_config("tiny", overrides={"mlflow.tracking_uri": mlflow_store, "iet.shards": 3, "iet.rounds": 1},
                       sets=["ray.actor_resources={worker_slot: 0.5}"])
    result = train(cfg, show_progress=False)
    run = MlflowClient(mlflow_store).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["nodes"] == "2"
    assert run.data.tags["actor.resources"] == str({"CPU": 0.5, "worker_slot": 0.5})


def test_more_shards_than_gpus_get_fractional_gpus_on_the_gpu_nodes(ray_cluster, gpu_nodes, mlflow_store, tmp_path):
    """Two GPU nodes join the cluster; K=4 actors get half a GPU and half a CPU each, on those nodes only
    (torch here is the CPU build, so the proxies compute on the CPU)."""
    cfg = build_config("tiny", overrides={"mlflow.tracking_uri": mlflow_store, "iet.shards": 4, "iet.rounds": 1})
    result = train(cfg, show_progress=False)
    run = MlflowClient(mlflow_store).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["nodes"] == "2"
    assert run.data.tags["actor.resources"] == str({"CPU": 0.5, "GPU": 0.5})

    dataset = load_dataset(resolve_dataset("digits", 8, None, tmp_path / "cache"))
    with start_shard_driver(cfg, dataset.images, split_into_shards(len(dataset), 4, seed=0)) as (driver, _):
        placed = driver.placement()
    assert {p["node_id"] for p in placed} == {node.node_id for node in gpu_nodes}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "ray.gpus_per_actor=1"],
         "no node can hold one shard actor needing {'CPU': 0.01, 'GPU': 1.0}: nodes offer [{'CPU': 2.0}, "
         "{'CPU': 1.0}, {'CPU': 1.0}]; lower ray.gpus_per_actor (auto fits the nodes), or add nodes with more GPU"),
        (["--set", "ray.actor_resources={tpu_slot: 1}"],
         "lower or drop tpu_slot in ray.actor_resources, or add nodes with more tpu_slot"),
        (["--set", "ray.actor_resources={worker_slot: 0.5}", "--shards", "5"],
         "5 shard actors needing {'CPU': 0.33, 'worker_slot': 0.5} each do not fit: the nodes hold 4; "
         "use --shards 4 or fewer, lower or drop worker_slot in ray.actor_resources, or add nodes"),
    ],
)
def test_resources_the_cluster_can_never_offer_fail_fast_with_one_line(ray_cluster, mlflow_store, cli_rejects, args, message):
    cli_rejects(["train", "--preset", "tiny", "--no-progress", "--set", f"mlflow.tracking_uri={mlflow_store}", *args],
                message)


def test_ray_job_submit_runs_a_tune_sweep_unchanged(job_cluster, tmp_path):
    """`memshard tune` as a Ray job on the token-authenticated cluster: the trials run there, the sweep's
    parent run holds a nested run per trial, and the chosen point is registered."""
    store = f"sqlite:///{tmp_path}/mlflow.db"
    grid = tmp_path / "grid.yaml"
    grid.write_text("iet.method: [ddpm, iet-agc-plus]\n")
    job = job_cluster.client.submit_job(
        entrypoint=f"memshard tune --preset tiny --grid {grid} --num-images 16 --sampling-steps 5 --eval-every 1 "
                   "--register-as tuned-by-job",
        runtime_env={**documented_runtime_env(store), "working_dir": str(REPO)},
    )
    status, logs = wait_for_job(job_cluster.client, job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "registered model: tuned-by-job version 1" in logs and "MLflow parent run: " in logs, logs[-3000:]

    runs = all_runs(store)
    (parent,) = [r for r in runs if r.info.run_name == "tune tiny"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(trials) == 2, [(r.info.run_name, r.info.status) for r in runs]
    assert all(r.info.status == "FINISHED" and r.data.tags["ray.address"] == job_cluster.gcs_address for r in trials)
    assert MlflowClient(store).search_model_versions("name='tuned-by-job'")
