"""The ``lmcache`` / ``lmcd`` command: ``server`` runs the daemon, ``bench`` measures one."""

from __future__ import annotations

import argparse
import sys

from lmcd import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmcache", description="lmcd: KV-cache server for LLM inference")
    parser.add_argument("--version", action="version", version=f"lmcd {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="{server,bench}")
    from lmcd.connector.bench import add_parser as add_bench
    from lmcd.server.main import add_parser as add_server

    add_server(subparsers)
    add_bench(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
