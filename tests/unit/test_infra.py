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
    assert set(kinds) == {"RayCluster", "RayJob", "CronJob", "RayCronJob"}
    cron = yaml.safe_load((ROOT / "infra/kuberay/nightly-rebase-cronjob.yaml").read_text())
    assert cron["spec"]["schedule"] == "0 2 * * *" and cron["spec"]["concurrencyPolicy"] == "Forbid"


# Fields of KubeRay 1.6.0's ray.io/v1 types (ray-operator/apis/ray/v1/raycronjob_types.go and
# rayjob_types.go): what a RayCronJob for the oldest operator that has it may use.
RAYCRONJOB_SPEC = {"jobTemplate", "schedule", "suspend"}  # timeZone only from 1.7
RAYJOB_SPEC = {
    "activeDeadlineSeconds",
    "backoffLimit",
    "rayClusterSpec",
    "submitterPodTemplate",
    "metadata",
    "clusterSelector",
    "submitterConfig",
    "managedBy",
    "deletionStrategy",
    "entrypoint",
    "runtimeEnvYAML",
    "jobId",
    "submissionMode",
    "entrypointResources",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "ttlSecondsAfterFinished",
    "preRunningDeadlineSeconds",
    "shutdownAfterJobFinishes",
    "suspend",
}


def test_raycronjob_runs_the_nightly_rebase_on_the_shared_cluster():
    path = ROOT / "infra/kuberay/nightly-rebase-raycronjob.yaml"
    [document] = yaml.safe_load_all(path.read_text())
    cron = yaml.safe_load((ROOT / "infra/kuberay/nightly-rebase-cronjob.yaml").read_text())
    rayjob = yaml.safe_load((ROOT / "infra/kuberay/rayjob-rebase.yaml").read_text())
    cluster = yaml.safe_load((ROOT / "infra/kuberay/raycluster.yaml").read_text())
    assert (document["apiVersion"], document["kind"]) == ("ray.io/v1", "RayCronJob")
    spec, template = document["spec"], document["spec"]["jobTemplate"]
    assert set(spec) <= RAYCRONJOB_SPEC and set(template) <= RAYJOB_SPEC
    assert spec["schedule"] == cron["spec"]["schedule"]
    # The same run as the one-off RayJob, on the RayCluster: no cluster of its own per night.
    assert template["entrypoint"] == rayjob["spec"]["entrypoint"]
    assert (
        template["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        and "rayClusterSpec" not in template
    )
    # KubeRay refuses these with clusterSelector (utils/validation.go, ValidateRayJobSpec).
    assert not template.get("backoffLimit") and not template.get("shutdownAfterJobFinishes")
    for rule in template.get("deletionStrategy", {}).get("deletionRules", []):
        assert rule["policy"] in {"DeleteSelf", "DeleteNone"} and rule["condition"]["jobStatus"] in {
            "SUCCEEDED",
            "FAILED",
        }
    # The file and the README name the versions and the feature gate.
    text, readme = path.read_text(), (ROOT / "README.md").read_text()
    assert "KubeRay >= 1.6" in text and "RayCronJob=true" in text
    row = next(line for line in readme.splitlines() if "nightly-rebase-raycronjob.yaml" in line)
    assert "KubeRay >= 1.6" in row and "`RayCronJob`" in row


def test_dockerfile_installs_torch_before_the_project():
    text = (ROOT / "infra/docker/Dockerfile").read_text()
    assert text.index("torch==${TORCH_VERSION}") < text.index("pip install --no-cache-dir .")
