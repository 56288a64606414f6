"""GPU registration on a server that cannot take GPU workers, and the GPU settings' validation.

These run everywhere (no GPU needed): the server must refuse a CUDA worker with a message that
says why, and bad GPU settings must stop the server before it starts.
"""

from __future__ import annotations

import importlib.util
from typing import cast

import pytest

from lmcd import protocol as p
from lmcd.connector.client import LmcdError, ServerError
from tests.conftest import connect, start_server
from tests.server.test_config_cli import CHEAP, run_server_cli

LAYOUT = p.KVLayout(2, 8, 16, 4096, 4096, [0, 8 * 4096], [0, 0])
SIZES = [2 * 8 * 4096]
HANDLE = bytes(range(64))


def register_cuda(url: str, handles: list[bytes], device: p.Device = p.Device.CUDA) -> None:
    with connect(url) as client:
        client.register_worker(LAYOUT, device, p.Copier.SERVER, SIZES, ipc_handles=handles,
                               device_pci="0000:3b:00", event_handle=HANDLE)


def test_cuda_off_refuses_gpu_workers_and_says_why() -> None:
    server = start_server("--cuda", "off", *CHEAP)
    try:
        with pytest.raises(ServerError, match="cannot copy for GPU workers: the server was started with --cuda off"
                           ) as err:
            register_cuda(server.url, [HANDLE])
        assert err.value.code == p.ErrorCode.SEGMENT_ERROR
        assert "--share-pool" in err.value.message  # and what would work instead
        with connect(server.url) as client:
            assert client.hello is not None and "cuda-ipc" not in client.hello.capabilities
            assert client.status()["workers"] == []
    finally:
        server.stop()


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_cuda_auto_without_cupy_serves_cpu_and_names_what_is_missing() -> None:
    server = start_server(*CHEAP)  # --cuda auto
    try:
        server.wait_for_log(r"GPU workers: off \(CuPy is not installed")
        with pytest.raises(ServerError, match="CuPy is not installed"):
            register_cuda(server.url, [HANDLE])
    finally:
        server.stop()


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_cuda_on_without_cupy_refuses_to_start() -> None:
    done = run_server_cli("server", "--cuda", "on", "--port", "0", "--http-port", "0", *CHEAP)
    assert done.returncode == 1
    assert "--cuda on: CuPy is not installed" in done.stdout + done.stderr


@pytest.mark.parametrize("value", ["maybe", "", "ON!"])
def test_bad_cuda_value_exits_2_naming_the_flag(value: str) -> None:
    done = run_server_cli("server", "--cuda", value, "--port", "0", *CHEAP)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--cuda" in done.stderr and "auto, on, off" in done.stderr
    assert "running on" not in done.stdout


@pytest.mark.parametrize("flag, value", [("--copy-engine", "staged"), ("--copy-ctas", "16")])
def test_retired_copy_engine_flags_are_unknown_arguments(flag: str, value: str) -> None:
    done = run_server_cli("server", flag, value, "--port", "0", *CHEAP)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "unrecognized arguments" in done.stderr and f"{flag} {value}" in done.stderr
    assert "running on" not in done.stdout


def test_bad_cuda_registrations_are_refused_before_any_mapping(server) -> None:  # noqa: ANN001
    # a device the protocol does not know never decodes
    with pytest.raises(ServerError, match="enum") as err:
        register_cuda(server.url, [HANDLE], device=cast(p.Device, 7))
    assert err.value.code == p.ErrorCode.BAD_FRAME
    # a handle that is not 64 bytes never decodes
    with pytest.raises(ServerError) as err:
        register_cuda(server.url, [b"short"])
    assert err.value.code == p.ErrorCode.BAD_FRAME
    with connect(server.url) as client:
        assert client.status()["workers"] == []
    # a GPU worker that copies itself: only through a shared pool (not this server's)
    with connect(server.url) as client, pytest.raises(LmcdError, match="--share-pool"):
        client.register_worker(LAYOUT, p.Device.CUDA, p.Copier.WORKER, SIZES)
