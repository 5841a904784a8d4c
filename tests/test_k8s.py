"""The Kubernetes manifests (deploy/k8s, deploy/overlays): valid against the Kubernetes schemas,
consistent with each other and with the code they run, and holding the security properties
docs/operations.md promises. No cluster is needed: everything is checked offline.

- every document validates against the Kubernetes OpenAPI schemas (kubernetes-validate,
  strict: unknown fields fail) for the oldest and the newest version we support, and so does
  what `kubectl kustomize` renders, where kubectl is installed;
- the kustomization lists every manifest of the base, and everything it lists exists; every
  manifest is in some kustomization (the trainer Jobs in their own);
- the image names and tags are set in one place, the image component (deploy/k8s/image), which
  every kustomization uses: every pod, the trainer Jobs included, runs the image it sets, the
  controller gives the Jobs it creates its own image, and no manifest carries a tag of its own;
- only the signer, in its own namespace, mounts the release-signing key; the controller's
  ServiceAccount has no right there and no right to Secrets;
- every container states requests and limits; serving containers have probes; pods run as
  non-root with a read-only root filesystem;
- the controller is one replica, recreated;
- every `cogbert` command line in the manifests (and the trainer Job the learning loop builds)
  is accepted by the real argument parser, with exact flag names;
- the broker's mosquitto.conf and acl are what `cogbert broker config` generates, and every
  file they name is mounted where they say;
- no key or certificate is committed;
- the learning loop's trainer Jobs run V-trace then PPO through the store.

The NetworkPolicies and the distributed trainer's ring: tests/test_k8s_network.py.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path, PurePosixPath

import pytest
import yaml

from .helpers import skip_on_this_machine
from .k8s_manifests import (
    BASE,
    BASE_DOCS,
    BASE_KUSTOMIZATION,
    CRD_GROUPS,
    DEPLOY,
    DOCS,
    EXAMPLE_DOCS,
    EXAMPLES,
    IMAGE_COMPONENT,
    JOBS,
    OUR_WORKLOADS,
    OVERLAYS,
    SIGNING_KEY_FILES,
    SIGNING_NAMESPACE,
    VERSIONS,
    WORKLOAD_KINDS,
    _component_images,
    _containers,
    _find,
    _kustomize,
    _load,
    _loop_job,
    _manifest_files,
    _name,
    _ns,
    _pod_labels,
    _pod_spec,
    _rendered_controller,
    _serve_container,
    _serve_settings,
    kubernetes_validate,
)

# -- schemas and kustomize ------------------------------------------------------------------

@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_manifest_validates_against_the_kubernetes_schemas(path):
    docs = _load(path)
    assert docs, f"{path} holds no document"
    for doc in docs:
        if doc["apiVersion"].startswith(CRD_GROUPS):
            endpoints = {"ServiceMonitor": "endpoints", "PodMonitor": "podMetricsEndpoints"}
            assert doc["kind"] in endpoints and doc["spec"][endpoints[doc["kind"]]], doc
            continue
        for version in VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                where = ".".join(map(str, e.path))
                pytest.fail(f"{path.name}: {doc['kind']}/{_name(doc)} against {version}: "
                            f"{where}: {e.message}")


def test_the_schema_check_refuses_what_kubernetes_would():
    # A misspelt field and a wrong type must fail, or the test above proves nothing.
    good = _find("Deployment", "cogbert-ingest")
    kubernetes_validate.validate(good, VERSIONS[-1], strict=True)
    bad = json.loads(json.dumps(good))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["comand"] = ["true"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)
    bad = json.loads(json.dumps(good))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)


def test_the_kustomization_lists_every_manifest_of_the_base_and_only_existing_files():
    k = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    listed = [BASE / r for r in k["resources"]]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    for p in listed:
        assert p.is_file(), f"kustomization.yaml lists {p.name}, which does not exist"
    on_disk = {p for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml"}
    missing = sorted(on_disk - set(listed))
    assert not missing, f"not in kustomization.yaml: {missing}"
    for gen in k.get("configMapGenerator", []) + k.get("secretGenerator", []):
        for f in gen.get("files", []):
            assert (BASE / f.split("=")[-1]).is_file(), f
    assert "namespace" not in k, "a kustomize namespace would move the signer out of its namespace"
    # Every kustomization under deploy/ (overlays, the trainer Jobs, the image component) lists
    # only what exists, and its components are Components.
    resources: set[Path] = set()
    for kfile in sorted(DEPLOY.rglob("kustomization.yaml")):
        kk = yaml.safe_load(kfile.read_text())
        for r in kk.get("resources", []):
            assert (kfile.parent / r).exists(), f"{kfile} lists {r}, which does not exist"
            resources.add((kfile.parent / r).resolve())
        for c in kk.get("components", []):
            ck = kfile.parent / c / "kustomization.yaml"
            assert ck.is_file(), f"{kfile} uses component {c}, which does not exist"
            assert yaml.safe_load(ck.read_text())["kind"] == "Component", ck
    # Each trainer Job directory is a kustomization of exactly its own files, and every manifest
    # file is in some kustomization (but the examples of the Secrets you create yourself): a
    # file outside one would not get the image component's image.
    for job in JOBS:
        kk = yaml.safe_load((job / "kustomization.yaml").read_text())
        assert sorted(kk["resources"]) == sorted(p.name for p in job.glob("*.yaml")
                                                 if p.name != "kustomization.yaml"), job
    outside = sorted(str(p.relative_to(DEPLOY)) for p in _manifest_files()
                     if p.resolve() not in resources and p != EXAMPLES)
    assert not outside, f"in no kustomization: {outside}"


def test_kustomize_renders_the_base_into_valid_objects_in_the_right_namespaces():
    docs = _kustomize(BASE)
    for doc in docs:
        kubernetes_validate.validate(doc, VERSIONS[-1], strict=True)
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "cogbert", _name(doc)
        if doc["kind"] in WORKLOAD_KINDS:
            assert _pod_labels(doc)["app.kubernetes.io/part-of"] == "cogbert", _name(doc)
    signer = _find("Deployment", "cogbert-signer", docs)
    assert _ns(signer) == SIGNING_NAMESPACE
    # The generated ConfigMap's hashed name is the one the broker mounts.
    config = [d for d in docs if d["kind"] == "ConfigMap"
              and _name(d).startswith("cogbert-broker-config-")]
    assert len(config) == 1
    broker = _find("StatefulSet", "cogbert-broker", docs)
    mounted = [v["configMap"]["name"] for v in _pod_spec(broker)["volumes"] if "configMap" in v]
    assert _name(config[0]) in mounted
    assert config[0]["data"]["mosquitto.conf"] == (BASE / "broker" / "mosquitto.conf").read_text()
    # Same objects as the files list, nothing lost or added.
    rendered = sorted((d["kind"], _name(d)) for d in docs if d is not config[0])
    assert rendered == sorted((d["kind"], _name(d)) for d in BASE_DOCS)


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_kustomize_renders_each_trainer_job_as_its_files_with_only_the_image_set(job):
    docs = _kustomize(job)
    files = [d for r in yaml.safe_load((job / "kustomization.yaml").read_text())["resources"]
             for d in _load(job / r)]
    assert sorted((d["kind"], _name(d)) for d in docs) == sorted((d["kind"], _name(d)) for d in files)
    images = set(_component_images().values())

    def without_images(d: dict) -> dict:
        d = json.loads(json.dumps(d))
        if d["kind"] in WORKLOAD_KINDS:
            for c in _containers(_pod_spec(d)):
                c.pop("image")
        return d

    for doc in docs:
        kubernetes_validate.validate(doc, VERSIONS[-1], strict=True)
        raw = next(f for f in files if (f["kind"], _name(f)) == (doc["kind"], _name(doc)))
        assert without_images(doc) == without_images(raw), f"kustomize changed {doc['kind']}/{_name(doc)}"
        if doc["kind"] in WORKLOAD_KINDS:
            assert {c["image"] for c in _containers(_pod_spec(doc))} <= images, _name(doc)


def test_the_monitoring_overlay_adds_a_service_monitor_that_selects_the_api():
    docs = _kustomize(OVERLAYS / "monitoring")
    sm = _find("ServiceMonitor", "cogbert-controller", docs)
    svc = _find("Service", "cogbert-controller", docs)
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
    assert _ns(svc) in sm["spec"]["namespaceSelector"]["matchNames"]


def test_ingestion_serves_metrics_where_its_annotations_and_pod_monitor_look():
    deployment = _find("Deployment", "cogbert-ingest")
    ingest = _pod_spec(deployment)["containers"][0]
    port = int(ingest["args"][ingest["args"].index("--metrics-port") + 1])
    assert [(p["name"], p["containerPort"]) for p in ingest["ports"]] == [("metrics", port)]
    notes = deployment["spec"]["template"]["metadata"]["annotations"]
    assert (notes["prometheus.io/port"], notes["prometheus.io/path"]) == (str(port), "/metrics")
    monitor = _find("PodMonitor", "cogbert-ingest")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert _ns(deployment) in monitor["spec"]["namespaceSelector"]["matchNames"]
    assert [(e["port"], e["path"]) for e in monitor["spec"]["podMetricsEndpoints"]] == [("metrics", "/metrics")]
    overlay = yaml.safe_load((OVERLAYS / "monitoring" / "kustomization.yaml").read_text())
    assert "podmonitor.yaml" in overlay["resources"]


# -- images: one place for their names and tags ---------------------------------------------

# Every kustomization that renders our pods: the base (the overlays build on it) and the Jobs.
POD_KUSTOMIZATIONS = (BASE, *JOBS, BASE / "decide")   # the decision service has its own


def _rendered_workloads(root: Path = BASE) -> list[dict]:
    """The workloads of every kustomization under ``root`` (deploy/k8s or a copy of it)."""
    return [d for k in POD_KUSTOMIZATIONS for d in _kustomize(root / k.relative_to(BASE))
            if d["kind"] in WORKLOAD_KINDS]


def _images_of(w: dict) -> dict[str, str]:
    return {c["name"]: c["image"] for c in _containers(_pod_spec(w))}


def _expect_images(workloads: list[dict], images: dict[str, str]) -> None:
    """Each container runs the component's image for the bare name its manifest gives."""
    assert sorted((w["kind"], _ns(w), _name(w)) for w in workloads) == \
        sorted((w["kind"], _ns(w), _name(w)) for w in OUR_WORKLOADS), "a workload is in no kustomization"
    for w in workloads:
        raw = _images_of(_find(w["kind"], _name(w)))
        rendered = _images_of(w)
        assert rendered.keys() == raw.keys(), _name(w)
        for c, image in rendered.items():
            assert raw[c] in images, f"{_name(w)}/{c}: {raw[c]} is not an image of the component"
            assert image == images[raw[c]], f"{_name(w)}/{c} runs {image}, not {images[raw[c]]}"
    # The broker runs the broker image; every other pod (the trainer Jobs' too) the cogbert one.
    by_image: dict[str, set[str]] = {}
    for w in workloads:
        for image in _images_of(w).values():
            by_image.setdefault(image, set()).add(_name(w))
    assert by_image.pop(images["cogbert-broker"]) == {"cogbert-broker"}
    assert by_image.keys() == {images["cogbert"]}
    assert {"cogbert-controller", "cogbert-train", "cogbert-train-dist"} <= by_image[images["cogbert"]]


def test_every_pod_runs_the_image_the_image_component_sets():
    images = _component_images()
    assert set(images) == {"cogbert", "cogbert-broker"}
    # Our own names, each with the tag the component gives it (read here, not written twice).
    component = yaml.safe_load((IMAGE_COMPONENT / "kustomization.yaml").read_text())
    tags = {e["name"]: e["newTag"] for e in component["images"]}
    assert images == {name: f"{name}:{tags[name]}" for name in ("cogbert", "cogbert-broker")}
    _expect_images(_rendered_workloads(), images)
    # The overlays render the base's pods with the same images.
    base = {(w["kind"], _name(w)): _images_of(w) for w in _kustomize(BASE) if w["kind"] in WORKLOAD_KINDS}
    for kfile in OVERLAYS.rglob("kustomization.yaml"):
        overlay = {(w["kind"], _name(w)): _images_of(w) for w in _kustomize(kfile.parent)
                   if w["kind"] in WORKLOAD_KINDS}
        assert overlay == base, kfile.parent.name


def test_the_controller_gives_the_jobs_it_creates_its_own_image():
    _kustomize(BASE)   # skips here without kustomize (_rendered_controller would read the file)
    controller = _rendered_controller()
    serve = _serve_container(controller)
    env = {e["name"]: e for e in serve["env"]}
    assert env["COGBERT_SERVE_IMAGE"] == {"name": "COGBERT_SERVE_IMAGE", "value": serve["image"]}
    assert serve["image"] == _component_images()["cogbert"]
    assert "--image" not in serve["args"], "a second source for the Jobs' image"
    # `cogbert cloud serve` reads it as its image setting, and the loop's Jobs run it, as do the
    # Jobs you create from deploy/k8s/jobs.
    assert _serve_settings(controller).image == serve["image"]
    for job in (_loop_job(), _loop_job(data_url="s3://bucket/prefix")):
        assert [c["image"] for c in _containers(_pod_spec(job))] == [serve["image"]]
    for job in JOBS:
        for w in _kustomize(job):
            if w["kind"] in WORKLOAD_KINDS:
                assert set(_images_of(w).values()) == {serve["image"]}, _name(w)
    # Applied without kustomize, the file names the bare image in both places.
    raw = _serve_container(_find("Deployment", "cogbert-controller"))
    assert {e["name"]: e.get("value") for e in raw["env"]}["COGBERT_SERVE_IMAGE"] == raw["image"] == "cogbert"


def test_one_edit_of_the_image_component_moves_every_image(tmp_path):
    _kustomize(BASE)   # skips here without kustomize
    copy = tmp_path / "k8s"
    shutil.copytree(BASE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    new = {"cogbert": "registry.example/cogbert:9.9.9",
           "cogbert-broker": "registry.example/cogbert-broker:9.9.9"}
    if shutil.which("kustomize"):   # what the component's comment tells you to run
        out = subprocess.run(["kustomize", "edit", "set", "image", *(f"{k}={v}" for k, v in new.items())],
                             cwd=copy / "image", capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    else:                           # kubectl's kustomize has no `edit`: edit the file
        kfile = copy / "image" / "kustomization.yaml"
        k = yaml.safe_load(kfile.read_text())
        for e in k["images"]:
            e["newName"], e["newTag"] = new[e["name"]].split(":")
        kfile.write_text(yaml.safe_dump(k))
    assert _component_images(copy / "image") == new
    workloads = _rendered_workloads(copy)
    _expect_images(workloads, new)
    controller = _find("Deployment", "cogbert-controller", workloads)
    env = {e["name"]: e.get("value") for e in _serve_container(controller)["env"]}
    assert env["COGBERT_SERVE_IMAGE"] == new["cogbert"]
    assert [c["image"] for c in _containers(_pod_spec(_loop_job(controller=controller)))] == [new["cogbert"]]
    # Nothing of the old images is left anywhere in what kustomize renders.
    rendered = "".join(yaml.safe_dump_all(_kustomize(copy / k.relative_to(BASE))) for k in POD_KUSTOMIZATIONS)
    for old in _component_images().values():
        assert old not in rendered


def test_no_manifest_names_an_image_tag_of_its_own():
    # The component is the only place: no other kustomization has `images:`, no manifest gives
    # our images a tag or digest (not even in a comment: a copy to keep equal by hand starts as
    # one), and the controller has no --image argument.
    component = IMAGE_COMPONENT / "kustomization.yaml"
    kustomizations = sorted(DEPLOY.rglob("kustomization.yaml"))
    assert component in kustomizations
    for kfile in kustomizations:
        if kfile != component:
            assert "images" not in yaml.safe_load(kfile.read_text()), f"{kfile}: images belong in {component}"
    images = _component_images()
    for w in OUR_WORKLOADS:
        for c, image in _images_of(w).items():
            assert image in images, f"{_name(w)}/{c}: image {image!r}: the bare name, the component tags it"
    tagged = re.compile(r"(?<![\w.-])(?:[\w.-]+(?::\d+)?/)*(?:cogbert|cogbert-broker)(?::\w[\w.-]*|@sha256:)")
    for p in sorted(DEPLOY.rglob("*")):
        if p.suffix in (".yaml", ".yml", ".json") and p != component:
            for n, line in enumerate(p.read_text().splitlines(), 1):
                assert not tagged.search(line), f"{p.relative_to(DEPLOY)}:{n}: {line.strip()}"
    assert "--image" not in _serve_container(_find("Deployment", "cogbert-controller"))["args"]
    # The check finds what it is for.
    for line in ("image: cogbert:0.1.0", "  - registry.example:5000/team/cogbert-broker:1.2",
                 "# keep equal to cogbert@sha256:abc", "- --image=cogbert:latest"):
        assert tagged.search(line), line
    for line in ("image: cogbert", "mqtts://cogbert-broker-services.cogbert.svc:8884",
                 "cogbert/component: trainer", "name: cogbert-broker-config"):
        assert not tagged.search(line), line


# -- secrets and the signing key ------------------------------------------------------------

def _secret_refs(spec: dict) -> set[str]:
    refs = set()
    for v in spec.get("volumes", []):
        if "secret" in v:
            refs.add(v["secret"]["secretName"])
        for src in v.get("projected", {}).get("sources", []):
            if "secret" in src:
                refs.add(src["secret"]["name"])
    for c in _containers(spec):
        for e in c.get("env", []):
            if "secretKeyRef" in e.get("valueFrom", {}):
                refs.add(e["valueFrom"]["secretKeyRef"]["name"])
        for e in c.get("envFrom", []):
            if "secretRef" in e:
                refs.add(e["secretRef"]["name"])
    return refs


def _signing_secrets() -> set[tuple[str, str]]:
    out = set()
    for d in EXAMPLE_DOCS + [d for _, d in DOCS]:
        if d["kind"] == "Secret":
            keys = set(d.get("data", {})) | set(d.get("stringData", {}))
            if keys & SIGNING_KEY_FILES:
                out.add((_ns(d), _name(d)))
    return out


def test_only_the_signer_mounts_the_signing_key_and_it_lives_in_its_own_namespace():
    signing = _signing_secrets()
    assert signing == {(SIGNING_NAMESPACE, "cogbert-release-key")}
    users = {(_ns(w), _name(w)) for w in OUR_WORKLOADS + [_loop_job()]
             if any((_ns(w), s) in signing for s in _secret_refs(_pod_spec(w)))}
    assert users == {(SIGNING_NAMESPACE, "cogbert-signer")}
    controller = _find("Deployment", "cogbert-controller")
    assert _ns(controller) != SIGNING_NAMESPACE
    assert not {s for s in _secret_refs(_pod_spec(controller))} & {n for _, n in signing}
    # The root key never enters the cluster at all.
    for d in EXAMPLE_DOCS:
        if d["kind"] == "Secret":
            assert "root-key.pem" not in set(d.get("stringData", {})) | set(d.get("data", {}))
    # Nothing but the signer runs in the signing namespace.
    assert {_name(w) for w in OUR_WORKLOADS if _ns(w) == SIGNING_NAMESPACE} == {"cogbert-signer"}


def test_the_controller_may_create_jobs_in_its_namespace_and_nothing_more():
    controller = _find("Deployment", "cogbert-controller")
    sa = _pod_spec(controller)["serviceAccountName"]
    subject = {"kind": "ServiceAccount", "name": sa, "namespace": _ns(controller)}
    bindings = [d for _, d in DOCS if d["kind"] in ("RoleBinding", "ClusterRoleBinding")
                and subject in d.get("subjects", [])]
    assert bindings
    assert all(b["kind"] == "RoleBinding" and _ns(b) == _ns(controller) for b in bindings)
    verbs_on_jobs = set()
    for b in bindings:
        assert b["roleRef"]["kind"] == "Role"
        role = _find("Role", b["roleRef"]["name"])
        assert _ns(role) == _ns(controller)
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
            forbidden = {"secrets", "serviceaccounts", "roles", "rolebindings"}
            assert not forbidden & set(rule["resources"]), rule
            if "batch" in rule["apiGroups"] and "jobs" in rule["resources"]:
                verbs_on_jobs |= set(rule["verbs"])
    # What loop.py's kubectl apply and kubectl wait need.
    assert {"get", "list", "watch", "create", "patch"} <= verbs_on_jobs
    # The loop creates its Jobs where the Role is.
    assert _ns(_loop_job()) == _ns(controller)
    # Only the controller talks to the API server.
    for w in OUR_WORKLOADS:
        if w is not controller:
            assert _pod_spec(w).get("automountServiceAccountToken") is False, _name(w)


def _ref_map(docs: list[dict]) -> dict[tuple[str, str, str], set[str]]:
    """{(kind, namespace, name): keys} of every ConfigMap and Secret defined."""
    out = {}
    for d in docs:
        if d["kind"] in ("ConfigMap", "Secret"):
            keys = {k for field in ("data", "stringData", "binaryData") for k in d.get(field, {})}
            out[(d["kind"], _ns(d), _name(d))] = keys
    for gen in BASE_KUSTOMIZATION.get("configMapGenerator", []):
        out[("ConfigMap", gen["namespace"], gen["name"])] = {Path(f).name for f in gen["files"]}
    return out


def test_every_secret_and_config_map_a_pod_needs_is_defined_or_described():
    defined = _ref_map([d for _, d in DOCS] + EXAMPLE_DOCS)
    for w in OUR_WORKLOADS:
        ns, spec = _ns(w), _pod_spec(w)
        needs: list[tuple[str, str, str | None, bool]] = []
        for v in spec.get("volumes", []):
            for kind, src, field in (("Secret", v.get("secret"), "secretName"),
                                     ("ConfigMap", v.get("configMap"), "name")):
                if src:
                    items = [(kind, src[field], it["key"], False) for it in src.get("items", [])]
                    needs += items or [(kind, src[field], None, False)]
            for s in v.get("projected", {}).get("sources", []):
                for kind, key in (("Secret", "secret"), ("ConfigMap", "configMap")):
                    if key in s:
                        needs += [(kind, s[key]["name"], it["key"], False)
                                  for it in s[key].get("items", [])]
        for c in _containers(spec):
            for e in c.get("env", []):
                for kind, key in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                    ref = e.get("valueFrom", {}).get(key)
                    if ref:
                        needs.append((kind, ref["name"], ref["key"], ref.get("optional", False)))
            for e in c.get("envFrom", []):
                for kind, key in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
                    if key in e:
                        needs.append((kind, e[key]["name"], None, False))
        for kind, name, key, optional in needs:
            assert (kind, ns, name) in defined, f"{_name(w)} needs {kind} {ns}/{name}: undefined"
            if key is not None and not optional:
                assert key in defined[(kind, ns, name)], f"{_name(w)} needs {key} of {kind} {name}"


def test_no_key_or_certificate_is_committed_under_deploy():
    pem = re.compile(r"-----BEGIN [A-Z ]+-----")
    for p in DEPLOY.rglob("*"):
        if p.is_file():
            assert not pem.search(p.read_text(errors="replace")), f"{p} holds a PEM block"
    for d in EXAMPLE_DOCS:
        data = d.get("data", {})
        plain = {**d.get("stringData", {}), **(data if d["kind"] == "ConfigMap" else {})}
        encoded = {**d.get("binaryData", {}), **(data if d["kind"] == "Secret" else {})}
        for key, value in plain.items():
            assert value == "" or value.startswith("<"), f"{_name(d)}/{key} is not a placeholder"
        for key, value in encoded.items():
            assert base64.b64decode(value).startswith(b"<placeholder"), f"{_name(d)}/{key}"


# -- pods -----------------------------------------------------------------------------------

_UNITS = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _quantity(q: str | int) -> float:
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(q))
    assert m and m.group(2) in _UNITS, q
    return float(m.group(1)) * _UNITS[m.group(2)]


def test_every_container_has_requests_and_limits():
    for w in OUR_WORKLOADS + [_loop_job()]:
        for c in _containers(_pod_spec(w)):
            res = c.get("resources", {})
            for r in ("cpu", "memory"):
                where = f"{_name(w)}/{c['name']}: {r}"
                assert r in res.get("requests", {}) and r in res.get("limits", {}), where
                assert _quantity(res["requests"][r]) <= _quantity(res["limits"][r]), where


def test_serving_containers_have_readiness_and_liveness_probes():
    for w in OUR_WORKLOADS:
        if w["kind"] in ("Job", "CronJob"):
            continue   # a batch run serves nothing for long; activeDeadlineSeconds bounds it
        for c in _pod_spec(w)["containers"]:
            if c.get("ports"):
                assert "readinessProbe" in c and "livenessProbe" in c, f"{_name(w)}/{c['name']}"
    # Ingestion serves only /metrics and is watched through the stats file it is told to write.
    ingest = _pod_spec(_find("Deployment", "cogbert-ingest"))["containers"][0]
    stats = ingest["args"][ingest["args"].index("--stats-file") + 1]
    for probe in ("readinessProbe", "livenessProbe"):
        assert stats in " ".join(ingest[probe]["exec"]["command"])
    assert any(m["mountPath"] == str(PurePosixPath(stats).parent) for m in ingest["volumeMounts"])
    # The controller: liveness on /health, readiness on /ready, on the port it serves.
    serve = _pod_spec(_find("Deployment", "cogbert-controller"))["containers"][0]
    port = int(serve["args"][serve["args"].index("--port") + 1])
    assert [p["containerPort"] for p in serve["ports"]] == [port]
    assert serve["livenessProbe"]["httpGet"]["path"] == "/health"
    assert serve["readinessProbe"]["httpGet"]["path"] == "/ready"


def test_the_ingest_probe_command_tells_a_fresh_stats_file_from_a_stale_or_missing_one(tmp_path):
    # Run the probe's shell command against real files: it must pass only on a fresh one.
    import os
    import time
    if subprocess.run(["stat", "-c", "%Y", "/"], capture_output=True).returncode != 0:
        skip_on_this_machine("run GNU stat, as the Debian-based image the probe runs in does")
    ingest = _pod_spec(_find("Deployment", "cogbert-ingest"))["containers"][0]
    cmd = ingest["livenessProbe"]["exec"]["command"]
    stats = ingest["args"][ingest["args"].index("--stats-file") + 1]
    f = tmp_path / "stats.json"
    local = [part.replace(stats, str(f)) for part in cmd]
    assert subprocess.run(local).returncode != 0           # missing
    f.write_text("{}")
    assert subprocess.run(local).returncode == 0           # fresh
    old = time.time() - 120
    os.utime(f, (old, old))
    assert subprocess.run(local).returncode != 0           # stale
    # Readiness also needs the broker link up, as the service writes it.
    ready = [part.replace(stats, str(f)) for part in ingest["readinessProbe"]["exec"]["command"]]
    for connected, code in ((True, 0), (False, 1)):
        f.write_text(json.dumps({"accepted": 3, "link": "connected" if connected else "backoff",
                                 "connected": connected}))
        assert (subprocess.run(ready).returncode != 0) == bool(code), connected


def test_pods_run_as_non_root_with_a_read_only_root_filesystem():
    for w in OUR_WORKLOADS + [_loop_job()]:
        spec = _pod_spec(w)
        sc = spec.get("securityContext", {})
        assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 1) != 0, _name(w)
        assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", _name(w)
        for c in _containers(spec):
            csc = c.get("securityContext", {})
            assert csc.get("allowPrivilegeEscalation") is False, f"{_name(w)}/{c['name']}"
            assert csc.get("readOnlyRootFilesystem") is True, f"{_name(w)}/{c['name']}"
            assert csc.get("capabilities", {}).get("drop") == ["ALL"], f"{_name(w)}/{c['name']}"
            assert "privileged" not in csc and "runAsUser" not in csc, f"{_name(w)}/{c['name']}"


def test_the_loop_creates_the_trainer_pod_of_the_job_manifest():
    # The Jobs the learning loop creates and deploy/k8s/jobs/train/job.yaml run the same pod
    # (security, store settings and credentials, volumes, resources); only what to train differs.
    static = _pod_spec(_find("Job", "cogbert-train", _load(BASE / "jobs" / "train" / "job.yaml")))
    for job in (_loop_job(), _loop_job(data_url="s3://bucket/prefix")):
        pod = _pod_spec(job)
        assert {k: v for k, v in pod.items() if k != "containers"} == \
            {k: v for k, v in static.items() if k != "containers"}
        # The loop passes the store URL it knows as --store; the rest of the environment is shared.
        assert _env(pod) == {k: v for k, v in _env(static).items() if k != "COGBERT_STORE"}
        assert pod["containers"][0]["envFrom"] == static["containers"][0]["envFrom"]
        assert pod["containers"][0]["securityContext"] == static["containers"][0]["securityContext"]
        assert pod["containers"][0]["resources"] == static["containers"][0]["resources"]
        assert pod["containers"][0]["volumeMounts"] == static["containers"][0]["volumeMounts"]
    vtrace = _loop_job(data_url="s3://bucket/prefix")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--data" in vtrace and "--env" not in vtrace and vtrace[vtrace.index("--bits") + 1] == "32"


def _env(pod: dict) -> dict[str, dict]:
    return {e["name"]: e for c in pod["containers"] for e in c.get("env", [])}


def test_the_controller_is_one_replica_recreated_never_rolled():
    controller = _find("Deployment", "cogbert-controller")
    assert controller["spec"]["replicas"] == 1
    assert controller["spec"]["strategy"] == {"type": "Recreate"}
    assert not [d for _, d in DOCS if d["kind"] == "HorizontalPodAutoscaler"
                and d["spec"]["scaleTargetRef"]["name"] == "cogbert-controller"]
    # It resumes its own MQTT session: a fixed client id, not one per pod.
    args = _pod_spec(controller)["containers"][0]["args"]
    assert "$(" not in args[args.index("--client-id") + 1]


def test_ingestion_scales_on_cpu_with_a_client_id_per_pod():
    hpa = _find("HorizontalPodAutoscaler", "cogbert-ingest")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                            "name": "cogbert-ingest"}
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    c = _pod_spec(_find("Deployment", "cogbert-ingest"))["containers"][0]
    assert "$(POD_NAME)" in c["args"][c["args"].index("--client-id") + 1]
    pod_name = [e for e in c["env"] if e["name"] == "POD_NAME"]
    assert pod_name[0]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


# -- the files each process reads -----------------------------------------------------------

def _provided_files(spec: dict, container: dict) -> set[str]:
    """Absolute paths of the files that ConfigMap/Secret items put into this container."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    out = set()
    for m in container.get("volumeMounts", []):
        v = volumes.get(m["name"], {})   # {}: a volumeClaimTemplate
        sources = v.get("projected", {}).get("sources", [])
        sources += [{"secret": v["secret"]}] if "secret" in v else []
        sources += [{"configMap": v["configMap"]}] if "configMap" in v else []
        for s in sources:
            for src in s.values():
                for it in src.get("items", []):
                    out.add(str(PurePosixPath(m["mountPath"]) / it["path"]))
    return out


def _arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_each_service_finds_its_identity_where_its_pki_flag_points():
    for name, identity_default in (("cogbert-ingest", "ingest"), ("cogbert-controller", "rollout")):
        w = _find("Deployment", name)
        spec = _pod_spec(w)
        c = spec["containers"][0]
        pki = PurePosixPath(_arg(c["args"], "--pki"))
        identity = _arg(c["args"], "--identity") if "--identity" in c["args"] else identity_default
        need = {str(pki / "ca.pem"), str(pki / "services" / identity / "cert.pem"),
                str(pki / "services" / identity / "key.pem")}
        assert need <= _provided_files(spec, c), f"{name}: no {need - _provided_files(spec, c)}"
    signer = _find("Deployment", "cogbert-signer")
    c = _pod_spec(signer)["containers"][0]
    key = str(PurePosixPath(_arg(c["args"], "--keys")) / "private" / "release-key.pem")
    assert key in _provided_files(_pod_spec(signer), c)


def _load_render():
    path = BASE / "broker" / "render.py"
    spec = importlib.util.spec_from_file_location("cogbert_k8s_render", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_broker_config_is_what_cogbert_broker_config_generates(tmp_path):
    from cogbert_cloud.fleet.pki import PKI
    pki = PKI.init(tmp_path / "pki")
    pki.issue_server(["cogbert-broker-devices.cogbert.svc"])
    pki.issue_service("ingest")
    pki.issue_service("rollout")
    rendered = _load_render().render(tmp_path / "pki")
    for name, text in rendered.items():
        assert (BASE / "broker" / name).read_text() == text, \
            f"deploy/k8s/broker/{name} is not the generator's: run deploy/k8s/broker/render.py"
    assert str(tmp_path) not in rendered["mosquitto.conf"]


def test_every_file_the_broker_config_names_is_mounted_there():
    conf = (BASE / "broker" / "mosquitto.conf").read_text()
    broker = _find("StatefulSet", "cogbert-broker")
    spec = _pod_spec(broker)
    c = spec["containers"][0]
    provided = _provided_files(spec, c)
    files = re.findall(r"(?m)^(?:cafile|certfile|keyfile|crlfile|plugin_opt_revoked_file) (\S+)$",
                       conf)
    assert len(files) >= 5
    assert set(files) <= provided, set(files) - provided
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    acl = re.search(r"(?m)^acl_file (\S+)$", conf).group(1)
    assert str(PurePosixPath(acl).parent) in mounts
    data = re.search(r"(?m)^persistence_location (\S+)$", conf).group(1).rstrip("/")
    assert data in mounts and not mounts[data].get("readOnly")
    claims = {t["metadata"]["name"] for t in broker["spec"]["volumeClaimTemplates"]}
    assert mounts[data]["name"] in claims   # persistence on the StatefulSet's own volume
    plugin = re.search(r"(?m)^plugin (\S+)$", conf).group(1)
    assert plugin in (DEPLOY / "docker" / "Dockerfile.broker").read_text()
    assert c["command"][-1] == str(PurePosixPath(acl).parent / "mosquitto.conf")
    # The two listeners are the two container ports the Services point at.
    listeners = {int(p) for p in re.findall(r"(?m)^listener (\d+) ", conf)}
    assert listeners == {p["containerPort"] for p in c["ports"]}


# -- services and URLs ----------------------------------------------------------------------

def test_services_select_pods_and_name_ports_they_have():
    workloads = OUR_WORKLOADS
    for svc in [d for _, d in DOCS if d["kind"] == "Service"]:
        sel = svc["spec"]["selector"]
        targets = [w for w in workloads
                   if _ns(w) == _ns(svc) and sel.items() <= _pod_labels(w).items()]
        assert targets, f"Service {_name(svc)} selects no pod"
        for port in svc["spec"].get("ports", []):
            t = port.get("targetPort", port["port"])
            for w in targets:
                ports = [p for c in _pod_spec(w)["containers"] for p in c.get("ports", [])]
                assert any(p.get("name") == t or p["containerPort"] == t for p in ports), \
                    (_name(svc), t)


def _expanded_args(w: dict, c: dict) -> list[str]:
    """command[1:] + args with $(VAR) replaced as the kubelet would, by values from this repo."""
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "configMapKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["configMapKeyRef"]
            cms = [d for _, d in DOCS if d["kind"] == "ConfigMap" and _name(d) == ref["name"]
                   and _ns(d) == _ns(w)]
            value = cms[0]["data"].get(ref["key"]) if cms else "value-from-config-map"
            if value is not None:   # an optional key that is absent leaves the variable unset
                env[e["name"]] = value
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = f"{_name(w)}-0"   # metadata.name of a pod of this workload
        else:
            env[e["name"]] = "value-from-secret"

    def sub(m: re.Match) -> str:
        assert m.group(1) in env, f"{_name(w)}/{c['name']}: $({m.group(1)}) is not in its env"
        return env[m.group(1)]

    argv = c["command"][1:] + c.get("args", [])
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, a) for a in argv]


def _cogbert_containers() -> list[tuple[dict, dict]]:
    out = [(w, c) for w in OUR_WORKLOADS + [_loop_job()] for c in _containers(_pod_spec(w))
           if c.get("command", [""])[0] == "cogbert"]
    return out


def test_services_reach_the_broker_at_a_service_that_exposes_that_port():
    for w, c in _cogbert_containers():
        argv = _expanded_args(w, c)
        if "--broker" not in argv:
            continue
        url = re.fullmatch(r"mqtts://([^:/]+):(\d+)", _arg(argv, "--broker"))
        assert url, _arg(argv, "--broker")
        host, port = url.group(1), int(url.group(2))
        name, ns = host.split(".")[0], host.split(".")[1]
        svc = _find("Service", name)
        assert _ns(svc) == ns and port in [p["port"] for p in svc["spec"]["ports"]], (host, port)


# -- the CLI --------------------------------------------------------------------------------

def _leaf_parser(parser: argparse.ArgumentParser,
                 argv: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The subparser that handles ``argv`` and the arguments left for it."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            return parser, argv
        i = next(i for i, a in enumerate(argv) if not a.startswith("-"))
        parser, argv = subs[0].choices[argv[i]], argv[i + 1:]


SETTINGS = {("cloud", "ingest"): ("cogbert_cloud.data.ingest", "IngestSettings", "INGEST_"),
            ("cloud", "serve"): ("cogbert_cloud.service.serve", "ServeSettings", "SERVE_"),
            ("device", "simulate"): ("cogbert_cloud.fleet.simulate", "SimulateSettings", "SIM_")}


def test_every_cogbert_command_line_is_accepted_by_the_cli(capsys):
    import importlib

    from cogbert_cloud.cli import build_parser
    from cogbert_edge.config import from_args

    seen = set()
    for w, c in _cogbert_containers():
        argv = _expanded_args(w, c)
        where = f"{_name(w)}/{c['name']}: cogbert {' '.join(argv)}"
        parser = build_parser()
        try:
            ns = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}\n{capsys.readouterr().err}")
        # Exact flag names: argparse would also take an abbreviation, which a later flag could
        # make ambiguous.
        leaf, rest = _leaf_parser(build_parser(), argv)
        known = {s for a in leaf._actions for s in a.option_strings}
        for tok in rest:
            if tok.startswith("--"):
                assert tok.split("=")[0] in known, f"{where}: {tok} is not a flag of this command"
        key = tuple(a for a in argv if not a.startswith("-"))[:2]
        if key in SETTINGS:
            mod, cls, prefix = SETTINGS[key]
            # The typed values (ints, floats, booleans), as the command would read them.
            from_args(getattr(importlib.import_module(mod), cls), ns, env_prefix=prefix)
        seen.add(key)
    assert {("cloud", "ingest"), ("cloud", "serve"), ("release", "signer"), ("cloud", "train"),
            ("device", "simulate")} <= seen


def test_the_cli_check_catches_an_invented_flag(capsys):
    from cogbert_cloud.cli import build_parser
    with pytest.raises(SystemExit):
        build_parser().parse_args(["cloud", "ingest", "--replicas", "2"])
    leaf, rest = _leaf_parser(build_parser(), ["cloud", "ingest", "--client", "x"])
    assert "--client" not in {s for a in leaf._actions for s in a.option_strings}


def test_the_loop_trainer_runs_vtrace_then_ppo_jobs_through_the_store(tmp_path):
    # A stand-in kubectl: `apply` records the Job; `get` plays the Job by writing the bundle its
    # args say it exports (PREFIX/model.safetensors in the store) after checking its input exists,
    # and reports it Complete.
    from cogbert_cloud.data.store import open_store
    from cogbert_cloud.service.loop import KubernetesJobTrainer, LoopSettings

    store_url = f"file://{tmp_path / 'store'}"
    fake = tmp_path / "kubectl"
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, sys
        from pathlib import Path
        from cogbert_cloud.data.store import open_store
        jobs = Path({str(tmp_path / 'jobs')!r})
        jobs.mkdir(exist_ok=True)
        if sys.argv[1] == "apply":
            job = json.load(sys.stdin)
            (jobs / (job["metadata"]["name"] + ".json")).write_text(json.dumps(job))
        elif "get" in sys.argv:
            name = sys.argv[sys.argv.index("get") + 1].split("/", 1)[1]
            pod = json.loads((jobs / (name + ".json")).read_text())["spec"]["template"]["spec"]
            args = pod["containers"][0]["args"]
            store = open_store(args[args.index("--store") + 1])
            src = store.get(args[args.index("--from") + 1][len("store:"):])
            store.put(args[args.index("--prefix") + 1] + "/model.safetensors", src + name.encode())
            print(json.dumps({{"status": {{"conditions": [{{"type": "Complete", "status": "True"}}]}}}}))
        """))
    fake.chmod(0o755)
    trainer = KubernetesJobTrainer(LoopSettings(store_url=store_url, fleet="plant"), open_store(store_url),
                                   kubectl=str(fake))
    init = tmp_path / "init.safetensors"
    init.write_bytes(b"stable")
    (tmp_path / "round").mkdir()
    out = trainer.train(tmp_path / "round", init, "file:///data", 5000)
    jobs = sorted((tmp_path / "jobs").glob("*.json"))
    assert [j.stem.rsplit("-", 1)[1] for j in jobs] == ["ppo", "vtrace"]
    name = jobs[0].stem.rsplit("-", 1)[0]
    # The PPO Job started from what the V-trace Job exported, which started from the stable bundle.
    assert out.read_bytes() == b"stable" + f"{name}-vtrace".encode() + f"{name}-ppo".encode()


def _recorded_kubectl(tmp_path: Path, conditions: list[dict]) -> Path:
    """A stand-in kubectl that records every call and reports the Job with ``conditions``."""
    fake = tmp_path / "kubectl"
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, sys
        with open({str(tmp_path / 'calls')!r}, "a") as f:
            f.write(" ".join(sys.argv[1:]) + "\\n")
        if "get" in sys.argv:
            print(json.dumps({{"status": {{"conditions": {json.dumps(conditions)}}}}}))
        """))
    fake.chmod(0o755)
    return fake


def _trainer(tmp_path: Path, kubectl: Path, **settings):
    from cogbert_cloud.data.store import open_store
    from cogbert_cloud.service.loop import KubernetesJobTrainer, LoopSettings
    url = f"file://{tmp_path / 'store'}"
    return KubernetesJobTrainer(LoopSettings(store_url=url, job_poll_interval=0.05, **settings), open_store(url),
                                kubectl=str(kubectl))


def test_a_failed_training_job_ends_the_wait_at_once_with_its_reason(tmp_path):
    from cogbert_cloud.errors import TrainingError
    fake = _recorded_kubectl(tmp_path, [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                         "message": "Job has reached the specified backoff limit"}])
    init = tmp_path / "init.safetensors"
    init.write_bytes(b"stable")
    with pytest.raises(TrainingError, match="BackoffLimitExceeded"):
        _trainer(tmp_path, fake, job_timeout=3600).train(tmp_path, init, None, 1000)
    # One look at the Job, not an hour of polling: the wait ended when it failed.
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0].startswith("apply") and sum("get job/" in c for c in calls) == 1


def test_a_training_job_that_never_finishes_is_deleted_after_the_timeout(tmp_path):
    from cogbert_cloud.errors import TrainingError
    fake = _recorded_kubectl(tmp_path, [{"type": "Complete", "status": "False"}])
    init = tmp_path / "init.safetensors"
    init.write_bytes(b"stable")
    with pytest.raises(TrainingError, match="did not finish within 0.3s"):
        _trainer(tmp_path, fake, job_timeout=0.3).train(tmp_path, init, None, 1000)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert sum("get job/" in c for c in calls) >= 2 and calls[-1].split()[2:4] == ["delete", calls[1].split()[3]]
