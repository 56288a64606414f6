"""A worker whose SHM segments belong to another user (a root vLLM next to a non-root server, as with
the image's default user): the registration is refused with both uids and what to do, and the
server keeps serving. The server runs as root without capabilities (setpriv), which is the same
file-permission check a non-root server meets."""

from __future__ import annotations

import os
import shutil

import pytest

import tests.conftest as conftest
from lmcd.connector.client import ServerError
from lmcd.connector.shm import CpuKVCache
from tests.conftest import connect

OTHER_UID = 4321

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root (to chown a segment) and setpriv (util-linux) to drop capabilities")


def test_registration_of_another_users_segments_names_both_uids(server_factory, monkeypatch):
    plain = conftest.server_command
    monkeypatch.setattr(conftest, "server_command",
                        lambda *flags: ["setpriv", "--bounding-set", "-all", "--inh-caps", "-all", *plain(*flags)])
    srv = server_factory("--l1-size-gb", "0.25")
    kv = CpuKVCache(num_layers=2, num_blocks=4, block_size=128, num_kv_heads=2, head_size=32)
    try:
        for seg in kv.segments:
            os.chown(f"/dev/shm{seg.shm_name}", OTHER_UID, OTHER_UID)
        with connect(srv.url) as client:
            with pytest.raises(ServerError) as refused:
                kv.register(client)
            message = str(refused.value)
            assert f"belongs to uid {OTHER_UID} and this server runs as uid 0" in message
            assert "same user" in message and "--user" in message
            assert client.status()["workers"] == []  # still serving, nothing registered
    finally:
        kv.close()
