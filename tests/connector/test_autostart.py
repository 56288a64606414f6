"""Embedded mode (``lmcd.connector.autostart``): the local server a connector starts, a real child process."""

from __future__ import annotations

import pytest

from lmcd.connector import autostart
from lmcd.connector.settings import ConnectorSettings, EmbeddedSettings
from tests.conftest import free_port


def test_the_started_server_gets_no_cacheblend_tuning_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """EmbeddedSettings.from_env has said once that they are ignored; the child would say it again."""
    monkeypatch.setenv("LMCACHE_BLEND_SPECIAL_STR", " # # ")
    monkeypatch.setenv("LMCACHE_BLEND_CHECK_LAYERS", "1")
    monkeypatch.setenv("LMCACHE_CHUNK_SIZE", "64")  # other variables are inherited as before
    monkeypatch.setattr(autostart, "_children", [])
    settings = ConnectorSettings(port=free_port())
    local = autostart.ensure_local_server(settings, EmbeddedSettings(max_local_cpu_size_gb=0.25))
    (child,) = autostart._children
    try:
        assert local.url == f"tcp://127.0.0.1:{settings.port}" and child.poll() is None
        with open(f"/proc/{child.pid}/environ", "rb") as f:
            names = {item.split(b"=", 1)[0].decode() for item in f.read().split(b"\0") if item}
        assert "LMCACHE_CHUNK_SIZE" in names
        assert not {n for n in names if n.startswith("LMCACHE_BLEND_")}, names
    finally:
        autostart._stop_children()
    assert child.returncode == 0
