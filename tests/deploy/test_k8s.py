"""deploy/k8s/: every document is valid against the Kubernetes API schemas (offline, fixed versions), and
the manifests agree with the server: probe paths are routes of the HTTP sidecar, probe and Service ports
are the ports the ConfigMap's settings bind, the memory request covers the pool, the startup probe
leaves time to pin it, both pods share the host's /dev/shm, and both read the token from files of the
Secret the README tells users to create (no committed Secret holds one)."""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from lmcd.cli import build_parser
from lmcd.connector.settings import KNOWN_KEYS
from lmcd.server.config import ConfigError, ServerConfig, load_file
from lmcd.server.http import HEALTH_DEADLINE_S, build_app

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
K8S_VERSIONS = ("1.31.0", "1.37.0")
STARTUP_BUDGET_S_PER_GIB = 2.0  # touching and pinning a pool: about 1 s per GiB measured; twice that
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path.name, doc))
    return out


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [doc for _, doc in documents() if doc["kind"] == kind and name in (None, doc["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/k8s, found {len(found)}"
    return found[0]


def quantity_bytes(text: str) -> float:
    for suffix in sorted(UNITS, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * UNITS[suffix]
    return float(text)


def server_container() -> dict[str, Any]:
    [container] = one("DaemonSet", "lmcd")["spec"]["template"]["spec"]["containers"]
    return container


def server_settings(tmp_path: Path) -> tuple[Any, dict[str, Any]]:
    """(argparse namespace of the container's args, settings from the mounted ConfigMap file)."""
    container = server_container()
    argv = container.get("command", []) + container["args"]
    assert argv[:2] == ["/opt/venv/bin/lmcache", "server"], argv
    args = build_parser().parse_args(argv[1:])  # the server's own parser: unknown flags fail here
    config_path = Path(args.config)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in one("DaemonSet", "lmcd")["spec"]["template"]["spec"]["volumes"]}
    volume = volumes[mounts[str(config_path.parent)]]
    config_map = one("ConfigMap", volume["configMap"]["name"])
    local = tmp_path / config_path.name
    local.write_text(config_map["data"][config_path.name])
    return args, load_file(str(local))  # the server's own loader: unknown keys fail here


def test_every_document_is_valid_against_the_kubernetes_api():
    docs = documents()
    assert {doc["kind"] for _, doc in docs} >= {"DaemonSet", "Service", "ConfigMap", "Deployment"}
    invalid = []
    for version in K8S_VERSIONS:
        for filename, doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except jsonschema.ValidationError as exc:  # kubernetes_validate's own error is a subclass
                invalid.append(f"{filename} ({doc['kind']} {doc['metadata']['name']}), Kubernetes {version}: "
                               f"{exc.message} at {'/'.join(map(str, exc.path))}")
    assert not invalid, "invalid against the Kubernetes API schemas:\n" + "\n".join(invalid)


def secret_file(pod: dict[str, Any], container: dict[str, Any], path: str) -> tuple[str, str, int]:
    """(Secret name, key, file mode) of the Secret volume file ``path`` in ``container``."""
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    directory, name = os.path.split(path)
    assert directory in mounts, f"{path}: no volume is mounted at {directory} in {container['name']}"
    volume = {v["name"]: v for v in pod["volumes"]}[mounts[directory]]
    assert "secret" in volume, f"{path} is not on a Secret volume: {volume}"
    secret = volume["secret"]
    items = {item["path"]: item["key"] for item in secret.get("items", [])}
    return secret["secretName"], items.get(name, name), secret.get("defaultMode", 0o644)


def test_config_map_is_a_valid_server_config(tmp_path):
    args, settings = server_settings(tmp_path)
    fields = {k: v for k, v in settings.items() if k not in ("l1_size_gb", "auth_token_file")}
    assert fields["host"] == "0.0.0.0" and fields["http_host"] == "0.0.0.0", "probes and the Service reach the pod IP"
    assert settings["l1_size_gb"] > 0
    # on all interfaces the server needs its token: from the file the ConfigMap names, on the Secret's volume
    with pytest.raises(ConfigError, match="--host 0.0.0.0 and --http-host 0.0.0.0: not a loopback"):
        ServerConfig(**fields, l1_size_gb=0.25)
    pod = one("DaemonSet", "lmcd")["spec"]["template"]["spec"]
    name, key, mode = secret_file(pod, server_container(), settings["auth_token_file"])
    assert (name, key) == ("lmcd-auth", "token")
    assert mode & 0o077 == 0, f"defaultMode {mode:o}: the server refuses a token file open to group or others"
    local = tmp_path / "token"  # what the kubelet writes there: the Secret's value, with that mode
    local.write_text(secrets.token_hex(32) + "\n")
    local.chmod(mode)
    config = ServerConfig(**fields, auth_token_file=str(local), l1_size_gb=0.25)  # the pool is sized below
    assert config.auth_token is not None and not config.insecure_no_auth


def test_no_committed_secret_and_the_readme_creates_a_random_one():
    """`kubectl apply -f deploy/k8s/` must not overwrite the Secret users create with a committed value, and no
    committed value may work as a token; the README's command creates the Secret the pods read."""
    secrets_found = [(filename, doc["metadata"]["name"]) for filename, doc in documents() if doc["kind"] == "Secret"]
    assert not secrets_found, f"deploy/k8s commits Secrets {secrets_found}: users create lmcd-auth themselves"
    # the placeholder this directory used to commit is refused, should a user's copy of it still be applied
    with pytest.raises(ConfigError, match="placeholder"):
        ServerConfig(auth_token="replace-me-with-a-random-token", l1_size_gb=0.25)
    readme = (REPO / "README.md").read_text()
    created = re.search(r"kubectl create secret generic (\S+) --from-literal=(\w+)=\"\$\(openssl rand -hex 32\)\"",
                        readme)
    assert created is not None, "README: no `kubectl create secret generic ... $(openssl rand -hex 32)` command"
    pod = one("DaemonSet", "lmcd")["spec"]["template"]["spec"]
    _, settings = server_settings_from_config_map()
    assert secret_file(pod, server_container(), settings["auth_token_file"])[:2] == created.groups()


def server_settings_from_config_map() -> tuple[None, dict[str, Any]]:
    [text] = one("ConfigMap", "lmcd-config")["data"].values()
    return None, yaml.safe_load(text)


def test_probes_hit_real_routes_on_the_configured_port(tmp_path):
    _, settings = server_settings(tmp_path)
    app = build_app(SimpleNamespace(config=ServerConfig(l1_size_gb=0.25)))  # build_app reads only .config
    get_routes = {route.path for route in app.routes if "GET" in getattr(route, "methods", set())}
    container = server_container()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["zmq"] == settings.get("port", ServerConfig.port)
    assert ports["http"] == settings.get("http_port", ServerConfig.http_port)
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container[kind]["httpGet"]
        assert probe["path"] == "/healthcheck" and probe["path"] in get_routes, (kind, sorted(get_routes))
        port = ports.get(probe["port"], probe["port"])
        assert port == ports["http"], f"{kind} probes port {probe['port']}, not the HTTP sidecar"
        # /healthcheck waits up to HEALTH_DEADLINE_S for the loop before answering 503
        assert container[kind].get("timeoutSeconds", 1) > HEALTH_DEADLINE_S, kind
    startup = container["startupProbe"]
    allowed_s = startup["periodSeconds"] * startup["failureThreshold"]
    assert allowed_s >= STARTUP_BUDGET_S_PER_GIB * settings["l1_size_gb"] + 60, (
        f"the startup probe gives up after {allowed_s} s: too soon to touch and pin {settings['l1_size_gb']} GiB")
    # the Service forwards to the same named ports
    service = one("Service", "lmcd")
    assert service["spec"]["internalTrafficPolicy"] == "Local", "vLLM must reach the server of its own node"
    targets = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert targets["zmq"] == (ports["zmq"], "zmq") and targets["http"] == (ports["http"], "http")
    selector = service["spec"]["selector"]
    labels = one("DaemonSet", "lmcd")["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()


def test_resources_cover_the_pool_and_shm_is_the_hosts(tmp_path):
    _, settings = server_settings(tmp_path)
    pod = one("DaemonSet", "lmcd")["spec"]["template"]["spec"]
    resources = server_container()["resources"]
    pool = settings["l1_size_gb"] * 2**30
    request = quantity_bytes(resources["requests"]["memory"])
    limit = quantity_bytes(resources["limits"]["memory"])
    assert request >= pool + 2 * 2**30, f"memory request {resources['requests']['memory']} < pool + 2 GiB"
    assert limit >= request
    assert float(resources["requests"]["cpu"]) >= settings["max_workers"], "a core per copy thread"
    # hostIPC on the server and on vLLM: the same /dev/shm and IPC namespace; a private /dev/shm
    # (emptyDir) on either would hide the host's and break the sharing
    vllm = one("Deployment", "vllm")["spec"]["template"]["spec"]
    for name, spec in (("lmcd", pod), ("vllm", vllm)):
        assert spec.get("hostIPC") is True, f"{name} needs hostIPC"
        for container in spec["containers"]:
            mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
            assert "/dev/shm" not in mounts, f"{name} mounts its own /dev/shm"
    security = server_container()["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    server_mounts = {m["mountPath"] for m in server_container()["volumeMounts"]}
    assert "/tmp" in server_mounts, "CuPy's kernel cache (CUPY_CACHE_DIR under /tmp) needs a writable /tmp"


def test_vllm_is_wired_to_the_node_local_server():
    container = one("Deployment", "vllm")["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    config = json.loads(args[args.index("--kv-transfer-config") + 1])
    assert config["kv_connector"] == "LMCacheMPConnector"
    assert config["kv_connector_module_path"] == "lmcd.connector.vllm"
    extra = config["kv_connector_extra_config"]
    assert {key.removeprefix("lmcache.mp.") for key in extra} <= KNOWN_KEYS
    service = one("Service", "lmcd")
    zmq_port = {p["name"]: p["port"] for p in service["spec"]["ports"]}["zmq"]
    assert extra["lmcache.mp.host"] == f"tcp://{service['metadata']['name']}"
    assert extra["lmcache.mp.port"] == zmq_port
    # the server's token reaches the connector from the same Secret, as files (no token in any env or arg)
    server_pod = one("DaemonSet", "lmcd")["spec"]["template"]["spec"]
    vllm_pod = one("Deployment", "vllm")["spec"]["template"]["spec"]
    _, settings = server_settings_from_config_map()
    server_secret = secret_file(server_pod, server_container(), settings["auth_token_file"])
    vllm_secret = secret_file(vllm_pod, container, extra["lmcache.mp.auth_token_file"])
    assert server_secret[:2] == vllm_secret[:2] == ("lmcd-auth", "token")
    assert vllm_secret[2] & 0o077 == 0, "the connector refuses a token file open to group or others"
    for spec in (server_container(), container):
        assert not [e for e in spec.get("env", []) if "TOKEN" in e["name"]], spec.get("env")
