"""The continuous-learning loop: train -> gate -> export -> sign -> roll out, again and again.

A round starts on a schedule (``interval``) or once ``min_new_transitions`` more transitions are
stored. It

1. trains a candidate from the stable release: V-trace on the fleet's logged experience
   (off-policy corrected), then PPO in the simulator; in a local process by default
   (``cogbert cloud train``), or as a Kubernetes Job (:class:`KubernetesJobTrainer`);
2. gates it: off-policy evaluation on the fleet's data logged by the stable release, and the
   simulator: a candidate that is not better is registered as ``retired`` and goes no further;
3. exports it to an int8 bundle checked against fp32 (part of training);
4. has it signed by the *signer*, a separate step that holds the release key: the signer also
   signs, in advance, the fleet rollback (the stable bundle under the next counter), so that
   the rollout controller can roll back without ever holding a key;
5. registers both and starts the staged rollout.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cogbert_cloud.data import keys
from cogbert_cloud.data.dataset import ExperienceDataset
from cogbert_cloud.data.store import ObjectStore
from cogbert_cloud.errors import StoreError, TrainingError
from cogbert_cloud.learn.gate import GateSettings
from cogbert_cloud.release.registry import Registry
from cogbert_cloud.release.rollout import RolloutController
from cogbert_edge._internal import trace
from cogbert_edge._internal.log import event
from cogbert_edge.errors import CogbertError
from cogbert_edge.inference.bundle import load_bundle

__all__ = ["LoopSettings", "ContinuousLearner", "LocalTrainer", "KubernetesJobTrainer", "Signer", "KeySigner"]

log = logging.getLogger("cogbert.loop")


@dataclass
class LoopSettings:
    env: str = "ProductionChain-v0"
    fleet: str = "default"
    model: str = "cogbert"
    store_url: str = "file://./cogbert-store"
    workdir: Path = Path("loop-work")
    train_steps: int = 100_000
    vtrace_epochs: int = 2
    # None: each step's default. A small rate keeps the candidate near the stable release, and
    # so within reach of off-policy evaluation on the data that release logged (docs/ope.md).
    lr: float | None = None
    interval: float = 3600.0
    min_new_transitions: int = 50_000
    gate_margin: float = 0.0
    gate_sim_episodes: int = 32
    # Windows of 32 steps at gamma 0.95: the whole-episode estimand needs the candidate within a
    # few thousandths of KL per step of the stable release to keep its weights usable (docs/ope.md).
    gate_horizon: int = GateSettings.horizon
    gate_gamma: float = GateSettings.gamma
    release_expiry: str = "30d"
    extra_train_args: list[str] = field(default_factory=list)
    # A Kubernetes training Job that neither completes nor fails within this long is deleted
    # and the round ends as training_failed; the Job's own activeDeadlineSeconds is longer.
    job_timeout: float = 6 * 3600.0
    job_poll_interval: float = 10.0


class Trainer(Protocol):
    def train(self, round_dir: Path, init: Path, data_url: str | None, steps: int) -> Path: ...


class Signer(Protocol):
    def sign(self, bundle: bytes, counter: int) -> bytes: ...


class LocalTrainer:
    """``cogbert cloud train`` in a child process; returns the exported bundle's path."""

    def __init__(self, settings: LoopSettings) -> None:
        self.s = settings

    def train(self, round_dir: Path, init: Path | None, data_url: str | None, steps: int) -> Path:
        """``init`` None trains from scratch (a first release); V-trace needs an ``init``."""
        base = [sys.executable, "-m", "cogbert_cloud.cli", "--log-level", "WARNING", "cloud", "train"]
        current = init
        if data_url and init is not None and self.s.vtrace_epochs > 0:
            out = round_dir / "vtrace"
            self._run(base + ["--data", data_url, "--fleet", self.s.fleet, "--from", str(current), "--out", str(out),
                              "--bits", "32", "--epochs", str(self.s.vtrace_epochs), "--no-progress", *self._lr()])
            current = out / "model-fp32.safetensors"
        out = round_dir / "ppo"
        start = [] if current is None else ["--from", str(current)]
        self._run(base + ["--env", self.s.env, *start, "--out", str(out), "--steps", str(steps),
                          "--no-progress", *self._lr(), *self.s.extra_train_args])
        return out / "model.safetensors"

    def _lr(self) -> list[str]:
        return [] if self.s.lr is None else ["--lr", repr(self.s.lr)]

    @staticmethod
    def _run(cmd: list[str]) -> None:
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise TrainingError(f"training failed ({p.returncode}): {p.stderr.strip()[-800:]}")


class KubernetesJobTrainer:
    """Training as Kubernetes Jobs through ``kubectl``: a V-trace Job on the fleet's data when
    there is some (as :class:`LocalTrainer`), then a PPO Job in simulation. Inputs and outputs
    travel through the object store. The pod is the one in deploy/k8s/jobs/train/job.yaml:
    store settings from the ``cogbert-settings`` ConfigMap, credentials from the
    ``cogbert-store-credentials`` Secret, non-root, read-only root filesystem, bounded
    (tests/test_k8s.py holds the two to the same pod spec). ``image`` is the pods' image:
    ``cogbert cloud serve`` passes its ``image`` setting, which deploy/k8s sets to the
    controller's own image (``COGBERT_SERVE_IMAGE``, filled in by kustomize)."""

    def __init__(self, settings: LoopSettings, store: ObjectStore, *, namespace: str = "cogbert",
                 image: str = "cogbert:latest", kubectl: str = "kubectl") -> None:
        self.s, self.store, self.ns, self.image, self.kubectl = settings, store, namespace, image, kubectl

    def manifest(self, name: str, init_key: str, out_prefix: str, steps: int, *, data_url: str | None = None) -> dict:
        """The Job for one run: V-trace on ``data_url`` when given, else PPO for ``steps``."""
        args = ["cloud", "train", "--from", f"store:{init_key}", "--out", "/work/out", "--store", self.s.store_url,
                "--prefix", out_prefix, "--no-progress"]
        if data_url:
            args += ["--data", data_url, "--fleet", self.s.fleet, "--bits", "32", "--epochs", str(self.s.vtrace_epochs)]
        else:
            args += ["--env", self.s.env, "--steps", str(steps), *self.s.extra_train_args]
        if self.s.lr is not None:
            args += ["--lr", repr(self.s.lr)]
        labels = {"app.kubernetes.io/name": "cogbert-trainer", "app.kubernetes.io/part-of": "cogbert",
                  "cogbert/component": "trainer"}
        return {"apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": name, "namespace": self.ns, "labels": labels},
                "spec": {"backoffLimit": 1, "activeDeadlineSeconds": 86400, "ttlSecondsAfterFinished": 3600,
                         "template": {"metadata": {"labels": labels}, "spec": self._pod(args)}}}

    def _pod(self, args: list[str]) -> dict:
        return {
            "restartPolicy": "Never", "automountServiceAccountToken": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "train", "image": self.image, "command": ["cogbert"], "args": args,
                "env": [{"name": "COGBERT_S3_ENDPOINT", "valueFrom": {"configMapKeyRef": {
                    "name": "cogbert-settings", "key": "s3-endpoint", "optional": True}}}],
                "envFrom": [{"secretRef": {"name": "cogbert-store-credentials"}}],
                "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "6Gi"}},
                "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": [{"name": "work", "mountPath": "/work"}, {"name": "tmp", "mountPath": "/tmp"}]}],
            "volumes": [{"name": "work", "emptyDir": {"sizeLimit": "4Gi"}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}]}

    def train(self, round_dir: Path, init: Path, data_url: str | None, steps: int) -> Path:
        name = f"cogbert-train-{int(time.time())}"
        key = keys.loop_init(name)
        self.store.put(key, init.read_bytes())
        if data_url and self.s.vtrace_epochs > 0:
            self._run(self.manifest(f"{name}-vtrace", key, keys.loop_prefix(name, "vtrace"), steps, data_url=data_url))
            key = keys.loop_model(name, "vtrace")
        self._run(self.manifest(f"{name}-ppo", key, keys.loop_prefix(name, "ppo"), steps))
        out = round_dir / "model.safetensors"
        out.write_bytes(self.store.get(keys.loop_model(name)))
        return out

    def _run(self, job: dict) -> None:
        """Create the Job and wait until it completes, fails (TrainingError at once, with the
        Job's reason) or runs past ``job_timeout`` (deleted, TrainingError). ``kubectl wait
        --for=condition=complete`` alone would sit out its whole timeout after a failure."""
        name = job["metadata"]["name"]
        self._kubectl(["apply", "-f", "-"], input=json.dumps(job))
        deadline = time.monotonic() + self.s.job_timeout
        while True:
            status = json.loads(self._kubectl(["-n", self.ns, "get", f"job/{name}", "-o", "json"]) or "{}")
            for cond in (status.get("status") or {}).get("conditions") or []:
                if cond.get("status") != "True":
                    continue
                if cond.get("type") == "Complete":
                    return
                if cond.get("type") == "Failed":
                    raise TrainingError(f"training Job {name} failed: {cond.get('reason', '')}: "
                                        f"{str(cond.get('message', ''))[:400]}")
            if time.monotonic() >= deadline:
                self._kubectl(["-n", self.ns, "delete", f"job/{name}", "--wait=false"], check=False)
                raise TrainingError(f"training Job {name} did not finish within {self.s.job_timeout:g}s; deleted it")
            time.sleep(min(self.s.job_poll_interval, max(0.0, deadline - time.monotonic())))

    def _kubectl(self, args: list[str], *, input: str | None = None, check: bool = True) -> str:
        p = subprocess.run([self.kubectl, *args], input=input, capture_output=True, text=True, timeout=120)
        if check and p.returncode != 0:
            raise TrainingError(f"kubectl {' '.join(args[:3])} failed ({p.returncode}): {p.stderr.strip()[-400:]}")
        return p.stdout


class KeySigner:
    """Signs with a keys directory (``cogbert keys init``). Run it where the key may live; the
    rollout controller only ever sees what it returns."""

    def __init__(self, keys_dir: Path, model: str, fleet: str, expires: str = "30d") -> None:
        from cogbert_cloud.release.signing import KeyStore, parse_duration
        self._keys, self.model, self.fleet = KeyStore(keys_dir), model, fleet
        self.expires = parse_duration(expires)

    def sign(self, bundle: bytes, counter: int) -> bytes:
        from cogbert_cloud.release.signing import create_release
        return create_release(bundle, self._keys, counter=counter, model=self.model, fleet=self.fleet,
                              expires=self.expires)


class ContinuousLearner:
    def __init__(self, settings: LoopSettings, registry: Registry, controller: RolloutController,
                 trainer: Trainer, signer: Signer, *, gate: Callable[..., dict] | None = None) -> None:
        self.s, self.registry, self.controller = settings, registry, controller
        self.trainer, self.signer = trainer, signer
        self.gate = gate or _default_gate
        self._last_round = 0.0
        self._last_transitions = 0

    def due(self) -> bool:
        stats = ExperienceDataset(self.registry.store, self.s.fleet).stats()
        new = stats["transitions"] - self._last_transitions
        return new >= self.s.min_new_transitions or time.time() - self._last_round >= self.s.interval

    def round(self, *, inject: Callable[[bytes], bytes] | None = None) -> dict:
        """One round; ``inject`` replaces the trained candidate (fault injection for the demo).
        With tracing configured the round is the root span of the release's trace ("release"),
        with train, gate and sign as children; its context is stored with the release, so that
        the rollout's stages, however much later, join the same trace."""
        with trace.span("release", fleet=self.s.fleet) as root:
            result = self._round(inject)
            if root is not None and result.get("release") is not None:
                root.set_attribute("counter", result["release"])
                root.set_attribute("decision", result["decision"])
            return result

    def _round(self, inject: Callable[[bytes], bytes] | None) -> dict:
        t0 = time.time()
        stable = self.registry.stable()
        if stable is None:
            raise RuntimeError("no stable release to improve on")
        self._last_round = time.time()
        self._last_transitions = ExperienceDataset(self.registry.store, self.s.fleet).stats()["transitions"]
        counter = self.registry.next_counter()
        round_dir = Path(self.s.workdir) / f"round-{counter}"
        round_dir.mkdir(parents=True, exist_ok=True)
        init = round_dir / "stable.safetensors"
        stable_bytes, _ = self.registry.files(stable["counter"])
        init.write_bytes(stable_bytes)
        data_url = self.s.store_url
        try:
            with trace.span("release.train", counter=counter, steps=self.s.train_steps):   # training and export
                candidate = self.trainer.train(round_dir, init, data_url, self.s.train_steps).read_bytes()
        except (TrainingError, StoreError, OSError, subprocess.SubprocessError) as e:
            # A failed or refused training run (export's quantization check, a lost Job) ends the
            # round with nothing released; the stable release keeps serving.
            reason = str(e)[-400:]
            self.registry.audit.record("round_failed", counter=counter, stable=stable["counter"], reason=reason)
            event(log, "round_failed", counter=counter, reason=reason)
            return {"release": None, "stable": stable["counter"], "decision": "training_failed", "reason": reason,
                    "gate": None, "injected_fault": False, "train_s": round(time.time() - t0, 1)}
        # A trainer that hands back the stable release trained nothing: its x-train is that
        # release's, not this round's.
        trained = candidate != stable_bytes
        train_info = json.loads(load_bundle(candidate).extra.get("x-train", "{}")) if trained else None
        injected = inject is not None
        if inject is not None:
            candidate = inject(candidate)
            # The canary is what an injected fault tests, so the gate is bypassed; what it would
            # have decided is kept beside, as evidence of the layer the fault skipped.
            # A gate that cannot judge (no logs yet, a store error) must not stop the canary's test.
            try:
                with trace.span("release.gate", counter=counter, bypassed=True):
                    would = self.gate(candidate=candidate, baseline=stable_bytes, data_url=data_url, settings=self.s)
            except CogbertError as e:
                would = {"decision": "error", "reasons": [f"{type(e).__name__}: {e}"[:300]]}
            verdict = {"decision": "promote", "reasons": ["fault injected: the gate is bypassed on purpose"],
                       "bypassed": {"decision": would["decision"], "reasons": would["reasons"]}}
        else:
            with trace.span("release.gate", counter=counter) as g:
                verdict = self.gate(candidate=candidate, baseline=stable_bytes, data_url=data_url, settings=self.s)
                if g is not None:
                    g.set_attribute("decision", str(verdict.get("decision")))
        result = {"release": counter, "stable": stable["counter"], "gate": verdict, "train": train_info,
                  "injected_fault": injected, "train_s": round(time.time() - t0, 1)}
        with trace.span("release.sign", counter=counter):
            manifest = self.signer.sign(candidate, counter)
        if verdict["decision"] != "promote":
            self.registry.add(counter, candidate, manifest, parent_release=stable["counter"], train=train_info,
                              evaluation=verdict, state="candidate")
            self.registry.set_state(counter, "retired",
                                    reason="rejected by the gate: " + "; ".join(verdict["reasons"])[:300])
            result["decision"] = "rejected_by_gate"
            event(log, "round_rejected", counter=counter, reasons=verdict["reasons"])
            return result
        with trace.span("release.sign", counter=counter + 1, rollback=True):
            rollback = self.signer.sign(stable_bytes, counter + 1)
        self.registry.add(counter, candidate, manifest, rollback=rollback, parent_release=stable["counter"],
                          train=train_info, evaluation=verdict)
        if ctx := trace.carrier():
            self.registry.update(counter, trace=ctx)     # the rollout's stages continue this trace
        self.controller.start(counter, actor="loop")
        result["decision"] = "rollout_started"
        event(log, "round_started_rollout", counter=counter, injected=injected)
        return result


def _default_gate(*, candidate: bytes, baseline: bytes, data_url: str, settings: LoopSettings) -> dict:
    from cogbert_cloud.learn.gate import evaluate_candidate
    return evaluate_candidate(load_bundle(candidate), load_bundle(baseline), data_url=data_url, env=settings.env,
                              margin=settings.gate_margin, sim_episodes=settings.gate_sim_episodes,
                              fleet=settings.fleet, horizon=settings.gate_horizon, gamma=settings.gate_gamma)
