"""deploy/docker-smoke.sh for real: the image is built, run with --network host --ipc host, a bench on
the host stores and retrieves through it, /status and /metrics are checked, docker stop exits 0.

It runs wherever docker works, or as root on a Debian machine (the script installs docker.io and
starts a dockerd of its own). Anywhere else it is skipped with the missing piece named in the
summary; with LMCD_REQUIRE_DOCKER=1 it fails instead of skipping (for CI machines that must run it).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "docker-smoke.sh"
SCRIPT_TIMEOUT_S = 1500  # cold: apt-get, debootstrap, a build that downloads ~400 MB; about 2 min here

pytestmark = [pytest.mark.docker, pytest.mark.timeout(SCRIPT_TIMEOUT_S + 180)]


def docker_works() -> tuple[bool, str]:
    if shutil.which("docker") is None:
        return False, "no docker command"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False, "`docker info` did not answer in 30 s"
    last = (info.stderr.strip().splitlines() or [""])[-1]
    return info.returncode == 0, f"`docker info` failed: {last}"


def missing() -> str | None:
    """Why the smoke test cannot run here, or None."""
    if shutil.which("bash") is None:
        return "no bash"
    works, why = docker_works()
    if works:
        return None
    if os.geteuid() != 0:
        return f"{why}, and not root (the script installs and starts docker only as root)"
    if shutil.which("dockerd") is None and shutil.which("apt-get") is None:
        return f"{why}; root, but neither dockerd nor apt-get (to install Debian's docker.io) is here"
    return None


def run_script() -> tuple[int, str]:
    """Run the script in its own process group; on timeout, SIGTERM the group so its trap cleans up."""
    env = {**os.environ, "LMCD_PYTHON": sys.executable}
    proc = subprocess.Popen(["bash", str(SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=SCRIPT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        pytest.fail(f"deploy/docker-smoke.sh ran past {SCRIPT_TIMEOUT_S} s:\n{out[-6000:]}")
    return proc.returncode, out


def test_docker_image_builds_runs_serves_and_stops_cleanly(capsys):
    reason = missing()
    if reason is not None:
        message = f"DOCKER SMOKE TEST NOT RUN: {reason}. Run it as root on Debian, or where docker works."
        with capsys.disabled():
            print(f"\n*** {message}", file=sys.stderr)
        if os.environ.get("LMCD_REQUIRE_DOCKER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    code, out = run_script()
    assert code == 0, f"deploy/docker-smoke.sh failed with exit code {code}:\n{out[-8000:]}"
    for step in ("/healthcheck: {\"status\":\"healthy\"", "docker HEALTHCHECK: healthy", "no torch",
                 "compiled page_copy.cu", "lookup of 4096 tokens", "POST /clear-cache", "docker stop: exit code 0",
                 "no SHM segments left", "plain docker run", "healthy on 127.0.0.1:5555",
                 "without a token: refused (exit code 2)", "/status 401/200"):
        assert step in out, f"step {step!r} missing from the script's output:\n{out[-8000:]}"
    if "no docker compose here" not in out:
        assert "deploy/compose.yaml is valid" in out, out[-8000:]
    passed = re.search(r"docker smoke test passed: image \S+ is (\d+) MB; total (\d+) s", out)
    assert passed is not None, out[-8000:]
    assert 100 < int(passed.group(1)) < 2000, f"unexpected image size {passed.group(1)} MB"
    with capsys.disabled():  # the image size and the timings belong in the CI log
        print("\n" + "\n".join(line for line in out.splitlines() if line.startswith("[docker-smoke")))


def test_skip_reason_names_what_is_missing(monkeypatch):
    on_path = {"bash", "apt-get"}
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if name in on_path else None)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    reason = missing()
    assert reason is not None and "no docker command" in reason and "not root" in reason
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert missing() is None  # root with apt-get: the script installs docker.io itself
    on_path.discard("apt-get")
    reason = missing()
    assert reason is not None and "neither dockerd nor apt-get" in reason
