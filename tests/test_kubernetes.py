"""deploy/kubernetes/: every overlay renders with the pinned kubectl's kustomize, passes strict
validation against the Kubernetes schemas offline (kubernetes-validate), and keeps what docs/deployment.md:
Kubernetes promises: non-root and read-only pods, probes on /health, requests and limits from the
benchmark, a grace period above the drain, the API port alone through the NetworkPolicy.

kubectl comes from scripts/install_kubectl.sh (scripts/test.sh runs it). A missing kubectl fails
these tests; SKIP_KUBERNETES=1 skips them on purpose.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
# The oldest Kubernetes still commonly run, and the pinned kubectl's own version.
KUBERNETES_VERSIONS = ("1.30.0", "1.35.0")
# Peak resident memory from process start, from the benchmark (docs/benchmark/latest.md): LiteRT
# int8 with 8 rows filling the context window (window_c8), and TensorFlow; fp32 LiteRT peaked at
# 1,213 MiB at the full window.
MEASURED_PEAK_MIB = {"litert": 943, "tf": 1922}
# Least time the startup probe allows: LiteRT warms up in 2-3 s, but the server first reads the
# whole model directory (~0.9 GB) to check its sums, from a volume other pods may be reading;
# the tf image's own HEALTHCHECK allows 300 s for XLA's compiles.
STARTUP_BUDGET_S = {"litert": 120, "tf": 300}

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("SKIP_KUBERNETES")), reason="SKIP_KUBERNETES is set: deploy/kubernetes/ not rendered")


def dockerfile_value(pattern: str) -> str:
    match = re.search(pattern, (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert match, pattern
    return match.group(1)


IMAGE_UID = int(dockerfile_value(r"^ARG UID=(\d+)$"))
IMAGE_HF_HOME = dockerfile_value(r"HF_HOME=(\S+)")


@pytest.fixture(scope="module")
def kubectl() -> str:
    path = Path(os.environ.get("KUBECTL") or ROOT / ".cache" / "kubernetes" / "kubectl")
    if not os.access(path, os.X_OK):
        pytest.fail(f"no kubectl at {path}: run scripts/install_kubectl.sh (scripts/test.sh does), "
                    "or set SKIP_KUBERNETES=1 to skip the Kubernetes tests")
    return str(path)


_rendered: dict[str, str] = {}


def render(kubectl: str, overlay: str) -> str:
    if overlay not in _rendered:
        done = subprocess.run([kubectl, "kustomize", str(DEPLOY / "overlays" / overlay)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        _rendered[overlay] = done.stdout
    return _rendered[overlay]


class Objects:
    """The rendered objects of one overlay, by kind and name."""

    def __init__(self, text: str):
        self.all = [doc for doc in yaml.safe_load_all(text) if doc]

    def of(self, kind: str) -> list[dict]:
        return [o for o in self.all if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict:
        found = [o for o in self.of(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"{len(found)} {kind} objects named {name}"
        return found[0]

    @property
    def api(self) -> dict:
        return self.one("Deployment", "llm-service")

    @property
    def job(self) -> dict | None:
        jobs = self.of("Job")
        return self.one("Job", "llm-service-model-init") if jobs else None

    @property
    def pods(self) -> list[dict]:
        """Every pod template: the API's, and the Job's where the weights are shared."""
        return [o["spec"]["template"]["spec"] for o in self.all if o["kind"] in ("Deployment", "Job")]

    @property
    def model_init(self) -> tuple[dict, dict]:
        """The pod and the container that fill the weights: the Job's, or the API pod's first
        init container (components/per-pod-weights)."""
        if self.job is not None:
            pod = self.job["spec"]["template"]["spec"]
            return pod, pod["containers"][0]
        pod = self.api["spec"]["template"]["spec"]
        return pod, pod["initContainers"][0]


@pytest.fixture(params=OVERLAYS)
def overlay(request) -> str:
    return request.param


@pytest.fixture
def objects(kubectl, overlay) -> Objects:
    return Objects(render(kubectl, overlay))


def validate(path: Path) -> subprocess.CompletedProcess:
    versions = [arg for v in KUBERNETES_VERSIONS for arg in ("-k", v)]
    return subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", *versions, str(path)],
                          capture_output=True, text=True, timeout=300)


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def backend_of(container: dict) -> str:
    """What the container serves with: its BACKEND, else the image's (the tag names the target)."""
    backend = env_of(container).get("BACKEND", {}).get("value")
    return backend or container["image"].rsplit(":", 1)[1]


def quantity(value: str | int) -> float:
    """A Kubernetes quantity in base units (cores or bytes)."""
    units = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * units[unit]


def pod_containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


def api_container(objects: Objects) -> dict:
    (container,) = [c for c in objects.api["spec"]["template"]["spec"]["containers"] if c["name"] == "api"]
    return container


def container_port(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return number


def exported_gauges() -> set[str]:
    """The gauges GET /metrics serves, from the service's own registry (before warm-up)."""
    from types import SimpleNamespace

    from service.metrics import Metrics

    runtime = SimpleNamespace(engine=None, scheduler=None, ready=False, warmup_seconds=None, memory_limit=None)
    text = Metrics(runtime).render().decode()
    return set(re.findall(r"^# TYPE (\S+) gauge$", text, re.MULTILINE))


def test_the_overlays_are_found():
    assert {"example", "tf", "per-pod-weights", "queue-autoscaling"} <= set(OVERLAYS)
    assert "llm_queue_prompts" in exported_gauges()


def test_every_overlay_validates_strictly(kubectl, overlay, tmp_path):
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(render(kubectl, overlay))
    done = validate(path)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    # A kind without a schema is only a warning to the tool: here it fails.
    assert not [line for line in lines if not line.startswith("INFO ")], done.stdout
    assert len([line for line in lines if " passed for resource " in line]) == \
        len(Objects(path.read_text()).all) * len(KUBERNETES_VERSIONS)


def test_strict_validation_rejects_an_unknown_field(kubectl, tmp_path):
    deployment = Objects(render(kubectl, "example")).api
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonRot"] = True
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(deployment))
    done = validate(path)
    assert done.returncode == 1
    assert "'runAsNonRot' was unexpected" in done.stdout


def test_every_image_is_the_overlays_own(objects):
    images = {c["image"] for pod in objects.pods for c in pod_containers(pod)}
    assert {image.rsplit(":", 1)[0] for image in images} == {"registry.example.com/llm-service"}, images


def test_pods_run_unprivileged_on_a_read_only_root(objects):
    assert len(objects.pods) == (2 if objects.job else 1)
    for pod in objects.pods:
        check_unprivileged(pod)


def check_unprivileged(pod: dict) -> None:
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    # The images' user; fsGroup lets it write a fresh volume (model-init).
    assert security["runAsUser"] == security["runAsGroup"] == security["fsGroup"] == IMAGE_UID
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod_containers(pod):
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }, container["name"]


def test_what_the_service_writes_is_on_a_writable_empty_dir(objects):
    """HF_HOME, Python's and TensorFlow's temporary files (/tmp) and XLA_CACHE_DIR, for the API
    and the model-init step; the root filesystem is read-only."""
    for pod, container in (objects.model_init, (objects.api["spec"]["template"]["spec"], api_container(objects))):
        volumes = {v["name"]: v for v in pod["volumes"]}
        writable = [m["mountPath"] for m in container["volumeMounts"]
                    if not m.get("readOnly") and "emptyDir" in volumes[m["name"]]]
        paths = [IMAGE_HF_HOME, "/tmp/"] + [e["value"] for n, e in env_of(container).items() if n == "XLA_CACHE_DIR"]
        for path in paths:
            assert any(path.startswith(mount.rstrip("/") + "/") for mount in writable), (container["name"], path)
        for volume in volumes.values():
            if "emptyDir" in volume:
                assert "sizeLimit" in volume["emptyDir"], volume["name"]


def test_the_api_reads_the_weights_only_after_model_init_wrote_them(objects):
    api_pod = objects.api["spec"]["template"]["spec"]
    init_pod, init = objects.model_init
    (models,) = [v for v in api_pod["volumes"] if v["name"] == "models"]
    if objects.job is not None:
        # One volume for every replica, filled by the Job, read-only for the API.
        pvc = objects.one("PersistentVolumeClaim", "llm-service-models")
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
        assert models["persistentVolumeClaim"] == {"claimName": "llm-service-models", "readOnly": True}
        (job_models,) = [v for v in init_pod["volumes"] if v["name"] == "models"]
        assert job_models["persistentVolumeClaim"] == {"claimName": "llm-service-models"}
    else:
        # Each pod its own copy, filled by its first init container.
        assert not objects.of("PersistentVolumeClaim")
        assert sorted(models) == ["emptyDir", "name"]
        assert api_pod["initContainers"][0] is init
    assert [(m["mountPath"], m.get("readOnly", False)) for m in init["volumeMounts"] if m["name"] == "models"] \
        == [("/models", False)]
    for container in pod_containers(api_pod):
        if container is not init:
            assert [(m["mountPath"], m.get("readOnly", False)) for m in container["volumeMounts"]
                    if m["name"] == "models"] == [("/models", True)], container["name"]
    # Before the API starts, a step waits for the conversion, which model-init writes last.
    wait = [c for c in api_pod["initContainers"] if c["name"] == "wait-for-model"]
    assert wait and "has_litert_files" in wait[0]["command"][-1]


def test_the_job_and_the_api_run_what_compose_runs(objects):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    _, init = objects.model_init
    assert init["command"] == compose["model-init"]["command"]
    assert init["image"].endswith(":tf")
    assert env_of(init)["MODEL_DIR"]["value"] == compose["model-init"]["environment"]["MODEL_DIR"]
    assert env_of(init)["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True

    api = api_container(objects)
    env = env_of(api)
    for name in ("MODEL_DIR", "HF_HUB_OFFLINE"):
        assert env[name]["value"] == compose["api"]["environment"][name], name
    assert int(env["PORT"]["value"]) == container_port(api, "http") == 8000
    assert api["image"].rsplit(":", 1)[1] == backend_of(api)
    # The key comes from a Secret that may be absent (then the API takes every request).
    assert env["API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "llm-service-api-key", "key": "api-keys", "optional": True}


def test_every_config_map_reference_resolves(objects):
    maps = {m["metadata"]["name"]: m["data"] for m in objects.of("ConfigMap")}
    references = [e["valueFrom"]["configMapKeyRef"]
                  for pod in objects.pods
                  for container in pod_containers(pod)
                  for e in container.get("env", []) if "configMapKeyRef" in e.get("valueFrom", {})]
    assert {r["key"] for r in references} == {"MODEL_ID", "MODEL_REVISION", "SERVED_MODEL_NAME"}
    for reference in references:
        assert reference["key"] in maps[reference["name"]]


def test_probes_ask_health_and_the_startup_probe_covers_the_warm_up(objects):
    api = api_container(objects)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        check = api[probe]["httpGet"]
        assert check["path"] == "/health", probe
        assert container_port(api, check["port"]) == 8000, probe
        assert api[probe]["timeoutSeconds"] >= 2, probe
    startup = api["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= STARTUP_BUDGET_S[backend_of(api)]


def test_resources_come_from_the_benchmark_and_make_a_guaranteed_pod(objects):
    pod = objects.api["spec"]["template"]["spec"]
    for container in pod_containers(pod):
        resources = container["resources"]
        assert resources["requests"] == resources["limits"], container["name"]
        assert set(resources["limits"]) == {"cpu", "memory"}, container["name"]
    api = api_container(objects)
    limits = api["resources"]["limits"]
    assert quantity(limits["memory"]) >= MEASURED_PEAK_MIB[backend_of(api)] * 2**20 * 1.25
    # The throughput figures are per replica on 2 cores.
    assert quantity(limits["cpu"]) == 2
    # NUM_THREADS follows the CPU limit: the default would count the node's cores.
    assert env_of(api)["NUM_THREADS"]["valueFrom"]["resourceFieldRef"] == {
        "containerName": "api", "resource": "limits.cpu", "divisor": "1"}
    # Converting DistilGPT2's shape peaked at 3.1 GiB resident (measured with /usr/bin/time -v).
    assert quantity(objects.model_init[1]["resources"]["limits"]["memory"]) >= 3122 * 2**20 * 1.25


def test_the_grace_period_outlasts_the_drain(objects):
    pod = objects.api["spec"]["template"]["spec"]
    api = api_container(objects)
    drain = int(env_of(api)["SHUTDOWN_GRACE_SECONDS"]["value"])
    pause = int(api["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert api["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= pause + drain + 5


def test_the_network_policy_admits_the_api_port_only(objects):
    pod_labels = objects.api["spec"]["template"]["metadata"]["labels"]
    policies = [p for p in objects.of("NetworkPolicy")
                if p["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()]
    assert len(policies) == 1
    spec = policies[0]["spec"]
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    (rule,) = spec["ingress"]
    assert list(rule) == ["ports"]  # from anywhere, to these ports only
    api = api_container(objects)
    assert [(container_port(api, p["port"]), p["protocol"]) for p in rule["ports"]] == [(8000, "TCP")]
    others = [p for p in objects.of("NetworkPolicy") if p is not policies[0]]
    if objects.job is None:
        # The pod downloads the weights itself: names and HTTPS, nothing else.
        (rule,) = spec["egress"]
        assert list(rule) == ["ports"]
        assert sorted((p["port"], p["protocol"]) for p in rule["ports"]) == [(53, "TCP"), (53, "UDP"), (443, "TCP")]
        assert not others
        return
    assert spec["egress"] == []  # nothing is fetched at run time
    # The Job's pod takes no connection at all.
    (job_policy,) = others
    assert job_policy["spec"]["podSelector"]["matchLabels"].items() <= \
        objects.job["spec"]["template"]["metadata"]["labels"].items()
    assert job_policy["spec"]["policyTypes"] == ["Ingress"] and "ingress" not in job_policy["spec"]


def test_service_autoscaler_and_disruption_budget_select_the_api(objects):
    deployment = objects.api
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    service = objects.one("Service", "llm-service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert container_port(api_container(objects), port["targetPort"]) == 8000

    hpa = objects.one("HorizontalPodAutoscaler", "llm-service")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm-service"}
    (metric,) = hpa["spec"]["metrics"]
    if metric["type"] == "Pods":
        # A gauge the service really exports (through a metrics adapter).
        assert metric["pods"]["metric"]["name"] in exported_gauges()
        assert metric["pods"]["target"]["type"] == "AverageValue"
    else:
        assert metric == {"type": "Resource", "resource": {
            "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}
    assert 2 <= hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]

    pdb = objects.one("PodDisruptionBudget", "llm-service")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # With at least two replicas, one may go at a time: drains proceed, serving never stops.
    assert pdb["spec"]["maxUnavailable"] == 1
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
