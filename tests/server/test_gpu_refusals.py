"""GPU registration on a server that cannot take GPU workers, and the GPU settings' validation.

These run everywhere (no GPU needed): the server must refuse a CUDA worker with a message that
says why, and bad GPU settings must stop the server before it starts.
"""

from __future__ import annotations

import importlib.util

import pytest

from lmcd import protocol as p
from lmcd.connector.client import LmcdError
from tests.conftest import connect, start_server
from tests.server.test_config_cli import CHEAP, run_server_cli

LAYOUT = p.KVLayout(2, 8, 16, 4096, 4096, [0, 8 * 4096], [0, 0])
HANDLE = bytes(range(64))


def register_cuda(url: str, handles: list[bytes], device: str = "cuda") -> None:
    with connect(url) as client:
        client.register_worker(LAYOUT, [], [2 * 8 * 4096], device, handles, "0000:3b:00", HANDLE)


def test_cuda_off_refuses_gpu_workers_and_says_why() -> None:
    server = start_server("--cuda", "off", *CHEAP)
    try:
        with pytest.raises(LmcdError, match="cannot take GPU workers: the server was started with --cuda off"):
            register_cuda(server.url, [HANDLE])
        with connect(server.url) as client:
            assert "cuda-ipc" not in client.hello.capabilities
    finally:
        server.stop()


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_cuda_auto_without_cupy_serves_cpu_and_names_what_is_missing() -> None:
    server = start_server(*CHEAP)  # --cuda auto
    try:
        server.wait_for_log(r"GPU workers: off \(CuPy is not installed")
        with pytest.raises(LmcdError, match="CuPy is not installed"):
            register_cuda(server.url, [HANDLE])
    finally:
        server.stop()


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_cuda_on_without_cupy_refuses_to_start() -> None:
    done = run_server_cli("server", "--cuda", "on", "--port", "0", "--http-port", "0", *CHEAP)
    assert done.returncode == 1
    assert "--cuda on: CuPy is not installed" in done.stdout + done.stderr


@pytest.mark.parametrize("flag, value", [("--cuda", "maybe"), ("--copy-engine", "warp"), ("--copy-ctas", "0")])
def test_bad_gpu_settings_exit_2_naming_the_flag(flag: str, value: str) -> None:
    done = run_server_cli("server", flag, value, "--port", "0", *CHEAP)
    assert done.returncode == 2
    assert flag in done.stderr


def test_bad_cuda_registrations_are_refused_before_any_mapping(server) -> None:  # noqa: ANN001
    with pytest.raises(LmcdError, match="unknown"):
        register_cuda(server.url, [HANDLE], device="tpu")
    # a handle that is not 64 bytes never decodes
    with connect(server.url) as client, pytest.raises(LmcdError):
        client.register_worker(LAYOUT, [], [2 * 8 * 4096], "cuda", [b"short"], "0000:3b:00", HANDLE)
    # a CPU worker without SHM segments copies itself: only through a shared pool (not this server's)
    with connect(server.url) as client, pytest.raises(LmcdError, match="--share-pool"):
        client.register_worker(LAYOUT, [], [2 * 8 * 4096])
