"""``lmcache server``: parse the configuration, run the daemon, exit 0 on SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import sys

from lmcd.server.config import ConfigError, add_arguments, resolve

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


def run(args: argparse.Namespace) -> int:
    try:
        config = resolve(args)
    except ConfigError as exc:
        print(f"lmcache server: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level_number)
    from lmcd.server.daemon import CacheServer

    server = CacheServer(config)
    try:
        server.startup()
    except (OSError, ValueError) as exc:
        logging.getLogger("lmcd.server").error("Startup failed: %s", exc)
        server.shutdown()
        return 1
    try:
        server.serve_forever()
    finally:
        server.shutdown()
    return 0
