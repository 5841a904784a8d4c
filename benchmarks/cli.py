"""The ``cogbert-bench`` command. Each suite prints a table, or one JSON object with ``--json``."""

from __future__ import annotations

import json
import sys

from cogbert_bench import edge, ingest, link, marl, native, ope, serve, train, updates
from cogbert_edge.cli import CliParser, run_command, version

# Suite name -> the module that registers it and prints its table (a module may hold several).
SUITES = {"edge": edge, "link": link, "native": native, "ingest": ingest, "outbox": ingest,
          "swap": updates, "rollout": updates, "train": train, "ope": ope, "marl": marl,
          "serve": serve}


def main(argv: list[str] | None = None) -> int:
    parser = CliParser(prog="cogbert-bench", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cogbert-bench {version()}")
    sub = parser.add_subparsers(dest="suite", required=True, metavar="SUITE")
    for module in dict.fromkeys(SUITES.values()):
        module.register(sub)
    args = parser.parse_args(argv)

    def run() -> int:
        result = args.func(args)
        if getattr(args, "json", False):
            json.dump(result, sys.stdout)
            print()
        else:
            print(SUITES[args.suite].table(result))
        return 0

    return run_command("cogbert-bench", run)


if __name__ == "__main__":
    sys.exit(main())
