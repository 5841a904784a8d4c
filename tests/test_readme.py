"""The README's "fleet, command by command" block runs as written: extracted from README.md and
run by bash against a real broker, with free ports and shorter trainings."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cogbert_cloud.fleet.broker import free_port

ROOT = Path(__file__).resolve().parent.parent


def walkthrough() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- walkthrough:start -->\s*```sh\n(.*?)```\s*<!-- walkthrough:end -->", text, re.S)
    assert m, "README.md has no walkthrough block between the walkthrough markers"
    return m.group(1)


def shortened(block: str) -> str:
    """The same commands with free ports and budgets a test can afford."""
    ports = {"8883": str(free_port()), "8884": str(free_port()), "8080": str(free_port())}
    for old, new in ports.items():
        assert old in block, f"the walkthrough no longer uses port {old}; update this test"
        block = re.sub(rf"\b{old}\b", new, block)
    block = block.replace("--steps 30000", "--steps 4000 --eval-episodes 2")
    block = block.replace("--steps 3000 ", "--steps 400 ")
    block = block.replace("--env ProductionChain-v0\nkill", "--env ProductionChain-v0 --sim-episodes 4\nkill")
    return block


@pytest.mark.slow
def test_the_readme_walkthrough_runs_as_written(tmp_path):
    block = shortened(walkthrough())
    assert "--steps 400 " in block and "--steps 4000 " in block, "the walkthrough's budgets changed; update this test"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "TMPDIR": str(tmp_path),
           "COGBERT_BACKEND": "numpy"}
    # The trap stops the background services whatever happens (they would hold the pipes open).
    script = ("set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n"
              + block.replace('cd "$(mktemp -d)"', f'cd "{tmp_path}"', 1))
    p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert p.returncode == 0, f"stdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    lines = p.stdout.strip().splitlines()
    # What the walkthrough shows the user, in order: the fleet as the API sees it, the dataset,
    # and the gate's decision.
    devices = json.loads(next(line for line in lines if line.startswith("[")))
    assert {d["device"] for d in devices} == {"press-0000", "press-0001"}
    assert all(d["model"] for d in devices)
    stats = dict(re.findall(r"^\s*(\w+): (\d+)$", p.stdout, re.M))
    assert int(stats["transitions"]) == 800 and int(stats["duplicates"]) == 0 and int(stats["gaps"]) == 0
    assert re.search(r"^decision: (promote|reject)", p.stdout, re.M)
    sim = json.loads((tmp_path / "simulate.json").read_text())
    assert sim["all_drained"] and sim["devices"] == 2
