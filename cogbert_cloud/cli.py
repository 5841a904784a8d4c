"""The ``cogbert`` command: edge and cloud subcommands in one tool.

Every subcommand module registers its own parser; handlers import what they need lazily, so
``cogbert bundle ...`` and ``cogbert device ...`` work on a device with only the edge SDK's
dependencies. A command whose module needs an extra that is not installed is still listed, and
says which extra to install. Errors and exit codes: :mod:`cogbert_edge.cli`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from cogbert_cloud.fleet import broker, pki
from cogbert_cloud.release import signing as releases
from cogbert_cloud.service import demo, operator_cli
from cogbert_edge import cli as edge_cli
from cogbert_edge._internal.log import setup_logging
from cogbert_edge._internal.trace import configure_tracing
from cogbert_edge.cli import CliParser, run_command, version


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="cogbert", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cogbert {version()}")
    parser.add_argument("--log-level", default=None, type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="log level of the logs on stderr (default: COGBERT_LOG_LEVEL, else INFO)")
    parser.add_argument("--log-format", default=None, choices=("auto", "json", "text"),
                        help="JSON lines, readable text, or auto: text on a terminal (default: COGBERT_LOG_FORMAT, "
                             "else auto)")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    device_sub = edge_cli.register(sub)
    _optional(device_sub, {"simulate": "run N simulated devices that decide and upload experience"},
              lambda: __import__("cogbert_cloud.fleet.simulate", fromlist=["register"]).register(device_sub))
    release_sub = releases.register(sub)
    _register_cloud(sub, release_sub)
    pki.register(sub)
    broker.register(sub)
    demo.register(sub)
    operator_cli.register(sub)
    return parser


def _optional(sub: argparse._SubParsersAction, commands: dict[str, str], register: Callable[[], None]) -> None:
    """Register commands whose modules may need an extra that is not installed here; if one is
    missing, the commands still exist and say what to install when they are run."""
    try:
        register()
    except ModuleNotFoundError as e:
        missing = ModuleNotFoundError(f"No module named {e.name!r}", name=e.name)

        def unavailable(_: argparse.Namespace) -> int:
            raise missing

        for name, helptext in commands.items():
            if name not in sub.choices:
                # No option prefix: every argument lands in `args`, so the handler runs and says
                # which extra to install instead of argparse rejecting the first --flag.
                p = sub.add_parser(name, help=f"{helptext} (needs an extra: {e.name} is not installed)",
                                   add_help=False, prefix_chars="\x00")
                p.add_argument("args", nargs=argparse.REMAINDER)
                p.set_defaults(func=unavailable)


def _register_cloud(sub: argparse._SubParsersAction, release_sub: argparse._SubParsersAction) -> None:
    cloud = sub.add_parser("cloud", help="the fleet service: ingestion, datasets, training, gate, control plane")
    csub = cloud.add_subparsers(dest="cloud_cmd", required=True, metavar="COMMAND")
    _optional(csub, {"ingest": "store experience batches from the broker exactly once"},
              lambda: _register_ingest(csub))
    _register_dataset(csub)
    _optional(csub, {"train": "train a policy in simulation (--env) or from fleet data (--data)",
                     "plot": "draw a training run's learning curve (metrics.jsonl) to PNG"},
              lambda: __import__("cogbert_cloud.learn.train.command", fromlist=["register"]).register(csub))
    _optional(csub, {"evaluate": "off-policy evaluation and the promotion gate"},
              lambda: __import__("cogbert_cloud.learn.gate", fromlist=["register"]).register(csub))
    _optional(csub, {"decide": "the decision service for thin clients (HTTP and WebSocket)"},
              lambda: __import__("cogbert_cloud.service.decide.server", fromlist=["register"]).register(csub))
    _optional(csub, {"serve": "the control plane: rollout controller, operator API, learning loop",
                     "token": "make an API bearer token and print it with its digest"},
              lambda: __import__("cogbert_cloud.service.serve", fromlist=["register"]).register(csub, release_sub))


def _register_ingest(csub: argparse._SubParsersAction) -> None:
    from cogbert_cloud.data.ingest import IngestSettings
    from cogbert_edge.config import add_arguments, from_args

    ing = csub.add_parser("ingest", help="store experience batches from the broker exactly once")
    add_arguments(ing, IngestSettings, env_prefix="INGEST_")

    def ingest_main(a: argparse.Namespace) -> int:
        from cogbert_cloud.data.ingest import run
        return run(from_args(IngestSettings, a, env_prefix="INGEST_"))

    ing.set_defaults(func=ingest_main)


def _register_dataset(csub: argparse._SubParsersAction) -> None:
    ds = csub.add_parser("dataset", help="inspect stored experience")
    dsub = ds.add_subparsers(dest="dataset_cmd", required=True, metavar="COMMAND")
    st = dsub.add_parser("stats", help="transitions, devices, batches, duplicates and gaps")
    st.add_argument("--store", required=True)
    st.add_argument("--fleet", default=None)
    st.add_argument("--json", action="store_true")

    def stats_main(a: argparse.Namespace) -> int:
        import json

        from cogbert_cloud.data.dataset import ExperienceDataset
        from cogbert_cloud.data.store import open_store
        stats = ExperienceDataset(open_store(a.store), a.fleet).stats()
        print(json.dumps(stats) if a.json else "\n".join(f"{k:>12}: {v}" for k, v in stats.items()))
        return 0

    st.set_defaults(func=stats_main)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def command() -> int:
        # Inside run_command: a bad COGBERT_LOG_LEVEL or COGBERT_LOG_FORMAT is a one-line error.
        setup_logging(args.log_level, args.log_format)
        args.log_level = logging.getLevelName(logging.getLogger("cogbert").level)   # what handlers read
        # OTLP export only when OTEL_EXPORTER_OTLP_ENDPOINT is set; otherwise this does nothing.
        configure_tracing("cogbert-" + "-".join(str(x) for x in (args.cmd, getattr(args, "cloud_cmd", None)) if x))
        return int(args.func(args) or 0)

    return run_command("cogbert", command)


if __name__ == "__main__":
    sys.exit(main())
