"""deploy/k8s/multinode checked offline: a LeaderWorkerSet running the vllm engine's stages over Ray.

The LeaderWorkerSet is checked against LWS's own schema (vendored in schemas/, trimmed as its header
says), its two pod templates and the Service against Kubernetes' schemas (kubernetes-validate), and
the commands against each other: yayi-serve's flags through its own parser, Ray's head and workers on
one port, the ranks vLLM needs against the GPUs the group has.  Never applied to a cluster here.
"""

from __future__ import annotations

import copy
import re
import shlex

import jsonschema
import kubernetes_validate
import pytest
import yaml

from engines.vllm.engine import VLLMOptions
from tests.helpers.deploy_files import DEPLOY
from tests.unit.test_deploy import K8S_VERSIONS, serve_config, strict_openapi

MULTINODE = DEPLOY / "k8s" / "multinode"
LWS = MULTINODE / "leaderworkerset.yaml"
LWS_SCHEMA = MULTINODE / "schemas" / "leaderworkerset-v0.9.0.schema.yaml"
PLAIN_SERVICE = DEPLOY / "k8s" / "service.yaml"
GRPC_PORT, METRICS_PORT = 50051, 9400


def docs() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(LWS.read_text())}


def template(lws: dict, role: str) -> dict:
    return lws["spec"]["leaderWorkerTemplate"][f"{role}Template"]


def only_container(pod_template: dict) -> dict:
    (container,) = pod_template["spec"]["containers"]
    return container


def check_lws(doc: dict) -> None:
    """LWS's schema (unknown fields refused, as kubectl --validate=strict) and each pod template as a Pod."""
    assert doc["apiVersion"] == "leaderworkerset.x-k8s.io/v1" and doc["kind"] == "LeaderWorkerSet"
    jsonschema.Draft7Validator(strict_openapi(yaml.safe_load(LWS_SCHEMA.read_text()))).validate(doc)
    for role in ("leader", "worker"):
        pod = {"apiVersion": "v1", "kind": "Pod", **template(doc, role)}
        kubernetes_validate.validate(pod, K8S_VERSIONS[-1], strict=True)


def test_every_multinode_file_is_checked():
    assert {p.relative_to(MULTINODE).as_posix() for p in MULTINODE.rglob("*.y*ml")} == {
        "leaderworkerset.yaml",
        "schemas/leaderworkerset-v0.9.0.schema.yaml",
    }
    assert set(docs()) == {"LeaderWorkerSet", "Service"}


def test_leaderworkerset_matches_the_lws_schema():
    check_lws(docs()["LeaderWorkerSet"])


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_pod_templates_and_service_match_the_kubernetes_schema(version):
    lws = docs()["LeaderWorkerSet"]
    for role in ("leader", "worker"):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", **template(lws, role)}, version, strict=True)
    kubernetes_validate.validate(docs()["Service"], version, strict=True)


@pytest.mark.parametrize(
    "breaks",
    [
        lambda d: d["spec"]["leaderWorkerTemplate"].update(size="2"),  # a string where LWS wants an integer
        lambda d: d["spec"]["leaderWorkerTemplate"].update(restartPolicy="Always"),  # not one of LWS's policies
        lambda d: d["spec"].update(startupPolicy="LeaderStarted"),
        lambda d: d["spec"]["leaderWorkerTemplate"].update(
            leaderTemplat=d["spec"]["leaderWorkerTemplate"].pop("leaderTemplate")
        ),
        lambda d: d["spec"]["leaderWorkerTemplate"].pop("workerTemplate"),  # required by LWS
        lambda d: only_container(template(d, "leader"))["startupProbe"].update(grpcc={"port": 50051}),  # Kubernetes'
        lambda d: only_container(template(d, "worker")).update(args="ray start"),  # a string, not a list
    ],
)
def test_the_check_rejects_broken_sets(breaks):
    broken = copy.deepcopy(docs()["LeaderWorkerSet"])
    breaks(broken)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        check_lws(broken)


def leader_steps() -> list[list[str]]:
    """The leader's shell line, step by step (``a && exec b``): each step's words."""
    container = only_container(template(docs()["LeaderWorkerSet"], "leader"))
    assert container["command"] == ["sh", "-c"]
    (script,) = container["args"]
    return [shlex.split(step) for step in script.split("&&")]


def flag_value(words: list[str], flag: str) -> str:
    (value,) = [w.split("=", 1)[1] for w in words if w.startswith(flag + "=")]
    return value


def test_leader_starts_rays_head_then_serves_the_stages_over_it():
    lws = docs()["LeaderWorkerSet"]
    head, serve = leader_steps()
    assert head[:3] == ["ray", "start", "--head"] and "--block" not in head  # the head runs on in the background
    assert serve[0] == "exec", "yayi-serve replaces the shell, so SIGTERM reaches it"
    config = serve_config(serve[1:])
    options = config.engine_options
    assert isinstance(options, VLLMOptions)
    assert (config.engine, config.device, options.distributed_executor_backend) == ("vllm", "cuda", "ray")
    assert (config.port, config.metrics_host, config.metrics_port) == (GRPC_PORT, "0.0.0.0", METRICS_PORT)
    # Every rank a GPU: the group's pods times each pod's GPUs, as many on the head as it announces to Ray.
    pods = lws["spec"]["leaderWorkerTemplate"]["size"]
    gpus = {
        role: only_container(template(lws, role))["resources"]["limits"]["nvidia.com/gpu"]
        for role in ("leader", "worker")
    }
    assert options.layout.ranks == pods * gpus["leader"] == pods * gpus["worker"]
    assert options.pipeline_parallel_size == pods, "one stage per pod: the activations cross the network once"
    assert int(flag_value(head, "--num-gpus")) == gpus["leader"]
    # vLLM's engine process finds the head through RAY_ADDRESS; the server waits for the workers to join.
    env = {e["name"]: e["value"] for e in only_container(template(lws, "leader"))["env"]}
    assert env["RAY_ADDRESS"] == f"127.0.0.1:{flag_value(head, '--port')}"
    assert options.ray_join_timeout_s > 0


def test_workers_join_the_leaders_head_and_offer_their_gpus():
    lws = docs()["LeaderWorkerSet"]
    head, _ = leader_steps()
    worker = only_container(template(lws, "worker"))
    (script,) = worker["args"]
    # Retried until the head answers (the leader's pod may start later), then blocking as the node's process.
    loop = re.fullmatch(r"until (ray start .+); do sleep \d+; done", script)
    assert loop, script
    start = shlex.split(loop.group(1))
    assert "--block" in start
    # LWS puts the leader's address in every pod's environment; Kubernetes expands $(VAR) in args.
    assert flag_value(start, "--address") == f"$(LWS_LEADER_ADDRESS):{flag_value(head, '--port')}"
    assert int(flag_value(start, "--num-gpus")) == worker["resources"]["limits"]["nvidia.com/gpu"]
    # Neither the leader's probes nor its ports: a worker serves nothing itself.
    assert "ports" not in worker and "readinessProbe" not in worker


def test_leader_probes_and_drain_match_the_single_gpu_deployment():
    lws = docs()["LeaderWorkerSet"]
    leader = template(lws, "leader")
    container = only_container(leader)
    _, serve = leader_steps()
    config = serve_config(serve[1:])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": GRPC_PORT}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= config.engine_options.ray_join_timeout_s + 120
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert leader["spec"]["terminationGracePeriodSeconds"] > pre_stop + config.grace_period_s
    assert leader["metadata"]["annotations"]["prometheus.io/port"] == str(METRICS_PORT)
    # A dead stage leaves the leader NOT_SERVING: liveness restarts it, and the group is recreated with it.
    assert lws["spec"]["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"
    # Workers are made with the leader, not after it is ready: it is ready only once they have joined.
    assert lws["spec"]["startupPolicy"] == "LeaderCreated"


def test_service_reaches_the_leaders_only():
    lws, service = docs()["LeaderWorkerSet"], docs()["Service"]
    leader, worker = template(lws, "leader"), template(lws, "worker")
    selector = service["spec"]["selector"].items()
    assert selector <= leader["metadata"]["labels"].items()
    assert not selector <= worker["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in only_container(leader)["ports"]}
    assert {(p["port"], ports[p["targetPort"]]) for p in service["spec"]["ports"]} == {
        (GRPC_PORT, GRPC_PORT),
        (METRICS_PORT, METRICS_PORT),
    }
    # The one-replica Service (../service.yaml) must not pick these pods: the Ray workers serve nothing.
    plain = yaml.safe_load(PLAIN_SERVICE.read_text())["spec"]["selector"].items()
    assert not plain <= leader["metadata"]["labels"].items() and not plain <= worker["metadata"]["labels"].items()
