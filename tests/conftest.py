"""Shared fixtures: the reference model in fp32, int8 and int4, as bundles and as files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from cogbert_edge import Bundle, ModelConfig, init_params
from cogbert_edge.inference.quant import plan, quantize_params

from .helpers import MACHINE_LIMIT


@pytest.fixture(scope="session")
def config() -> ModelConfig:
    return ModelConfig.reference()


@pytest.fixture(scope="session")
def params(config) -> dict[str, np.ndarray]:
    # A full-scale policy head, so that actions depend on the weights as in a trained model.
    return init_params(config, seed=0, policy_gain=1.0)


@pytest.fixture(scope="session")
def bundles(config, params) -> dict[str, Bundle]:
    out = {"fp32": Bundle.create(config, params, model_id="ref-fp32")}
    for bits in (8, 4):
        layers = plan(config, bits, 64)
        out[f"int{bits}"] = Bundle.create(config, quantize_params(params, layers), quant=layers,
                                          model_id=f"ref-int{bits}", parent="ref-fp32")
    return out


@pytest.fixture(scope="session")
def bundle_files(bundles, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bundles")
    paths = {}
    for k, b in bundles.items():
        paths[k] = d / f"{k}.safetensors"
        b.save(paths[k])
    return paths


# `./run test` installs every tool a test needs, so there a skipped test is a missing install
# step: COGBERT_STRICT_SKIPS=1 (which ./run test sets) fails the run. A skip for what the machine
# is (helpers.skip_on_this_machine: a CPU without AVX-512, BSD stat) does not.
_skipped: list[str] = []


def pytest_runtest_logreport(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if MACHINE_LIMIT not in reason:
            _skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus) -> None:
    if os.environ.get("COGBERT_STRICT_SKIPS") == "1" and _skipped and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if os.environ.get("COGBERT_STRICT_SKIPS") == "1" and _skipped:
        terminalreporter.write_line(
            f"COGBERT_STRICT_SKIPS=1: {len(_skipped)} test(s) skipped, which fails this run (./run test "
            "installs every tool the tests need; set COGBERT_STRICT_SKIPS=0 to allow skips): "
            + ", ".join(_skipped[:5]), red=True)
