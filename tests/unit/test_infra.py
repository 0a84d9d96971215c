"""Every manifest under infra/ parses, and every job and config it names exists."""

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[2]
JOB = re.compile(r"\bjobs\.([a-z_]+)\b")
CONFIG = re.compile(r"jobs/configs/[\w.-]+\.yaml")


def _documents():
    for path in sorted((ROOT / "infra").rglob("*")):
        if path.suffix in (".yaml", ".yml"):
            yield path, list(yaml.safe_load_all(path.read_text()))
        elif path.suffix == ".json":
            yield path, [json.loads(path.read_text())]


def test_manifests_parse_and_name_existing_jobs_and_configs():
    seen = set()
    for path, documents in _documents():
        assert documents and all(isinstance(d, dict) for d in documents), path
        text = path.read_text()
        for job in JOB.findall(text):
            assert (ROOT / "jobs" / f"{job}.py").exists(), (path, job)
            seen.add(job)
        for config in CONFIG.findall(text):
            assert (ROOT / config).exists(), (path, config)
    assert {"compress", "rebase", "export"} <= seen


def test_kubernetes_objects_are_well_formed():
    kinds = {}
    for path, documents in _documents():
        for d in documents:
            if "apiVersion" in d:
                assert d.get("kind") and d.get("metadata") and d.get("spec"), path
                kinds.setdefault(d["kind"], []).append(path.name)
    assert set(kinds) == {"RayCluster", "RayJob", "CronJob"}
    cron = yaml.safe_load((ROOT / "infra/kuberay/nightly-rebase-cronjob.yaml").read_text())
    assert cron["spec"]["schedule"] == "0 2 * * *" and cron["spec"]["concurrencyPolicy"] == "Forbid"


def test_dockerfile_installs_torch_before_the_project():
    text = (ROOT / "infra/docker/Dockerfile").read_text()
    assert text.index("torch==${TORCH_VERSION}") < text.index("pip install --no-cache-dir .")
