"""deploy/ checked offline: each file against a published schema or parser, and against each other.

No Docker engine or cluster is needed. Schemas come from PyPI packages (kubernetes-validate,
check-jsonschema, cloudcoil-models-prometheus-operator), and every command line is parsed by
yayi-serve's own argument parser, so a flag that does not exist fails here, not in a pod.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import dockerfile
import jsonschema
import kubernetes_validate
import pydantic
import pytest
import yaml
from check_jsonschema.cli.main_command import main as check_jsonschema
from click.testing import CliRunner
from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

from loadtest import ROOT
from server.cli import build_parser, config_from_args
from server.metrics import ServerMetrics
from tests.helpers.deploy_files import DASHBOARD, DEPLOY, DOCKERFILES, PROMETHEUS, all_exprs, dashboard, panels

K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-compose.yml"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"

GRPC_PORT, METRICS_PORT = 50051, 9400
# An older minor and the newest one bundled: the manifests should need nothing recent.
K8S_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())
BUILTIN_K8S_MANIFESTS = ["deployment.yaml", "deployment-gpu.yaml", "service.yaml"]
DEPLOYMENTS = {"cpu": "deployment.yaml", "gpu": "deployment-gpu.yaml"}

# Metric names from docs/design.md's Metrics table that the dashboard may query (the torch allocator,
# KV-cache and stall series are not among them); histograms are listed without their _bucket/_sum/_count series.
METRICS = {
    "yayi_requests_total",
    "yayi_prompt_tokens_total",
    "yayi_generation_tokens_total",
    "yayi_time_to_first_token_seconds",
    "yayi_inter_token_latency_seconds",
    "yayi_request_duration_seconds",
    "yayi_request_queue_seconds",
    "yayi_requests_running",
    "yayi_requests_waiting",
    "yayi_device_memory_used_bytes",
    "yayi_device_memory_peak_bytes",
    "yayi_device_utilization_ratio",
    "yayi_device_power_watts",
    "yayi_energy_joules_total",
    "yayi_engine_info",
}
HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")
POWER_METRICS = ("yayi_device_power_watts", "yayi_energy_joules_total")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Fail any in-process attempt to reach beyond loopback: the validators must work offline."""
    real_connect = socket.socket.connect

    def connect(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("localhost", "::1") and not host.startswith("127."):
            raise AssertionError(f"network access to {address} during an offline check")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def validate_manifests(path: Path, version: str) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        # strict: unknown fields (a misspelt probe, say) are errors, as with kubectl --validate=strict.
        kubernetes_validate.validate(doc, version, strict=True)


def serve_config(argv: list[str]):
    """The ServerConfig yayi-serve would run with: argparse exits (SystemExit) on an unknown flag."""
    assert argv[0] == "yayi-serve", argv
    return config_from_args(build_parser().parse_args(argv[1:]))


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


# ---- Kubernetes ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", BUILTIN_K8S_MANIFESTS)
def test_manifest_matches_the_kubernetes_schema(name, version):
    validate_manifests(K8S / name, version)


def test_kubernetes_validator_rejects_a_broken_manifest():
    doc = load_yaml(K8S / "deployment.yaml")
    container(doc)["readinessProbe"]["grpcc"] = container(doc)["readinessProbe"].pop("grpc")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


def test_every_manifest_is_checked():
    checked = {*BUILTIN_K8S_MANIFESTS, "servicemonitor.yaml"}
    assert {p.name for p in K8S.glob("*.y*ml")} == checked


def check_servicemonitor(doc: dict) -> None:
    # A CRD has no schema in kubernetes-validate. cloudcoil's models are generated from the
    # Prometheus Operator's CRD (its openAPIV3Schema): they check types and required fields;
    # the round trip catches unknown fields, which pydantic would otherwise drop silently.
    model = ServiceMonitor.model_validate(doc)
    assert model.model_dump(by_alias=True, exclude_unset=True) == doc, "unknown or misplaced fields"


def test_servicemonitor_matches_the_prometheus_operator_crd():
    doc = load_yaml(K8S / "servicemonitor.yaml")
    check_servicemonitor(doc)
    service = load_yaml(K8S / "service.yaml")
    assert doc["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert [ports[e["port"]] for e in doc["spec"]["endpoints"]] == [METRICS_PORT]


def test_servicemonitor_check_rejects_unknown_and_missing_fields():
    doc = load_yaml(K8S / "servicemonitor.yaml")
    endpoint = doc["spec"]["endpoints"][0]
    endpoint["intervall"] = endpoint.pop("interval")
    with pytest.raises(AssertionError, match="unknown or misplaced fields"):
        check_servicemonitor(doc)
    del doc["spec"]["selector"]
    with pytest.raises(pydantic.ValidationError, match="selector"):
        check_servicemonitor(doc)


def test_service_reaches_both_deployments_on_named_ports():
    service = load_yaml(K8S / "service.yaml")
    assert service["spec"]["type"] == "ClusterIP"
    assert {(p["name"], p["port"]) for p in service["spec"]["ports"]} == {
        ("grpc", GRPC_PORT),
        ("metrics", METRICS_PORT),
    }
    for name in DEPLOYMENTS.values():
        deployment = load_yaml(K8S / name)
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items(), name
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(), name
        container_ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
        for port in service["spec"]["ports"]:
            assert container_ports[port["targetPort"]] == port["port"], (name, port)


@pytest.mark.parametrize("variant", DEPLOYMENTS)
def test_deployment_probes_drain_and_scrape(variant):
    deployment = load_yaml(K8S / DEPLOYMENTS[variant])
    pod = deployment["spec"]["template"]
    main = container(deployment)
    # args alone would replace the image's CMD, program name included.
    assert main["command"] == ["yayi-serve"]
    config = serve_config([*main["command"], *main["args"]])
    assert (config.port, config.metrics_host, config.metrics_port) == (GRPC_PORT, "0.0.0.0", METRICS_PORT)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert main[probe]["grpc"] == {"port": GRPC_PORT}, probe
    startup = main["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "model load needs minutes of slack"
    pre_stop = int(main["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop + config.grace_period_s
    assert pod["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(METRICS_PORT),
        "prometheus.io/path": "/metrics",
    }
    assert {"cpu", "memory"} <= main["resources"]["requests"].keys() <= main["resources"]["limits"].keys()
    if variant == "gpu":
        assert config.device == "cuda"
        assert main["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["spec"]["nodeSelector"] and pod["spec"]["tolerations"]
        assert "cuda" in main["image"]
    else:
        assert config.device == "cpu"
        assert not any(key.startswith("nvidia.com/") for key in main["resources"]["limits"])


# ---- the llm-d router (Kubernetes, deploy/k8s/llm-d) ---------------------------------------
# Never applied to a cluster here. The InferencePool is checked against the Inference Extension's
# own CRD (committed in crds/), the router's config against a schema written from its Go types
# (schemas/), the rest against Kubernetes' schemas, and all of them against each other.

LLMD = K8S / "llm-d"
LLMD_BUILTIN = ["yayi-serve.yaml", "epp-config.yaml", "epp.yaml"]
INFERENCEPOOL_CRD = LLMD / "crds" / "inference.networking.k8s.io_inferencepools.yaml"
EPP_CONFIG_SCHEMA = LLMD / "schemas" / "endpointpickerconfig-v0.9.0.schema.json"
EPP_FLAGS = LLMD / "schemas" / "epp-flags-v0.9.0.txt"
EPP_CONFIG_KEY = "yayi.yaml"


def llmd_docs(name: str) -> dict[str, dict]:
    """A multi-document manifest's objects by kind."""
    return {doc["kind"]: doc for doc in yaml.safe_load_all((LLMD / name).read_text())}


def strict_openapi(schema):
    """A CRD's openAPIV3Schema for jsonschema, with unknown fields refused as kubectl --validate=strict does.

    The API server prunes unknown fields of a structural schema silently; here each object that lists
    its properties allows no others (metadata, which lists none, stays open).
    """
    if isinstance(schema, dict):
        schema = {k: strict_openapi(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict_openapi(v) for v in schema]
    return schema


def check_inferencepool(doc: dict) -> None:
    crd = load_yaml(INFERENCEPOOL_CRD)
    assert doc["apiVersion"] == f"{crd['spec']['group']}/v1" and doc["kind"] == crd["spec"]["names"]["kind"]
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"]]
    jsonschema.Draft7Validator(strict_openapi(version["schema"]["openAPIV3Schema"])).validate(doc)
    # The CRD's CEL rules (x-kubernetes-validations), which jsonschema does not run.
    ref = doc["spec"]["endpointPickerRef"]
    assert ref.get("kind", "Service") != "Service" or "port" in ref, "port is required when kind is 'Service'"
    numbers = [p["number"] for p in doc["spec"]["targetPorts"]]
    assert len(numbers) == len(set(numbers)), "port number must be unique"


def test_inferencepool_matches_the_inference_extension_crd():
    check_inferencepool(load_yaml(LLMD / "inferencepool.yaml"))


def test_inferencepool_check_rejects_broken_pools():
    doc = load_yaml(LLMD / "inferencepool.yaml")
    for breaks in (
        lambda d: d["spec"].update(appProtocol="h2c"),  # only http and kubernetes.io/h2c exist
        lambda d: d["spec"].update(appprotocol=d["spec"].pop("appProtocol")),  # optional, so only strictness sees it
        lambda d: d["spec"].update(targetPort=d["spec"].pop("targetPorts")),
        lambda d: d["spec"]["endpointPickerRef"].pop("port"),
        lambda d: d["spec"]["targetPorts"].append({"number": 50051}),
    ):
        broken = json.loads(json.dumps(doc))
        breaks(broken)
        with pytest.raises((jsonschema.ValidationError, AssertionError)):
            check_inferencepool(broken)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", LLMD_BUILTIN)
def test_llmd_manifest_matches_the_kubernetes_schema(name, version):
    validate_manifests(LLMD / name, version)


def test_every_llmd_manifest_is_checked_and_applied():
    checked = {*LLMD_BUILTIN, "inferencepool.yaml", "kustomization.yaml"}
    assert {p.name for p in LLMD.glob("*.y*ml")} == checked
    assert set(load_yaml(LLMD / "kustomization.yaml")["resources"]) == checked - {"kustomization.yaml"}


def test_pool_pods_are_the_cpu_deployment_labelled_for_the_router():
    pool = load_yaml(LLMD / "yayi-serve.yaml")
    cpu = load_yaml(K8S / "deployment.yaml")
    # The same server, probes, drain and resources: only the labels and the replica count differ.
    assert container(pool) == container(cpu)
    assert pool["spec"]["template"]["spec"] == cpu["spec"]["template"]["spec"]
    assert pool["spec"]["template"]["metadata"]["annotations"] == cpu["spec"]["template"]["metadata"]["annotations"]
    labels = pool["spec"]["template"]["metadata"]["labels"]
    assert labels["llm-d.ai/engine-type"] == "yayi"
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_inferencepool_selects_the_pool_pods_and_names_the_picker():
    pool = load_yaml(LLMD / "inferencepool.yaml")["spec"]
    pods = load_yaml(LLMD / "yayi-serve.yaml")
    labels = pods["spec"]["template"]["metadata"]["labels"]
    assert pool["selector"]["matchLabels"].items() <= labels.items()
    # Only the pods labelled for the router: the plain Deployment's pods are not in the pool.
    assert (
        not pool["selector"]["matchLabels"].items()
        <= load_yaml(K8S / "deployment.yaml")["spec"]["template"]["metadata"]["labels"].items()
    )
    ports = {p["name"]: p["containerPort"] for p in container(pods)["ports"]}
    assert [p["number"] for p in pool["targetPorts"]] == [ports["grpc"]] == [GRPC_PORT]
    assert pool["appProtocol"] == "kubernetes.io/h2c"
    epp = llmd_docs("epp.yaml")
    service = epp["Service"]
    assert pool["endpointPickerRef"]["name"] == service["metadata"]["name"]
    (ext_proc,) = [p for p in service["spec"]["ports"] if p["port"] == pool["endpointPickerRef"]["port"]["number"]]
    assert ext_proc["appProtocol"] == "kubernetes.io/h2c"
    assert service["spec"]["selector"].items() <= epp["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    # The router v0.9.0 ships the Inference Extension's v1.5.0 CRD, where the picker is required.
    assert "endpointPickerRef" in pool


def epp_config() -> dict:
    return yaml.safe_load(load_yaml(LLMD / "epp-config.yaml")["data"][EPP_CONFIG_KEY])


def check_epp_config(config: dict) -> None:
    schema = json.loads(EPP_CONFIG_SCHEMA.read_text())
    jsonschema.Draft202012Validator(schema).validate(config)


def test_epp_config_matches_the_routers_types():
    check_epp_config(epp_config())


def test_epp_config_check_rejects_what_the_router_would():
    for breaks in (
        lambda c: c["plugins"][2]["parameters"]["engineConfigs"][0].update(queuedRequestSpec="x"),  # misspelt
        lambda c: c["plugins"].append({"type": "queue-scorers"}),  # no such plugin
        lambda c: c["plugins"][1]["parameters"].update(port=9400),  # not in v0.9.0: a flag there
        lambda c: c.update(parsers=c.pop("requestHandler")),
    ):
        broken = epp_config()
        breaks(broken)
        with pytest.raises(jsonschema.ValidationError):
            check_epp_config(broken)


def test_epp_config_reads_yayi_metrics_and_passes_grpc_through():
    config = epp_config()
    plugins = {p.get("name", p["type"]): p for p in config["plugins"]}
    refs = [
        *(p["pluginRef"] for profile in config["schedulingProfiles"] for p in profile["plugins"]),
        *(s["pluginRef"] for s in config["dataLayer"]["sources"]),
        *(e["pluginRef"] for s in config["dataLayer"]["sources"] for e in s["extractors"]),
        *(p["pluginRef"] for p in config["requestHandler"]["parsers"]),
    ]
    assert set(refs) <= plugins.keys()
    extractor = plugins["core-metrics-extractor"]["parameters"]
    (yayi,) = [e for e in extractor["engineConfigs"] if e["name"] == "yayi"]
    assert (yayi["queuedRequestsSpec"], yayi["runningRequestsSpec"], yayi["kvUsageSpec"]) == (
        "yayi_requests_waiting",
        "yayi_requests_running",
        "yayi_kv_cache_usage_ratio",
    )
    # Names the server really exports (ServerMetrics' families), in Prometheus' legacy name syntax.
    exported = {family.name for family in ServerMetrics("hf-kv", "m").registry.collect()}
    for spec in (yayi["queuedRequestsSpec"], yayi["runningRequestsSpec"], yayi["kvUsageSpec"]):
        assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", spec) and spec in exported, spec
    pods = load_yaml(LLMD / "yayi-serve.yaml")
    assert pods["spec"]["template"]["metadata"]["labels"][extractor["engineLabelKey"]] == "yayi"
    # Our bodies are protobuf: the passthrough parser alone, which claims no protocol, so the EPP's
    # check of parsers against the pool's appProtocol (h2c) passes.
    assert [plugins[p["pluginRef"]]["type"] for p in config["requestHandler"]["parsers"]] == ["passthrough-parser"]


def test_epp_runs_with_flags_it_has_and_finds_its_config_pool_and_metrics():
    epp = llmd_docs("epp.yaml")
    deployment = epp["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    main = container(deployment)
    known = {line for line in EPP_FLAGS.read_text().splitlines() if line and not line.startswith("#")}
    args = dict(arg.removeprefix("--").split("=", 1) for arg in main["args"])
    assert all(arg.startswith("--") and "=" in arg for arg in main["args"]), main["args"]
    assert args.keys() <= known, args.keys() - known
    assert args["pool-name"] == load_yaml(LLMD / "inferencepool.yaml")["metadata"]["name"]
    assert args["pool-group"] == load_yaml(INFERENCEPOOL_CRD)["spec"]["group"]
    # The config file is the ConfigMap's key, mounted where --config-file points.
    (mount,) = main["volumeMounts"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == load_yaml(LLMD / "epp-config.yaml")["metadata"]["name"]
    assert args["config-file"] == f"{mount['mountPath']}/{EPP_CONFIG_KEY}"
    # The router scrapes each pod where yayi-serve serves /metrics.
    pods = load_yaml(LLMD / "yayi-serve.yaml")
    config = serve_config([*container(pods)["command"], *container(pods)["args"]])
    assert int(args["model-server-metrics-port"]) == config.metrics_port == METRICS_PORT
    assert config.metrics_host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert int(args["grpc-port"]) == ports["grpc"] and int(args["grpc-health-port"]) == ports["grpc-health"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert main[probe]["grpc"]["port"] == ports["grpc-health"]
    service_ports = {p["port"]: p["targetPort"] for p in epp["Service"]["spec"]["ports"]}
    assert service_ports[int(args["grpc-port"])] == "grpc"
    # RBAC for the service account the picker runs as: pods and the pool.
    assert pod["serviceAccountName"] == epp["ServiceAccount"]["metadata"]["name"]
    assert epp["RoleBinding"]["subjects"][0]["name"] == epp["ServiceAccount"]["metadata"]["name"]
    assert epp["RoleBinding"]["roleRef"]["name"] == epp["Role"]["metadata"]["name"]
    granted = {(g, r) for rule in epp["Role"]["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert {("", "pods"), ("inference.networking.k8s.io", "inferencepools")} <= granted
    assert pod["terminationGracePeriodSeconds"] >= pods["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert main["image"].endswith(":v0.9.0") == EPP_FLAGS.name.endswith("-v0.9.0.txt")


# ---- docker compose -----------------------------------------------------------------------


def test_compose_file_matches_the_compose_spec():
    # check-jsonschema vendors the compose-spec schema; nothing is downloaded.
    result = CliRunner().invoke(check_jsonschema, ["--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    assert result.exit_code == 0, result.output


def test_compose_spec_check_rejects_a_broken_file(tmp_path):
    doc = load_yaml(COMPOSE)
    doc["services"]["yayi-serve"]["healthcheck"]["tests"] = doc["services"]["yayi-serve"]["healthcheck"].pop("test")
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(doc))
    result = CliRunner().invoke(check_jsonschema, ["--builtin-schema", "vendor.compose-spec", str(broken)])
    assert result.exit_code == 1, result.output


def test_compose_wires_the_stack_together():
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert set(services) == {"yayi-serve", "prometheus", "grafana"}
    server = services["yayi-serve"]
    build = server["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILES["cpu"]
    config = serve_config(server["command"])
    assert (config.port, config.metrics_host, config.metrics_port) == (GRPC_PORT, "0.0.0.0", METRICS_PORT)
    assert {f"{GRPC_PORT}:{GRPC_PORT}", f"{METRICS_PORT}:{METRICS_PORT}"} <= set(server["ports"])
    assert int(server["stop_grace_period"].removesuffix("s")) > config.grace_period_s
    # The healthcheck runs the script the image copies in, with the image's python.
    test = server["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"] and test[2] in dockerfile_copies(DOCKERFILES["cpu"]).values()
    # Every bind mount names a file or folder that exists here.
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            assert (COMPOSE.parent / source).exists(), volume
    mounts = {v.split(":")[1]: (COMPOSE.parent / v.split(":")[0]).resolve() for v in services["grafana"]["volumes"]}
    provider_path = load_yaml(DASHBOARD_PROVIDERS)["providers"][0]["options"]["path"]
    assert mounts[provider_path] == DASHBOARD.parent
    assert mounts["/etc/grafana/provisioning"] == DATASOURCES.parent.parent
    (prometheus_mount,) = services["prometheus"]["volumes"]
    assert prometheus_mount.split(":")[1] == "/etc/prometheus/prometheus.yml"
    assert (COMPOSE.parent / prometheus_mount.split(":")[0]).resolve() == PROMETHEUS
    assert services["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"


# ---- Prometheus ---------------------------------------------------------------------------


def test_prometheus_scrapes_the_compose_service():
    config = load_yaml(PROMETHEUS)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "yayi-serve"]
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets == [f"yayi-serve:{METRICS_PORT}"]
    assert job.get("scrape_interval", config["global"]["scrape_interval"]) == "5s"


# ---- Grafana ------------------------------------------------------------------------------


def test_every_panel_queries_prometheus():
    (datasource,) = load_yaml(DATASOURCES)["datasources"]
    assert (datasource["type"], datasource["url"]) == ("prometheus", "http://prometheus:9090")
    assert len(panels()) >= 10
    for panel in panels():
        assert panel["targets"], panel["title"]
        assert all(t.get("expr", "").strip() for t in panel["targets"]), panel["title"]
        for ref in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]:
            assert ref == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]


def test_exprs_name_only_metrics_the_server_exports():
    assert 36 <= dashboard()["schemaVersion"] <= 41
    for expr in all_exprs():
        # Directly evaluable against Prometheus's HTTP API: no Grafana variables.
        assert "$" not in expr, expr
        names = {HISTOGRAM_SUFFIX.sub("", name) for name in re.findall(r"yayi_[a-z_]+", expr)}
        assert names and names <= METRICS, (expr, names - METRICS)


def test_dashboard_covers_what_the_operator_asked_for():
    exprs = "\n".join(all_exprs())
    for wanted in (
        "rate(yayi_generation_tokens_total[1m])",
        "rate(yayi_prompt_tokens_total[1m])",
        "histogram_quantile(0.5, sum by (le, engine) (rate(yayi_time_to_first_token_seconds_bucket[1m])))",
        "histogram_quantile(0.95, sum by (le, engine) (rate(yayi_time_to_first_token_seconds_bucket[1m])))",
        "histogram_quantile(0.5, sum by (le, engine) (rate(yayi_inter_token_latency_seconds_bucket[1m])))",
        "histogram_quantile(0.95, sum by (le, engine) (rate(yayi_request_duration_seconds_bucket[1m])))",
        "yayi_requests_running",
        "yayi_requests_waiting",
        "sum by (status) (rate(yayi_requests_total[1m]))",
        'yayi_requests_total{status!="OK"}',
        "yayi_device_memory_used_bytes",
        "yayi_device_memory_peak_bytes",
        "yayi_device_utilization_ratio",
        "yayi_device_power_watts",
        "rate(yayi_energy_joules_total[1m])",
    ):
        assert wanted in exprs, wanted


def test_dashboard_groups_by_replica_as_well():
    # Behind a load balancer (make replicas, the llm-d pool) each replica is one Prometheus instance.
    exprs = "\n".join(all_exprs())
    for wanted in (
        "sum by (instance) (rate(yayi_generation_tokens_total[1m]))",
        "sum by (instance) (rate(yayi_requests_total[1m])) / scalar(sum(rate(yayi_requests_total[1m])))",
        "histogram_quantile(0.5, sum by (le, instance) (rate(yayi_time_to_first_token_seconds_bucket[1m])))",
        "histogram_quantile(0.95, sum by (le, instance) (rate(yayi_time_to_first_token_seconds_bucket[1m])))",
        "sum by (instance) (yayi_requests_running)",
        "sum by (instance) (yayi_requests_waiting)",
        "sum by (instance, status) (rate(yayi_requests_total[1m]))",
    ):
        assert wanted in exprs, wanted
    per_replica = [p for p in panels() if any("instance" in t["expr"] for t in p["targets"])]
    assert all("{{instance}}" in t["legendFormat"] for p in per_replica for t in p["targets"] if "by (" in t["expr"])


def test_power_panels_are_honest_about_missing_readings():
    for panel in panels():
        exprs = [t["expr"] for t in panel["targets"]]
        if any(name in e for e in exprs for name in POWER_METRICS):
            # No invented zero where nothing was measured; the panel says why it may be empty.
            assert not any("vector(" in e for e in exprs), panel["title"]
            assert panel["description"] == "absent on machines without power readings (no NVML, no RAPL)"


# ---- Dockerfiles --------------------------------------------------------------------------


def dockerfile_copies(path: Path) -> dict[str, str]:
    """COPY source -> destination, for single-source COPYs."""
    return {c.value[0]: c.value[1] for c in dockerfile.parse_file(str(path)) if c.cmd == "COPY" and len(c.value) == 2}


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_dockerfile_builds_a_non_root_server(variant):
    # dockerfile wraps BuildKit's own parser: a syntax error raises here.
    commands = dockerfile.parse_file(str(DOCKERFILES[variant]))
    by_cmd: dict[str, list] = {}
    for command in commands:
        by_cmd.setdefault(command.cmd, []).append(command)
    (cmd,) = by_cmd["CMD"]
    assert cmd.json, "exec form, so SIGTERM reaches yayi-serve rather than a shell"
    config = serve_config(list(cmd.value))
    assert (config.host, config.port) == ("0.0.0.0", GRPC_PORT)
    assert (config.metrics_host, config.metrics_port) == ("0.0.0.0", METRICS_PORT)
    assert config.device == {"cpu": "cpu", "cuda": "cuda"}[variant]
    runs = " ".join(" ".join(c.value) for c in by_cmd["RUN"])
    index = {"cpu": "https://download.pytorch.org/whl/cpu", "cuda": "https://download.pytorch.org/whl/cu128"}[variant]
    assert f"pip install torch==2.13.0 --index-url {index}" in runs
    assert "python -m engines.models smollm2-135m" in runs, "the model is prepared at build time"
    assert by_cmd["USER"][-1].value[0] not in ("root", "0")
    assert set(by_cmd["EXPOSE"][0].value) == {str(GRPC_PORT), str(METRICS_PORT)}
    assert by_cmd["STOPSIGNAL"][0].value == ("SIGTERM",)
    assert "ENTRYPOINT" not in by_cmd
    for command in by_cmd["COPY"]:
        for source in command.value[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: not in the build context (the repository root)"
