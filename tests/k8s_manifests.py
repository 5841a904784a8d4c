"""The Kubernetes manifests under deploy/, loaded once for the tests that check them
(tests/test_k8s.py, tests/test_k8s_network.py), and the lookups they share."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "k8s"
OVERLAYS = DEPLOY / "overlays"
EXAMPLES = BASE / "secrets" / "examples.yaml"
# The oldest Kubernetes these manifests are written for (StatefulSet PVC retention policy is
# beta and on by default from 1.27, Indexed Jobs GA since 1.24) and the newest schema shipped.
VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
CRD_GROUPS = ("monitoring.coreos.com/",)   # no upstream schema: checked by hand in test_k8s.py
SIGNING_NAMESPACE = "cogbert-signing"
SIGNING_KEY_FILES = {"release-key.pem", "root-key.pem"}   # what `cogbert keys init` keeps private
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job", "DaemonSet", "CronJob")


# -- loading --------------------------------------------------------------------------------

def _manifest_files() -> list[Path]:
    files = sorted(p for d in (BASE, OVERLAYS) for p in d.rglob("*.yaml"))
    return [p for p in files if p.name != "kustomization.yaml"]


def _load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


DOCS: list[tuple[Path, dict]] = [(p, d) for p in _manifest_files() for d in _load(p)]
EXAMPLE_DOCS = _load(EXAMPLES)
BASE_KUSTOMIZATION = yaml.safe_load((BASE / "kustomization.yaml").read_text())
BASE_FILES = {BASE / r for r in BASE_KUSTOMIZATION["resources"]}
BASE_DOCS = [d for p, d in DOCS if p in BASE_FILES]


def _name(doc: dict) -> str:
    meta = doc["metadata"]
    return meta.get("name") or meta["generateName"].rstrip("-")


def _ns(doc: dict) -> str:
    return doc["metadata"].get("namespace", "default")


def _find(kind: str, name: str, docs=None) -> dict:
    hits = [d for d in (docs or [d for _, d in DOCS]) if d["kind"] == kind and _name(d) == name]
    assert len(hits) == 1, f"expected one {kind} {name}, found {len(hits)}"
    return hits[0]


def _pod_spec(doc: dict) -> dict:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def _pod_labels(doc: dict) -> dict:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["metadata"].get("labels", {})
    return doc["spec"]["template"]["metadata"].get("labels", {})


def _containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def _loop_job(data_url: str | None = None) -> dict:
    """The trainer Job that `cogbert cloud serve --loop --trainer kubernetes` creates."""
    from cogbert_cloud.loop import KubernetesJobTrainer, LoopSettings
    from cogbert_cloud.store import open_store

    controller = _find("Deployment", "cogbert-controller")
    args = controller["spec"]["template"]["spec"]["containers"][0]["args"]
    ns = args[args.index("--namespace") + 1]
    trainer = KubernetesJobTrainer(LoopSettings(store_url="s3://bucket/prefix"),
                                   open_store("file:///tmp/x"), namespace=ns,
                                   image=args[args.index("--image") + 1])
    return trainer.manifest("cogbert-train-1", "loop/x/init.safetensors", "loop/x", 1000, data_url=data_url)


OUR_WORKLOADS = [d for _, d in DOCS if d["kind"] in WORKLOAD_KINDS]


def _component(doc: dict) -> str:
    return _pod_labels(doc)["cogbert/component"]
