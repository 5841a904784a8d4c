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

from . import broker, demo, pki, releases, simulate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cogbert", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="log level of the JSON logs on stderr")
    sub = parser.add_subparsers(dest="cmd", required=True)
    device_sub = edge_cli.register(sub)
    simulate.register(device_sub)
    release_sub = releases.register(sub)
    _register_cloud(sub, release_sub)
    pki.register(sub)
    broker.register(sub)
    demo.register(sub)
    return parser


def _register_cloud(sub: argparse._SubParsersAction, release_sub: argparse._SubParsersAction) -> None:
    from cogbert_edge.settings import add_arguments, from_args

    from .ingest import IngestSettings

    cloud = sub.add_parser("cloud", help="the fleet service: ingestion, datasets, training")
    csub = cloud.add_subparsers(dest="cloud_cmd", required=True)
    ing = csub.add_parser("ingest", help="store experience batches from the broker exactly once")
    add_arguments(ing, IngestSettings, env_prefix="INGEST_")

    def ingest_main(a: argparse.Namespace) -> int:
        from .ingest import run
        return run(from_args(IngestSettings, a, env_prefix="INGEST_"))

    ing.set_defaults(func=ingest_main)

    ds = csub.add_parser("dataset", help="inspect stored experience")
    dsub = ds.add_subparsers(dest="dataset_cmd", required=True)
    st = dsub.add_parser("stats", help="transitions, devices, batches, duplicates and gaps")
    st.add_argument("--store", required=True)
    st.add_argument("--fleet", default=None)
    st.add_argument("--json", action="store_true")

    def stats_main(a: argparse.Namespace) -> int:
        import json

        from .dataset import ExperienceDataset
        from .store import open_store
        stats = ExperienceDataset(open_store(a.store), a.fleet).stats()
        print(json.dumps(stats) if a.json else "\n".join(f"{k:>12}: {v}" for k, v in stats.items()))
        return 0

    st.set_defaults(func=stats_main)

    from .train import command as train_command
    train_command.register(csub)
    from .gate import register as register_gate
    register_gate(csub)
    from . import service
    service.register(csub, release_sub)


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
