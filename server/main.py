"""``lmcache server``: parse the configuration, run the daemon, exit 0 on SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import sys
from typing import TYPE_CHECKING

from lmcd.server.config import ConfigError, ServerConfig, add_arguments, resolve

if TYPE_CHECKING:
    from lmcd.server.daemon import CacheServer

LOG_FORMAT = "[%(asctime)s] LMCache %(levelname)s: %(message)s"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "server", help="run the cache server daemon",
        description="Run the lmcd cache server: one per node, owning the L1 pool of KV-cache chunks.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def setup_logging(level: int) -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stdout, force=True)
    for noisy in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def log_auth(config: ServerConfig, args: argparse.Namespace, server: CacheServer) -> None:
    """Say at every start how clients are authenticated; WARNING where the token shows on the command line
    or where auth is off by the operator's choice. Never logs the token."""
    log = logging.getLogger("lmcd.server")
    if config.auth_token is None:
        if config.insecure_no_auth:
            log.warning("Auth is OFF (--insecure-no-auth): no auth token is required, so any process that reaches "
                        "%s or %s can read, overwrite and clear the cache; use it only on a trusted network, else "
                        "set --auth-token-file PATH or LMCD_AUTH_TOKEN", server.url, server.http_url)
        else:
            log.info("Auth: off (loopback only); set --auth-token-file PATH or LMCD_AUTH_TOKEN to require a token")
        return
    if config.auth_token_file is not None:
        source = f"--auth-token-file {config.auth_token_file}"
    elif getattr(args, "auth_token", None) is not None:
        source = "--auth-token"
        log.warning("--auth-token on the command line is visible to every local user (ps, /proc/<pid>/cmdline): "
                    "put the token in a file of mode 0600 and pass --auth-token-file PATH (or LMCD_AUTH_TOKEN_FILE), "
                    "or set LMCD_AUTH_TOKEN")
    elif os.environ.get("LMCD_AUTH_TOKEN"):
        source = "LMCD_AUTH_TOKEN"
    else:
        source = "auth_token in the --config file"
    log.info("Auth: token required (from %s) in Hello and on every HTTP endpoint but /healthcheck", source)


def resolve_and_set_up_logging(args: argparse.Namespace) -> ServerConfig:
    """resolve(args), then logging at the configured level; what resolving logged (which adapter LMCache's legacy
    keys became, a password written inline) is held until then and logged at that level."""
    held = logging.handlers.BufferingHandler(capacity=1000)
    root = logging.getLogger()
    level = root.level
    root.addHandler(held)
    root.setLevel(logging.DEBUG)
    try:
        config = resolve(args)
    finally:
        root.removeHandler(held)
        root.setLevel(level)
    setup_logging(config.log_level_number)
    for record in held.buffer:
        if record.levelno >= config.log_level_number:
            logging.getLogger(record.name).handle(record)
    return config


def run(args: argparse.Namespace) -> int:
    try:
        config = resolve_and_set_up_logging(args)
    except ConfigError as exc:
        print(f"lmcache server: error: {exc}", file=sys.stderr)
        return 2
    from lmcd.server.daemon import CacheServer

    server = CacheServer(config)
    try:
        server.startup()
    except (OSError, ValueError) as exc:
        logging.getLogger("lmcd.server").error("Startup failed: %s", exc)
        server.shutdown()
        return 1
    log_auth(config, args, server)
    try:
        server.serve_forever()
    finally:
        server.shutdown()
    return 0
