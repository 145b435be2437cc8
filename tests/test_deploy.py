"""deploy/, checked offline: what `kubectl apply` and `docker build` would refuse, and names that must agree.

Kubernetes' own kinds (Secret, and every Pod template inside the KubeRay resources) are validated
with kubernetes-validate's strict Kubernetes schemas; RayCluster and RayJob, which it does not know,
with tests/kuberay_v1.schema.json (KubeRay's ray.io/v1 fields).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

from backend.config import TrainConfig
from napari_raysam import cluster as clusters
from napari_raysam.auth import in_clear_warning

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES = "1.37"
KUBERAY_SCHEMA = json.loads((Path(__file__).parent / "kuberay_v1.schema.json").read_text())


def documents(name: str) -> list[dict]:
    return list(yaml.safe_load_all((DEPLOY / name).read_text()))


def cluster_specs(resource: dict) -> list[dict]:
    return [resource["spec"]] if resource["kind"] == "RayCluster" else [resource["spec"]["rayClusterSpec"]]


def pod_templates(resource: dict) -> dict[str, dict]:
    """The Pod templates of a RayCluster or RayJob, by where they are."""
    templates = {}
    for spec in cluster_specs(resource):
        templates["head"] = spec["headGroupSpec"]["template"]
        templates.update((f"worker group {group['groupName']}", group["template"]) for group in spec.get("workerGroupSpecs", []))
    if "submitterPodTemplate" in resource["spec"]:
        templates["submitter"] = resource["spec"]["submitterPodTemplate"]
    return templates


def validate(resource: dict) -> None:
    """Raise if ``kubectl apply`` (with strict field validation) would refuse ``resource``."""
    try:
        kubernetes_validate.validate(resource, KUBERNETES, strict=True)
    except kubernetes_validate.SchemaNotFoundError:  # KubeRay's kinds: our schema, then each Pod template
        jsonschema.validate(resource, KUBERAY_SCHEMA)
        for where, template in pod_templates(resource).items():
            pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
            kubernetes_validate.validate(pod_template, KUBERNETES, strict=True)


RAY_RESOURCES = documents("raycluster.yaml") + documents("rayjob.yaml")
SECRETS = {secret["metadata"]["name"]: secret for secret in documents("secrets.example.yaml")}


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml", "secrets.example.yaml"])
def test_the_manifests_are_valid_kubernetes_resources(name):
    for resource in documents(name):
        validate(resource)


@pytest.mark.parametrize("mistake", [
    lambda r: cluster_specs(r)[0]["workerGroupSpecs"][0].pop("groupName"),
    lambda r: cluster_specs(r)[0].update(workerGroupSpec=[]),  # a typo of workerGroupSpecs
    lambda r: cluster_specs(r)[0]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"][1]["valueFrom"]["secretKeyRef"].pop("key"),
    lambda r: cluster_specs(r)[0]["headGroupSpec"]["template"]["spec"]["containers"][0].update(envfrom=[]),
], ids=["no group name", "misspelt field", "secret without key", "misspelt container field"])
def test_the_validation_catches_the_mistakes_kubectl_would_refuse(mistake):
    for resource in RAY_RESOURCES:
        broken = copy.deepcopy(resource)
        mistake(broken)
        with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
            validate(broken)


def ray_containers(resource: dict) -> dict[str, dict]:
    return {where: template["spec"]["containers"][0] for where, template in pod_templates(resource).items()}


@pytest.mark.parametrize("resource", RAY_RESOURCES, ids=lambda r: r["kind"])
def test_every_ray_container_has_token_auth_and_the_storage_credentials(resource, monkeypatch):
    for where, container in ray_containers(resource).items():
        env = {item["name"]: item for item in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", where
        reference = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        token = SECRETS[reference["name"]]["stringData"][reference["key"]]  # the Secret exists with that key
        # the variable the cluster gets is the one our client reads the token from
        monkeypatch.setenv("RAY_AUTH_TOKEN", token)
        assert clusters.read_token() == token.strip()
        if where != "submitter":  # the nodes read and write the runs' storage; the submitter only submits
            assert [source["secretRef"]["name"] for source in container["envFrom"]] == ["napari-raysam-storage"], where


def test_the_storage_secret_holds_what_pyarrow_s3_reads():
    storage = SECRETS["napari-raysam-storage"]["stringData"]
    assert set(storage) <= {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN"}
    # Ray Train's storage (pyarrow.fs) goes where AWS_ENDPOINT_URL says: a closed port on loopback here
    probe = "import pyarrow.fs as fs; f, p = fs.FileSystem.from_uri('s3://napari-raysam/runs'); f.get_file_info(p)"
    env = {"PATH": "/usr/bin:/bin", **storage, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "127.0.0.1:9" in result.stderr, result.stderr[-2000:]


def test_one_image_tag_and_one_ray_version_across_the_files():
    images = {c["image"] for resource in RAY_RESOURCES for c in ray_containers(resource).values()}
    assert len(images) == 1, images
    image = images.pop()
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for text in (dockerfile, (DEPLOY / "README.md").read_text()):  # how both say to build it
        assert re.findall(r"docker build -f deploy/Dockerfile -t (\S+) \.", text) == [image]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert image.rsplit(":", 1)[1] == project["version"]
    ray_image = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)-py311$", dockerfile, re.M)
    assert ray_image, "the Dockerfile's base image is not a rayproject/ray release"
    ray_version = ray_image.group(1)
    assert {spec["rayVersion"] for resource in RAY_RESOURCES for spec in cluster_specs(resource)} == {ray_version}
    ray = next(Requirement(d) for d in project["dependencies"] if Requirement(d).name == "ray")
    assert ray.specifier.contains(ray_version), (ray, ray_version)


def test_the_image_installs_the_dependencies_of_pyproject(tmp_path):
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "COPY pyproject.toml /tmp/napari-raysam/pyproject.toml" in dockerfile
    listing = re.search(r'RUN python -c "(.+?)"', dockerfile).group(1)  # the RUN step that lists them
    listing = listing.replace("/tmp/napari-raysam/pyproject.toml", str(ROOT / "pyproject.toml"))
    listed = subprocess.run([sys.executable, "-c", listing], capture_output=True, text=True, check=True).stdout.split("\n")
    assert [line for line in listed if line] == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    # and the build context holds nothing else (not .venv, nor data)
    assert (DEPLOY / "Dockerfile.dockerignore").read_text().split("\n")[1:3] == ["*", "!pyproject.toml"]


def test_the_rayjob_runs_the_backend_with_a_valid_config():
    (job,) = documents("rayjob.yaml")
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert set(runtime_env) == {"working_dir"} and re.fullmatch(r"s3://[^/]+/.+\.zip", runtime_env["working_dir"])
    # the job entry point's command line (backend/__main__.py), with the config file from the working_dir zip
    assert shlex.split(job["spec"]["entrypoint"]) == ["python", "-m", "backend", "train", "--config", "config.json"]
    config = TrainConfig.from_json(DEPLOY / "train_config.json")
    assert config.storage.startswith("s3://") and config.data.startswith("s3://") and config.run_name
    readme = (DEPLOY / "README.md").read_text()  # the guide zips that config as config.json and uploads it there
    assert "cp deploy/train_config.json build/napari-raysam-job/config.json" in readme
    assert f"aws s3 cp build/{runtime_env['working_dir'].rsplit('/', 1)[1]} {runtime_env['working_dir'].rsplit('/', 1)[0]}/" in readme


def test_the_guide_port_forwards_the_dashboard_to_a_loopback_address():
    readme = (DEPLOY / "README.md").read_text()
    (raycluster,) = documents("raycluster.yaml")
    assert f"kubectl port-forward svc/{raycluster['metadata']['name']}-head-svc 8265:8265" in readme
    address = "http://127.0.0.1:8265"
    assert f"--address {address}" in readme and in_clear_warning(address) is None  # the token never crosses the network in the clear
    for secret in SECRETS:
        assert f"kubectl create secret generic {secret}" in readme
