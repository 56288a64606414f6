"""The Dockerfile's CMD: plain `docker run IMAGE` serves on loopback only, which the server allows without a
token; beyond loopback it needs a token (tests/server/test_auth_defaults.py), given to the container."""

from __future__ import annotations

import json
import re
from pathlib import Path

from lmcd.cli import build_parser
from lmcd.server.config import is_loopback, resolve

REPO = Path(__file__).resolve().parents[2]


def test_default_command_serves_loopback_only_without_a_token():
    [line] = re.findall(r"^CMD (\[.*\])$", (REPO / "Dockerfile").read_text(), re.M)
    argv = json.loads(line)
    assert argv[:2] == ["/opt/venv/bin/lmcache", "server"], argv
    args = build_parser().parse_args(argv[1:])
    args.l1_size_gb = 0.25  # the image's default pool is sized where it runs
    config = resolve(args, {})  # the image sets no token: the server must accept this command as it is
    assert config.auth_token is None and not config.insecure_no_auth
    assert is_loopback(config.host) and is_loopback(config.http_host), (config.host, config.http_host)
