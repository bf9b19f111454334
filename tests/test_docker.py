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
