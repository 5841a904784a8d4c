"""Configuration: defaults, then COGBERT_* environment, then flags; bad values are ConfigErrors."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest

from cogbert_edge import ConfigError
from cogbert_edge.config import add_arguments, from_args, load


@dataclass
class Example:
    broker: str = "mqtts://localhost:8883"
    batch_bytes: int = 131072
    ratio: float = 0.5
    compress: bool = True
    spool: Path = Path("/tmp/spool")
    stages: tuple[int, ...] = (5, 25, 100)
    token: str | None = None


def test_defaults_then_environment_then_flags():
    env = {"COGBERT_EX_BATCH_BYTES": "4096", "COGBERT_EX_COMPRESS": "off", "COGBERT_EX_STAGES": "1, 50,100",
           "COGBERT_EX_BROKER": "mqtts://env:1"}
    s = load(Example, env_prefix="EX_", environ=env)
    assert s == Example(broker="mqtts://env:1", batch_bytes=4096, compress=False, stages=(1, 50, 100))
    parser = argparse.ArgumentParser()
    add_arguments(parser, Example, env_prefix="EX_")
    args = parser.parse_args(["--broker", "mqtts://flag:2", "--no-compress", "--spool", "~/x", "--ratio", "2"])
    s = load(Example, env_prefix="EX_", environ=env, **{k: v for k, v in vars(args).items()})
    assert s.broker == "mqtts://flag:2" and s.batch_bytes == 4096 and s.ratio == 2.0
    assert s.spool == Path("~/x").expanduser() and s.compress is False
    assert "COGBERT_EX_BATCH_BYTES" in parser.format_help()


def test_from_args_reads_the_process_environment(monkeypatch):
    monkeypatch.setenv("COGBERT_TOKEN", "abc")
    parser = argparse.ArgumentParser()
    add_arguments(parser, Example)
    assert from_args(Example, parser.parse_args([])).token == "abc"


@pytest.mark.parametrize("env", [{"COGBERT_BATCH_BYTES": "lots"}, {"COGBERT_COMPRESS": "maybe"},
                                 {"COGBERT_STAGES": "5,x"}])
def test_bad_values_are_config_errors_naming_the_variable(env):
    with pytest.raises(ConfigError, match=next(iter(env))):
        load(Example, environ=env)
