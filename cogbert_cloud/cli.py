"""The ``cogbert`` command: edge and cloud subcommands in one tool.

Every subcommand module registers its own parser; handlers import what they need lazily so
that ``cogbert bundle ...`` works on a device with only the edge SDK's dependencies.
"""

from __future__ import annotations

import argparse
import sys

from cogbert_edge import CogbertError
from cogbert_edge import cli as edge_cli
from cogbert_edge._log import setup_logging

from . import broker, demo, pki


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cogbert", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="log level of the JSON logs on stderr")
    sub = parser.add_subparsers(dest="cmd", required=True)
    edge_cli.register(sub)
    pki.register(sub)
    broker.register(sub)
    demo.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except CogbertError as e:
        print(f"cogbert: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
