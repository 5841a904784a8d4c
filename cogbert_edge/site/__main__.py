"""Run one site agent as a process: observations in, actions out, as JSON lines.

    python -m cogbert_edge.site --device station_0 --fleet F --site S --members a,b,c \
        --coordinator coord --broker mqtts://host:8883 --pki DIR --bundle role.safetensors

Each input line is ``{"step": t, "obs": [...], "session": S}`` (the station's local observation;
``session`` names the site's episode) or ``{"reward": r, "session": S, "step": t, "done": false}``
(the team reward of a logged decision); each output line is ``{"step", "action", "proposed",
"mode", "round_trip_ms", "peers_heard", "logged_step"}``. With ``--spool`` the agent is a full
:class:`~cogbert_edge.device.Device` (outbox, uploads, telemetry, and updates with
``--trust-root``) and logs every decision; at the end of the input it waits up to
``--drain-timeout`` seconds for the cloud to store everything, prints ``{"metrics": ...}`` and
exits. This is how a station's controller (or the plant simulator of the tests and the demo)
drives an agent.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cogbert_edge.device import Device, DeviceSettings
from cogbert_edge.errors import CogbertError
from cogbert_edge.inference.policy import Policy
from cogbert_edge.site.agent import SiteAgent, SiteAgentSettings
from cogbert_edge.update.agent import UpdateSettings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cogbert_edge.site", description="Run one agent of a site")
    p.add_argument("--device", required=True)
    p.add_argument("--fleet", required=True)
    p.add_argument("--site", required=True)
    p.add_argument("--members", required=True, help="the site's agents, comma-separated, in agent-index order")
    p.add_argument("--coordinator", required=True)
    p.add_argument("--broker", required=True)
    p.add_argument("--pki", required=True, type=Path)
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--mode", default="centralized", choices=["centralized", "decentralized"])
    p.add_argument("--deadline-ms", type=float, default=50.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spool", type=Path, help="run as a logging device with its outbox here")
    p.add_argument("--trust-root", type=Path, help="root.json of the release keys: install signed releases")
    p.add_argument("--drain-timeout", type=float, default=60.0)
    p.add_argument("--role", help="the agent's role: with --trust-root, install site releases' bundle for it")
    p.add_argument("--trial-decisions", type=int, default=200, help="decisions a new release runs on trial")
    a = p.parse_args(argv)
    try:
        settings = SiteAgentSettings(a.device, a.fleet, a.site, a.members.split(","), a.coordinator, a.broker,
                                     a.pki, a.mode, a.deadline_ms)
        device = None
        if a.spool is not None:
            device = Device(DeviceSettings(device_id=a.device, spool=a.spool, bundle=a.bundle, fleet=a.fleet,
                                           broker=a.broker, pki=a.pki, backend="numpy", seed=a.seed,
                                           trust_root=a.trust_root, reward_delay=1, telemetry_interval=2.0,
                                           update=UpdateSettings(role=a.role, trial_decisions=a.trial_decisions,
                                                                 trial_seconds=60.0))).start()
            agent = SiteAgent(settings, device=device).start()
        else:
            agent = SiteAgent(settings, Policy.load(a.bundle, "numpy", seed=a.seed)).start()
    except CogbertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = sys.stdout
    print(json.dumps({"event": "agent_ready", "device": a.device}), file=out, flush=True)
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                req = json.loads(line)
                if "reward" in req:
                    agent.reward(str(req["session"]), float(req["reward"]), step=int(req["step"]),
                                 done=bool(req.get("done", False)), truncated=bool(req.get("truncated", False)))
                    continue
                r = agent.step(int(req["step"]), req["obs"], req.get("session"))
            except (ValueError, KeyError, TypeError, CogbertError) as e:
                # Bad input gets an error line and the agent keeps going.
                print(json.dumps({"error": str(e)[:200]}), file=out, flush=True)
                continue
            print(json.dumps({"step": r.step, "action": r.action, "proposed": r.proposed, "mode": r.mode,
                              "round_trip_ms": r.round_trip_ms, "peers_heard": r.peers_heard,
                              "logged_step": r.logged_step, "model": agent.policy_model_id}), file=out, flush=True)
        metrics = agent.metrics()
        if device is not None:
            device.flush()
            deadline = time.monotonic() + a.drain_timeout
            while not device.drained() and time.monotonic() < deadline:
                time.sleep(0.05)
            metrics["drained"] = device.drained()
            metrics["logged"] = device.outbox.last_seq
        print(json.dumps({"metrics": metrics}), file=out, flush=True)
    finally:
        agent.close()
        if device is not None:
            device.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
