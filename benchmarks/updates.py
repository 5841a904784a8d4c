"""``cogbert-bench swap`` and ``cogbert-bench rollout``: model updates while decisions run.

swap: one device decides in a tight loop while signed releases are installed one after the
other through its update agent (verify, stage, load on a worker thread, swap between two
decisions, trial, commit). ``swap_pause_us_p99`` is the 99th percentile of decision latency
in the windows around the swaps (from install start to 20 decisions after the swap), next to
the same percentile with no update running; ``commit_pause_us_*`` the same over the trials'
ends (from the swap's window to 20 decisions after the ``committed`` status); ``failed_decisions``
counts exceptions and non-finite outputs. ``gc_full_collection_ms`` is one full garbage collection
after the run: the stall Python's own full collections put on a decision whenever they run
(``DeviceSettings.freeze_gc``; ``--no-freeze-gc`` for the comparison).

rollout: N simulated devices (``cogbert device simulate`` processes) deciding at a modest rate
on a real mutual-TLS Mosquitto; a signed release is published on the fleet's retained release
topic; the time until each device reports ``committed`` on its status topic is measured.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from cogbert_bench._fleet import local_fleet
from cogbert_bench._timing import summary_us
from cogbert_cloud.fleet.broker import BrokerConfig
from cogbert_cloud.fleet.pki import PKI
from cogbert_cloud.release.distribution import publish_release, release_message
from cogbert_cloud.release.signing import KeyStore, create_release
from cogbert_edge import (
    ActionSpace,
    Bundle,
    Device,
    DeviceSettings,
    ModelConfig,
    UpdateSettings,
    init_params,
)
from cogbert_edge.inference.quant import plan, quantize_params
from cogbert_edge.link.mqtt import LinkSettings, MqttLink
from cogbert_edge.update.agent import golden_outputs
from cogbert_edge.wire.messages import StatusReport


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("swap", help="decision latency while models are hot-swapped")
    p.add_argument("--swaps", type=int, default=20)
    p.add_argument("--decisions", type=int, default=20000, help="decisions before the first swap (baseline)")
    # fp32 by default, as before; int8 is what `cogbert cloud train` exports for devices.
    p.add_argument("--quant", choices=["fp32", "int8"], default="fp32", help="the releases' weights")
    p.add_argument("--no-freeze-gc", action="store_true",
                   help="start the device with freeze_gc=False (compare gc_full_collection_ms)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=swap_main)
    r = sub.add_parser("rollout", help="time from publishing a release to every device committed")
    r.add_argument("--devices", type=int, default=200)
    r.add_argument("--procs", type=int, default=20, help="simulate processes to spread the devices over "
                   "(few devices per process, as on real hardware where each runs its own)")
    r.add_argument("--rate", type=float, default=10.0, help="decisions per second per device")
    r.add_argument("--sim-log", type=Path, default=None,
                   help="write each simulate process's log to SIM_LOG.<n> (default: discard)")
    r.add_argument("--sim-log-level", default="WARNING")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=rollout_main)


def _bundle(seed: int, config: ModelConfig, quant: str = "fp32") -> bytes:
    params = init_params(config, seed, policy_gain=1.0)
    layers = plan(config, 8) if quant == "int8" else None
    if layers is not None:
        params = quantize_params(params, layers)
    b = Bundle.create(config, params, quant=layers, model_id=f"bench-{seed}")
    return Bundle.create(config, dict(b.tensors), quant=layers, model_id=f"bench-{seed}",
                         extra={"x-golden": json.dumps(golden_outputs(b))}).to_bytes()


def swap_main(args: argparse.Namespace) -> dict:
    config = ModelConfig.reference()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        keys = KeyStore.init(root / "keys")
        bundles = [_bundle(i, config, args.quant) for i in range(args.swaps + 1)]
        (root / "factory.safetensors").write_bytes(bundles[0])
        dev = _offline_device(root, keys, freeze_gc=not args.no_freeze_gc)
        updater = dev.updater
        assert updater is not None   # a device given a trust root runs an update agent
        rng = np.random.default_rng(0)
        obs = rng.standard_normal((256, config.obs_dim)).astype(np.float32)
        state = dev.policy.initial_state()
        lat, marks, commit_marks, failed = [], [], [], 0
        swapped_at: list[int] = []
        clock = time.perf_counter

        def decide(n: int) -> None:
            nonlocal state, failed
            for i in range(n):
                t0 = clock()
                try:
                    d = dev.act("s", obs[i % 256], state)
                    state = d.state
                    failed += not (np.isfinite(d.value) and np.isfinite(d.log_prob))
                except Exception:  # noqa: BLE001 - a failed decision is what we count
                    failed += 1
                lat.append(clock() - t0)

        decide(args.decisions)
        baseline = np.array(lat)
        for k in range(1, args.swaps + 1):
            manifest = create_release(bundles[k], keys, counter=k, model="bench", fleet="default")
            path = root / f"b{k}.safetensors"
            path.write_bytes(bundles[k])
            start = len(lat)
            swaps_before = dev.swaps
            updater.on_message(release_message(manifest, url=path.as_uri()), dev.policy)
            while dev.swaps == swaps_before:
                decide(1)
            swapped_at.append(len(lat) - 1)     # the decision during which the swap came, or the first after it
            decide(20)
            marks.append((start, len(lat)))
            # The trial's end and commit, until the status is out and 20 decisions after it.
            start, done_before = len(lat), sum(s.status == "committed" for s in updater.statuses)
            while sum(s.status == "committed" for s in updater.statuses) == done_before:
                decide(1)
            decide(20)
            commit_marks.append((start, len(lat)))
        statuses = [s.status for s in updater.statuses]
        # What a full collection, which Python starts on its own as long-lived objects grow,
        # would stall one decision for on this device.
        t0 = clock()
        gc.collect()
        full_gc_ms = (clock() - t0) * 1e3
        dev.close(flush=False)
    around = np.concatenate([np.array(lat[a:b]) for a, b in marks]) * 1e6
    # Where in the windows the slow decisions are: while the install runs (before the swap), or
    # right at it (the update thread holds the GIL while it reports the install and the trial).
    before = np.concatenate([np.array(lat[a:k]) for (a, _), k in zip(marks, swapped_at, strict=True)]) * 1e6
    first = np.array([lat[k:k + 3] for k in swapped_at]) * 1e6
    commits = np.concatenate([np.array(lat[a:b]) for a, b in commit_marks]) * 1e6
    return {"suite": "swap", "model": f"reference (obs 64, LSTM 256, 8 actions), {args.quant}",
            "backend": dev.policy.backend,
            "swaps": args.swaps, "committed": statuses.count("committed"),
            "swap_pause_us_p99": round(float(np.percentile(around, 99)), 1),
            "swap_pause_us_max": round(float(around.max()), 1),
            "window_decisions": len(around),
            "install_window_us_p99": round(float(np.percentile(before, 99)), 1) if len(before) else None,
            "first_three_after_swap_us_p50": [round(float(x), 1) for x in np.percentile(first, 50, axis=0)],
            "first_three_after_swap_us_max": [round(float(x), 1) for x in first.max(axis=0)],
            "commit_pause_us_p99": round(float(np.percentile(commits, 99)), 1),
            "commit_pause_us_max": round(float(commits.max()), 1),
            "baseline": summary_us(baseline), "baseline_max_us": round(float(baseline.max()) * 1e6, 1),
            "decisions": len(lat), "failed_decisions": failed,
            "gc_full_collection_ms": round(full_gc_ms, 2), "gc_frozen_objects": gc.get_freeze_count()}


def _offline_device(root: Path, keys: KeyStore, *, freeze_gc: bool = True) -> Device:
    """A device whose link never connects: releases are handed to its agent directly."""
    pki = PKI.init(root / "pki")
    pki.issue_device("bench", fleet="default")
    return Device(DeviceSettings(device_id="bench", spool=root / "spool", bundle=root / "factory.safetensors",
                                 broker="mqtts://localhost:9", pki=pki.root, trust_root=keys.root / "root.json",
                                 model_name="bench", freeze_gc=freeze_gc,
                                 update=UpdateSettings(trial_decisions=200, trial_seconds=0.2))).start()


def rollout_main(args: argparse.Namespace) -> dict:
    config = ModelConfig(obs_dim=16, action=ActionSpace.of_discrete(4), encoder=(32,), hidden=32)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        keys = KeyStore.init(root / "keys")
        ids = [f"fleet-{i:04d}" for i in range(args.devices)]
        (root / "factory.safetensors").write_bytes(_bundle(0, config))
        new = _bundle(1, config)
        (root / "release.safetensors").write_bytes(new)
        manifest = create_release(new, keys, counter=1, model="bench", fleet="bench")
        with local_fleet(root, services=["rollout"], devices=ids,
                         config=BrokerConfig(plugin_in_confdir=False, max_inflight_messages=1000)) as (pki, broker):
            committed: dict[str, float] = {}
            statuses: dict[str, list] = {}
            lock = threading.Lock()

            def on_status(m) -> None:
                s = StatusReport.decode(m.payload)
                with lock:
                    statuses.setdefault(s.device, []).append(s.status)
                    if s.kind == "committed":
                        committed.setdefault(s.device, time.monotonic())

            ctl = MqttLink(LinkSettings.for_service(broker.service_url, pki.root, "rollout", client_id="rollout-bench"))
            ctl.start()
            ctl.subscribe("cogbert/v1/bench/+/status", on_status).wait(10)
            per = -(-args.devices // args.procs)
            procs: list[subprocess.Popen] = []
            logs = []
            for i in range(args.procs):
                first = i * per
                n = min(per, args.devices - first)
                if n <= 0:
                    break
                logs.append(open(f"{args.sim_log}.{i}" if args.sim_log else os.devnull, "w"))
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "cogbert_cloud.cli", "--log-level", args.sim_log_level, "device", "simulate",
                     "--devices", str(n), "--first-index", str(first), "--prefix", "fleet", "--fleet", "bench",
                     "--steps", "0", "--keep-running", "60", "--rate", str(args.rate), "--broker", broker.url,
                     "--pki", str(pki.root), "--spool", str(root / "spool"), "--bundle",
                     str(root / "factory.safetensors"), "--trust-root", str(keys.root / "root.json"),
                     "--model-name", "bench", "--trial-decisions", "10", "--trial-seconds", "0",
                     "--env", "sensor", "--telemetry-interval", "1",
                     "--drain-timeout", "0"],
                    stdout=subprocess.DEVNULL, stderr=logs[-1]))
            # Wait until every device is connected and deciding (each sends telemetry).
            seen: set[str] = set()
            ctl.subscribe("cogbert/v1/bench/+/telemetry", lambda m: seen.add(m.topic.split("/")[3])).wait(10)
            deadline = time.monotonic() + 120
            while len(seen) < args.devices and time.monotonic() < deadline:
                time.sleep(0.1)
            ready = len(seen)
            t0 = time.monotonic()
            for h in publish_release(ctl, "bench", manifest, url=(root / "release.safetensors").as_uri()):
                h.wait(10)
            deadline = t0 + 60
            while len(committed) < args.devices and time.monotonic() < deadline:
                time.sleep(0.02)
            times = sorted(t - t0 for t in committed.values())
            for p in procs:
                p.terminate()       # with --drain-timeout 0: no ingestion here to wait for
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            for f in logs:
                f.close()
            ctl.close()
    return {"suite": "rollout", "devices": args.devices, "ready": ready, "committed": len(times),
            "p50_s": round(float(np.percentile(times, 50)), 3) if times else None,
            "max_s": round(times[-1], 3) if times else None,
            "not_committed": sorted(set(ids) - set(committed))[:10],
            "status_reports": dict(collections.Counter(x.split(":")[0] for v in statuses.values() for x in v))}


def table(result: dict) -> str:
    return "\n".join(f"{k:>20}: {v}" for k, v in result.items())
