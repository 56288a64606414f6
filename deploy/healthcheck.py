"""The image's HEALTHCHECK: GET /healthcheck of the lmcd server that is PID 1 of the container.

The sidecar's address is resolved like the server resolves it (flag > environment > ``--config``
YAML file > default), from the server's own command line, so the probe follows ``--http-port``
however it was given. Exit code 0 when the server answers 200, 1 otherwise, with the reason.
Installed in the image as ``/opt/venv/bin/lmcd-healthcheck``; usage: ``lmcd-healthcheck [PID]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from lmcd.server.config import BY_FIELD, ConfigError, ServerConfig, add_arguments, load_file

TIMEOUT_S = 4.0
ANY_ADDRESS_TO_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def server_argv(pid: int) -> list[str]:
    """The arguments after ``server`` on process ``pid``'s command line."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = [arg.decode() for arg in f.read().split(b"\0") if arg]
    if "server" not in argv:
        raise ConfigError(f"process {pid} is not an lmcd server ({' '.join(argv)!r}); pass the server's pid")
    return argv[argv.index("server") + 1:]


def http_address(argv: list[str], environ: Mapping[str, str]) -> tuple[str, int]:
    """(host to connect to, port) of the HTTP sidecar of a server started with ``argv``."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    args, _ = parser.parse_known_args(argv)
    path = args.config or environ.get("LMCD_CONFIG")
    from_file = load_file(path) if path else {}

    def setting(name: str) -> Any:
        s = BY_FIELD[name]
        if getattr(args, name) is not None:
            return getattr(args, name)
        if environ.get(s.env):
            return s.parse(environ[s.env])
        if name in from_file:
            return s.parse(str(from_file[name]))
        return ServerConfig.__dataclass_fields__[name].default

    host, port = str(setting("http_host")), int(setting("http_port"))
    if port == 0:
        raise ConfigError("the server was started with --http-port 0 (a random port): give it a fixed port to probe")
    return ANY_ADDRESS_TO_LOOPBACK.get(host, host), port


def main(argv: list[str]) -> int:
    pid = int(argv[0]) if argv else 1
    try:
        host, port = http_address(server_argv(pid), os.environ)
    except (OSError, ConfigError, ValueError) as exc:
        print(f"lmcd-healthcheck: cannot tell where the server's HTTP sidecar listens: {exc}", file=sys.stderr)
        return 1
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/healthcheck"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as reply:
            print(f"{url}: {reply.status} {reply.read().decode(errors='replace')}")
            return 0
    except urllib.error.HTTPError as exc:
        print(f"{url}: {exc.code} {exc.read().decode(errors='replace')}", file=sys.stderr)
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: no answer ({getattr(exc, 'reason', exc)}); is the server still starting?", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
