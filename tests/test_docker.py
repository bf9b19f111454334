"""What can be checked of docker/ without a Docker engine: files, paths and the shared install recipe."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from geoseg.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def test_images_use_the_same_install_script_as_make():
    makefile = (ROOT / "Makefile").read_text()
    assert "bash docker/install.sh" in makefile
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        text = (ROOT / "docker" / name).read_text()
        assert "docker/install.sh /opt/venv/bin/python" in text
        for src in re.findall(r"^COPY (\S+(?: \S+)*) \S+$", text, flags=re.M):
            for part in src.split():
                assert (ROOT / part).exists(), f"{name}: COPY source {part} is missing"
    install = (ROOT / "docker" / "install.sh").read_text()
    assert "-c constraints.txt torch torchvision" in install


def test_compose_runs_a_scheduler_two_workers_and_a_job():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert services["scheduler"]["command"][:2] == ["dask", "scheduler"]
    assert services["worker"]["deploy"]["replicas"] == 2
    assert "tcp://scheduler:8786" in services["worker"]["command"]
    job = services["job"]["command"]
    assert job[:2] == ["geoseg", "run"]
    cfg = load_config(ROOT / job[2], [job[job.index("--set") + 1]])
    assert cfg.cluster.address == "tcp://scheduler:8786"


def test_images_start_workers_with_the_settings_of_geoseg_worker_env():
    from geoseg.cluster import worker_exports

    wanted = {line.removeprefix("export ") for line in worker_exports()}
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        text = (ROOT / "docker" / name).read_text().replace("\\\n", " ")
        env = {item for line in re.findall(r"^ENV (.+)$", text, flags=re.M) for item in line.split()}
        assert wanted <= env, f"{name} lacks {sorted(wanted - env)}"


def test_the_kubernetes_job_runs_on_its_dask_cluster_with_object_storage_only():
    """docker/kubernetes.yaml, a DaskJob of the Dask operator: the runner gets no scheduler address
    but DASK_SCHEDULER_ADDRESS (tested in test_distributed), every location is a URL, no pod
    mounts a volume, and credentials come from a Secret, never written in the manifest."""
    from dask.utils import parse_bytes

    job = yaml.safe_load((ROOT / "docker" / "kubernetes.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("kubernetes.dask.org/v1", "DaskJob")
    pods = {
        "job": job["spec"]["job"]["spec"],
        "worker": job["spec"]["cluster"]["spec"]["worker"]["spec"],
        "scheduler": job["spec"]["cluster"]["spec"]["scheduler"]["spec"],
    }
    (runner,) = pods["job"]["containers"]
    args = runner["args"]
    assert args[:2] == ["geoseg", "run"]
    cfg = load_config(ROOT / args[2], [])
    assert cfg.cluster.address is None and cfg.cluster.jobqueue is None
    assert args[args.index("--input") + 1].startswith("s3://") and args[args.index("--out") + 1].startswith("s3://")
    (worker,) = pods["worker"]["containers"]
    assert worker["args"][:2] == ["dask", "worker"] and not any(a.startswith("tcp://") for a in worker["args"])
    (scheduler,) = pods["scheduler"]["containers"]
    assert scheduler["args"] == ["dask", "scheduler"]
    service = job["spec"]["cluster"]["spec"]["scheduler"]["service"]
    assert service["selector"]["dask.org/cluster-name"] == job["metadata"]["name"]
    assert {p["port"] for p in service["ports"]} == {8786, 8787}
    for name, pod in pods.items():
        assert "volumes" not in pod, f"{name}: a volume is a shared disk the workers must not need"
        images = {c["image"] for c in pod["containers"]}
        assert images == {"geoseg:cpu"}, name
    for container in (runner, worker):
        assert container["envFrom"] == [{"secretRef": {"name": "geoseg-object-store"}}]
        assert "env" not in container  # no credential written into the manifest
    # the worker's memory limit for Dask stays under the pod's, which the kernel enforces
    memory_limit = worker["args"][worker["args"].index("--memory-limit") + 1]
    assert parse_bytes(memory_limit) < parse_bytes(worker["resources"]["limits"]["memory"])
