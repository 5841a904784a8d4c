"""The NetworkPolicies of deploy/k8s, evaluated rather than counted: who may reach the broker's
two listeners, the API, the signer, the object store and the distributed trainer's ring. The
evaluator below implements the Kubernetes rules (default allow until a policy selects a pod;
the union of the rules of every policy that does) for the selectors these manifests use, and a
test checks that it is not vacuous."""

from __future__ import annotations

import json
from pathlib import PurePosixPath

from .k8s_manifests import DOCS, OUR_WORKLOADS, _component, _find, _loop_job, _name, _ns, _pod_labels

# -- network policies -----------------------------------------------------------------------

POLICIES = [d for _, d in DOCS if d["kind"] == "NetworkPolicy"]


def _selects(selector: dict, labels: dict) -> bool:
    if not selector.get("matchLabels") and not selector.get("matchExpressions"):
        return True
    ok = selector.get("matchLabels", {}).items() <= labels.items()
    for e in selector.get("matchExpressions", []):
        if e["operator"] == "In":
            ok &= labels.get(e["key"]) in e["values"]
        elif e["operator"] == "NotIn":
            ok &= labels.get(e["key"]) not in e["values"]
        elif e["operator"] == "Exists":
            ok &= e["key"] in labels
        else:
            ok &= e["key"] not in labels
    return ok


def _peer_admits(peer: dict, pod_labels: dict, pod_ns: str, policy_ns: str) -> bool:
    if "ipBlock" in peer:
        return False   # pods are matched by selectors here, never by address
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": pod_ns}):
            return False
    elif pod_ns != policy_ns:
        return False
    return _selects(peer.get("podSelector", {}), pod_labels)


def _port_ok(rule: dict, port: int) -> bool:
    return not rule.get("ports") or any(p.get("port") == port for p in rule["ports"])


def _ingress_allowed(dst: tuple[str, dict], src: tuple[str, dict] | None, port: int) -> bool:
    """Whether src (namespace, pod labels; None: outside the cluster) may open port on dst."""
    dst_ns, dst_labels = dst
    applying = [p for p in POLICIES if _ns(p) == dst_ns and "Ingress" in p["spec"]["policyTypes"]
                and _selects(p["spec"]["podSelector"], dst_labels)]
    if not applying:
        return True
    for p in applying:
        for rule in p["spec"].get("ingress", []):
            if not _port_ok(rule, port):
                continue
            if "from" not in rule:
                return True
            if src is not None and any(_peer_admits(peer, src[1], src[0], dst_ns)
                                       for peer in rule["from"]):
                return True
    return False


def _egress_allowed(src: tuple[str, dict], dst: tuple[str, dict], port: int) -> bool:
    src_ns, src_labels = src
    applying = [p for p in POLICIES if _ns(p) == src_ns and "Egress" in p["spec"]["policyTypes"]
                and _selects(p["spec"]["podSelector"], src_labels)]
    if not applying:
        return True
    return any(_port_ok(rule, port)
               and ("to" not in rule
                    or any(_peer_admits(peer, dst[1], dst[0], src_ns) for peer in rule["to"]))
               for p in applying for rule in p["spec"].get("egress", []))


def _egress_outside(src: tuple[str, dict], port: int) -> bool:
    """Whether src may open port on an address outside the cluster (the object store)."""
    src_ns, src_labels = src
    applying = [p for p in POLICIES if _ns(p) == src_ns and "Egress" in p["spec"]["policyTypes"]
                and _selects(p["spec"]["podSelector"], src_labels)]
    return not applying or any(
        _port_ok(rule, port) and ("to" not in rule or any("ipBlock" in peer for peer in rule["to"]))
        for p in applying for rule in p["spec"].get("egress", []))


def _pods() -> dict[str, tuple[str, dict]]:
    pods = {_component(w): (_ns(w), _pod_labels(w)) for w in OUR_WORKLOADS}
    loop = _loop_job()
    pods["loop-trainer"] = (_ns(loop), loop["spec"]["template"]["metadata"]["labels"])
    return pods


def test_every_namespace_denies_by_default_and_every_pod_has_its_own_policy():
    namespaces = {_ns(w) for w in OUR_WORKLOADS}
    for ns in namespaces:
        deny = [p for p in POLICIES if _ns(p) == ns and p["spec"]["podSelector"] == {}
                and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
                and not p["spec"].get("ingress") and not p["spec"].get("egress")]
        assert deny, f"no default-deny policy in {ns}"
    for name, (ns, labels) in _pods().items():
        own = [p for p in POLICIES if _ns(p) == ns and p["spec"]["podSelector"] != {}
               and _selects(p["spec"]["podSelector"], labels)]
        assert own, f"no NetworkPolicy selects the {name} pods"


def test_only_ingestion_and_the_controller_reach_the_service_listener():
    pods = _pods()
    broker = pods["broker"]
    allowed = {n for n, p in pods.items() if n != "broker" and _ingress_allowed(broker, p, 8884)
               and _egress_allowed(p, broker, 8884)}
    assert allowed == {"ingest", "controller"}
    assert not _ingress_allowed(broker, None, 8884)   # nothing from outside the cluster


def test_devices_reach_the_device_listener_from_anywhere():
    pods = _pods()
    assert _ingress_allowed(pods["broker"], None, 8883)
    assert _ingress_allowed(pods["broker"], pods["sim"], 8883)
    assert _egress_allowed(pods["sim"], pods["broker"], 8883)
    assert not _egress_allowed(pods["sim"], pods["broker"], 8884)


def test_whoever_uses_the_object_store_reaches_it_and_the_broker_reaches_nothing():
    pods = _pods()
    # The simulators download release bundles from presigned store URLs, like real devices.
    for name in ("ingest", "controller", "trainer", "loop-trainer", "trainer-dist", "signer",
                 "sim"):
        assert _egress_outside(pods[name], 443), name
    assert not _egress_outside(pods["broker"], 443)
    assert not any(_egress_allowed(pods["broker"], pod, 443) for pod in pods.values())


def test_the_api_is_reachable_from_the_monitoring_and_ingress_namespaces_only():
    pods = _pods()
    controller = pods["controller"]
    assert _ingress_allowed(controller, ("monitoring", {"app": "prometheus"}), 8080)
    assert _ingress_allowed(controller, ("ingress-nginx", {"app": "ingress-nginx"}), 8080)
    assert not _ingress_allowed(controller, None, 8080)
    for name, pod in pods.items():
        if name != "controller":
            assert not _ingress_allowed(controller, pod, 8080), name
    # Nothing reaches the signer, on any port.
    for name, pod in pods.items():
        assert not _ingress_allowed(pods["signer"], pod, 8080), name
    assert not _ingress_allowed(pods["signer"], None, 443)


def test_ingestion_metrics_are_reachable_from_the_monitoring_namespace_only():
    pods = _pods()
    ingest = pods["ingest"]
    assert _ingress_allowed(ingest, ("monitoring", {"app": "prometheus"}), 9102)
    assert not _ingress_allowed(ingest, ("ingress-nginx", {"app": "ingress-nginx"}), 9102)
    assert not _ingress_allowed(ingest, None, 9102)
    for name, pod in pods.items():
        assert not _ingress_allowed(ingest, pod, 9102), name
    assert not _ingress_allowed(ingest, ("monitoring", {"app": "prometheus"}), 8080)


def test_the_policy_evaluation_is_not_vacuous():
    # Without the broker's policy, the sims could reach the service listener: the evaluator
    # must see that, or the tests above would pass whatever the policies said.
    global POLICIES
    saved = POLICIES
    try:
        POLICIES = [p for p in saved if _name(p) != "broker"]
        pods = _pods()
        assert _ingress_allowed(pods["broker"], pods["sim"], 8884) is False   # default deny remains
        POLICIES = [p for p in saved if _name(p) not in ("broker", "default-deny")]
        assert _ingress_allowed(pods["broker"], pods["sim"], 8884) is True
    finally:
        POLICIES = saved


# -- the distributed trainer ----------------------------------------------------------------

def test_the_distributed_trainer_hostfile_matches_its_indexed_job_and_service():
    job = _find("Job", "cogbert-train-dist")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    pod = spec["template"]["spec"]
    svc = _find("Service", pod["subdomain"])
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"].items() <= _pod_labels(job).items()
    train = next(c for c in pod["containers"] if c["name"] == "train")
    env = {e["name"]: e for e in train["env"]}
    assert env["MLX_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    hostfile = PurePosixPath(env["MLX_HOSTFILE"]["value"])
    mount = next(m for m in train["volumeMounts"]
                 if PurePosixPath(m["mountPath"]) == hostfile.parent)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    cm = _find("ConfigMap", volume["configMap"]["name"])
    ranks = json.loads(cm["data"][hostfile.name])
    port = train["ports"][0]["containerPort"]
    assert ranks == [[f"{_name(job)}-{i}.{pod['subdomain']}:{port}"]
                     for i in range(spec["completions"])]
    assert port in [p["port"] for p in svc["spec"]["ports"]]
    # The ranks may talk to each other on that port, and nobody else may.
    me = (_ns(job), _pod_labels(job))
    assert _ingress_allowed(me, me, port) and _egress_allowed(me, me, port)
    assert not _ingress_allowed(me, _pods()["sim"], port)
    # Every rank runs the same training command (one ring, one model).
    assert train["command"] == ["cogbert"] and train["args"][:2] == ["cloud", "train"]
