"""``cogbert demo --multi-agent``: multi-agent sites end to end on one machine.

1. a PKI whose device certificates name their site and site role, release keys, Mosquitto with the
   site ACLs;
2. MAPPO trains the line's role actor (``--marl-steps``; the central critic stays here);
3. the gate compares the candidate with the factory release and the heuristic team policy on the
   same seeds in the simulator (paired differences);
4. the candidate's role bundles are signed as one site release, with a pre-signed rollback;
5. ``--sites`` sites, each three agent devices (own certificate, outbox, update agent) and a
   coordinator process, decide on their own simulated line the whole time;
6. the canary stage is half the sites (whole sites); their team return under the release is
   compared with the other sites' on the same seeds, then the release is promoted to every site
   or the canary sites are rolled back;
7. the summary reports each site's team return against the heuristic on the same seeds, and the
   coordinators' latency, synchronisation efficiency and conflicts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from cogbert_cloud.fleet.broker import LocalBroker
from cogbert_cloud.fleet.pki import PKI
from cogbert_cloud.learn.envs.production_line import HeuristicTeamPolicy, ProductionLineConfig, ProductionLineVecEnv
from cogbert_cloud.learn.marl import MARLTrainer, evaluate_bundles, marl_preset
from cogbert_cloud.release.rollout.sites import SiteRelease, SiteRollout, canary_sites
from cogbert_cloud.release.signing import KeyStore, create_site_release
from cogbert_edge.inference.bundle import Bundle, load_bundle
from cogbert_edge.inference.model import ActionSpace, ModelConfig, init_params
from cogbert_edge.link.mqtt import LinkSettings, MqttLink

__all__ = ["run_multi_agent"]

FLEET = "plant"


class _Plant(threading.Thread):
    """Each site's line, driving its three agent processes; episodes seeded per site and episode."""

    def __init__(self, procs: dict[str, list[subprocess.Popen]], members: dict[str, list[str]]) -> None:
        super().__init__(daemon=True)
        self.procs, self.members = procs, members
        self.models: dict[str, str] = {}
        self.episodes: dict[str, list[dict]] = {s: [] for s in procs}
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            cfg = ProductionLineConfig()
            envs = {s: ProductionLineVecEnv(1, config=cfg) for s in self.procs}
            ep = 0
            while not self.stop.is_set():
                seed = 50_000 + ep          # every site plays the same seed: common random numbers
                obs = {s: envs[s].reset(seed)[0] for s in self.procs}
                ret = dict.fromkeys(self.procs, 0.0)
                models: dict[str, set[str]] = {s: set() for s in self.procs}
                for t in range(cfg.episode_length):
                    for s, procs in self.procs.items():
                        for k, p in enumerate(procs):
                            assert p.stdin is not None
                            p.stdin.write(json.dumps({"step": t, "obs": obs[s][0, k].tolist(),
                                                      "session": f"{s}-ep{ep}"}) + "\n")
                            p.stdin.flush()
                        res = []
                        for p in procs:
                            assert p.stdout is not None
                            res.append(json.loads(p.stdout.readline()))
                        for d, r in zip(self.members[s], res, strict=True):
                            self.models[d] = r["model"]
                            models[s].add(r["model"])
                        obs[s], _, reward, _, done, _ = envs[s].step(np.array([[r["action"] for r in res]]))
                        ret[s] += float(reward[0])
                        for p in procs:
                            assert p.stdin is not None
                            p.stdin.write(json.dumps({"reward": float(reward[0]), "session": f"{s}-ep{ep}",
                                                      "step": t, "truncated": bool(done[0])}) + "\n")
                            p.stdin.flush()
                for s in self.procs:
                    self.episodes[s].append({"episode": ep, "seed": seed, "return": ret[s],
                                             "models": sorted(models[s])})
                ep += 1
        except BaseException as e:  # reported by run_multi_agent
            self.error = e


def run_multi_agent(workdir: Path, *, marl_steps: int = 100_000, sites: int = 2, episodes_per_stage: int = 3,
                    seed: int = 0, quiet: bool = False) -> dict[str, Any]:
    t0 = time.monotonic()

    def say(msg: str) -> None:
        if not quiet:
            print(f"[{time.monotonic() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    site_names = [f"line{chr(ord('A') + i)}" for i in range(sites)]
    members = {s: [f"{s.lower()}-st{k}" for k in range(3)] for s in site_names}
    say(f"PKI, release keys and the broker for {sites} sites of 3 agents and a coordinator")
    pki = PKI.init(workdir / "pki")
    pki.issue_server(["localhost"])
    pki.issue_service("rollout")
    for s in site_names:
        for d in members[s]:
            pki.issue_device(d, fleet=FLEET, site=s)
        pki.issue_device(f"{s.lower()}-coord", fleet=FLEET, site=s, site_role="coordinator")
    keys = KeyStore.init(workdir / "keys")

    say(f"MAPPO: {marl_steps} steps on ProductionLine-v0 (parameter-shared LSTM actor, central critic)")
    trainer = MARLTrainer(marl_preset("ProductionLine-v0", seed=seed))
    train = trainer.train(marl_steps)
    candidate = trainer.bundles()["agent"]
    cfg = ModelConfig(obs_dim=candidate.config.obs_dim, action=ActionSpace.of_discrete(3),
                      encoder=candidate.config.encoder, hidden=candidate.config.hidden)
    fparams = init_params(cfg, seed + 1)
    fparams["obs_norm.mean"] = np.zeros(cfg.obs_dim, np.float32)
    fparams["obs_norm.std"] = np.ones(cfg.obs_dim, np.float32)
    factory = Bundle.create(cfg, fparams)
    roles = trainer.role_map()

    say("gate: candidate against the factory release and the heuristic, 200 episodes on the same seeds")
    g_seed = 70_000
    cand = evaluate_bundles({"agent": candidate}, roles, "ProductionLine-v0", 200, seed=g_seed)
    fact = evaluate_bundles({"agent": factory}, roles, "ProductionLine-v0", 200, seed=g_seed)
    heur = _heuristic(200, g_seed)
    diff = cand - fact
    gate = {"candidate": float(cand.mean()), "factory": float(fact.mean()), "heuristic": float(heur.mean()),
            "diff_vs_factory": float(diff.mean()),
            "diff_vs_factory_ci95": float(1.96 * diff.std(ddof=1) / np.sqrt(len(diff))),
            "diff_vs_heuristic": float((cand - heur).mean())}
    gate["passed"] = gate["diff_vs_factory"] - gate["diff_vs_factory_ci95"] > 0
    say(f"gate: candidate {gate['candidate']:.1f}, factory {gate['factory']:.1f}, heuristic {gate['heuristic']:.1f}"
        f" -> {'pass' if gate['passed'] else 'fail'}")
    summary: dict[str, Any] = {"train": train, "gate": gate, "sites": site_names}
    if not gate["passed"]:
        summary["outcome"] = "rejected at the gate"
        return summary

    cand_b, fact_b = candidate.to_bytes(), factory.to_bytes()
    (workdir / "factory.safetensors").write_bytes(fact_b)
    release = SiteRelease(2, create_site_release({"agent": cand_b}, keys, counter=2, model="cogbert", fleet=FLEET),
                          {"agent": cand_b})
    rollback = SiteRelease(3, create_site_release({"agent": fact_b}, keys, counter=3, model="cogbert",
                                                  fleet=FLEET), {"agent": fact_b})
    say("signed site release 2 (every role's bundle in one manifest) and its rollback, release 3")

    broker = LocalBroker(pki.root, workdir / "broker").start()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COGBERT_LOG_LEVEL": "warning"}
    coords, procs = [], {}
    plant: _Plant | None = None
    link: MqttLink | None = None
    try:
        for s in site_names:
            cdev = f"{s.lower()}-coord"
            c = subprocess.Popen([sys.executable, "-m", "cogbert_cloud.service.coordinator", "--fleet", FLEET,
                                  "--site", s, "--device", cdev, "--members", ",".join(members[s]), "--broker",
                                  broker.url, "--pki", str(pki.root), "--deadline-ms", "50", "--metrics-file",
                                  str(workdir / f"{s}-coordination.json")], stdout=subprocess.PIPE, text=True, env=env)
            coords.append(c)
            procs[s] = [subprocess.Popen(
                [sys.executable, "-m", "cogbert_edge.site", "--device", d, "--fleet", FLEET, "--site", s,
                 "--members", ",".join(members[s]), "--coordinator", cdev, "--broker", broker.url, "--pki",
                 str(pki.root), "--bundle", str(workdir / "factory.safetensors"), "--deadline-ms", "100",
                 "--seed", str(k), "--spool", str(workdir / "spool" / d), "--trust-root",
                 str(keys.root / "root.json"), "--role", "agent", "--trial-decisions", "50", "--drain-timeout", "10"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
                for k, d in enumerate(members[s])]
        for c in coords:
            assert c.stdout is not None
            json.loads(c.stdout.readline())
        for ps in procs.values():
            for p in ps:
                assert p.stdout is not None
                json.loads(p.stdout.readline())
        link = MqttLink(LinkSettings.for_service(broker.service_url, pki.root, "rollout")).start()
        link.wait_connected(10)
        rollout = SiteRollout(link, FLEET, {s: dict.fromkeys(members[s], "agent") for s in site_names}).start()
        plant = _Plant(procs, members)
        plant.start()
        canary = canary_sites(site_names, 0.5)
        say(f"canary stage: sites {canary} (whole sites) get release 2")
        stage1 = rollout.stage(canary, release, rollback, timeout=120)
        cand_id = load_bundle(cand_b).model_id
        _wait(lambda: all(plant.models.get(d) == cand_id for s in canary for d in members[s]), plant, 60)
        start = {s: len(plant.episodes[s]) for s in site_names}
        _wait(lambda: all(len(plant.episodes[s]) >= start[s] + episodes_per_stage + 1 for s in site_names),
              plant, 600)
        # Compare whole episodes played entirely under one release, on the same seeds at every site.
        def window(s: str) -> list[float]:
            eps = plant.episodes[s][start[s] + 1:start[s] + 1 + episodes_per_stage]
            return [e["return"] for e in eps]
        canary_ret = float(np.mean([r for s in canary for r in window(s)]))
        control = [s for s in site_names if s not in canary]
        control_ret = float(np.mean([r for s in control for r in window(s)])) if control else float("nan")
        promote = not control or canary_ret >= control_ret
        say(f"canary team return {canary_ret:.1f} vs control {control_ret:.1f} -> "
            f"{'promote' if promote else 'roll back'}")
        if promote and control:
            stage2 = rollout.stage(control, release, rollback, timeout=120)
        elif not promote:
            stage2 = {s: rollout.roll_back(s, rollback, timeout=120) for s in canary}
        else:
            stage2 = {}
        heur_seeds = sorted({e["seed"] for s in site_names for e in plant.episodes[s]})
        h = {sd: float(_heuristic(1, sd)[0]) for sd in heur_seeds}
        per_site = {}
        for s in site_names:
            eps = plant.episodes[s]
            under = [e for e in eps if e["models"] == [cand_id]]
            per_site[s] = {"episodes": len(eps),
                           "release2_return": float(np.mean([e["return"] for e in under])) if under else None,
                           "heuristic_same_seeds": float(np.mean([h[e["seed"]] for e in under])) if under else None,
                           "coordination": json.loads((workdir / f"{s}-coordination.json").read_text())}
        summary.update(outcome="promoted" if promote else "rolled back", canary=canary, stage1=stage1, stage2=stage2,
                       canary_return=canary_ret, control_return=control_ret, per_site=per_site,
                       audit=rollout.audit, wall_s=round(time.monotonic() - t0, 1))
        (workdir / "multi-agent-summary.json").write_text(json.dumps(summary, indent=1, default=str))
        say(f"done: {summary['outcome']}; summary in {workdir / 'multi-agent-summary.json'}")
        return summary
    finally:
        if plant is not None:
            plant.stop.set()
            plant.join(60)
        if link is not None:
            link.close()
        for ps in procs.values():
            for p in ps:
                if p.stdin:
                    p.stdin.close()
        for ps in procs.values():
            for p in ps:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
        for c in coords:
            c.terminate()
            c.wait(10)
        broker.stop()


def _heuristic(episodes: int, seed: int) -> np.ndarray:
    from cogbert_cloud.learn.envs.production_line import evaluate_team
    return evaluate_team(HeuristicTeamPolicy(ProductionLineConfig()), episodes, seed)


def _wait(cond: Any, plant: _Plant, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if plant.error is not None:
            raise plant.error
        if time.monotonic() > deadline:
            raise TimeoutError("the multi-agent demo timed out waiting for the sites")
        time.sleep(0.1)
