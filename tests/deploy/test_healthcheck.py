"""deploy/healthcheck.py (the image's HEALTHCHECK) against real servers: it finds the HTTP sidecar from the
server's own command line, environment and --config file, and answers 0 only while the server is healthy."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from lmcd.server.config import ConfigError
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
PROBE = REPO / "deploy" / "healthcheck.py"


def load_probe() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lmcd_healthcheck", PROBE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module




def probe(pid: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(PROBE), str(pid)], capture_output=True, text=True, timeout=30)


def test_probe_follows_the_server_flags_and_fails_once_it_stopped(server_factory):
    port = free_port()
    srv = server_factory("--l1-size-gb", "0.25", "--http-port", str(port))  # after the fixture's --http-port 0
    healthy = probe(srv.proc.pid)
    assert healthy.returncode == 0, healthy.stderr
    assert f"http://127.0.0.1:{port}/healthcheck: 200" in healthy.stdout and '"healthy"' in healthy.stdout
    srv.stop()
    gone = probe(srv.proc.pid)
    assert gone.returncode == 1
    assert "not an lmcd server" in gone.stderr or "No such file" in gone.stderr


def test_probe_reports_a_server_that_does_not_answer(server_factory):
    srv = server_factory("--l1-size-gb", "0.25")
    random_port = probe(srv.proc.pid)  # the fixture's servers use --http-port 0: nothing fixed to probe
    assert random_port.returncode == 1 and "--http-port 0" in random_port.stderr
    not_server = probe(os.getpid())  # pytest itself
    assert not_server.returncode == 1 and "is not an lmcd server" in not_server.stderr


def test_address_precedence_flag_environment_file_default(tmp_path):
    hc = load_probe()
    config = tmp_path / "lmcd.yaml"
    config.write_text("http_port: 9101\nhttp_host: 0.0.0.0\nl1_size_gb: 60\n")
    assert hc.http_address([], {}) == ("127.0.0.1", 8080)
    assert hc.http_address(["--config", str(config)], {}) == ("127.0.0.1", 9101)  # 0.0.0.0 is probed on loopback
    assert hc.http_address([], {"LMCD_CONFIG": str(config), "LMCACHE_HTTP_PORT": "9102"}) == ("127.0.0.1", 9102)
    assert hc.http_address(["--config", str(config), "--http-port=9103", "--http-host", "::"],
                           {"LMCACHE_HTTP_PORT": "9102"}) == ("::1", 9103)
    assert hc.http_address(["--http-host", "10.1.2.3", "--l1-size-gb", "60"], {}) == ("10.1.2.3", 8080)
    with pytest.raises(ConfigError, match="--http-port 0"):
        hc.http_address(["--http-port", "0"], {})
