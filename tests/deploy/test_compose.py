"""deploy/compose.yaml: lmcd and vLLM share the host's network and IPC namespace, vLLM waits for the server's
health check, and its kv-transfer-config points lmcd's connector at the port the server binds.
deploy/docker-smoke.sh also has `docker compose config` (or docker-compose) read the file."""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from typing import Any

import yaml

from lmcd.cli import build_parser
from lmcd.connector.settings import KNOWN_KEYS

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "deploy" / "compose.yaml"
VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def interpolate(value: Any, environ: dict[str, str]) -> Any:
    """Compose's ${VAR} and ${VAR:-default}, applied to every string of the file."""
    if isinstance(value, str):
        return VARIABLE.sub(lambda m: environ.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, list):
        return [interpolate(v, environ) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, environ) for k, v in value.items()}
    return value


def services() -> dict[str, Any]:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), {})["services"]


def test_server_and_vllm_share_the_hosts_network_and_ipc():
    found = services()
    assert set(found) == {"lmcd", "vllm"}
    for name, service in found.items():
        assert service["network_mode"] == "host", name
        assert service["ipc"] == "host", name
    # vLLM's image runs as root; a CPU worker's 0600 SHM segments need the server to be the same user
    assert found["lmcd"]["user"].split(":")[0] == "0" and found["lmcd"]["cap_drop"] == ["ALL"]


def test_vllm_starts_once_the_server_is_healthy():
    found = services()
    assert found["vllm"]["depends_on"]["lmcd"]["condition"] == "service_healthy"
    check = found["lmcd"]["healthcheck"]
    assert check["test"] == ["CMD", "/opt/venv/bin/python", "/opt/venv/bin/lmcd-healthcheck"]
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "/opt/venv/bin/lmcd-healthcheck" in dockerfile, "the image must install the health probe"
    assert int(check["start_period"].rstrip("s")) >= 300, "pinning a large pool takes minutes"


def test_kv_transfer_config_points_at_the_server():
    found = services()
    argv = found["lmcd"]["command"]
    assert argv[:2] == ["/opt/venv/bin/lmcache", "server"]
    args = build_parser().parse_args(argv[1:])  # the server's own parser: unknown flags fail here
    command = found["vllm"]["command"]
    config = json.loads(command[command.index("--kv-transfer-config") + 1])
    assert config["kv_connector"] == "LMCacheMPConnector" and config["kv_role"] == "kv_both"
    assert config["kv_connector_module_path"] == "lmcd.connector.vllm"
    extra = config["kv_connector_extra_config"]
    assert {key.removeprefix("lmcache.mp.") for key in extra} <= KNOWN_KEYS
    assert extra["lmcache.mp.port"] == args.port
    assert extra["lmcache.mp.host"] in (f"tcp://{args.host}", args.host)
    assert float(args.l1_size_gb) > 0
    # vLLM's image gets lmcd's connector from deploy/vllm.Dockerfile, built on vllm/vllm-openai
    build = found["vllm"]["build"]
    vllm_dockerfile = (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve()
    assert "vllm/vllm-openai" in build["args"]["VLLM_IMAGE"]
    assert re.search(r"^FROM \$\{VLLM_IMAGE\}", vllm_dockerfile.read_text(), re.M)


def container_env(service: dict[str, Any], shell: dict[str, str]) -> dict[str, str]:
    """The environment compose gives a service's container: ``${VAR}`` interpolated from the shell, and a
    variable named without a value passed through from the shell only where it is set there."""
    raw = yaml.safe_load(COMPOSE.read_text())["services"][service["name"]].get("environment", {})
    pairs = raw.items() if isinstance(raw, dict) else [(e.partition("=")[0], e.partition("=")[2] if "=" in e
                                                        else None) for e in raw]
    out = {}
    for name, value in pairs:
        if value is None:
            if name in shell:
                out[name] = shell[name]
        else:
            out[name] = interpolate(str(value), shell)
    return out


def test_the_token_passes_through_only_when_set():
    """An unset LMCD_AUTH_TOKEN must not reach the containers as "" (the server refuses an empty token
    variable); a set one reaches the server and vLLM alike, and the server accepts the result."""
    from lmcd.server.config import resolve

    token = secrets.token_hex(32)
    for shell in ({}, {"LMCD_AUTH_TOKEN": token}):
        found = interpolate(yaml.safe_load(COMPOSE.read_text()), shell)["services"]
        envs = {name: container_env({"name": name}, shell) for name in found}
        for name, env in envs.items():
            assert all(env[k] != "" for k in env if k.startswith("LMCD_")), (name, env)
            assert env.get("LMCD_AUTH_TOKEN") == shell.get("LMCD_AUTH_TOKEN"), (name, env)
        args = build_parser().parse_args(found["lmcd"]["command"][1:])
        args.l1_size_gb = 0.25  # the pool is checked above; this machine may have less memory
        config = resolve(args, envs["lmcd"])
        assert config.auth_token == shell.get("LMCD_AUTH_TOKEN")
